"""LoRA plans and adapter files: budgets hold, rules order ranks, formats round-trip."""

import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from optiq.lora.adapters import read_adapter
from optiq.lora.formats import write_peft
from optiq.lora.plan import plan_lora, signals_from

layers = st.lists(st.tuples(st.sampled_from([32, 64, 96]), st.sampled_from([32, 64, 128]), st.sampled_from([2, 3, 4, 5, 6, 8]),
                            st.floats(1e-4, 10.0)), min_size=1, max_size=12)


def setup(rows):
    dims = {f"model.layers.{i}.mlp.down_proj": (a, b) for i, (a, b, _, _) in enumerate(rows)}
    bits = {p: r[2] for p, r in zip(dims, rows)}
    kl = {p: r[3] for p, r in zip(dims, rows)}
    return dims, bits, kl


@settings(max_examples=60, deadline=None)
@given(rows=layers, rule=st.sampled_from(["constant", "by_bits", "by_kl"]), extra=st.integers(0, 20000))
def test_param_budget_is_respected_and_nearly_spent(rows, rule, extra):
    dims, bits, kl = setup(rows)
    floor = sum(a + b for a, b in dims.values())
    plan = plan_lora(dims, 8, rule, *signals_from(bits, kl), param_budget=floor + extra)
    assert floor <= plan.trainable_params <= floor + extra
    # no single module could take one more rank without breaking the budget... for the
    # rule's scale: spending is within one module's (in + out) per module of the budget
    assert plan.trainable_params >= floor + extra - sum(a + b for a, b in dims.values())


@settings(max_examples=60, deadline=None)
@given(rows=layers, rule=st.sampled_from(["by_bits", "by_kl"]))
def test_ranks_follow_the_signal(rows, rule):
    dims, bits, kl = setup(rows)
    signal = bits if rule == "by_bits" else kl
    plan = plan_lora(dims, 8, rule, *signals_from(bits, kl))
    by_signal = sorted(plan.modules, key=lambda m: signal[m.path])
    assert [m.rank for m in by_signal] == sorted(m.rank for m in by_signal)


@settings(max_examples=15, deadline=None)
@given(rows=layers, seed=st.integers(0, 2**16))
def test_peft_files_round_trip(rows, seed):
    dims, bits, _ = setup(rows)
    plan = plan_lora(dims, 4, "by_bits", *signals_from(bits))
    rng = np.random.default_rng(seed)
    weights = {m.path: (mx.array(rng.standard_normal((m.in_dims, m.rank)).astype(np.float32)),
                        mx.array(rng.standard_normal((m.rank, m.out_dims)).astype(np.float32))) for m in plan.modules}
    with tempfile.TemporaryDirectory() as tmp:
        write_peft(Path(tmp), plan, weights, n_layers=len(rows))
        back = read_adapter(tmp)
    for m in plan.modules:
        a, b, scale = back.modules[m.path]
        assert mx.array_equal(a, weights[m.path][0]).item() and mx.array_equal(b, weights[m.path][1]).item()
        assert scale == m.alpha / m.rank


@settings(max_examples=80, deadline=None)
@given(rows=layers, extra=st.integers(0, 20000), rank=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_by_error_spends_within_the_budget_and_leaves_nothing_that_fits(rows, extra, rank, seed):
    from optiq.lora.plan import spend_on_residual

    dims, _, _ = setup(rows)
    rng = np.random.default_rng(seed)
    spectra = {p: np.sort(rng.gamma(0.5, size=min(d)))[::-1] for p, d in dims.items()}
    budget = sum(a + b for a, b in dims.values()) + extra
    cap = 4 * rank
    ranks = spend_on_residual(list(dims), dims, spectra, budget, cap)
    spent = sum(ranks[p] * sum(d) for p, d in dims.items())
    assert spent <= budget and all(1 <= ranks[p] <= min(cap, min(d)) for p, d in dims.items())
    # greedy to the end: no module below its cap could take one more direction
    assert all(ranks[p] == min(cap, min(d)) or sum(d) > budget - spent for p, d in dims.items())
    plan = plan_lora(dims, rank, "by_error", param_budget=budget, spectra=spectra)
    assert [m.rank for m in plan.modules] == [ranks[p] for p in dims]
