"""Bit allocation: the least predicted KL under an effective-bits budget.

Pure numpy: the planners take numbers and return numbers.

Effective bits per weight (bpw) count the fp16 scale and bias of every group,
as `mlx_lm.utils.compute_bits_per_weight` does: a layer of n weights stored at
`bits` with `group_size` costs n*bits + (n/group_size)*32 bits. This module's
`layer_cost_bits` is the one definition used by the planner, the metadata and
the benchmarks.
"""

import math
import re
from functools import reduce

import numpy as np

from .errors import OptiqError
from .records import BitPlan, Candidate, SensitivityTable

MAX_DP_UNITS = 1 << 20  # beyond this the DP coarsens its cost unit and proves a gap


def layer_cost_bits(n_params: int, candidate: Candidate) -> int:
    """Storage of one layer in bits: packed weights plus fp16 scales and biases
    (TurboQuant: plus one fp16 norm per vector); Candidate.effective_bits counts them."""
    return round(n_params * candidate.effective_bits)


def nominal_cost_bits(n_params: int, candidate: Candidate) -> int:
    """Bits as KV-cache plans usually count them: the code width alone."""
    return round(n_params * min(candidate.code_bits, 16))


def effective_bpw(assignments, n_params: dict) -> float:
    total = sum(n_params[p] for p, _ in assignments)
    cost = sum(layer_cost_bits(n_params[p], c) for p, c in assignments)
    return cost / total if total else 0.0


# -- the two solvers over plain arrays ---------------------------------------


