"""KV-cache benchmark: optiq's per-layer KV plan against the unquantized cache
and uniform quantized caches, measured side by side in one run.

    python benchmarks/kv.py                       # SmolLM2-135M-Instruct
    python benchmarks/kv.py --model gemma3        # Gemma-3-270M (gemma3 wheels)

Rows: the unquantized cache; mlx-lm's own QuantizedKVCache at 8 and 4 bits
(what `kv_bits` gives today: full-attention layers only, since mlx-lm cannot
quantize its rotating cache); optiq's cache at uniform 4 bits on every cache
layer (sliding-window layers included); and the optiq plan at `--target-bits`
average (nominal, as kv_bits counts bits), measured and planned in this run
by the same code as `optiq kv-cache` on the calibration part of WikiText-2.
Sections: quality (KL against the unquantized cache and perplexity over long
held-out WikiText-2 windows, every position), a pass-key needle at several
depths (exact match), and decode speed with KV bytes at each context length.
Weights stay fp32 so the rows differ only in the KV cache. Prints markdown
tables and writes JSON to benchmarks/results/kv-<model>.json.
"""

import argparse
import json
import time
from pathlib import Path

from common import RESULTS, WIKITEXT, gemma3_model, kv_decode_speed, kv_needle, kv_quality, text_windows


def mlx_lm_rows(bits):
    from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache

    def make(model):
        return [QuantizedKVCache(64, bits) if type(c) is KVCache else c for c in make_prompt_cache(model)]

    return make


def plan_rows(layers):
    from optiq.kv import make_kv_cache

    return lambda model: make_kv_cache(model, layers)


