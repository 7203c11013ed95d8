"""Learned rounding: `optiq tune` over optiq's mixed plan against mlx-lm's own
DWQ (`mlx_lm.quant.dwq.dwq_quantize`) over uniform 4-bit g64, at the same
effective bits, calibration tokens, steps, learning rate and batch,
measured in one run on the same held-out tokens.

    python benchmarks/tune.py                            # SmolLM2, 60 steps of 4 x 256 WikiText tokens
    python benchmarks/tune.py --optiq-tuned DIR          # reuse an `optiq tune` output of the same settings
    python benchmarks/tune.py --code-lr 1e-3             # optiq's row trains the codes too

Tuning seconds are each loop's own (optiq's from its output's metadata, so
loading and the before/after measurement are not counted; mlx-lm's around
its dwq_quantize call). On a GPU both train in the model's fp16: MLX-CUDA's
fp32 quantized forward failed (0.32.4).

Data: WikiText-2 from ../shared/data, calibrating on the last 25% of
articles and evaluating on the first 75% (--n-eval x --seq-len tokens).
Every row is the written model opened by stock mlx-lm with fp32
activations, KL against the fp32 reference. Writes
benchmarks/results/tune-<model>.json.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, WIKITEXT  # also puts the repo on sys.path


def measured(model, ev, refs) -> dict:
    from optiq.cpu import adapt_for_cpu
    from optiq.evaluate import quality

    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        adapt_for_cpu(model)
    return quality(model, ev, refs, batch_size=4)


def train_dtype(stored):
    """fp32 on a CPU (its half-precision matmuls are slow and inexact), the
    model's own dtype on a GPU (mlx-lm's DWQ trains in bf16 by default; fp16
    for a bf16 model like Qwen2.5 risks overflowing its activations)."""
    import mlx.core as mx

    return mx.float32 if mx.default_device() == mx.cpu else stored


def mlx_lm_dwq(ref_path, cal, args) -> tuple:
    """(uniform 4-bit g64 before, after mlx-lm's dwq_quantize), as models."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import mlx_lm
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import quantize_model

    from optiq.cpu import adapt_for_cpu
    from optiq.quantize import cast_floats
    from optiq.source import to_fp32
    from optiq.tune import reference_targets

    def uniform():
        model, config = mlx_lm.load(str(ref_path), return_config=True)[::2]
        model, _ = quantize_model(model, config, group_size=64, bits=4)
        return model

    reference, _ = mlx_lm.load(str(ref_path))
    to_fp32(reference)
    model = uniform()
    # the dtype the uniform row stores its scales in (the model's own): DWQ's row keeps it
    stored = next(m.scales.dtype for _, m in model.named_modules() if hasattr(m, "scales"))
    if mx.default_device() == mx.cpu:
        adapt_for_cpu(model)
    rows = [(list(map(int, r)), 0) for r in cal]
    t0 = time.perf_counter()
    dwq_quantize(model, lambda batch, i, split: reference_targets(reference, batch, args.top_k), optim.Adam(learning_rate=args.lr),
                 rows, rows[: args.batch_size], args.batch_size, args.seq_len + 1, args.seed, dtype=train_dtype(stored))
    seconds = time.perf_counter() - t0
    cast_floats(model, stored)  # scales and biases as the written model stores them, as the uniform row does
    return uniform(), model, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the optiq model (default: SmolLM2 at 4.5 bpw, made by optiq convert)")
    p.add_argument("--reference", default=None, help="its float source (default: the one its optiq_metadata.json records)")
    p.add_argument("--wikitext", default=str(WIKITEXT))
    p.add_argument("--optiq-tuned", default=None, help="an optiq tune output of that model, instead of tuning here")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--n-eval", type=int, default=8)
    p.add_argument("--top-k", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--code-lr", type=float, default=0.0, help="optiq tune --code-lr: > 0 trains the codes too")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not Path(args.wikitext).exists():
        sys.exit(f"needs {args.wikitext} (../shared/data)")

    import mlx_lm

    from optiq.blas import ensure_fast_blas
    from optiq.calibration import tokens_from_texts, wikitext_split
    from optiq.evaluate import reference_batches
    from optiq.source import load_reference, recorded_source

    ensure_fast_blas()
    sys.path.insert(0, str(Path(__file__).parent))
    from lora import default_model

    model_path = Path(args.model or default_model())
    meta = json.loads((model_path / "optiq_metadata.json").read_text())
    ref_path = recorded_source(args.reference, meta, "benchmarks/tune.py")
    reference = load_reference(ref_path)
    cal_text, eval_text = wikitext_split(Path(args.wikitext).read_text())
    n_cal = args.steps * args.batch_size  # one pass: mlx-lm's DWQ takes one step per batch of its data
    cal = tokens_from_texts([cal_text], reference.tokenizer, n_cal, args.seq_len)
    ev = tokens_from_texts([eval_text], reference.tokenizer, args.n_eval, args.seq_len)
    refs = reference_batches(reference.model, ev, batch_size=4)
    rows = []

    def add(name, model, bpw, seconds=0.0):
        rows.append(dict(method=name, effective_bpw=bpw, seconds=seconds, **measured(model, ev, refs)))
        print(f"{name}: mean KL {rows[-1]['kl_mean']:.4f}, top-1 {rows[-1]['top1']:.3f}", flush=True)

    plan_bpw = meta["effective_bpw"]
    before, after, seconds = mlx_lm_dwq(ref_path, cal, args)
    add("uniform 4-bit g64 (mlx-lm)", before, 4.5)
    add(f"uniform 4-bit g64 + mlx-lm DWQ ({args.steps} steps)", after, 4.5, seconds)
    del before, after
    add("optiq convert (default)", mlx_lm.load(str(model_path))[0], plan_bpw)
    with tempfile.TemporaryDirectory() as tmp:
        tuned = args.optiq_tuned
        if tuned is None:
            cal_file = Path(tmp) / "calibration.txt"
            cal_file.write_text(cal_text)
            tuned = str(Path(tmp) / "tuned")
            cmd = [sys.executable, "-m", "optiq", "tune", str(model_path), "-o", tuned, "--calibration", str(cal_file), "--n-calibration", str(n_cal),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
                   "--top-k", str(args.top_k), "--seed", str(args.seed), "--code-lr", str(args.code_lr), "--reference", str(ref_path)]
            subprocess.run(cmd, check=True)
        elif not (Path(tuned) / "config.json").exists():
            sys.exit(f"--optiq-tuned {tuned}: no model there")
        codes = f", codes at {args.code_lr:g}" if args.code_lr else ""
        seconds = json.loads((Path(tuned) / "optiq_metadata.json").read_text()).get("tuning", {}).get("seconds", float("nan"))
        add(f"optiq convert + optiq tune ({args.steps} steps{codes})", mlx_lm.load(tuned)[0], plan_bpw, seconds)
    name = model_path.name
    out = Path(args.out or RESULTS / f"tune-{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(model=str(model_path), reference=str(ref_path), args=vars(args), rows=rows), indent=1))
    print(f"\n{name}: {args.steps} steps x {args.batch_size} x {args.seq_len} WikiText tokens, lr {args.lr}; held-out {args.n_eval} x {args.seq_len}\n")
    print("| method | eff. bpw | mean KL | p99 KL | top-1 | ppl | tuning (s) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['effective_bpw']:.3f} | {r['kl_mean']:.4f} | {r['kl_p99']:.3f} | {r['top1']:.3f} | {r['perplexity']:.2f} | {r['seconds']:.0f} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
