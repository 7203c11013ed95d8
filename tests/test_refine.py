import attrs
import pytest

from optiq.calibration import sample_tokens
from optiq.plan import plan_bits
from optiq.records import Candidate
from optiq.probes import measure_weights, rounding_for
from optiq.reference import reference_pass
from optiq.refine import marginal_table, plan_kl, refine
from optiq.source import load_reference


@pytest.mark.parametrize("arch", ["llama", "qwen3_5"])
def test_marginal_changes_are_what_the_whole_plan_measures(model_factory, arch):
    loaded = load_reference(model_factory(arch))
    tokens = sample_tokens(loaded.model, loaded.tokenizer, 3, 32, seed=11)
    cal = reference_pass(loaded.model, tokens, 2, kl_stride=2)
    rounding = rounding_for(cal)
    cands = [Candidate(b, 32) for b in (2, 3, 4, 8)]
    table = measure_weights(loaded.model, tokens, cands, reference=cal, rounding=rounding)
    plan = plan_bits(table, 4.0)
    marginal, base = marginal_table(cal, rounding, table, plan)
    assert base == pytest.approx(plan_kl(cal, rounding, plan), rel=1e-4)
    chosen = plan.as_dict()
    for layer in marginal.layers[:: max(1, len(marginal.layers) // 4)]:
        for c, delta in zip(layer.candidates, layer.kl):
            if c == chosen[layer.path]:
                assert delta == 0.0
                continue
            moved = attrs.evolve(plan, assignments=tuple((p, c if p == layer.path else x) for p, x in plan.assignments))
            assert plan_kl(cal, rounding, moved) == pytest.approx(base + delta, rel=1e-3, abs=1e-6)


def test_refine_never_returns_a_worse_plan(model_factory):
    loaded = load_reference(model_factory("qwen3"))
    tokens = sample_tokens(loaded.model, loaded.tokenizer, 3, 32, seed=12)
    cal = reference_pass(loaded.model, tokens, 2, kl_stride=2)
    rounding = rounding_for(cal)
    cands = [Candidate(b, 32) for b in (2, 3, 4, 8)]
    table = measure_weights(loaded.model, tokens, cands, reference=cal, rounding=rounding)
    plan = plan_bits(table, 3.5)
    before = plan_kl(cal, rounding, plan)
    better, history = refine(cal, rounding, table, plan, 3.5, rounds=2)
    assert plan_kl(cal, rounding, better) <= before + 1e-9
    assert better.effective_bpw <= 3.5 + 1e-9
    assert history and all(r.kept for r in history[:-1])
