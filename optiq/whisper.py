"""Speech recognition: the weight chain on mlx-whisper models.

Sensitivity is the KL of Whisper's next-token distribution (the decoder's
logits on a transcript, given the audio) with one layer quantized; the audio
encoder's layers are probed and planned like the decoder's. mlx-whisper's
loader (0.4.3) quantizes every layer whose scales are stored with the one
`quantization` width of config.json, so a plan here chooses per layer between
that width and float: the output loads in stock `mlx_whisper.load_models`.

Calibration and evaluation speech: a folder of .wav files, each with a .txt
transcript beside it, or (no folder) sentences spoken by espeak-ng.
"""

import json
import re
import shutil
import subprocess
import tempfile
from math import gcd
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from scipy.io import wavfile
from scipy.signal import resample_poly

from . import metrics
from .calibration import paired_files
from .errors import OptiqError, require_extra
from .io import atomic_output, write_json
from .plan import plan_bits
from .probe_hooks import run_it
from .probes import gram_rounding, logits_kl, probe_table
from .quantize import apply_codes, cast_floats
from .records import SensitivityTable
from .source import read_config

SAMPLE_RATE = 16000
# Spoken by espeak-ng when no speech folder is given: calibration and
# evaluation sentences are disjoint.
CALIBRATION_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore every summer morning.",
    "A large language model predicts the next word from the words before it.",
    "Please call Stella and ask her to bring these things from the store.",
)
EVAL_SENTENCES = (
    "The weather today is cold and windy with a chance of rain.",
    "Seven students walked to the library after their morning class.",
    "He opened the window to let the fresh air into the room.",
    "Numbers like twelve and forty are easy to say out loud.",
)


def require():
    require_extra("mlx_whisper", "Whisper models", "whisper")


def is_whisper(path) -> bool:
    """mlx-whisper's layout: config.json holds Whisper's ModelDimensions."""
    config = read_config(path)
    return "n_mels" in config and "n_audio_ctx" in config


def load(path, dtype=mx.float32):
    require()
    from mlx_whisper.load_models import load_model

    if not is_whisper(path):
        raise OptiqError(f"{path} is not an mlx-whisper model folder (config.json with n_mels, n_audio_ctx)")
    return load_model(str(path), dtype=dtype)


def tokenizer_for(model):
    from mlx_whisper.tokenizer import get_tokenizer

    return get_tokenizer(model.is_multilingual, num_languages=model.num_languages, language="en", task="transcribe")


# -- speech -------------------------------------------------------------------


