"""LoRA benchmark: rank rules and adapter starts at equal trainable
parameters, over several seeds, on the quantized model users train; the float
model's own fine-tune as the gap to close; and training speed against
mlx_lm.lora on the same model and data, measured in the same run.

    python benchmarks/lora.py                               # SmolLM2 4.5-bpw optiq model, 200 steps x 3 seeds
    python benchmarks/lora.py --iters 300 --seeds 0,1,2 --n-test 128
    python benchmarks/lora.py --plot results/lora.json      # redraw the loss-curve PNG from a JSON
    python benchmarks/lora.py --merge a.json b.json --out results/lora.json   # join runs made in several calls

Task: GSM8K (../shared/data/gsm8k, or --gsm8k DIR with train.jsonl and
test.jsonl) as chat data, question -> worked answer; train on the first
--n-train train problems, validate on the next --n-valid, test on the first
--n-test test problems (greedy, batched, exact match of the final number, no
few-shot examples: the adapter learns the format).

Rows (--rows): a rank rule and a start, each given constant rank's
trainable-parameter count: constant, by_bits, by_kl (b = 0, mlx-lm's start),
constant+residual and by_error+residual (adapters fitted to W_ref -
dequant(Q(W)) before training, LoftQ's start), by_error (its ranks, b = 0),
and float (constant rank on the unquantized reference: the loss the
quantized rows try to reach). Each row runs once per seed (the seed sets the
adapters' random start and the batch order, the same for every row).
Speed: mlx_lm.lora's own command on the same quantized model, modules, rank,
batch and data against optiq's trainer, both over --speed-iters steps, the
first report (compilation) left out. On a CPU mlx_lm.lora on a quantized
model computes fp16 quantized matmuls (hours a step): there the pair runs on
--speed-model (default the fp32 reference).

Writes benchmarks/results/lora.json and lora.png (validation loss against
step, mean and spread over seeds; matplotlib).
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

from common import RESULTS, draw_png  # also puts the repo on sys.path

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
RESIDUALS = {}  # (model, reference, rank) -> {path: ResidualFactors}, shared by the runs of one process
ROWS = {  # label: (model, rank rule, start)
    "constant": ("quantized", "constant", "zero"),
    "by_bits": ("quantized", "by_bits", "zero"),
    "by_kl": ("quantized", "by_kl", "zero"),
    "by_error": ("quantized", "by_error", "zero"),
    "constant+residual": ("quantized", "constant", "residual"),
    "by_error+residual": ("quantized", "by_error", "residual"),
    "float": ("float", "constant", "zero"),
}


def default_model() -> str:
    from optiq.source import cache_dir

    out = cache_dir() / "bench" / "SmolLM2-135M-Instruct-optiq-4.5bpw"
    if not (out / "optiq_metadata.json").exists():
        from optiq.pipeline import ConvertConfig, convert

        convert(ConvertConfig(output=str(out), force=True))
    return str(out)


def write_data(folder: Path, gsm8k: Path, n_train: int, n_valid: int) -> Path:
    from optiq.tasks import read_gsm8k

    rows = read_gsm8k(gsm8k / "train.jsonl")
    chat = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]} for r in rows]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in chat[:n_train]) + "\n")
    (folder / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in chat[n_train : n_train + n_valid]) + "\n")
    return folder


def load(path):
    import mlx.core as mx
    import mlx_lm

    from optiq.cpu import adapt_for_cpu

    model, tok = mlx_lm.load(str(path))
    if mx.default_device() == mx.cpu:
        adapt_for_cpu(model)
    return model, tok


def run_one(label, paths, data, seed, args, test):
    import mlx.core as mx
    import numpy as np

    from optiq.lora.plan import KL_CLIP, plan_lora, weight_signals
    from optiq.lora.residual import layer_residuals, plan_from_residual, start_from_residual
    from optiq.lora.formats import write_peft
    from optiq.lora.train import apply_plan, load_datasets, lora_weights, reference_linears, target_dims, train
    which, scaling, init = ROWS[label]
    mx.random.seed(seed)
    np.random.seed(seed)  # mlx-lm draws batches with numpy's global RNG: the same batches for every row of a seed
    model, tok = load(paths[which])
    dims = target_dims(model)
    budget = plan_lora(dims, args.rank).trainable_params  # every row spends constant rank's parameters
    meta = Path(paths["quantized"]) / "optiq_metadata.json"
    weight_plan, table = weight_signals(json.loads(meta.read_text()))
    factors = None
    if scaling == "by_error" or init == "residual":  # the residuals are the model's, not the run's: taken once
        key = (paths["quantized"], paths["float"], args.rank)
        if key not in RESIDUALS:
            taken = layer_residuals(model, reference_linears(paths["float"], dims), dims, int(KL_CLIP * args.rank))
            RESIDUALS[key] = {f.path: f for f in taken}
        factors = RESIDUALS[key]
    plan, factors = plan_from_residual(model, dims, None, init, args.rank, scaling, factors=factors, plan=weight_plan, table=table,
                                       param_budget=budget)
    apply_plan(model, plan)
    held = 1 - start_from_residual(model, plan, factors) if init == "residual" else 0.0
    tr, va = load_datasets(data, tok, True)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        reports, _ = train(model, plan, tr, va, Path(work), args.iters, args.lr, args.batch_size, args.max_seq_length,
                           args.steps_per_eval, 10**9, val_batches=args.val_batches, resume=False)
        wall = time.perf_counter() - t0
    model.eval()
    if args.save_adapters:  # PEFT files, to score GSM8K on another machine when this one cannot
        write_peft(mkdir(Path(args.save_adapters) / f"{label}-seed{seed}"), attrs.evolve(plan, base_model=str(paths[which])),
                   lora_weights(model, plan), len(model.layers))
    acc = test_accuracy(model, tok, test, args) if test else float("nan")
    rates = [r["tokens_per_second"] for r in reports.train[1:]] or [r["tokens_per_second"] for r in reports.train]
    return dict(row=label, seed=seed, params=plan.trainable_params, ranks=[min(m.rank for m in plan.modules), max(m.rank for m in plan.modules)],
                residual_held=held, val=[(r["iteration"], r["val_loss"]) for r in reports.val],
                train=[(r["iteration"], r["train_loss"]) for r in reports.train], accuracy=acc,
                tokens_per_s=statistics.mean(rates), train_s=wall)


def test_accuracy(model, tok, test, args) -> float:
    """GSM8K accuracy with each batch's time printed: on a GPU the first
    batches compile kernels, and a silent stall reads like a hang."""
    from optiq.tasks import gsm8k

    clock = [time.perf_counter()]

    def progress(done, total):
        print(f"  GSM8K {done}/{total}: {time.perf_counter() - clock[0]:.1f} s", flush=True)
        clock[0] = time.perf_counter()

    return gsm8k(model, tok, test, [], max_tokens=args.max_tokens, batch_size=args.test_batch, progress=progress)["accuracy"]


def merged(paths) -> dict:
    """One result from runs made in several calls (one seed a call on a lent GPU).
    A part trained with other settings (a speed-only call: a few steps, --n-test 0)
    gives its speed pair and no runs; every speed pair is kept, longest first."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    same = ("iters", "lr", "rank", "batch_size", "max_seq_length", "n_train", "n_valid")
    comparable = [part for part in parts if all(part["args"][k] == parts[0]["args"][k] for k in same)]
    runs = {(r["row"], r["seed"]): r for part in comparable for r in part["runs"]}  # a later part's run replaces an earlier one
    result = parts[0] | {"runs": list(runs.values())}
    result["args"] = result["args"] | {"seeds": sorted({r["seed"] for r in result["runs"]}),
                                       "n_test": max(part["args"]["n_test"] for part in comparable)}
    pairs = [pair for part in parts for pair in [part.get("speed")] + part.get("speed_all", []) if pair]
    pairs = list({json.dumps(pair, sort_keys=True): pair for pair in pairs}.values())  # a pair carried in two parts counts once
    result["speed_all"] = sorted(pairs, key=lambda pair: -pair[0]["steps"])
    result["speed"] = result["speed_all"][0] if pairs else None
    result["summary"] = summarize(result["runs"])
    return result


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def mlx_lm_rates(output: str) -> list:
    """tok/s per report from mlx-lm's training log ("Tokens/sec N" or its table)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", output)
    rates = [float(x) for x in re.findall(r"Tokens/sec ([\d.]+)", text)]
    table = re.findall(r"^\s*\d+\s+[\d.]+\s+[▼▲=]?\s*([\d,.]+)\s+[\d.]+k?\s*$", text, flags=re.M)  # 2,882 tok/s
    return rates or [float(r.replace(",", "")) for r in table]


def speed_pair(model_path, data, args) -> list:
    """optiq's trainer and mlx_lm.lora, the same model, modules, rank, batch and steps."""
    import mlx.core as mx
    import numpy as np

    from optiq.lora.plan import plan_lora
    from optiq.lora.train import DEFAULT_TARGETS, apply_plan, load_datasets, target_dims, train

    mx.random.seed(0)
    np.random.seed(0)
    model, tok = load(model_path)
    plan = plan_lora(target_dims(model), args.rank)
    apply_plan(model, plan)
    tr, va = load_datasets(data, tok, True)
    with tempfile.TemporaryDirectory() as work:
        reports, _ = train(model, plan, tr, va, Path(work), args.speed_iters, args.lr, args.batch_size, args.max_seq_length,
                           10**9, 10**9, val_batches=1, resume=False)
    ours = [r["tokens_per_second"] for r in reports.train][1:]
    del model
    with tempfile.TemporaryDirectory() as out:
        config = Path(out) / "lora.yaml"  # the same modules and scale (alpha / r = 2) as optiq's constant rule
        keys = [f"self_attn.{k}" if k in ("q_proj", "k_proj", "v_proj", "o_proj") else f"mlp.{k}" for k in DEFAULT_TARGETS]
        config.write_text(json.dumps({"lora_parameters": {"rank": args.rank, "scale": 2.0, "dropout": 0.0, "keys": keys}}))
        # --mask-prompt as optiq trains: tok/s counts only the tokens the loss sees
        cmd = [sys.executable, "-m", "mlx_lm", "lora", "--model", str(model_path), "--train", "--data", str(data), "-c", str(config),
               "--mask-prompt", "--iters", str(args.speed_iters), "--batch-size", str(args.batch_size), "--num-layers", "-1",
               "--learning-rate", str(args.lr), "--max-seq-length", str(args.max_seq_length), "--adapter-path", out,
               "--steps-per-report", "10", "--val-batches", "1", "--steps-per-eval", "100000", "--seed", "0"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    theirs = mlx_lm_rates(proc.stdout + proc.stderr)[1:]
    mean = lambda xs: statistics.mean(xs) if xs else float("nan")  # noqa: E731
    return [dict(trainer="optiq lora train", model=str(model_path), steps=args.speed_iters, tokens_per_s=mean(ours), reports=ours),
            dict(trainer="mlx_lm.lora", model=str(model_path), steps=args.speed_iters, tokens_per_s=mean(theirs), reports=theirs,
                 returncode=proc.returncode, tail=(proc.stdout + proc.stderr)[-600:])]


def summarize(runs) -> list:
    rows = []
    for label in dict.fromkeys(r["row"] for r in runs):
        mine = [r for r in runs if r["row"] == label]
        final = [r["val"][-1][1] for r in mine]
        scored = [r["accuracy"] for r in mine if r["accuracy"] == r["accuracy"]]  # runs made with --n-test 0 have NaN
        rows.append(dict(row=label, seeds=len(mine), params=mine[0]["params"], ranks=mine[0]["ranks"], residual_held=mine[0]["residual_held"],
                         val_start=statistics.mean(r["val"][0][1] for r in mine), val_final=statistics.mean(final),
                         val_final_std=statistics.stdev(final) if len(final) > 1 else float("nan"),
                         accuracy=statistics.mean(scored) if scored else float("nan"), accuracy_seeds=len(scored),
                         accuracy_std=statistics.stdev(scored) if len(scored) > 1 else float("nan"), tokens_per_s=statistics.mean(r["tokens_per_s"] for r in mine)))
    return rows


def table(result) -> str:
    a = result["args"]
    lines = [f"model {result['model']} (float: {result['float']}); GSM8K chat, {a['n_train']} train, {a['iters']} steps x batch "
             f"{a['batch_size']}, lr {a['lr']}, rank {a['rank']} budget, seeds {a['seeds']}; test {a['n_test']} problems, 0-shot greedy\n",
             "| row | trainable params | ranks | residual held at start | val loss start | val loss end (mean ± sd) | seeds | GSM8K acc (mean ± sd) | seeds scored | train tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["summary"]:
        lines.append(f"| {r['row']} | {r['params']:,} | {r['ranks'][0]}-{r['ranks'][1]} | {r['residual_held']:.1%} | {r['val_start']:.3f} | "
                     f"{r['val_final']:.3f} ± {r['val_final_std']:.3f} | {r['seeds']} | {r['accuracy']:.3f} ± {r.get('accuracy_std', float('nan')):.3f} | "
                     f"{r.get('accuracy_seeds', r['seeds'])} | "
                     f"{r['tokens_per_s']:.0f} |")
    if result.get("speed"):
        lines += ["", "| trainer (same model, rank, batch, data) | steps | train tok/s | optiq / mlx_lm.lora |", "|---|---|---|---|"]
        for pair in result.get("speed_all") or [result["speed"]]:
            ratio = pair[0]["tokens_per_s"] / pair[1]["tokens_per_s"]
            lines += [f"| {s['trainer']} | {s['steps']} | {s['tokens_per_s']:.0f} | {f'{ratio:.2f}x' if s is pair[0] else ''} |" for s in pair]
    return "\n".join(lines)


def plot(result, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    zoom = 1 if min(len(r["val"]) for r in result["runs"]) > 2 else 0
    for ax, first in zip(axes, (0, zoom)):  # the whole run, and the end where the rows part
        for label in dict.fromkeys(r["row"] for r in result["runs"]):
            curves = np.array([[v for _, v in r["val"]] for r in result["runs"] if r["row"] == label])[:, first:]
            steps = [s for s, _ in next(r for r in result["runs"] if r["row"] == label)["val"]][first:]
            mean, sd = curves.mean(0), curves.std(0)
            ax.plot(steps, mean, label=label, linestyle="--" if label == "float" else "-", marker="." if first else None)
            ax.fill_between(steps, mean - sd, mean + sd, alpha=0.15)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (GSM8K answers)")
    axes[1].set_title(f"from step {steps[0]}")
    axes[0].set_title(f"LoRA on {Path(result['model']).name}, mean ± sd over seeds {result['args']['seeds']}", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the quantized optiq model (default: SmolLM2 at 4.5 bpw, made by optiq convert)")
    p.add_argument("--reference", default=None, help="its float source (default: the one its optiq_metadata.json records)")
    p.add_argument("--gsm8k", default=str(SHARED_GSM8K))
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--steps-per-eval", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-seq-length", type=int, default=384)
    p.add_argument("--n-train", type=int, default=1600)
    p.add_argument("--n-valid", type=int, default=64)
    p.add_argument("--val-batches", type=int, default=16)
    p.add_argument("--n-test", type=int, default=128)
    p.add_argument("--test-batch", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--speed-iters", type=int, default=60)
    p.add_argument("--speed-model", default=None, help="model for the speed pair (default: the quantized model on a GPU, the float one on a CPU)")
    p.add_argument("--save-adapters", default=None, metavar="DIR", help="write each run's adapter (PEFT) under DIR")
    p.add_argument("--out", default=str(RESULTS / "lora.json"))
    p.add_argument("--plot", default=None, metavar="JSON", help="only redraw the PNG of an earlier run")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="only join earlier runs' JSONs into --out, with its table and PNG")
    args = p.parse_args()
    if args.merge:
        result = merged(args.merge)
        Path(args.out).write_text(json.dumps(result, indent=1))
        args.plot = args.out
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        print(table(result))
        return plot(result, Path(args.plot).with_suffix(".png"))
    gsm8k_dir = Path(args.gsm8k)
    if not (gsm8k_dir / "train.jsonl").exists():
        sys.exit(f"benchmarks/lora.py needs GSM8K's train.jsonl and test.jsonl in {gsm8k_dir} (--gsm8k)")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := [r for r in rows if r not in ROWS]:
        sys.exit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    import mlx.core as mx

    from optiq.blas import ensure_fast_blas
    from optiq.source import recorded_source
    from optiq.tasks import read_gsm8k

    ensure_fast_blas()
    model_path = args.model or default_model()
    float_path = str(recorded_source(args.reference, json.loads((Path(model_path) / "optiq_metadata.json").read_text()), "benchmarks/lora.py"))
    paths = {"quantized": model_path, "float": float_path}
    test = read_gsm8k(gsm8k_dir / "test.jsonl")[: args.n_test]
    result = dict(model=model_path, float=float_path, device=str(mx.default_device()), args=vars(args) | {"seeds": seeds}, runs=[])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "data", gsm8k_dir, args.n_train, args.n_valid)
        for seed in seeds:
            for label in rows:
                run = run_one(label, paths, data, seed, args, test)
                result["runs"].append(run)
                print(f"{label} seed {seed}: val {run['val'][0][1]:.3f} -> {run['val'][-1][1]:.3f}, acc {run['accuracy']:.3f}, "
                      f"{run['tokens_per_s']:.0f} tok/s, {run['train_s']:.0f} s", flush=True)
                result["summary"] = summarize(result["runs"])
                out.write_text(json.dumps(result, indent=1))  # every run kept as it lands
        if args.speed_iters:
            speed_model = args.speed_model or (float_path if mx.default_device() == mx.cpu else model_path)
            result["speed"] = speed_pair(speed_model, data, args)
            out.write_text(json.dumps(result, indent=1))
    print()
    print(table(result))
    print(f"\nwrote {out}")
    draw_png(plot, result, out.with_suffix(".png"), script="lora.py")


if __name__ == "__main__":
    main()
