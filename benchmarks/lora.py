"""LoRA benchmark: rank rules at an equal trainable-parameter budget, and
training speed against mlx_lm.lora, measured in one run.

    python benchmarks/lora.py                      # SmolLM2 optiq model (made with `optiq convert` defaults)
    python benchmarks/lora.py --model PATH --iters 60 --n-test 40

Task: GSM8K (../shared/data/gsm8k) as chat data, question -> worked answer;
train on the first --n-train train problems, validate on the next 64, test
on the first --n-test test problems (greedy, exact match of the final
number, no few-shot examples: the adapter learns the format). Rows: constant
rank, by_bits and by_kl, each given the constant row's parameter count as
--param-budget; validation loss after the same steps; accuracy; training
tokens/s. A last row runs mlx_lm.lora (its CLI, one rank everywhere) on the
same data for a few steps and reports its tokens/s, against optiq's trainer on
the same model (SmolLM2 in fp32: mlx_lm.lora on a quantized model computes
fp16 quantized matmuls, which on this CPU take hours per step).
Writes benchmarks/results/lora.json.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS  # also puts the repo on sys.path
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def default_model() -> str:
    from optiq.source import cache_dir

    out = cache_dir() / "bench" / "SmolLM2-135M-Instruct-optiq-4.5bpw"
    if not (out / "optiq_metadata.json").exists():
        from optiq.pipeline import ConvertConfig, convert

        convert(ConvertConfig(output=str(out), force=True))
    return str(out)


def fp32_model() -> str:
    from optiq.source import cache_dir, resolve_model

    out = cache_dir() / "bench" / "SmolLM2-135M-Instruct-fp32"
    if not (out / "config.json").exists():
        from mlx_lm import convert

        convert(str(resolve_model(None)), mlx_path=str(out), dtype="float32")
    return str(out)


def write_data(folder: Path, n_train: int) -> Path:
    from optiq.tasks import read_gsm8k

    rows = read_gsm8k(GSM8K / "train.jsonl")
    chat = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]} for r in rows]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in chat[:n_train]) + "\n")
    (folder / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in chat[n_train : n_train + 64]) + "\n")
    return folder


def run_rule(model_path, data, scaling, rank, budget, args, iters=None, n_test=None):
    import mlx.core as mx
    import mlx_lm

    from optiq.cpu import adapt_for_cpu
    from optiq.lora.plan import plan_lora, weight_signals
    from optiq.lora.train import apply_plan, load_datasets, target_dims, train
    from optiq.tasks import gsm8k, read_gsm8k

    import numpy as np

    mx.random.seed(0)
    np.random.seed(0)  # mlx-lm draws batches with numpy's global RNG: the same batches for every rule
    model, tok = mlx_lm.load(model_path)
    adapt_for_cpu(model)
    meta = Path(model_path) / "optiq_metadata.json"
    weight_plan, table = weight_signals(json.loads(meta.read_text())) if meta.exists() else (None, None)
    plan = plan_lora(target_dims(model), rank, scaling, weight_plan, table, budget)
    apply_plan(model, plan)
    tr, va = load_datasets(data, tok, True)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        iters = iters or args.iters
        reports, _ = train(model, plan, tr, va, Path(work), iters, args.lr, args.batch_size, args.max_seq_length,
                           iters, 10**9, val_batches=args.val_batches, resume=False)
        wall = time.perf_counter() - t0
    model.eval()
    n_test = args.n_test if n_test is None else n_test
    test = read_gsm8k(GSM8K / "test.jsonl")[:n_test]
    acc = gsm8k(model, tok, test, [], max_tokens=args.max_tokens) if n_test else {"accuracy": float("nan")}
    tps = [r["tokens_per_second"] for r in reports.train]
    return dict(rule=scaling if iters == args.iters else f"optiq lora ({scaling}, {iters} steps, speed model)", params=plan.trainable_params, ranks=sorted({m.rank for m in plan.modules}),
                val_loss_start=reports.val[0]["val_loss"], val_loss=reports.val[-1]["val_loss"],
                accuracy=acc["accuracy"], tokens_per_s=sum(tps) / len(tps) if tps else float("nan"), train_s=wall)


def mlx_lm_rates(output: str) -> list:
    """tok/s from mlx-lm's training table (rows: iteration, loss, arrow, tok/s, tokens)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", output)
    rows = re.findall(r"^\s*\d+\s+[\d.]+\s+[▼▲=]?\s*([\d.]+)\s+[\d.]+k?\s*$", text, flags=re.M)
    return [float(r) for r in rows] or [float(x) for x in re.findall(r"Tokens/sec ([\d.]+)", text)]