def read_wav(path) -> np.ndarray:
    """Mono float32 at 16 kHz (Whisper's rate) from a .wav file."""
    try:
        rate, data = wavfile.read(str(path))
    except (ValueError, OSError) as exc:
        raise OptiqError(f"{path}: not a readable .wav file ({exc})")
    if data.dtype.kind in "iu":
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max)
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        g = gcd(rate, SAMPLE_RATE)
        data = resample_poly(data, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return data


def check_speech(folder) -> list:
    """The .wav files of a speech folder, once each has a .txt transcript beside it."""
    return paired_files(folder, (".wav",), ".wav files", "transcript")


def read_speech(folder) -> list:
    """[(waveform, transcript)] from .wav files with a .txt transcript beside each."""
    return [(read_wav(wav), wav.with_suffix(".txt").read_text().strip()) for wav in check_speech(folder)]


def speak(sentences, folder) -> Path:
    """Write each sentence as espeak-ng speech (.wav) with its transcript (.txt)."""
    espeak = shutil.which("espeak-ng") or shutil.which("espeak")
    if espeak is None:
        raise OptiqError("no speech data: give a folder of .wav files with .txt transcripts, or install espeak-ng")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, sentence in enumerate(sentences):
        subprocess.run([espeak, "-w", str(folder / f"{i:03d}.wav"), sentence], check=True, capture_output=True)
        (folder / f"{i:03d}.txt").write_text(sentence + "\n")
    return folder


def speech(source, sentences) -> list:
    """A speech folder's samples, or `sentences` spoken by espeak-ng."""
    if source is not None:
        return read_speech(source)
    with tempfile.TemporaryDirectory(prefix="optiq-speech-") as tmp:
        return read_speech(speak(sentences, tmp))


# -- sensitivity ----------------------------------------------------------------


def features(model, samples) -> list:
    """[(log-mel (1, frames, mels), decoder tokens (1, T))]: the transcript after
    the start-of-transcript prompt, as Whisper is trained to predict it."""
    from mlx_whisper.audio import N_SAMPLES, log_mel_spectrogram, pad_or_trim

    tok = tokenizer_for(model)
    out = []
    for wave, text in samples:
        mel = log_mel_spectrogram(pad_or_trim(mx.array(wave), N_SAMPLES), n_mels=model.dims.n_mels)
        ids = list(tok.sot_sequence_including_notimestamps) + tok.encode(" " + text) + [tok.eot]
        out.append((mel[None].astype(mx.float32), mx.array([ids[: model.dims.n_text_ctx]])))
    return out


def quantizable(model) -> list:
    """[(path, module)] of every Linear and Embedding, encoder and decoder."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and hasattr(m, "to_quantized")]


class Calibrated:
    """The reference logits and encoder outputs of the calibration speech."""

    def __init__(self, model, batches):
        self.model, self.batches = model, batches
        self.audio = [model.embed_audio(mel) for mel, _ in batches]
        self.refs = [metrics.reference_from_logits(model.logits(tokens, a)) for (_, tokens), a in zip(batches, self.audio)]
        mx.eval(self.audio, [r.top1 for r in self.refs])

    def kl(self, encoder_changed: bool = True, model=None) -> dict:
        """Mean KL and top-1 agreement over transcript positions of `model`
        (default: the reference as it stands now, one layer perturbed)."""
        model = model or self.model
        fresh = encoder_changed or model is not self.model
        return logits_kl(
            (ref, model.logits(tokens, model.embed_audio(mel) if fresh else audio))
            for (mel, tokens), audio, ref in zip(self.batches, self.audio, self.refs)
        )


def rounding(model, batches, quantizer: str, dtype=mx.float16, refit: bool = True):
    """MLX's rounding, or GPTQ with Grams over the calibration speech's forward passes."""
    return gram_rounding(model, quantizable(model), quantizer, lambda: (model.logits(t, model.embed_audio(mel)) for mel, t in batches), dtype, refit)


def measure(model, batches, candidates, rounding, model_id: str = "", on_probe=run_it) -> SensitivityTable:
    """Every quantizable layer probed at every candidate (Whisper is small:
    a probe of a decoder layer reuses the cached encoder output)."""
    cal = Calibrated(model, batches)
    method = f"probe (whisper decoder logits), {rounding.quantizer}"
    return probe_table(
        quantizable(model), candidates, lambda path: cal.kl(path.startswith("encoder."))["kl_mean"],
        [t for _, t in batches], model_id, method, rounding, on_probe=on_probe,
    )


# -- writing --------------------------------------------------------------------


def best_plan(table: SensitivityTable, target_bpw: float, method: str = "exact"):
    """The best plan mlx-whisper can load: for each quantized width, the exact
    plan choosing per layer between it and float; the width whose plan
    predicts the least KL wins."""
    widths = {c for layer in table.layers for c in layer.candidates if c.bits < 16}
    plans = []
    for width in sorted(widths, key=lambda c: (c.bits, c.group_size)):
        try:
            plans.append(plan_bits(table.restricted(lambda c: c == width), target_bpw, method=method))
        except OptiqError:  # this width cannot meet the target even with every layer at it
            continue
    if not plans:
        raise OptiqError(f"no quantization width meets --target-bpw {target_bpw} for this Whisper model")
    return min(plans, key=lambda p: p.predicted_kl)


def quantize(model, plan, dtype=mx.float16, codes=None):
    """The planned layers quantized in place at the plan's one width (with
    exactly `codes` where GPTQ gave them), then every float (scales and
    biases too) cast to dtype, as optiq.quantize does."""
    chosen = {path: c for path, c in plan.assignments if c.bits < 16}
    widths = set(chosen.values())
    if len(widths) > 1:
        raise OptiqError(f"mlx-whisper holds one quantization width; the plan has {sorted(c.key for c in widths)}")
    quantization = None
    if widths:
        (width,) = widths
        nn.quantize(model, group_size=width.group_size, bits=width.bits, class_predicate=lambda p, m: p in chosen)
        quantization = {"group_size": width.group_size, "bits": width.bits}
    apply_codes(model, plan, codes)
    cast_floats(model, dtype)
    return quantization


def save(out, model, source, quantization, metadata: dict, force: bool = False):
    """mlx-whisper's folder (config.json, weights.safetensors), written atomically."""
    config = json.loads((Path(source) / "config.json").read_text())
    config.pop("quantization", None)
    if quantization:
        config["quantization"] = quantization
    with atomic_output(out, force=force) as tmp:
        mx.save_safetensors(str(tmp / "weights.safetensors"), dict(tree_flatten(model.parameters())))
        (tmp / "config.json").write_text(json.dumps(config, indent=4))
        write_json(tmp / "optiq_metadata.json", metadata)
    return Path(out)


# -- word error rate ------------------------------------------------------------


def words(text: str) -> list:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def edit_distance(a: list, b: list) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def transcribe(path, samples) -> list:
    """Greedy transcripts by stock mlx_whisper.transcribe, fp32 activations."""
    require()
    import mlx_whisper

    return [
        mlx_whisper.transcribe(wave, path_or_hf_repo=str(path), temperature=0.0, fp16=False, language="en", condition_on_previous_text=False, verbose=None)["text"]
        for wave, _ in samples
    ]


def wer(path, samples) -> dict:
    """Word error rate: word edits over reference words, summed over samples."""
    hyps = transcribe(path, samples)
    edits = sum(edit_distance(words(text), words(h)) for (_, text), h in zip(samples, hyps))
    n = sum(len(words(text)) for _, text in samples)
    return {"wer": edits / max(n, 1), "n_words": n, "n_samples": len(samples), "transcripts": hyps}
