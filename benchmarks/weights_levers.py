"""The rounding and group-size levers at one size, measured side by side:
uniform 4-bit group 64 (round-to-nearest and GPTQ) and mlx-lm's
dynamic_quant against optiq's exact plan
over GPTQ-rounded candidates that stay near uniform (4-8 bits at groups 64
and 128, optionally 3 bits and group 32), where single-layer KLs add up
better than in plans that push layers to 2-3 bits.

    python benchmarks/weights_levers.py                 # SmolLM2, 4.5 bpw
    python benchmarks/weights_levers.py --quantizer rtn
    python benchmarks/weights_levers.py --recipe        # the table over the fair row's candidates only: its cost

Caution: on SmolLM2 (a Q4_1 GGUF: weights on an affine 4-bit grid of 32)
a 4-bit group-32 candidate reproduces the reference almost exactly, so rows
allowing group 32 flatter optiq there; the groups 64/128 row is the fair one.

Data and columns as benchmarks/weights.py (same calibration and held-out
WikiText-2 tokens, so its rows compare). Writes a markdown table and JSON to
benchmarks/results/weights-levers-<model>-<quantizer>.json.
"""

import argparse
import json
import time
from pathlib import Path

from common import RESULTS, WIKITEXT, gemma3_model  # noqa: E402  (also puts the repo on sys.path)
from optiq.blas import ensure_fast_blas  # noqa: E402
from weights import dynamic_quant_plan, markdown, row  # noqa: E402

CANDIDATE_SETS = {  # label: which candidates the plan may use
    "4-8 bits, groups 64/128": lambda c: c.bits >= 4 and c.group_size >= 64,
    # = optiq convert --quantizer gptq --candidate-bits 4,5,6,8 --group-sizes 32,64,128
    "4-8 bits, groups 32-128": lambda c: c.bits >= 4,
    "3-8 bits, groups 32-128": lambda c: True,
}


def main():
    ensure_fast_blas()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2; 'gemma3' for Gemma-3-270M; or a path/repo id")
    p.add_argument("--target", type=float, default=4.5)
    p.add_argument("--extra-targets", default="", help="more targets for the first candidate set, from the same table "
                   "(e.g. the sizes llama.cpp's types land at, for rows at equal bpw)")
    p.add_argument("--quantizer", choices=["gptq", "rtn"], default="gptq")
    p.add_argument("--n-calibration", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--gram-samples", type=int, default=64, help="sequences in GPTQ's Gram matrices (as optiq convert --gram-samples)")
    p.add_argument("--n-eval", type=int, default=8)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--recipe", action="store_true", help="measure only the candidates of the first row (4-8 bits, groups 64/128), as optiq convert would for that recipe")
    p.add_argument("--anchor-bits", default="4", help="bit-widths probed (at every group size); the rest predicted")
    args = p.parse_args()

    from optiq.calibration import split_calibration, tokens_from_texts, wikitext_split
    from optiq.evaluate import quality, reference_batches, simulated
    from optiq.plan import plan_bits, uniform_plan
    from optiq.records import Candidate
    from optiq.probes import measure_weights, rounding_for
    from optiq.reference import reference_pass
    from optiq.rounding import DTYPES
    from optiq.source import load_reference, resolve_model

    if not WIKITEXT.exists():
        raise SystemExit(f"needs {WIKITEXT} (../shared/data)")
    name = args.model or "SmolLM2-135M-Instruct"
    loaded = load_reference(resolve_model(gemma3_model() if args.model == "gemma3" else args.model))
    from optiq.quantize import output_dtype

    dtype = DTYPES[output_dtype(loaded.config)]  # round scales as a written model stores them (bf16 for Gemma)
    cal_text, eval_text = wikitext_split(WIKITEXT.read_text())
    every = tokens_from_texts([cal_text], loaded.tokenizer, max(args.n_calibration, args.gram_samples), args.seq_len)
    cal, gram = split_calibration(every, args.n_calibration)
    ev = tokens_from_texts([eval_text], loaded.tokenizer, args.n_eval, args.eval_seq_len)
    refs = reference_batches(loaded.model, ev, batch_size=4)

    def measure(assignments, calibrated):
        with simulated(loaded.model, assignments, calibrated):
            return quality(loaded.model, ev, refs, batch_size=4)

    candidates = [Candidate(b, g) for b in (4, 5, 6, 8) for g in (32, 64, 128)] + [Candidate(3, 64)]
    sets = dict(CANDIDATE_SETS)
    if args.recipe:
        first = next(iter(sets))
        sets = {first: sets[first]}
        candidates = [c for c in candidates if sets[first](c)]
    t0 = time.time()
    reference = reference_pass(loaded.model, cal, 8, 4, gram_tokens=gram)
    calibrated = rounding_for(reference, args.quantizer, dtype)
    table = measure_weights(loaded.model, cal, candidates, anchors={int(b) for b in args.anchor_bits.split(",")}, kl_stride=4, reference=reference, rounding=calibrated)
    seconds = time.time() - t0
    rows = []
    for label, keep in sets.items():
        plan = plan_bits(table.restricted(keep), args.target)
        rows.append(row(f"optiq exact, {args.quantizer}, {label}", plan, measure(plan.assignments, calibrated), seconds, {"predicted_kl": plan.predicted_kl}))
        print(rows[-1], flush=True)
    first = next(iter(sets))
    for target in [float(t) for t in args.extra_targets.split(",") if t.strip()]:
        plan = plan_bits(table.restricted(sets[first]), target)
        rows.append(row(f"optiq exact, {args.quantizer}, {first} @ {target} bpw", plan, measure(plan.assignments, calibrated), seconds,
                        {"predicted_kl": plan.predicted_kl}))
        print(rows[-1], flush=True)
    uniform = uniform_plan(table, Candidate(4, 64))
    rows.append(row(f"uniform 4-bit g64, {args.quantizer}", uniform, measure(uniform.assignments, calibrated), seconds))
    rtn = rounding_for(reference, "rtn", dtype)
    rows.append(row("uniform 4-bit g64, rtn", uniform, measure(uniform.assignments, rtn), 0.0))
    t0 = time.time()
    dq, (lo, hi) = dynamic_quant_plan(loaded, cal, table, args.target, 64)
    rows.append(row(f"mlx-lm dynamic_quant {lo}/{hi}, rtn", dq, measure(dq.assignments, rtn), time.time() - t0))
    text = markdown(rows)
    print(f"\n{name} at {args.target} bpw; sensitivity ({table.method}) {seconds:.0f} s\n\n{text}")
    out = RESULTS / f"weights-levers-{Path(name).name}-{args.quantizer}{'-recipe' if args.recipe else ''}.json"
    out.write_text(json.dumps({"model": name, "target": args.target, "sensitivity_seconds": seconds, "rows": rows, "args": vars(args)}, indent=2))
    out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