def solve_exact(costs, values, budget: int):
    """Multiple-choice knapsack: pick one option per item, total cost <= budget,
    least total value. Returns (choices, gap) where gap bounds how far the
    answer can be from the optimum (0.0 when the DP ran at full resolution).

    costs: list of int arrays, values: list of float arrays (one per item).
    """
    if sum(int(c.min()) for c in costs) > budget:
        raise ValueError("budget below the cheapest choice of every item")
    unit = reduce(math.gcd, (int(x) for c in costs for x in c), 0) or 1
    exact = budget // unit <= MAX_DP_UNITS
    if not exact:
        unit = -(-budget // MAX_DP_UNITS)
    # Rounding costs up keeps every DP answer feasible at the true costs.
    w = [(-(-c.astype(np.int64) // unit)).astype(np.int64) for c in costs]
    cap = budget // unit
    choices = _dp(w, values, cap)
    if choices is None:  # coarse rounding made it infeasible: fall back to cheapest
        choices = [int(np.argmin(c)) for c in costs]
    gap = 0.0
    if not exact:
        total = sum(float(v[k]) for v, k in zip(values, choices))
        gap = max(0.0, total - lagrangian_bound(costs, values, budget))
    return choices, gap


def _dp(w, values, cap: int):
    dp, picks = _dp_table(w, values, cap)
    if not np.isfinite(dp[cap]):
        return None
    return _backtrack(w, picks, cap)


def _dp_table(w, values, cap: int):
    """(best value with cost <= u for every u <= cap, the pick per item and u)."""
    inf = np.inf
    dp = np.zeros(cap + 1)  # best value using the items so far with cost <= u
    picks = np.empty((len(w), cap + 1), dtype=np.uint8)
    for i, (wi, vi) in enumerate(zip(w, values)):
        new = np.full(cap + 1, inf)
        arg = np.zeros(cap + 1, dtype=np.uint8)
        for k, (wk, vk) in enumerate(zip(wi, vi)):
            if wk > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[wk:] = dp[: cap + 1 - wk] + vk
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        dp, picks[i] = new, arg
    return dp, picks


def _backtrack(w, picks, u: int) -> list:
    choices = []
    for i in range(len(w) - 1, -1, -1):
        k = int(picks[i, u])
        choices.append(k)
        u -= int(w[i][k])
    return choices[::-1]


def solve_exact_nested(costs, values, budget: int, inner: set, inner_budget: int):
    """solve_exact with a second budget on a subset of the items: the items
    in `inner` together cost <= inner_budget, all items <= budget. Exact: the
    inner and outer items' DP tables are joined at the best split of the budget."""
    inner_ix = [i for i in range(len(costs)) if i in inner]
    outer_ix = [i for i in range(len(costs)) if i not in inner]
    if not inner_ix or not outer_ix:
        return solve_exact(costs, values, min(budget, inner_budget) if not outer_ix else budget)
    if sum(int(costs[i].min()) for i in inner_ix) > inner_budget or sum(int(c.min()) for c in costs) > budget:
        raise ValueError("budget below the cheapest choice of every item")
    unit = reduce(math.gcd, (int(x) for c in costs for x in c), 0) or 1
    if budget // unit > MAX_DP_UNITS:  # KV plans have tens of layers; weights never nest
        raise ValueError(f"nested budget too fine for an exact DP ({budget // unit} units)")
    w = [(c.astype(np.int64) // unit) for c in costs]
    cap, inner_cap = budget // unit, min(inner_budget // unit, budget // unit)
    dp_in, picks_in = _dp_table([w[i] for i in inner_ix], [values[i] for i in inner_ix], inner_cap)
    dp_out, picks_out = _dp_table([w[i] for i in outer_ix], [values[i] for i in outer_ix], cap)
    joined = dp_in + dp_out[cap - np.arange(inner_cap + 1)]
    u = int(np.argmin(joined))
    choices = [0] * len(costs)
    for ix, k in zip(inner_ix, _backtrack([w[i] for i in inner_ix], picks_in, u)):
        choices[ix] = k
    for ix, k in zip(outer_ix, _backtrack([w[i] for i in outer_ix], picks_out, cap - u)):
        choices[ix] = k
    return choices, 0.0


def solve_exact_timed(costs, values, times, budget: int, time_budget: float, iterations: int = 48):
    """solve_exact with a second, real-valued budget: total time <= time_budget.
    The time constraint is relaxed with a multiplier mu (value + mu*time, the
    bits still exact by DP), bisected to the least mu whose plan fits. Returns
    (choices, gap): the gap is the duality gap over the multipliers tried, a
    bound on how far the plan can be from the best plan meeting both budgets
    (NaN where the DP was coarsened, so no bound is proven)."""
    times = [np.asarray(t, dtype=np.float64) for t in times]
    # multipliers in units of value per the slowest plan's time (never a near-zero budget's,
    # which would overflow mu * t / scale)
    slowest = sum(float(t.max()) for t in times if t.size)
    scale = max(time_budget, slowest) if max(time_budget, slowest) > 0 else 1.0

    def at(mu):
        choices, gap = solve_exact(costs, [v + mu * t / scale for v, t in zip(values, times)], budget)
        value = sum(float(v[k]) for v, k in zip(values, choices))
        spent = sum(float(t[k]) for t, k in zip(times, choices))
        return choices, value, spent, gap

    choices, value, spent, gap = at(0.0)
    if spent <= time_budget:
        return choices, gap
    fastest, _ = solve_exact(costs, times, budget)
    if sum(float(t[k]) for t, k in zip(times, fastest)) > time_budget:
        raise ValueError("no plan within the bits budget meets the time budget")
    lower, best, exact = -np.inf, None, gap == 0.0
    lo, hi = 0.0, max(1e-12, sum(float(np.ptp(v)) for v in values))
    for _ in range(64):  # a multiplier large enough that the plan fits
        choices, value, spent, gap = at(hi)
        exact = exact and gap == 0.0
        lower = max(lower, value + hi * (spent - time_budget) / scale)
        if spent <= time_budget:
            best = (value, choices)
            break
        lo, hi = hi, hi * 4
    else:  # times tied at float resolution keep every relaxed plan a hair over: the fastest plan fits
        best = (sum(float(v[k]) for v, k in zip(values, fastest)), fastest)
    for _ in range(iterations):
        if exact and best[0] - lower <= 1e-12:  # the duality gap is closed: no multiplier can do better
            break
        mu = (lo + hi) / 2
        choices, value, spent, gap = at(mu)
        exact = exact and gap == 0.0
        lower = max(lower, value + mu * (spent - time_budget) / scale)
        if spent <= time_budget:
            hi = mu
            if value < best[0]:
                best = (value, choices)
        else:
            lo = mu
    return best[1], max(0.0, best[0] - lower) if exact else float("nan")


def lagrangian_bound(costs, values, budget: int) -> float:
    """max over lambda of sum_i min_k (v_ik + lambda*c_ik) - lambda*budget: a lower
    bound on the optimum, used as the certificate when the DP is coarsened."""

    def dual(lam):
        return sum(float(np.min(v + lam * c)) for c, v in zip(costs, values)) - lam * budget

    lo, hi = 0.0, 1.0
    while dual(hi) > dual(hi / 2) and hi < 1e12:
        hi *= 2
    for _ in range(100):  # the dual is concave: ternary search
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if dual(a) < dual(b):
            lo = a
        else:
            hi = b
    return dual((lo + hi) / 2)


def solve_greedy(costs, values, budget: int):
    """Start everything at its cheapest option; repeatedly take the upgrade with
    the largest value drop per added cost that still fits."""
    choices = [int(np.argmin(c)) for c in costs]
    spent = sum(int(c[k]) for c, k in zip(costs, choices))
    while True:
        best, best_ratio = None, 0.0
        for i, (c, v) in enumerate(zip(costs, values)):
            k0 = choices[i]
            for k in range(len(c)):
                dc, dv = int(c[k]) - int(c[k0]), float(v[k0]) - float(v[k])
                if dc > 0 and dv > 0 and spent + dc <= budget and dv / dc > best_ratio:
                    best, best_ratio = (i, k, dc), dv / dc
        if best is None:
            return choices
        i, k, dc = best
        choices[i], spent = k, spent + dc


# -- the stage: SensitivityTable + budget -> BitPlan -------------------------

_BLOCK = re.compile(r"\.layers\.(\d+)\.")


def protected_paths(paths, protect) -> set:
    """Paths named by protection rules: 'embed', 'lm_head', 'first', 'last', or a regex."""
    blocks = [int(m.group(1)) for p in paths if (m := _BLOCK.search(p))]
    first, last = (min(blocks), max(blocks)) if blocks else (None, None)
    out = set()
    for rule in protect:
        for p in paths:
            m = _BLOCK.search(p)
            block = int(m.group(1)) if m else None
            if (
                (rule == "embed" and "embed" in p)
                or (rule == "lm_head" and "lm_head" in p)
                or (rule == "first" and block is not None and block == first)
                or (rule == "last" and block is not None and block == last)
                or (rule not in ("embed", "lm_head", "first", "last") and re.search(rule, p))
            ):
                out.add(p)
    return out


def plan_bits(
    table: SensitivityTable,
    target_bpw: float,
    method: str = "exact",
    protect=(),
    protect_bits: int = 8,
    cost=layer_cost_bits,
    nested=(),
    seconds=None,
    seconds_budget=None,
) -> BitPlan:
    """The plan with the least predicted total KL at effective bpw <= target
    (`cost=nominal_cost_bits` budgets the code width alone). The layers named
    in `nested` must also meet the target among themselves (method exact).
    `seconds` ({path: time per candidate, in the layer's order}, e.g. from
    `optiq.speed.layer_seconds`) with `seconds_budget` also holds the plan's
    summed time to that budget (method exact)."""
    layers = [layer for layer in table.layers if layer.candidates]
    guarded = protected_paths([layer.path for layer in layers], protect)
    options = []  # per layer: list of (candidate, kl)
    for layer in layers:
        opts = list(zip(layer.candidates, layer.kl))
        if layer.path in guarded:
            high = [o for o in opts if o[0].bits >= protect_bits]
            opts = high or [max(opts, key=lambda o: o[0].effective_bits)]
        options.append(opts)
    n_params = {layer.path: layer.n_params for layer in layers}
    total = sum(n_params.values())
    costs = [np.array([cost(l.n_params, c) for c, _ in o]) for l, o in zip(layers, options)]
    values = [np.array([kl for _, kl in o], dtype=np.float64) for o in options]
    budget = int(math.floor(target_bpw * total + 1e-9))
    floor_bpw = sum(int(c.min()) for c in costs) / total
    if budget < sum(int(c.min()) for c in costs):
        raise OptiqError(
            f"target {target_bpw} bpw is below the smallest plan these candidates allow "
            f"({floor_bpw:.3f} effective bpw)"
        )
    nested = set(nested)
    inner = {i for i, l in enumerate(layers) if l.path in nested}
    if inner and seconds is not None:
        raise OptiqError("a nested budget and a time budget do not combine")
    if inner and method == "exact":
        inner_total = sum(layers[i].n_params for i in inner)
        inner_budget = int(math.floor(target_bpw * inner_total + 1e-9))
        if inner_budget < sum(int(costs[i].min()) for i in inner):
            raise OptiqError(f"target {target_bpw} bpw is below the smallest plan these candidates allow for {sorted(nested)}")
        choices, gap = solve_exact_nested(costs, values, budget, inner, inner_budget)
    elif inner:
        raise OptiqError("a nested budget needs the exact method")
    elif seconds is not None and method != "exact":
        raise OptiqError("a time budget needs the exact method")
    elif seconds is not None:
        times = [np.array([seconds[l.path][l.candidates.index(c)] for c, _ in o]) for l, o in zip(layers, options)]
        try:
            choices, gap = solve_exact_timed(costs, values, times, budget, float(seconds_budget))
        except ValueError:
            fastest = sum(float(t.min()) for t in times)
            raise OptiqError(
                f"no plan at {target_bpw} bpw meets the time budget ({seconds_budget * 1e3:.3f} ms; the fastest layer formats "
                f"alone take {fastest * 1e3:.3f} ms): raise the target or allow faster formats"
            ) from None
    elif method == "exact":
        choices, gap = solve_exact(costs, values, budget)
    elif method == "greedy":
        choices, gap = solve_greedy(costs, values, budget), float("nan")
    else:
        raise OptiqError(f"unknown planning method {method!r} (exact or greedy)")
    assignments = tuple((l.path, o[k][0]) for l, o, k in zip(layers, options, choices))
    spent = sum(int(c[k]) for c, k in zip(costs, choices))
    timed = {}
    if seconds is not None:
        timed = {"predicted_seconds": float(sum(seconds[l.path][l.candidates.index(o[k][0])] for l, o, k in zip(layers, options, choices))),
                 "seconds_budget": float(seconds_budget)}
    return BitPlan(
        assignments=assignments,
        target_bpw=float(target_bpw),
        effective_bpw=spent / total,
        predicted_kl=float(sum(v[k] for v, k in zip(values, choices))),
        method=method,
        optimality_gap=gap,
        **timed,
    )


def uniform_plan(table: SensitivityTable, candidate: Candidate) -> BitPlan:
    """Every layer at one candidate (where its group size fits): the baseline."""
    chosen = []
    for layer in table.layers:
        fits = [c for c in layer.candidates if c == candidate]
        if fits:
            chosen.append((layer.path, candidate, layer.kl_of(candidate)))
    assignments = tuple((p, c) for p, c, _ in chosen)
    n_params = {layer.path: layer.n_params for layer in table.layers}
    return BitPlan(
        assignments=assignments,
        target_bpw=candidate.effective_bits,
        effective_bpw=effective_bpw(assignments, n_params),
        predicted_kl=float(sum(kl for _, _, kl in chosen)),
        method=f"uniform {candidate.key}",
    )
