"""Learned rounding's learning rate, temperature and step count, swept over
optiq's mixed plan: which `optiq tune` settings make held-out KL go down.

    python benchmarks/tune_sweep.py                                   # SmolLM2 4.5-bpw model
    python benchmarks/tune_sweep.py --lrs 3e-6,1e-5,3e-5 --temperatures 1,2 --checkpoints 16,64,256
    python benchmarks/tune_sweep.py --plot results/tune-sweep-X.json  # redraw the PNG
    python benchmarks/tune_sweep.py --apply DIR/tune-sweep-X-tuned.safetensors   # write it, measure it here
    python benchmarks/tune_sweep.py --measure MODEL_DIR [MODEL_DIR ...]         # measure written models here

Each (lr, temperature) starts from the written model and runs `optiq.tune`'s
own steps (the library's loss, batches and optimizer), scored at every
checkpoint on two token sets that training never sees: a validation slice of
the calibration split (last 25% of WikiText articles: --n-val windows spread
over it, the other --n-train windows train), which picks the setting, and the
weights table's held-out tokens (first 75% of articles, --n-eval x
--eval-seq-len), which reports it, so the choice is not made on the tokens it
is reported on. Scores are mean KL against the fp32 reference, with fp32
activations or (--dtype model, as on MLX-CUDA, where fp32 failed) the
model's own. The chosen (setting, checkpoint)'s tuned scales and biases are
written (safetensors) so another machine can apply them to the same model.

Writes benchmarks/results/tune-sweep-<model>.json and .png (held-out KL
against step, one line per setting).

--apply writes the model with a sweep's tuned scales and biases (optiq's
save, stock mlx-lm loads it, in the model's dtypes) and measures it; --measure
measures written models. Both measure as the weights table does (fp32 on
this machine, the same held-out tokens), after mlx-lm's round-to-nearest
4-bit g64 (the token check `weights.py --add-from` applies), on WikiText and
on GSM8K's text (unlike the calibration). They write
results/tune-measured-<first model>.json, which weights.py joins.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from common import RESULTS, WIKITEXT, draw_png, markdown_table  # also puts the repo on sys.path
from lora import default_model
from optiq.blas import ensure_fast_blas


def floats(text: str) -> list:
    return [float(x) for x in text.split(",") if x.strip()]


def as_dtype(model, dtype: str):
    """The written model with fp32 scales, biases and activations, or as written ("model")."""
    from optiq.source import to_fp32

    return to_fp32(model) if dtype == "float32" else model


def fp32_reference(given, meta: dict) -> tuple:
    """(path, Loaded) of the float model a written one came from, in fp32 on any
    device (load_reference keeps a GPU model's own dtype)."""
    from optiq.source import load_reference, recorded_source, to_fp32

    ref_path = recorded_source(given, meta, "benchmarks/tune_sweep.py")
    reference = load_reference(ref_path)
    to_fp32(reference.model)
    return ref_path, reference


def sweep_one(model_path, reference, train, val, val_refs, ev, ev_refs, lr, temperature, checkpoints, args):
    """One setting's curve, [(step, val KL, held-out KL, mean train loss since
    the last checkpoint)], and its parameters at the checkpoint of lowest val KL."""
    import mlx_lm

    from optiq.evaluate import quality
    from optiq.tune import TuneConfig, start, tune_steps

    model = as_dtype(mlx_lm.load(str(model_path))[0], args.dtype)
    config = TuneConfig(steps=checkpoints[-1], lr=lr, batch_size=args.batch_size, temperature=temperature, top_k=args.top_k, seed=args.seed,
                        max_bits=args.max_bits, schedule=args.schedule, norm_lr=args.norm_lr,
                        code_lr=args.code_lr)
    params, opt = start(model, config)
    curve = [(0, quality(model, val, val_refs, 4)["kl_mean"], quality(model, ev, ev_refs, 4)["kl_mean"], float("nan"))]
    done, kept = 0, (curve[0][1], 0, None)
    for step in checkpoints:
        params, opt, losses = tune_steps(model, reference, train, params, opt, done, step, config)
        done = step
        curve.append((step, quality(model, val, val_refs, 4)["kl_mean"], quality(model, ev, ev_refs, 4)["kl_mean"], sum(losses) / len(losses)))
        if curve[-1][1] < kept[0]:
            kept = (curve[-1][1], step, params)
        print(f"lr {lr:g} T {temperature:g} step {step}: val KL {curve[-1][1]:.4f}, held-out KL {curve[-1][2]:.4f}, loss {curve[-1][3]:.4f}", flush=True)
    return curve, kept


def plot(result, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in result["runs"]:
        steps = [c[0] for c in run["curve"]]
        ax.plot(steps, [c[2] for c in run["curve"]], marker="o", label=f"lr {run['lr']:g}, T {run['temperature']:g}")
    ax.axhline(result["untuned"]["kl_mean"], color="black", linestyle="--", label="untuned")
    ax.set_xscale("symlog", linthresh=8)
    ax.set_xlim(left=0)
    ax.set_xlabel(f"tuning step (batch {result['args']['batch_size']} x {result['args']['seq_len']} tokens)")
    ax.set_ylabel("held-out mean KL vs fp32 reference")
    ax.set_title(f"optiq tune: held-out KL by step, per (lr, temperature), on {result['device']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def table(result) -> str:
    rows = []
    for run in result["runs"]:
        best = min(run["curve"], key=lambda c: c[1])
        last = run["curve"][-1]
        rows.append([f"{run['lr']:g}", f"{run['temperature']:g}", f"{best[0]}", f"{best[1]:.4f}", f"{best[2]:.4f}", f"{last[2]:.4f}", f"{run['seconds']:.0f}"])
    head = f"untuned: val KL {result['untuned']['val_kl']:.4f}, held-out KL {result['untuned']['kl_mean']:.4f}\n\n"
    return head + markdown_table(["lr", "temperature", "best step (val)", "val KL there", "held-out KL there", f"held-out KL at {result['args']['checkpoints'][-1]}", "seconds"], rows)


def gsm8k_text(path: Path) -> str:
    from optiq.tasks import read_gsm8k

    return "\n\n".join(f"{r['question']}\n{r['answer']}" for r in read_gsm8k(path))


def written_label(folder: Path) -> str:
    """A written model's row name, from what its optiq_metadata.json records."""
    meta = json.loads((folder / "optiq_metadata.json").read_text())
    calibration = Path(str(meta.get("calibration", {}).get("source", "self-sampled"))).name
    refit = ", scales refit" if meta.get("refit_scales") else ""  # recorded since convert refits GPTQ's scales by default
    label = f"optiq convert (calibration: {calibration}{refit})"
    if tuning := meta.get("tuning"):
        on = ", on a GPU" if "gpu" in str(tuning.get("device", "")) else ""
        label += f" + optiq tune (lr {tuning['lr']:g}, T {tuning.get('temperature', 2.0):g}, {tuning['steps']} steps{on})"
    return label


def apply_tuned(args) -> Path:
    """The model with a sweep's tuned values, written next to it (optiq's save)."""
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten, tree_map, tree_unflatten

    from optiq.quantize import save_model_folder

    tuned_file = Path(args.apply)
    sweep = json.loads(tuned_file.with_name(tuned_file.name.replace("-tuned.safetensors", ".json")).read_text())
    model_path = Path(args.model or default_model())
    meta = json.loads((model_path / "optiq_metadata.json").read_text())
    model, tok, config = mlx_lm.load(str(model_path), return_config=True)
    values = mx.load(str(tuned_file))
    dtypes = dict(tree_flatten(tree_map(lambda x: x.dtype, model.parameters())))
    if missing := [k for k in values if k not in dtypes]:
        sys.exit(f"{tuned_file} holds {len(missing)} values the model lacks (e.g. {missing[0]}): tuned from another model")
    model.update(tree_unflatten([(k, v.astype(dtypes[k])) for k, v in values.items()]))
    written = model_path.with_name(model_path.name + "-tuned")
    run = next(r for r in sweep["runs"] if (r["lr"], r["temperature"]) == (sweep["chosen"]["lr"], sweep["chosen"]["temperature"]))
    tuning = sweep["chosen"] | {"device": sweep["device"], "sweep": sweep["args"], "values": str(tuned_file), "seconds": run["seconds"]}
    save_model_folder(str(written), model, tok, config, model_path, meta | {"tuning": tuning}, force=True)
    return written


def measure_written(args, folders: list, out: Path):
    """Written models opened by stock mlx-lm, measured here in fp32 as the weights
    table measures (the same held-out tokens), after mlx-lm's round-to-nearest
    4-bit g64 (the token check weights.py --add-from applies), on WikiText and
    on GSM8K's text (unlike the calibration)."""
    import mlx.core as mx
    import mlx_lm
    import mlx_lm_peers

    from optiq.calibration import tokens_from_texts, wikitext_split
    from optiq.cpu import adapt_for_cpu
    from optiq.evaluate import quality, reference_batches
    from optiq.io import write_json
    meta = json.loads((folders[0] / "optiq_metadata.json").read_text())
    ref_path, reference = fp32_reference(args.reference, meta)
    texts = {"WikiText": wikitext_split(Path(args.wikitext).read_text())[1]}
    if Path(args.gsm8k_text).exists():
        texts["GSM8K"] = gsm8k_text(Path(args.gsm8k_text))
    makers = [("uniform 4-bit g64", 4.5, 0.0, lambda: mlx_lm_peers.rtn_model(ref_path, None))]
    for folder in folders:
        written = json.loads((folder / "optiq_metadata.json").read_text())
        seconds = written.get("tuning", {}).get("seconds", float("nan"))  # the tuning's time; a convert's own is not recorded
        makers.append((written_label(folder), written["effective_bpw"], seconds, lambda folder=folder: mlx_lm.load(str(folder))[0]))
    result = {"models": [str(f) for f in folders], "reference": str(ref_path), "device": str(mx.default_device()), "rows": [], "other_text": []}
    for name, text in texts.items():
        ev = tokens_from_texts([text], reference.tokenizer, args.n_eval, args.eval_seq_len)
        refs = reference_batches(reference.model, ev, 4)
        for method, bpw, seconds, make in makers:
            row = {"method": method, "effective_bpw": bpw, **quality(adapt_for_cpu(make()), ev, refs, batch_size=4), "seconds": seconds, "text": name}
            (result["rows"] if name == "WikiText" else result["other_text"]).append(row)
            print(f"{name}: {method}: mean KL {row['kl_mean']:.4f}, top-1 {row['top1']:.3f}", flush=True)
    result["rtn_check"] = result["rows"][0]
    write_json(out, result)
    for name in texts:
        rows = [r for r in result["rows"] + result["other_text"] if r["text"] == name]
        print(f"\n{name} held-out, {args.n_eval} x {args.eval_seq_len} tokens, fp32 on {mx.default_device()}:\n")
        print(markdown_table(["method", "eff. bpw", "mean KL", "x uniform 4-bit", "top-1", "ppl"],
                             [[r["method"], f"{r['effective_bpw']:.3f}", f"{r['kl_mean']:.4f}", f"{r['kl_mean'] / rows[0]['kl_mean']:.2f}x",
                               f"{r['top1']:.3f}", f"{r['perplexity']:.2f}"] for r in rows]))
    print(f"\nwrote {out}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="the optiq model (default: SmolLM2 at 4.5 bpw, made by optiq convert)")
    p.add_argument("--reference", default=None, help="its float source (default: the one its optiq_metadata.json records)")
    p.add_argument("--wikitext", default=str(WIKITEXT))
    p.add_argument("--lrs", default="1e-6,3e-6,1e-5")
    p.add_argument("--temperatures", default="1,2")
    p.add_argument("--checkpoints", default="8,16,32,64,128,256,512", help="steps at which both token sets are scored (the last is the run's length)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--n-train", type=int, default=196, help="training windows from the calibration split")
    p.add_argument("--n-val", type=int, default=16, help="validation windows after them, which pick the setting")
    p.add_argument("--self-sampled", type=int, default=0, metavar="N",
                   help="N more training windows sampled from the reference (the calibration split holds only ~200 of 256 tokens)")
    p.add_argument("--sample-batch", type=int, default=64, help="--self-sampled: sequences decoded at once")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="lr over the run (cosine: to 0 at the last checkpoint)")
    p.add_argument("--norm-lr", type=float, default=0.0, help="> 0: the norms' weights train too, at this rate")
    p.add_argument("--code-lr", type=float, default=0.0, help="> 0: the codes train too (straight-through rounding), at this rate")
    p.add_argument("--max-bits", type=int, default=8, help="layers under this many bits train (DWQ's 8; 9 trains the 8-bit ones too)")
    p.add_argument("--n-eval", type=int, default=8)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--top-k", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "model"), default="float32", help="the tuned model's activations: fp32 (as the weights table measures) or its own dtype")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None, metavar="JSON", help="only redraw the PNG of an earlier run")
    p.add_argument("--apply", default=None, metavar="SAFETENSORS", help="only write the model with an earlier sweep's tuned values, and measure it")
    p.add_argument("--measure", nargs="+", default=None, metavar="DIR", help="only measure written models here (with --apply: beside it)")
    p.add_argument("--gsm8k-text", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"),
                   help="--apply: text unlike the calibration, scored too")
    args = p.parse_args()
    ensure_fast_blas()  # fp32 on a CPU: every row here is measured that way
    if args.apply or args.measure:
        folders = [Path(f) for f in args.measure or []]
        if missing := [str(f) for f in [*([Path(args.apply)] if args.apply else []), *(f / "optiq_metadata.json" for f in folders), Path(args.wikitext)]
                       if not f.exists()]:
            sys.exit(f"missing: {', '.join(missing)} (--apply takes a sweep's -tuned.safetensors, --measure optiq model folders)")
        folders = ([apply_tuned(args)] if args.apply else []) + folders
        return measure_written(args, folders, Path(args.out or RESULTS / f"tune-measured-{folders[0].name}.json"))
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        print(table(result))
        return plot(result, Path(args.plot).with_suffix(".png"))
    checkpoints = sorted({int(x) for x in args.checkpoints.split(",") if x.strip()})
    lrs, temperatures = floats(args.lrs), floats(args.temperatures)
    if not checkpoints or checkpoints[0] <= 0 or not lrs or not temperatures:
        sys.exit("--checkpoints, --lrs and --temperatures each need at least one positive value")
    if not Path(args.wikitext).exists():
        sys.exit(f"needs WikiText-2's wiki.test.raw at {args.wikitext} (--wikitext)")

    import mlx.core as mx
    import mlx_lm
    import numpy as np
    from mlx.utils import tree_flatten, tree_map

    from optiq.calibration import tokens_from_texts, wikitext_split, with_sampled
    from optiq.evaluate import quality, reference_batches
    from optiq.io import write_json
    from optiq.tune import written_values
    model_path = Path(args.model or default_model())
    meta = json.loads((model_path / "optiq_metadata.json").read_text())
    ref_path, reference = fp32_reference(args.reference, meta)
    cal_text, eval_text = wikitext_split(Path(args.wikitext).read_text())
    cal = tokens_from_texts([cal_text], reference.tokenizer, args.n_train + args.n_val, args.seq_len)
    if len(cal) < args.n_train + args.n_val:
        sys.exit(f"the calibration split holds {len(cal)} windows of {args.seq_len}, fewer than --n-train + --n-val")
    # Windows are spread evenly over the split, so validation takes every k-th
    # window rather than the split's tail (a few articles' text).
    val_rows = set(range(0, len(cal), len(cal) // args.n_val)[: args.n_val])
    train = cal[[i for i in range(len(cal)) if i not in val_rows]]
    val = cal[sorted(val_rows)]
    if args.self_sampled:
        train = with_sampled(train, reference.model, reference.tokenizer, args.self_sampled, seed=args.seed, batch_size=args.sample_batch)
        print(f"training on {len(train)} windows ({args.self_sampled} sampled from the reference)", flush=True)
    ev = tokens_from_texts([eval_text], reference.tokenizer, args.n_eval, args.eval_seq_len)
    val_refs, ev_refs = reference_batches(reference.model, val, 4), reference_batches(reference.model, ev, 4)
    written = mlx_lm.load(str(model_path))[0]
    dtypes = dict(tree_flatten(tree_map(lambda x: x.dtype, written.parameters())))  # as written, before any fp32 cast
    untuned = as_dtype(written, args.dtype)
    result = dict(model=str(model_path), reference=str(ref_path), device=str(mx.default_device()), args=vars(args) | {"checkpoints": checkpoints},
                  untuned=quality(untuned, ev, ev_refs, 4) | {"val_kl": quality(untuned, val, val_refs, 4)["kl_mean"]}, runs=[])
    del untuned
    out = Path(args.out or RESULTS / f"tune-sweep-{model_path.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    best = None
    for temperature in temperatures:
        for lr in lrs:
            t0 = time.perf_counter()
            curve, kept = sweep_one(model_path, reference.model, train, val, val_refs, ev, ev_refs, lr, temperature, checkpoints, args)
            result["runs"].append(dict(lr=lr, temperature=temperature, curve=curve, seconds=time.perf_counter() - t0))
            write_json(out, result)  # every setting kept as it lands
            if kept[2] is not None and (best is None or kept[0] < best[0]):
                best = (kept[0], lr, temperature, kept[1], kept[2])
    if best is None:
        print(table(result))
        sys.exit("no setting lowered validation KL below the untuned model's; nothing to write")
    # The chosen (setting, step): what `optiq tune --lr --steps --temperature` would write.
    _, lr, temperature, steps, params = best
    result["chosen"] = dict(lr=lr, temperature=temperature, steps=steps)
    tuned_file = out.with_name(out.stem + "-tuned.safetensors")
    # In the model's own dtypes, as it will hold them (half the bytes of fp32 for an fp16 model).
    # Trained codes are written as the layers' packed words (written_values).
    mx.save_safetensors(str(tuned_file), {k: v.astype(dtypes[k]) for k, v in written_values(params, written).items()})
    write_json(out, result)
    print()
    print(table(result))
    print(f"\nchosen by validation KL: lr {lr:g}, temperature {temperature:g}, {steps} steps; its scales/biases in {tuned_file}\nwrote {out}")
    draw_png(plot, result, out.with_suffix(".png"), script="tune_sweep.py")


if __name__ == "__main__":
    main()
