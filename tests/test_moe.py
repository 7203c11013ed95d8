"""Mixture-of-experts families end to end on tiny random models built with
mlx-lm's own classes: convert (expert projections planned, per-expert Grams
and GPTQ), stock mlx-lm loading and generating, KV plans and serving."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

from optiq import device
from optiq.cli import main as cli
from optiq.estimate import output_error, whole_layer_error
from optiq.experts import coverage, coverage_lines
from optiq.grams import grams_tapped
from optiq.kv import make_kv_cache, read_kv_config
from optiq.kv.affine_cache import LatentKVCache
from optiq.kv.sensitivity import run_with_cache
from optiq.model_tree import is_experts, quantizable_layers
from optiq.quantize import apply_codes
from optiq.records import BitPlan, Candidate
from optiq.rounding import Rounding, fake_quantize, gptq_weight
from optiq.source import load_reference

from conftest import build_model
from test_kv import _kl

FAMILIES = ["qwen3_moe", "qwen3_5_moe", "mixtral", "gpt_oss", "deepseek_v3"]
CONVERT = ["--target-bpw", "4.5", "--n-calibration", "4", "--seq-len", "48", "--n-eval", "4", "--kl-stride", "2", "--quiet"]

LOAD_AND_GENERATE = """
import json, sys
from mlx_lm import generate, load
model, tok = load(sys.argv[1])
assert not any(m.startswith("optiq") for m in sys.modules), "optiq was imported"
text = generate(model, tok, "The quick brown fox", max_tokens=6)
layers = {p: [m.bits, m.group_size, type(m).__name__] for p, m in model.named_modules() if hasattr(m, "bits")}
print(json.dumps({"text": text, "layers": layers}))
"""


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {arch: build_model(root / arch, arch) for arch in FAMILIES}


@pytest.fixture(scope="module")
def converted(moe_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-out")
    out = {}
    for arch in FAMILIES:
        out[arch] = root / arch
        assert cli(["convert", str(moe_models[arch]), "-o", str(out[arch]), *CONVERT]) == 0
    return out


@pytest.mark.parametrize("arch", FAMILIES)
def test_moe_converts_at_4_5_bpw_with_experts_planned_and_loads_in_stock_mlx_lm(moe_models, converted, arch):
    model = load_reference(moe_models[arch]).model
    experts = [p for p, m in quantizable_layers(model) if is_experts(m)]
    assert experts, "the tiny model has expert projections"
    meta = json.loads((converted[arch] / "optiq_metadata.json").read_text())
    plan = BitPlan.from_dict(meta["plan"])
    assert set(experts) <= set(plan.as_dict())
    assert plan.effective_bpw <= 4.5 + 1e-9
    # every expert projection's tokens are reported
    assert set(meta["expert_coverage"]) == set(experts)
    assert all(c["max_tokens"] > 0 for c in meta["expert_coverage"].values())
    # no worse than uniform 4-bit at the same size, on held-out tokens
    base = meta["measured"]["baseline"]
    assert base["name"].startswith("uniform 4@") and base["effective_bpw"] == pytest.approx(plan.effective_bpw, abs=0.01)
    assert meta["measured"]["kl_mean"] <= base["kl_mean"]
    # stock mlx-lm (no optiq import) opens the experts quantized as planned, and generates
    result = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(converted[arch])], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(loaded["text"], str)
    chosen = plan.as_dict()
    for path in experts:
        c = chosen[path]
        if c.bits < 16:
            assert loaded["layers"][path] == [c.bits, c.group_size, "QuantizedSwitchLinear"]


def switch_call(seed=0, tokens=40, experts=4, width=64, k=2):
    mx.random.seed(seed)
    glu = SwitchGLU(width, 32, experts)
    x = mx.random.normal((2, tokens // 2, width))
    indices = mx.argsort(mx.random.normal((2, tokens // 2, experts)), axis=-1)[..., :k]
    return glu, x, indices


@pytest.mark.parametrize("tokens", [40, 400])  # below and above SwitchGLU's sort threshold (64 indices)
def test_expert_grams_are_each_experts_routed_inputs(tokens):
    glu, x, indices = switch_call(tokens=tokens)
    grams, counts = {}, {}
    with grams_tapped(glu, [("up_proj", glu.up_proj), ("down_proj", glu.down_proj)], grams, counts):
        glu(x, indices)
    flat, idx = np.array(x).reshape(-1, x.shape[-1]), np.array(indices).reshape(len(np.array(x).reshape(-1, x.shape[-1])), -1)
    for e in range(4):
        rows = flat[(idx == e).any(axis=1)]
        assert counts["up_proj"][e] == len(rows)
        want = rows.T @ rows  # a GPU's matmuls round like TF32: a tolerance on the Gram's scale
        np.testing.assert_allclose(np.array(grams["up_proj"][e]), want, rtol=1e-4, atol=1e-3 * np.abs(want).max())
    assert counts["down_proj"].tolist() == counts["up_proj"].tolist()
    assert grams["down_proj"][0].shape == (32, 32)


def test_gate_and_up_projections_share_one_expert_gram():
    glu, x, indices = switch_call(tokens=400)
    grams, counts = {}, {}
    with grams_tapped(glu, [(p, glu[p]) for p in ("up_proj", "gate_proj", "down_proj")], grams, counts):
        glu(x, indices)
        glu(x * 2, indices)
    assert grams["gate_proj"] is grams["up_proj"] and grams["down_proj"] is not grams["up_proj"]
    flat = np.array(x).reshape(-1, x.shape[-1])
    rows = flat[(np.array(indices).reshape(len(flat), -1) == 0).any(axis=1)]
    want = 5 * rows.T @ rows
    np.testing.assert_allclose(np.array(grams["gate_proj"][0]), want, rtol=1e-4, atol=1e-3 * np.abs(want).max())
    assert counts["gate_proj"].tolist() == counts["up_proj"].tolist() == (2 * np.bincount(np.array(indices).reshape(-1), minlength=4)).tolist()


def test_expert_gptq_beats_rounding_per_expert_and_the_written_codes_are_what_was_measured():
    glu, x, indices = switch_call(tokens=400)
    grams, counts = {}, {}
    layer = glu.gate_proj
    with grams_tapped(glu, [("gate_proj", layer)], grams, counts):
        glu(x, indices)
    del grams["gate_proj"][3]  # as if expert 3 saw no token: plain rounding, no Gram
    cand = Candidate(3, 32)
    rounding = Rounding("gptq", mx.float16, grams)
    weight, codes = rounding.rounded("gate_proj", layer, layer.weight, cand)
    assert weight.shape == layer.weight.shape and codes[0].shape == layer.weight.shape
    rtn = fake_quantize(layer.weight, cand)
    for e in range(3):  # each expert's output error on its own tokens: GPTQ below rounding
        g = grams["gate_proj"][e]
        err = lambda w: float(mx.sum(((w[e] - layer.weight[e]) @ g) * (w[e] - layer.weight[e])))  # noqa: E731
        assert err(weight) < err(rtn)
    identity, _ = gptq_weight(layer.weight[3], mx.eye(layer.weight.shape[-1]), cand)
    np.testing.assert_allclose(np.array(weight[3]), np.array(identity), atol=1e-6)
    # slabbed and whole-layer error estimates agree (one expert per slab)
    whole = whole_layer_error("gate_proj", layer, weight - layer.weight, rounding, None)
    saved = device.row_slab
    try:
        device.row_slab = lambda: layer.weight[0].size
        slabbed = output_error("gate_proj", layer, cand, rounding, None)
    finally:
        device.row_slab = saved
    assert slabbed == pytest.approx(whole, rel=1e-4)
    # the codes written into mlx-lm's QuantizedSwitchLinear hold exactly the measured weight
    q = QuantizedSwitchLinear(64, 32, 4, bias=False, group_size=32, bits=3)
    apply_codes({"gate_proj": q}, BitPlan(assignments=(("gate_proj", cand),), target_bpw=4.0, effective_bpw=4.0, predicted_kl=0.0, method="test"), {"gate_proj": codes})
    written = mx.dequantize(q.weight, q.scales, q.biases, group_size=32, bits=3)
    np.testing.assert_allclose(np.array(written), np.array(weight), atol=1e-5)


def test_coverage_names_experts_no_token_reached():
    cover = coverage({"model.layers.0.mlp.switch_mlp.up_proj": np.array([5, 0, 9, 0]), "model.layers.1.mlp.switch_mlp.up_proj": np.array([3, 3, 3, 3])})
    assert cover["model.layers.0.mlp.switch_mlp.up_proj"]["unseen"] == [1, 3]
    lines = coverage_lines(cover)
    assert "0..9" in lines[0]
    assert any("model.layers.0.mlp.switch_mlp: 2 of 4 experts saw no calibration token (1, 3)" in line for line in lines)
    assert not any("layers.1" in line for line in lines[1:])


@pytest.mark.parametrize("arch", FAMILIES)
def test_moe_kv_plan_and_planned_cache_generate(converted, tmp_path, arch):
    out = tmp_path / "kv"
    args = ["kv-cache", str(converted[arch]), "-o", str(out), "--n-calibration", "2", "--seq-len", "40",
            "--candidate-bits", "4,8", "--target-bits", "6", "--group-size", "32", "--quiet"]
    assert cli(args) == 0
    plan = read_kv_config(out / "kv_plan.json")
    assert plan.layers and plan.average_bits <= 6 + 1e-9
    loaded = load_reference(converted[arch])
    model = loaded.model
    tokens = mx.array([list(range(5, 45))])
    ref = run_with_cache(model, tokens, make_kv_cache(model), 20)
    eight = make_kv_cache(model, [{"layer_idx": e.layer_idx, "bits": 8, "group_size": 32} for e in plan.layers])
    two = make_kv_cache(model, [{"layer_idx": e.layer_idx, "bits": 2, "group_size": 32} for e in plan.layers])
    kl8, kl2 = _kl(ref, run_with_cache(model, tokens, eight, 20)), _kl(ref, run_with_cache(model, tokens, two, 20))
    # the planned caches are read, and 8 bits is near-lossless; 10x, not 20x: the
    # hybrid qwen3_5_moe's linear-attention layers hold no KV, and it measures 19.5x.
    # (The bound is for these random tiny models: gpt_oss's measures 0.031 with
    # GPTQ's scales refit to its codes, under 0.02 without; its 2-bit cache 1.94.)
    assert kl8 < 5e-2 and kl2 > 10 * kl8, (kl8, kl2)
    if arch == "deepseek_v3":  # latent attention reads its cache itself: plain arrays back
        assert all(isinstance(eight[e.layer_idx], LatentKVCache) for e in plan.layers)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_moe_serves_with_a_kv_plan_like_mlx_lm_greedy(converted, tmp_path, arch):
    pytest.importorskip("openai")
    import mlx_lm
    from mlx_lm.generate import generate_step
    from servers import start

    from optiq.source import to_fp32

    kv = tmp_path / "kv"
    assert cli(["kv-cache", str(converted[arch]), "-o", str(kv), "--n-calibration", "2", "--seq-len", "32",
                "--candidate-bits", "8", "--target-bits", "8", "--group-size", "32", "--quiet"]) == 0
    running = start(model=str(converted[arch]), kv_config=str(kv / "kv_config.json"), max_context=256)
    try:
        prompt = "The quick brown fox"
        r = running.client.completions.create(model=running.app.defaults.model_name, prompt=prompt, max_tokens=8, temperature=0)
        tokens = running.app.tokenizer.encode(prompt)
        # mlx-lm's own greedy loop (fp32) over the same per-layer planned cache
        model, tokenizer = mlx_lm.load(str(converted[arch]))
        to_fp32(model)
        cache = make_kv_cache(model, read_kv_config(kv / "kv_config.json"))
        out = []
        for token, _ in generate_step(mx.array(tokens), model, max_tokens=8, prompt_cache=cache):
            if token in tokenizer.eos_token_ids:
                break
            out.append(token)
        assert r.choices[0].text == tokenizer.decode(out)
    finally:
        running.stop()


def test_moe_streams_from_disk_under_max_memory(moe_models, tmp_path, capsys):
    """--max-memory below the model's fp32 size: blocks (experts included) are
    read from disk one at a time, their expert Grams go to disk, and stock
    mlx-lm opens the output."""
    out = tmp_path / "streamed"
    assert cli(["convert", str(moe_models["qwen3_moe"]), "-o", str(out), "--max-memory", "0.004",
                "--target-bpw", "4.5", "--n-calibration", "3", "--seq-len", "32", "--kl-stride", "2"]) == 0
    assert "streamed from disk" in capsys.readouterr().err
    meta = json.loads((out / "optiq_metadata.json").read_text())
    assert meta["expert_coverage"] and any(p.endswith("switch_mlp.down_proj") for p in BitPlan.from_dict(meta["plan"]).as_dict())
    result = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
