"""Hypothesis: the exact planner is optimal, feasible and monotone; greedy never beats it."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optiq import plan as planner
from optiq.records import Candidate, LayerSensitivity, SensitivityTable

CANDS = (Candidate(2, 64), Candidate(3, 64), Candidate(4, 64), Candidate(8, 64))


@st.composite
def instances(draw):
    n_items = draw(st.integers(1, 5))
    costs, values = [], []
    for _ in range(n_items):
        k = draw(st.integers(1, 4))
        c = draw(st.lists(st.integers(1, 40), min_size=k, max_size=k))
        v = draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=k, max_size=k))
        costs.append(np.array(c))
        values.append(np.array(v))
    lo = sum(int(c.min()) for c in costs)
    hi = sum(int(c.max()) for c in costs)
    budget = draw(st.integers(lo, hi + 5))
    return costs, values, budget


def brute_force(costs, values, budget):
    best = np.inf
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        if sum(int(c[k]) for c, k in zip(costs, pick)) <= budget:
            best = min(best, sum(float(v[k]) for v, k in zip(values, pick)))
    return best


def total(values, choices):
    return sum(float(v[k]) for v, k in zip(values, choices))


def spent(costs, choices):
    return sum(int(c[k]) for c, k in zip(costs, choices))


@settings(max_examples=300, deadline=None)
@given(instances())
def test_exact_matches_brute_force_and_fits(inst):
    costs, values, budget = inst
    choices, gap = planner.solve_exact(costs, values, budget)
    assert spent(costs, choices) <= budget
    assert gap == 0.0
    assert total(values, choices) == pytest_approx(brute_force(costs, values, budget))


@settings(max_examples=200, deadline=None)
@given(instances())
def test_greedy_never_beats_exact(inst):
    costs, values, budget = inst
    exact, _ = planner.solve_exact(costs, values, budget)
    greedy = planner.solve_greedy(costs, values, budget)
    assert spent(costs, greedy) <= budget
    assert total(values, greedy) >= total(values, exact) - 1e-9


@settings(max_examples=200, deadline=None)
@given(instances(), st.integers(0, 30))
def test_exact_kl_never_rises_with_budget(inst, extra):
    costs, values, budget = inst
    a, _ = planner.solve_exact(costs, values, budget)
    b, _ = planner.solve_exact(costs, values, budget + extra)
    assert total(values, b) <= total(values, a) + 1e-9


@settings(max_examples=100, deadline=None)
@given(instances())
def test_coarsened_dp_stays_feasible_and_certifies_its_gap(inst):
    costs, values, budget = inst
    old = planner.MAX_DP_UNITS
    planner.MAX_DP_UNITS = 2  # force the coarse path
    try:
        choices, gap = planner.solve_exact(costs, values, budget)
    finally:
        planner.MAX_DP_UNITS = old
    assert spent(costs, choices) <= budget
    best = brute_force(costs, values, budget)
    assert total(values, choices) - best <= gap + 1e-6


@st.composite
def tables(draw):
    n = draw(st.integers(1, 6))
    layers = []
    for i in range(n):
        params = 64 * draw(st.integers(1, 50))
        kls = sorted(draw(st.lists(st.floats(0, 5, allow_nan=False), min_size=4, max_size=4)), reverse=True)
        layers.append(
            LayerSensitivity(
                path=f"model.layers.{i}.mlp.down_proj",
                n_params=params,
                candidates=CANDS,
                kl=kls,
                measured=[True] * 4,
                error=[0.0] * 4,
            )
        )
    return SensitivityTable(model="m", layers=layers)


@settings(max_examples=100, deadline=None)
@given(tables(), st.floats(2.5, 16.0))
def test_plan_bits_respects_effective_bpw(table, target):
    bp = planner.plan_bits(table, target)
    assert bp.effective_bpw <= target + 1e-9
    greedy = planner.plan_bits(table, target, method="greedy")
    assert greedy.effective_bpw <= target + 1e-9
    assert greedy.predicted_kl >= bp.predicted_kl - 1e-9


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-9, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(instances(), st.data())
def test_nested_budget_matches_brute_force(inst, data):
    """A subset of the items under its own budget as well (KV plans: the
    full-attention layers' mean must meet the target by themselves)."""
    costs, values, budget = inst
    inner = set(data.draw(st.lists(st.integers(0, len(costs) - 1), unique=True, max_size=len(costs))))
    lo = sum(int(costs[i].min()) for i in inner)
    inner_budget = data.draw(st.integers(lo, lo + 60))
    choices, _ = planner.solve_exact_nested(costs, values, budget, inner, inner_budget)
    assert spent(costs, choices) <= budget
    assert sum(int(costs[i][choices[i]]) for i in inner) <= inner_budget
    best = np.inf
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        if spent(costs, pick) <= budget and sum(int(costs[i][pick[i]]) for i in inner) <= inner_budget:
            best = min(best, total(values, pick))
    assert total(values, choices) == pytest_approx(best)


@settings(max_examples=200, deadline=None)
@given(instances(), st.data())
def test_time_budget_is_met_and_its_gap_bounds_the_optimum(inst, data):
    """A second, real-valued budget (decode time): the plan meets both budgets,
    is never better than the best plan that does (brute force), and is within
    the duality gap it reports of it; a plan is refused only when none fits."""
    costs, values, budget = inst
    times = [np.array(data.draw(st.lists(st.floats(0, 5, allow_nan=False), min_size=len(c), max_size=len(c)))) for c in costs]
    best, fastest = np.inf, np.inf
    picks = [p for p in itertools.product(*[range(len(c)) for c in costs]) if spent(costs, p) <= budget]
    fastest = min(sum(float(t[k]) for t, k in zip(times, p)) for p in picks)
    time_budget = fastest + data.draw(st.floats(-1, 10, allow_nan=False))
    feasible = [p for p in picks if sum(float(t[k]) for t, k in zip(times, p)) <= time_budget]
    if not feasible:
        with pytest.raises(ValueError):
            planner.solve_exact_timed(costs, values, times, budget, time_budget)
        return
    best = min(total(values, p) for p in feasible)
    choices, gap = planner.solve_exact_timed(costs, values, times, budget, time_budget)
    assert spent(costs, choices) <= budget
    assert sum(float(t[k]) for t, k in zip(times, choices)) <= time_budget + 1e-9
    assert total(values, choices) >= best - 1e-9
    assert total(values, choices) - best <= gap + 1e-6


def test_a_near_zero_time_budget_plans_without_overflow():
    """Hypothesis found it: a subnormal time budget made mu * t / budget
    overflow (inf * 0 = NaN in the relaxed values). The fastest plan fits."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choices, _ = planner.solve_exact_timed([np.array([1, 2])], [np.array([0.0, 1.0])], [np.array([1.0, 0.0])], 2, 5e-324)
    assert list(choices) == [1]
