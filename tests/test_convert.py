"""optiq convert end to end on tiny random models, and its bad-input paths."""

import json
import subprocess
import sys

import pytest

from optiq.cli import main as cli
from optiq.plan import layer_cost_bits
from optiq.quantize import plan_quantization
from optiq.records import BitPlan, Candidate, QuantizedWeights, SensitivityTable

FAST = ["--n-calibration", "3", "--seq-len", "32", "--n-eval", "2", "--kl-stride", "2", "--quiet"]

LOAD_WITHOUT_OPTIQ = """
import json, sys
import mlx.core as mx
from mlx_lm import load
model, tok = load(sys.argv[1])
assert not any(m.startswith("optiq") for m in sys.modules), "optiq was imported"
ids = tok.encode("The quick brown fox")
out = model(mx.array([ids]))
mx.eval(out)
layers = {p: (m.bits, m.group_size) for p, m in model.named_modules() if hasattr(m, "bits")}
print(json.dumps({"shape": list(out.shape), "layers": layers}))
"""


def run_convert(args):
    return cli(["convert", *args])


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_5", "gemma3_text"])
def test_convert_writes_a_model_stock_mlx_lm_loads(model_factory, tmp_path, arch):
    src = model_factory(arch)
    out = tmp_path / "out"
    assert run_convert([str(src), "-o", str(out), "--target-bpw", "4.5", "--group-size", "32", *FAST]) == 0
    meta = json.loads((out / "optiq_metadata.json").read_text())
    plan = BitPlan.from_dict(meta["plan"])
    table = SensitivityTable.from_dict(meta["sensitivity"])
    assert plan.effective_bpw <= 4.5 + 1e-9
    assert meta["measured"]["kl_mean"] >= 0 and "baseline" in meta["measured"]
    assert 0 < meta["convert_seconds"] < 600  # what the conversion cost, kept beside what it measured
    # config.json carries mlx-lm's own per-layer entries
    config = json.loads((out / "config.json").read_text())
    for path, cand in plan.assignments:
        assert config["quantization"][path] == {"group_size": cand.group_size, "bits": cand.bits, "mode": "affine"}
    # the plan alone says the same config, with no model (what a plan made elsewhere is timed by)
    assert plan_quantization(plan) == config["quantization"] == config["quantization_config"]
    # stock mlx-lm, in a fresh interpreter with no optiq import, opens it as planned
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_OPTIQ, str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for path, cand in plan.assignments:
        assert loaded["layers"][path] == [cand.bits, cand.group_size]
    # the plan's bpw is the layers' true storage
    n = {l.path: l.n_params for l in table.layers}
    bits = sum(layer_cost_bits(n[p], c) for p, c in plan.assignments)
    assert bits / sum(n[p] for p, _ in plan.assignments) == pytest.approx(plan.effective_bpw)


def test_plan_uses_the_budget_better_than_uniform(model_factory, tmp_path):
    """At the uniform 4-bit budget the exact plan's predicted KL is never worse,
    and the written model's measured KL is reported against it."""
    src = model_factory("llama")
    out = tmp_path / "out"
    assert run_convert([str(src), "-o", str(out), "--target-bpw", "5.0", "--group-size", "32", "--measure", "all", *FAST]) == 0
    meta = json.loads((out / "optiq_metadata.json").read_text())
    table = SensitivityTable.from_dict(meta["sensitivity"])
    uniform4 = sum(l.kl_of(Candidate(4, 32)) for l in table.layers)
    assert meta["plan"]["predicted_kl"] <= uniform4 + 1e-12
    assert meta["measured"]["baseline"]["effective_bpw"] == pytest.approx(5.0)


def test_sensitivity_reuse_and_greedy(model_factory, tmp_path):
    src = model_factory("qwen3")
    first = tmp_path / "a"
    assert run_convert([str(src), "-o", str(first), "--group-size", "32", "--no-eval", *FAST]) == 0
    table_file = tmp_path / "table.json"
    table_file.write_text(json.dumps(json.loads((first / "optiq_metadata.json").read_text())["sensitivity"]))
    second = tmp_path / "b"
    assert run_convert([str(src), "-o", str(second), "--sensitivity", str(table_file), "--method", "greedy", "--group-size", "32", "--no-eval", *FAST]) == 0
    plan = json.loads((second / "optiq_metadata.json").read_text())["plan"]
    assert plan["method"] == "greedy"
    # a converted model's folder names the table it was planned from
    third = tmp_path / "c"
    assert run_convert([str(src), "-o", str(third), "--sensitivity", str(first), "--group-size", "32", "--no-eval", *FAST]) == 0
    assert json.loads((third / "optiq_metadata.json").read_text())["sensitivity"] == json.loads(table_file.read_text())


def test_protect_keeps_head_and_embedding_high(model_factory, tmp_path):
    src = model_factory("qwen3")
    out = tmp_path / "p"
    assert run_convert([str(src), "-o", str(out), "--group-size", "32", "--protect", "embed,lm_head", "--protect-bits", "8", "--target-bpw", "5", "--no-eval", *FAST]) == 0
    plan = BitPlan.from_dict(json.loads((out / "optiq_metadata.json").read_text())["plan"]).as_dict()
    assert plan["lm_head"].bits == 8 and plan["model.embed_tokens"].bits == 8


