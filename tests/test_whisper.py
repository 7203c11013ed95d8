"""Speech recognition: optiq convert and eval on a tiny random Whisper in
mlx-whisper's own layout, opened by stock mlx-whisper."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("mlx_whisper", reason="mlx-whisper not installed (pip install 'optiq[whisper]')")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from optiq import whisper  # noqa: E402
from optiq.errors import OptiqError  # noqa: E402
from optiq.records import Candidate  # noqa: E402

DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2, n_vocab=51865, n_text_ctx=64, n_text_state=64, n_text_head=2, n_text_layer=2)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    """Random weights in mlx-whisper's layout: config.json of ModelDimensions, weights.safetensors."""
    from mlx.utils import tree_flatten
    from mlx_whisper.whisper import ModelDimensions, Whisper

    folder = tmp_path_factory.mktemp("whisper") / "tiny"
    folder.mkdir()
    mx.random.seed(0)
    model = Whisper(ModelDimensions(**DIMS), dtype=mx.float16)
    mx.save_safetensors(str(folder / "weights.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(dict(DIMS, model_type="whisper")))
    return folder


@pytest.fixture(scope="module")
def speech_folder(tmp_path_factory):
    """Tones with transcripts (no espeak-ng needed), at 22.05 kHz to exercise resampling."""
    from scipy.io import wavfile

    folder = tmp_path_factory.mktemp("speech")
    rate = 22050
    for i, text in enumerate(["one two three", "the cat sat on the mat", "hello world"]):
        t = np.arange(int(rate * (1 + 0.5 * i))) / rate
        wave = 0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t * (1 + t))
        wavfile.write(folder / f"{i}.wav", rate, (wave * 32767).astype(np.int16))
        (folder / f"{i}.txt").write_text(text + "\n")
    return folder


def run(argv):
    from optiq.cli import main

    return main(argv)


def test_convert_plans_per_layer_and_stock_mlx_whisper_loads_it(tiny_whisper, speech_folder, tmp_path, capsys):
    from mlx_whisper.load_models import load_model

    out = tmp_path / "q"
    args = ["convert", str(tiny_whisper), "-o", str(out), "--candidate-bits", "4,8", "--target-bpw", "5", "--calibration", str(speech_folder), "--eval-data", str(speech_folder), "--quiet"]
    assert run(args) == 0
    assert "optiq exact" in capsys.readouterr().out
    meta = json.loads((out / "optiq_metadata.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert meta["model_type"] == "whisper" and meta["plan"]["effective_bpw"] <= 5.0
    plan = {p: c["bits"] for p, c in meta["plan"]["assignments"]}
    quantized_bits = {b for b in plan.values() if b < 16}
    assert len(quantized_bits) == 1 and config["quantization"]["bits"] in quantized_bits
    assert any(b == 16 for b in plan.values()), "at 5 bpw some layers stay float"
    assert any(p.startswith("encoder.") and b < 16 for p, b in plan.items()), "the encoder is planned, not left float by rule"
    loaded = load_model(str(out))  # stock mlx-whisper
    modules = dict(loaded.named_modules())
    for path, bits in plan.items():
        assert isinstance(modules[path], (nn.QuantizedLinear, nn.QuantizedEmbedding)) == (bits < 16), path
    # the written model behaves as the plan measured: held-out KL reported and finite
    assert 0 <= meta["measured"]["kl_mean"] < 10 and "baseline" in meta["measured"]


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_written_logits_equal_the_simulated_plan(tiny_whisper, speech_folder, tmp_path, quantizer):
    """What stock mlx-whisper opens computes what the probes simulated,
    with MLX's rounding or with GPTQ's codes (Grams over the calibration speech)."""
    from optiq.evaluate import simulated
    from optiq.records import BitPlan

    out = tmp_path / "q"
    assert run(["convert", str(tiny_whisper), "-o", str(out), "--candidate-bits", "4", "--target-bpw", "6", "--calibration", str(speech_folder), "--quantizer", quantizer, "--no-eval", "--quiet"]) == 0
    meta = json.loads((out / "optiq_metadata.json").read_text())
    plan = BitPlan.from_dict(meta["plan"])
    assert meta["quantizer"] == quantizer and meta["sensitivity"]["method"].endswith(quantizer)
    reference = whisper.load(tiny_whisper)
    batches = whisper.features(reference, whisper.read_speech(speech_folder))
    mel, tokens = batches[0]
    rounding = whisper.rounding(reference, batches, quantizer)
    assert bool(rounding.grams) == (quantizer == "gptq")
    written = whisper.load(out)
    with simulated(reference, plan.assignments, rounding):
        want = np.array(reference(mel, tokens))
        for path, c in plan.assignments:  # the same codes the probes measured
            m = dict(written.named_modules())[path]
            if c.bits < 16:
                got = mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32), group_size=c.group_size, bits=c.bits)
                np.testing.assert_allclose(np.array(got), np.array(dict(reference.named_modules())[path].weight), rtol=0, atol=1e-6)
    got = np.array(written(mel, tokens))
    assert np.abs(want).max() > 1
    np.testing.assert_allclose(got, want, rtol=0, atol=0.01 * np.abs(want).max())


def test_best_plan_holds_one_quantized_width():
    import attrs

    from optiq.records import LayerSensitivity, SensitivityTable

    cands = (Candidate(4, 64), Candidate(8, 64), Candidate(16))
    layers = tuple(
        LayerSensitivity(path=f"l{i}", n_params=1000, candidates=cands, kl=(k4, k4 / 20, 0.0), measured=(True,) * 3, error=(1, 1, 0))
        for i, k4 in enumerate([0.5, 0.01, 0.02, 0.3])
    )
    plan = whisper.best_plan(SensitivityTable(model="t", layers=layers), 6.0)
    widths = {c for _, c in plan.assignments if c.bits < 16}
    assert len(widths) == 1
    assert plan.effective_bpw <= 6.0
    mixed = attrs.evolve(plan, assignments=(("layers.0", Candidate(4, 64)), ("layers.1", Candidate(8, 64))))
    with pytest.raises(OptiqError, match="one quantization width"):
        whisper.quantize(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)), mixed)