def run_mlx_lm(model_path, data, rank, args):
    from optiq.lora.train import DEFAULT_TARGETS

    with tempfile.TemporaryDirectory() as out:
        config = Path(out) / "lora.yaml"  # the same modules and scale as optiq's constant row
        keys = [f"self_attn.{k}" if k.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else f"mlp.{k}" for k in DEFAULT_TARGETS]
        config.write_text(json.dumps({"lora_parameters": {"rank": rank, "scale": 2.0, "dropout": 0.0, "keys": keys}}))
        # --mask-prompt as optiq trains: tok/s counts only the tokens the loss sees
        cmd = [sys.executable, "-m", "mlx_lm", "lora", "--model", model_path, "--train", "--data", str(data), "-c", str(config), "--mask-prompt",
               "--iters", str(args.mlx_lm_iters), "--batch-size", str(args.batch_size), "--num-layers", "-1",
               "--learning-rate", str(args.lr), "--max-seq-length", str(args.max_seq_length), "--adapter-path", out,
               "--steps-per-report", "1", "--val-batches", "1", "--steps-per-eval", "100000"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    rates = mlx_lm_rates(proc.stdout + proc.stderr)
    return dict(rule=f"mlx_lm.lora (rank {rank}, {args.mlx_lm_iters} steps)", params=None, ranks=[rank], val_loss_start=float("nan"),
                val_loss=float("nan"), accuracy=float("nan"), tokens_per_s=sum(rates) / len(rates) if rates else float("nan"),
                train_s=wall, returncode=proc.returncode, tail=(proc.stdout + proc.stderr)[-400:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-seq-length", type=int, default=384)
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-test", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--mlx-lm-iters", type=int, default=3)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--speed-model", default=None, help="model for the speed pair against mlx_lm.lora (default: SmolLM2 in fp32; "
                   "mlx_lm.lora on a quantized model runs fp16 quantized matmuls, hours per step on a CPU)")
    p.add_argument("--out", default=str(RESULTS / "lora.json"))
    args = p.parse_args()
    if not GSM8K.exists():
        sys.exit(f"benchmarks/lora.py needs {GSM8K} (the shared GSM8K data)")

    from optiq.blas import ensure_fast_blas

    ensure_fast_blas()
    model_path = args.model or default_model()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp) / "data", args.n_train)
        first = run_rule(model_path, data, "constant", args.rank, None, args)
        rows.append(first)
        print(first, flush=True)
        for rule in ("by_bits", "by_kl"):
            rows.append(run_rule(model_path, data, rule, args.rank, first["params"], args))
            print(rows[-1], flush=True)
        speed_model = args.speed_model or fp32_model()
        rows.append(run_rule(speed_model, data, "constant", args.rank, None, args, iters=args.mlx_lm_iters, n_test=0))
        print(rows[-1], flush=True)
        rows.append(run_mlx_lm(speed_model, data, args.rank, args))
        print(rows[-1], flush=True)
    print(f"\nmodel {model_path} (speed pair: {speed_model}); GSM8K chat, {args.n_train} train, {args.iters} steps x batch {args.batch_size}, "
          f"lr {args.lr}; test {args.n_test} problems, 0-shot greedy\n")
    print("| rank rule | trainable params | ranks | val loss (start -> end) | GSM8K acc | train tok/s |\n|---|---|---|---|---|---|")
    for r in rows:
        params = f"{r['params']:,}" if r["params"] else "-"
        print(f"| {r['rule']} | {params} | {r['ranks'][0]}-{r['ranks'][-1]} | {r['val_loss_start']:.3f} -> {r['val_loss']:.3f} | "
              f"{r['accuracy']:.3f} | {r['tokens_per_s']:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(model=model_path, args=vars(args), rows=rows), indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