def measure_plans(model, tok, args):
    """optiq kv-cache's measurement and plans, on the calibration part: one
    table, planned over affine candidates alone and with TurboQuant added."""
    from optiq.kv import cache_layers, measure_kv, plan_kv
    from optiq.records import Candidate

    tokens = text_windows(tok, "calibration", args.n_calibration, args.calibration_len)
    affine = [Candidate(b, 64) for b in (2, 3, 4, 5, 6, 8)] + [Candidate(k, 64, v_bits=v) for k, v in ((8, 4), (4, 2), (4, 8), (2, 4))]
    turbo = [Candidate(int(b), 0, "turbo") for b in args.turbo_bits.split(",") if b]
    if args.table:  # an earlier run's table (its JSON), not measured again
        from optiq.records import SensitivityTable

        saved = json.loads(Path(args.table).read_text())
        table, seconds = SensitivityTable.from_dict(saved["table"]), saved["sensitivity_seconds"]
    else:
        t0 = time.perf_counter()
        prefill = args.calibration_len - args.calibration_decode if args.calibration_decode else None
        table = measure_kv(model, tokens, affine + turbo, prefill=prefill)
        seconds = time.perf_counter() - t0
    print(f"{len(cache_layers(model))} cache layers measured in {seconds:.0f} s")
    plans = {}
    sliding = [i for i, kind in cache_layers(model) if kind == "sliding"]
    for label, keep in (("", lambda c: c.mode == "affine"), (" + turbo", lambda c: True)):
        if label and not turbo:
            continue
        plan = plan_kv(table.restricted(keep), args.target_bits, n_layers=len(model.layers), sliding=sliding)
        plans[f"optiq plan {args.target_bits:g}{label}"] = plan
        print(f"plan{label}: {plan.average_bits:.3f} average bits ({plan.effective_bits:.3f} effective; {plan.long_context_bits or plan.average_bits:.3f} over the full-attention layers), predicted KL {plan.predicted_kl:.4f}")
        print("  " + " ".join(f"{e.layer_idx}:{'t' if e.mode == 'turbo' else ''}{e.bits}{'/' + str(e.v_bits) if e.v_bits else ''}" for e in plan.layers))
    return table, plans, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2; 'gemma3' for Gemma-3-270M; or a path/repo id")
    p.add_argument("--target-bits", type=float, default=4.5)
    p.add_argument("--n-calibration", type=int, default=2)
    p.add_argument("--calibration-len", type=int, default=512)
    p.add_argument("--calibration-decode", type=int, default=0, help="teacher-forced decode steps per probe (0: one prefill replayed from the probed layer, optiq kv-cache's default)")
    p.add_argument("--turbo-bits", default="3,4", help="TurboQuant candidates for the second plan ('' for none)")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--decode", type=int, default=64, help="of --seq-len, the tokens decoded one at a time")
    p.add_argument("--needle-tokens", type=int, default=1500)
    p.add_argument("--needle-format", choices=["auto", "chat", "completion"], default="auto", help="auto: chat when the tokenizer has a template (a base model asks as a completion)")
    p.add_argument("--contexts", default="2048,8192,16384")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--table", default=None, help="reuse the sensitivity table of an earlier run's JSON")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: quality,needle,speed")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    from optiq.blas import ensure_fast_blas

    ensure_fast_blas()
    import mlx_lm

    from optiq.source import resolve_model, to_fp32

    folder = resolve_model(gemma3_model() if args.model == "gemma3" else args.model)
    name = "gemma3" if args.model == "gemma3" else Path(folder).name
    out_path = Path(args.out or RESULTS / f"kv-{name}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model, tok = mlx_lm.load(str(folder))
    to_fp32(model)
    result = dict(model=str(folder), args=vars(args), wikitext=WIKITEXT.exists())

    def save():  # after every section, so a stopped run keeps what it measured
        out_path.write_text(json.dumps(result, indent=2))

    from optiq.kv import uniform_layers

    table, plans, seconds = measure_plans(model, tok, args)
    result["sensitivity_seconds"] = seconds
    result["table"] = table.to_dict()
    result["plans"] = {k: p.to_dict() for k, p in plans.items()}
    save()
    rows = [
        ("unquantized", lambda model: mlx_lm.models.cache.make_prompt_cache(model)),
        ("mlx-lm 8-bit", mlx_lm_rows(8)),
        ("mlx-lm 4-bit", mlx_lm_rows(4)),
        ("optiq uniform 4-bit", plan_rows(uniform_layers(model, 4, 64))),
        *[(label, plan_rows(list(p.layers))) for label, p in plans.items()],
    ]
    skip = set(args.skip.split(","))
    if "quality" not in skip:
        print("\nquality (KL and perplexity vs the unquantized cache):")
        windows_ = text_windows(tok, "evaluation", args.windows, args.seq_len)
        result["quality"] = kv_quality(model, windows_, args.seq_len - args.decode, rows)
        save()
    if "needle" not in skip:
        print("\nneedle:")
        chat = {"auto": None, "chat": True, "completion": False}[args.needle_format]
        result["needle"] = kv_needle(model, tok, rows, args.needle_tokens, chat=chat)
        save()
    contexts = [int(c) for c in args.contexts.split(",")]
    if "speed" not in skip:
        print("\ndecode speed:")
        result["speed"] = kv_decode_speed(model, tok, contexts, rows, args.steps)
        base = {r["context"]: r for r in result["speed"] if r["method"] == "unquantized"}
        for r in result["speed"]:  # bytes against the same cache in fp16 (the weights here are fp32)
            r["kv_vs_fp16"] = r["kv_bytes"] / (base[r["context"]]["kv_bytes"] / 2)
        save()

    print(f"\nmodel {folder}; WikiText-2: {result['wikitext']}; quality over {args.windows}x{args.seq_len} tokens "
          f"({args.decode} decoded); plan measured in {seconds:.0f} s\n")
    head = "| KV cache | KL | ppl | needle | " + " | ".join(f"tok/s @{c} | bytes/fp16 @{c}" for c in contexts) + " |"
    print(head)
    print("|---|---|---|---|" + "---|---|" * len(contexts))
    for row, _ in rows:
        q = result.get("quality", {}).get(row, {})
        n = result.get("needle", {}).get(row, {})
        cells = []
        for c in contexts:
            s = next((r for r in result.get("speed", []) if r["method"] == row and r["context"] == c), None)
            cells += [f"{s['tok_per_s']:.2f}", f"{s['kv_vs_fp16']:.3f}"] if s else ["-", "-"]
        print(f"| {row} | {q.get('kl', float('nan')):.4f} | {q.get('ppl', float('nan')):.2f} | {n.get('hits', '-')}/{n.get('of', '-')} | " + " | ".join(cells) + " |")
    save()
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