def test_wer_counts_word_edits():
    assert whisper.words("Hello, World! It's") == ["hello", "world", "it's"]
    assert whisper.edit_distance("a b c d".split(), "a x c".split()) == 2
    assert whisper.edit_distance([], "a b".split()) == 2


def test_eval_wer_with_a_baseline(tiny_whisper, speech_folder, tmp_path, capsys):
    out = tmp_path / "q"
    assert run(["convert", str(tiny_whisper), "-o", str(out), "--candidate-bits", "4", "--target-bpw", "6", "--calibration", str(speech_folder), "--no-eval", "--quiet"]) == 0
    result_file = tmp_path / "wer.json"
    assert run(["eval", str(out), "--task", "wer", "--baseline", str(tiny_whisper), "--data", str(speech_folder), "--json", str(result_file)]) == 0
    table = capsys.readouterr().out
    assert str(out)[-40:] in table and "wer" in table
    result = json.loads(result_file.read_text())
    for r in result["models"].values():
        assert r["n_words"] == 3 + 6 + 2 and r["n_samples"] == 3 and 0 <= r["wer"]


def test_bad_speech_inputs_get_clear_errors(tiny_whisper, speech_folder, tmp_path, capsys, tiny_llama):
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(speech_folder / "0.wav", lonely / "0.wav")
    with pytest.raises(SystemExit) as exc:
        run(["convert", str(tiny_whisper), "-o", str(tmp_path / "x"), "--calibration", str(lonely), "--quiet"])
    assert exc.value.code == 2 and "no transcript" in capsys.readouterr().err
    (lonely / "0.txt").write_text("hi")
    (lonely / "1.wav").write_text("not audio")
    (lonely / "1.txt").write_text("hi")
    with pytest.raises(SystemExit) as exc:
        run(["convert", str(tiny_whisper), "-o", str(tmp_path / "x"), "--calibration", str(lonely), "--quiet"])
    assert exc.value.code == 2 and "not a readable .wav" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run(["eval", str(tiny_llama), "--task", "wer", "--data", str(speech_folder)])
    assert exc.value.code == 2 and "not one" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")
def test_espeak_speech_is_16khz_with_transcripts(tmp_path):
    samples = whisper.read_speech(whisper.speak(["testing one two"], tmp_path))
    wave, text = samples[0]
    assert text == "testing one two" and wave.dtype == np.float32 and 0.5 * 16000 < len(wave) < 5 * 16000
    assert np.abs(wave).max() > 0.01
