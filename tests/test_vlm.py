"""Vision-language: optiq convert and eval on tiny random Qwen2-VL and
Gemma 3 models in mlx-vlm's own layout (weights, config, tokenizer, image
processor), opened by stock mlx_vlm.load."""

import json

import numpy as np
import pytest

pytest.importorskip("mlx_vlm", reason="mlx-vlm not installed (pip install 'optiq[vlm]')")

import mlx.core as mx  # noqa: E402

from optiq import vlm  # noqa: E402
from optiq.errors import OptiqError  # noqa: E402

from vlm_models import build_vlm  # noqa: E402


@pytest.fixture(scope="module", params=["qwen2_vl", "gemma3"])
def tiny_vlm(request, tmp_path_factory):
    return build_vlm(tmp_path_factory.mktemp(request.param) / "tiny", request.param)


@pytest.fixture(scope="module")
def converted(tiny_vlm, tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm-out") / "q"
    assert run([str(tiny_vlm), "--model-type", "vlm", "-o", str(out), "--n-calibration", "4", "--n-eval", "4", "--quiet"]) == 0
    return out


def run(argv, command="convert"):
    from optiq.cli import main

    return main([command] + argv)


def test_convert_plans_vision_and_language_and_stock_mlx_vlm_loads_it(tiny_vlm, converted):
    from mlx_vlm import generate, load

    meta = json.loads((converted / "optiq_metadata.json").read_text())
    plan = dict((p, c) for p, c in meta["plan"]["assignments"])
    # The vision tower and projector are planned like any other layer, not left float by rule.
    assert sum(p.startswith("vision_tower.") for p in plan) >= 8 and sum(p.startswith("language_model.") for p in plan) >= 8
    assert len({tuple(c) if isinstance(c, list) else json.dumps(c) for c in plan.values()}) > 1  # mixed widths
    assert meta["effective_bpw"] <= 4.5 + 1e-9
    config = json.loads((converted / "config.json").read_text())
    assert any(k.startswith("vision_tower.") for k, v in config["quantization"].items() if isinstance(v, dict))
    # mlx-vlm's Gemma 3 copies the embedding into lm_head on load: one plan entry, written identically.
    family = json.loads((tiny_vlm / "config.json").read_text())["model_type"]
    assert meta["tied"] == ({"language_model.model.embed_tokens": ["language_model.lm_head"]} if family == "gemma3" else {})
    for kept, twins in meta["tied"].items():
        assert all(config["quantization"][t] == config["quantization"][kept] for t in twins)
    # Stock mlx-vlm opens it: the planned layers are quantized at their planned widths.
    model, processor = load(str(converted))
    modules = dict(model.named_modules())
    for path, entry in config["quantization"].items():
        if isinstance(entry, dict):
            assert modules[path].bits == entry["bits"] and modules[path].group_size == entry["group_size"], path
    text = generate(model, processor, vlm.chat_prompt(model, processor, "What is this?"), [vlm.draw("circle", "red")], max_tokens=4, temperature=0.0, verbose=False)
    assert text.generation_tokens >= 1
    # The planned model beats uniform 4-bit at the same effective size on
    # held-out scenes where quantization shows: on the random Qwen2-VL uniform
    # 4-bit costs 0.44 mean KL; on the random Gemma 3 about 0.003, at the
    # level of noise between 4 calibration and 4 held-out scenes.
    measured = meta["measured"]
    assert measured["baseline"]["effective_bpw"] >= meta["effective_bpw"] - 1e-9
    if json.loads((tiny_vlm / "config.json").read_text())["model_type"] == "qwen2_vl":
        assert measured["baseline"]["kl_mean"] > 0.1 and measured["kl_mean"] < measured["baseline"]["kl_mean"]


def test_written_codes_are_the_probed_codes(tiny_vlm, converted):
    """What stock mlx-vlm computes equals the plan simulated on the float model."""
    from optiq.evaluate import simulated
    from optiq.records import BitPlan
    from optiq.source import dequantized_fp32

    from optiq.probes import with_twins

    model, processor = vlm.load(tiny_vlm)
    written, _ = vlm.load(converted, fp32=False)
    meta = json.loads((converted / "optiq_metadata.json").read_text())
    plan = BitPlan.from_dict(meta["plan"])
    assert meta["quantizer"] == "gptq"  # the default for vision-language models
    layers, twins = vlm.quantizable(model)
    assert {p: [t for t, _ in ts] for p, ts in twins.items()} == meta["tied"]
    sample = vlm.prepare(model, processor, vlm.draw("square", "blue", 2, "cat"), vlm.chat_prompt(model, processor, "Describe it."))
    from optiq import metrics

    dtype = mx.bfloat16 if json.loads((tiny_vlm / "config.json").read_text())["torch_dtype"] == "bfloat16" else mx.float16
    float_logits = vlm.forward(model, sample)
    # rounded as the output stores scales, GPTQ's Grams from convert's calibration
    rounding = vlm.rounding(model, vlm.calibration(model, processor, None, 4, seed=0), "gptq", dtype)
    with simulated(model, with_twins(plan.assignments, twins), rounding):
        expected = vlm.forward(model, sample)
    got = vlm.forward(dequantized_fp32(written), sample)

    def kl(p, q):
        return float(mx.mean(metrics.token_kl(metrics.reference_from_logits(p), q)))

    # The written model computes the simulated plan: what is left is float
    # summation order, far below what quantizing did to the float model.
    assert kl(expected, got) < 1e-2 * kl(float_logits, expected)


def test_calibration_from_an_image_folder(tiny_vlm, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, color in enumerate(["red", "green"]):
        vlm.draw("triangle", color).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"Is the triangle {color}?\n")
    model, processor = vlm.load(tiny_vlm)
    samples = vlm.calibration(model, processor, folder, 8, seed=0, answer_tokens=4)
    assert len(samples) == 2 and all(0 < s.start < s.input_ids.shape[1] for s in samples)
    (folder / "2.png").write_bytes(b"not an image")
    (folder / "2.txt").write_text("?")
    with pytest.raises(OptiqError, match="not a readable image"):
        vlm.read_images(folder)
    (folder / "2.png").unlink()
    vlm.draw("circle", "red").save(folder / "3.png")
    with pytest.raises(OptiqError, match="no prompt 3.txt"):
        vlm.read_images(folder)


def test_drawn_questions_know_their_answers():
    items = vlm.choice_items(12, seed=5)
    assert len(items) == 12
    for image, question, options, answer in items:
        assert image.size == (224, 224) and len(options) == 4 and len(set(options)) == 4 and 0 <= answer < 4
    # Different seeds draw different scenes: calibration and evaluation stay apart.
    a, b = (np.asarray(vlm.scenes(1, s)[0][0]) for s in (0, 1))
    assert not np.array_equal(a, b)


def test_eval_ai2d_with_baseline(tiny_vlm, converted, tmp_path, capsys):
    out = tmp_path / "ai2d.json"
    assert run([str(converted), "--task", "ai2d", "--baseline", str(tiny_vlm), "--n-samples", "8", "--json", str(out)], "eval") == 0
    result = json.loads(out.read_text())
    rows = result["models"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n_questions"] == 8 for r in rows.values())
    assert 0.0 <= result["agreement"] <= 1.0
    # The same model as its own baseline picks the same options.
    data = tmp_path / "questions.jsonl"
    for i, (image, question, options, answer) in enumerate(vlm.choice_items(3, seed=9)):
        image.save(tmp_path / f"q{i}.png")
        with data.open("a") as f:
            f.write(json.dumps({"image": f"q{i}.png", "question": question, "options": options, "answer": "ABCD"[answer]}) + "\n")
    assert run([str(tiny_vlm), "--task", "ai2d", "--baseline", str(tiny_vlm), "--data", str(data), "--json", str(out)], "eval") == 0
    result = json.loads(out.read_text())
    assert result["agreement"] == 1.0 and result["models"][str(tiny_vlm)]["n_questions"] == 3
    assert "same option picked by both" in capsys.readouterr().out


def fails(argv, command, capsys) -> str:
    """The error message of a run that must exit non-zero."""
    with pytest.raises(SystemExit) as exc:
        run(argv, command)
    assert exc.value.code != 0
    return capsys.readouterr().err


def test_bad_vlm_input_is_a_clear_error(tiny_vlm, tiny_llama, tmp_path, capsys):
    assert "not a vision-language model" in fails([str(tiny_llama), "--model-type", "vlm", "-o", str(tmp_path / "x"), "--quiet"], "convert", capsys)
    assert not (tmp_path / "x").exists()
    assert "neither --refine-rounds" in fails([str(tiny_vlm), "--model-type", "vlm", "--refine-rounds", "1", "-o", str(tmp_path / "y"), "--quiet"], "convert", capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "missing.png", "question": "?", "options": ["a", "b"], "answer": 0}\n')
    assert "bad.jsonl:1" in fails([str(tiny_vlm), "--task", "ai2d", "--data", str(bad)], "eval", capsys)
    assert "not a folder of images" in fails([str(tiny_vlm), "--model-type", "vlm", "--calibration", str(tmp_path / "none"), "-o", str(tmp_path / "z"), "--quiet"], "convert", capsys)
    assert not (tmp_path / "z").exists()


def test_auto_strips_an_mlx_vlm_checkpoint_to_text(tiny_vlm, tmp_path):
    """Without --model-type vlm a checkpoint in mlx-vlm's layout (as
    mlx-community publishes them) becomes a text model stock mlx-lm opens,
    its language weights unchanged."""
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from optiq.strip import strip

    out = tmp_path / "text"
    report = strip(tiny_vlm, out)
    assert "vision_tower." in report.removed_prefixes
    model, _ = load(str(out))
    source = mx.load(str(tiny_vlm / "model.safetensors"))
    for name, value in tree_flatten(model.parameters()):
        assert mx.array_equal(value, source["language_model." + name]), name


def test_language_probes_reuse_the_vision_towers_outputs(tiny_vlm):
    """A language-layer probe reads the remembered vision outputs and gets
    the KL a full forward gets; a vision-layer probe must recompute them."""
    from optiq.model_tree import container_of

    model, processor = vlm.load(tiny_vlm)
    cal = vlm.Calibrated(model, vlm.calibration(model, processor, None, 3, seed=0, answer_tokens=4))
    assert cal.remembers and len(cal.tower_outputs) == 3  # one per image
    layers, _ = vlm.quantizable(model)
    for prefix in ("language_model.", "vision_tower."):
        path = next(p for p, _ in layers if p.startswith(prefix) and "embed" not in p)
        container, key = container_of(model, path)
        weight = container[key].weight
        container[key].weight = mx.zeros_like(weight)  # a change the random Gemma 3 also notices
        try:
            full, remembered = (cal.kl(vision_changed=v)["kl_mean"] for v in (True, False))
        finally:
            container[key].weight = weight
        assert full > 1e-5
        if prefix == "language_model.":
            assert remembered == full
        else:  # the remembered outputs are the unperturbed tower's: measure_weights never uses them here
            assert remembered < full
    assert type(model["vision_tower"]).__name__ != "RememberedTower"  # restored