def test_group_sizes_make_per_layer_group_choices(model_factory, tmp_path):
    src = model_factory("llama")
    out = tmp_path / "g"
    assert run_convert([str(src), "-o", str(out), "--group-sizes", "32,64", "--candidate-bits", "3,4", "--target-bpw", "4.0", "--no-eval", *FAST]) == 0
    table = SensitivityTable.from_dict(json.loads((out / "optiq_metadata.json").read_text())["sensitivity"])
    assert {c.group_size for c in table.layers[1].candidates} == {32, 64}


def expect_error(capsys, args, words):
    with pytest.raises(SystemExit) as exc:
        run_convert(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert all(w in err for w in words), err
    return err


def test_bad_input_exits_2_with_a_reason_and_writes_nothing(model_factory, tmp_path, capsys):
    src = str(model_factory("llama"))
    out = tmp_path / "never"
    expect_error(capsys, [str(tmp_path / "missing"), "-o", str(out), *FAST], ["not found"])
    expect_error(capsys, [src, "-o", str(out), "--target-bpw", "1.0", *FAST], ["below the cheapest"])
    expect_error(capsys, [src, "-o", str(out), "--candidate-bits", "7", *FAST], ["candidate-bits"])
    expect_error(capsys, [src, "-o", str(out), "--group-size", "48", *FAST], ["group size"])
    expect_error(capsys, [src, "-o", str(out), "--calibration", str(tmp_path / "nope.txt"), *FAST], ["calibration"])
    expect_error(capsys, [src, "-o", "/proc/optiq-out", *FAST], ["cannot write"])
    # Detection: no quantized convolution in MLX, so nothing yolo-mlx could open; refused with that reason.
    expect_error(capsys, [src, "-o", str(out), "--model-type", "yolo", *FAST], ["no quantized convolution"])
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    expect_error(capsys, [str(weird), "-o", str(out), *FAST], ["no model*.safetensors"])
    import mlx.core as mx

    mx.save_safetensors(str(weird / "model.safetensors"), {"x": mx.zeros(1)})
    expect_error(capsys, [str(weird), "-o", str(out), *FAST], ["no_such_arch"])
    assert not out.exists()
    exists = tmp_path / "exists"
    exists.mkdir()
    expect_error(capsys, [src, "-o", str(exists), *FAST], ["exists", "--force"])
    assert list(exists.iterdir()) == []
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_force_replaces_an_existing_output(model_factory, tmp_path):
    src = str(model_factory("llama"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert run_convert([src, "-o", str(out), "--force", "--group-size", "32", "--no-eval", *FAST]) == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()


def test_quantized_input_is_a_dequantized_reference(model_factory, tmp_path):
    """An already-quantized MLX model converts again; the table says its reference is dequantized."""
    src = str(model_factory("llama"))
    first = tmp_path / "q"
    assert run_convert([src, "-o", str(first), "--group-size", "32", "--target-bpw", "6", "--no-eval", *FAST]) == 0
    again = tmp_path / "qq"
    assert run_convert([str(first), "-o", str(again), "--group-size", "32", "--target-bpw", "4.5", "--no-eval", *FAST]) == 0
    meta = json.loads((again / "optiq_metadata.json").read_text())
    assert meta["reference"] == "dequantized"
    assert meta["sensitivity"]["reference"] == "dequantized"


def test_quantized_weights_record_is_returned(model_factory, tmp_path):
    from optiq.commands.convert import ConvertOptions, convert

    opts = ConvertOptions(model=str(model_factory("llama")), output=str(tmp_path / "r"), group_size=32,
                          n_calibration=2, seq_len=32, n_eval=2, kl_stride=2, quiet=True)
    record = convert(opts)
    assert isinstance(record, QuantizedWeights)
    assert record.bytes > 0 and dict(record.measured)["kl_mean"] >= 0


def test_refinement_keeps_only_rounds_that_lower_the_measured_kl(model_factory, tmp_path):
    src = str(model_factory("llama"))
    out = tmp_path / "r"
    assert run_convert([src, "-o", str(out), "--group-size", "32", "--target-bpw", "4.0", "--refine-rounds", "2", "--no-eval", *FAST]) == 0
    meta = json.loads((out / "optiq_metadata.json").read_text())
    rounds = meta["refinement"]
    assert 1 <= len(rounds) <= 2
    kept = [r for r in rounds if r["kept"]]
    assert all(not r["kept"] for r in rounds[len(kept):])  # stops at the first round that does not help
    assert meta["plan"]["effective_bpw"] <= 4.0 + 1e-9
    if kept:
        assert meta["plan"]["method"].endswith("refined")


@pytest.mark.parametrize(
    "arch, sizes",
    [
        ("llama", ["--target-bpw", "3.5", "--group-size", "32"]),
        ("qwen3", ["--target-bpw", "3.5", "--group-size", "32"]),
        # the recipe that meets the quality target: GPTQ over bits and group sizes per layer
        ("llama", ["--target-bpw", "4.25", "--group-sizes", "32,64", "--candidate-bits", "3,4"]),
        # a bf16 output: scales and biases rounded through bf16 by the probes as by the writer
        ("llama", ["--target-bpw", "3.5", "--group-size", "32", "--dtype", "bfloat16"]),
        # GPTQ's own min/max grid, without the scales and biases fitted to its codes (the default)
        ("llama", ["--target-bpw", "3.5", "--group-size", "32", "--no-refit-scales"]),
        # MLX's microscaling formats: GPTQ on their float grids, 8-bit scales, no biases
        ("llama", ["--target-bpw", "5", "--group-size", "32", "--modes", "mxfp4,nvfp4,mxfp8", "--candidate-bits", "4,8"]),
    ],
)
def test_gptq_is_measured_and_written_with_the_same_rounding(model_factory, tmp_path, arch, sizes):
    """The written model holds exactly the GPTQ weights the probes measured, at
    each layer's own bits and group size, and stock mlx-lm loads them."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    from optiq.calibration import sample_tokens, split_calibration
    from optiq.model_tree import container_of
    from optiq.probes import rounding_for
    from optiq.reference import reference_pass
    from optiq.source import load_reference

    src = model_factory(arch)
    out = tmp_path / "g"
    assert run_convert([str(src), "-o", str(out), "--quantizer", "gptq", "--gram-samples", "7", *FAST[:-1], *sizes]) == 0
    meta = json.loads((out / "optiq_metadata.json").read_text())
    assert meta["quantizer"] == "gptq" and meta["sensitivity"]["method"].endswith("gptq")
    written, _ = load(str(out))
    ref = load_reference(src)
    every = sample_tokens(ref.model, ref.tokenizer, 7, 32, seed=0)  # convert's calibration (seed 0)
    tokens, gram_tokens = split_calibration(every, 3)  # 3 probed, all 7 in the Grams
    cal = reference_pass(ref.model, tokens, 8, 2, gram_tokens=gram_tokens)
    assert meta["calibration"]["gram_sequences"] == 7
    plan = BitPlan.from_dict(meta["plan"])
    assert len({c.group_size for _, c in plan.assignments}) == (2 if "--group-sizes" in sizes else 1)
    dtype = mx.bfloat16 if "bfloat16" in sizes else mx.float16
    refit = "--no-refit-scales" not in sizes
    assert meta["refit_scales"] == refit
    rounding = rounding_for(cal, "gptq", dtype, refit=refit)  # the rounding convert used, for the expected weights
    for path, cand in plan.assignments[1:]:
        container, key = container_of(ref.model, path)
        module = container[key]
        want = np.array(rounding.quantized(path, module, module.weight, cand))
        c2, k2 = container_of(written, path)
        m = c2[k2]
        assert (m.bits, m.group_size, m.mode) == (cand.bits, cand.group_size, cand.mode)
        if m.mode == "affine":
            got = np.array(mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32), group_size=m.group_size, bits=m.bits))
            assert m.scales.dtype == dtype
        else:
            got = np.array(mx.dequantize(m.weight, m.scales, group_size=m.group_size, bits=m.bits, mode=m.mode, dtype=mx.float32))
            assert m.scales.dtype == mx.uint8 and "biases" not in m
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_default_candidates_are_near_uniform_and_widen_only_when_needed(model_factory):
    """Defaults: groups 64/128, bits from the widest width that fits the target
    up; reaching lower only when protection leaves no feasible plan."""
    from optiq.model_tree import quantizable_layers
    from optiq.pipeline import ConvertConfig
    from optiq.pipeline.config import candidates, smallest_plan_bpw, widen_defaults
    from optiq.source import load_reference

    bits = lambda cands: sorted({c.bits for c in cands})  # noqa: E731
    assert bits(candidates(ConvertConfig(target_bpw=4.5))) == [4, 5, 6, 8]
    assert bits(candidates(ConvertConfig(target_bpw=3.5))) == [3, 4, 5, 6, 8]
    assert {c.group_size for c in candidates(ConvertConfig())} == {64, 128}
    assert bits(candidates(ConvertConfig(target_bpw=4.5, group_sizes=(32,)))) == [3, 4, 5, 6, 8]
    layers = quantizable_layers(load_reference(model_factory("qwen3")).model)
    config = ConvertConfig(target_bpw=5.0, group_sizes=(32,), protect=("embed", "lm_head"), protect_bits=8)
    near = candidates(config)
    assert smallest_plan_bpw(layers, near, ["embed", "lm_head"], 8) > 5.0  # infeasible as is
    wide = widen_defaults(config, near, layers)
    assert min(bits(wide)) < min(bits(near)) and smallest_plan_bpw(layers, wide, ["embed", "lm_head"], 8) <= 5.0
    explicit = ConvertConfig(target_bpw=5.0, group_sizes=(32,), protect=("embed", "lm_head"), bits=(4, 8))
    assert widen_defaults(explicit, candidates(explicit), layers) == candidates(explicit)
