"""Refinement: measure a plan, re-allocate around it, repeat while it helps.

Per-layer KLs measured one layer at a time add up to less than the KL of the
whole plan (errors compound). Refinement measures, with the plan in place,
what moving each layer one step down or up costs or saves against the fp32
reference, and solves the same knapsack over those marginal changes. A round
is kept only when the measured KL of the new plan is lower.
"""

import attrs
import mlx.core as mx

from .evaluate import simulated
from .plan import plan_bits
from .records import BitPlan, LayerSensitivity, SensitivityTable
from .sensitivity import Calibrated, container_of, start_block


@attrs.frozen
class Round:
    measured_kl: float
    predicted_kl: float
    kept: bool


def neighbours(layer: LayerSensitivity, current, steps: int = 1) -> tuple:
    """The candidates within `steps` of the current one, ordered by size."""
    ordered = sorted(layer.candidates, key=lambda c: (c.effective_bits, c.group_size))
    i = ordered.index(current)
    return tuple(ordered[max(0, i - steps) : i + steps + 1])


def plan_kl(cal: Calibrated, plan: BitPlan) -> float:
    """Measured KL of a whole plan on the calibration positions."""
    with simulated(cal.model, plan.assignments, cal):
        return cal.probe(0)


def marginal_table(cal: Calibrated, table: SensitivityTable, plan: BitPlan, progress=True):
    """(table of KL changes around `plan`, KL of `plan`), measured with the plan in place."""
    from tqdm.auto import tqdm

    chosen = plan.as_dict()
    model = cal.model
    modules = {p: container_of(model, p)[0][container_of(model, p)[1]] for p in chosen}
    originals = {p: m.weight for p, m in modules.items()}
    layers = []
    with simulated(model, plan.assignments, cal):
        here = Calibrated(model, cal.tokens, cal.batches[0].shape[0], cal.kl_stride, refs=cal.refs)
        base = here.probe(0)
        todo = [(l, neighbours(l, chosen[l.path])) for l in table.layers if l.path in chosen]
        bar = tqdm(total=sum(len(n) - 1 for _, n in todo), desc="refine", unit="probe", disable=not progress)
        for layer, cands in todo:
            container, key = container_of(model, layer.path)
            module = container[key]
            planned = module.weight
            deltas = []
            for c in cands:
                if c == chosen[layer.path]:
                    deltas.append(0.0)
                    continue
                module.weight = cal.quantized(layer.path, module, originals[layer.path], c)
                try:
                    deltas.append(here.probe(start_block(layer.path, len(here.blocks))) - base)
                finally:
                    module.weight = planned
                bar.update(1)
            layers.append(attrs.evolve(layer, candidates=cands, kl=deltas, measured=[True] * len(cands), error=[0.0] * len(cands)))
        bar.close()
    mx.clear_cache()
    return attrs.evolve(table, layers=tuple(layers), method="marginal around plan"), base


def refine(cal: Calibrated, table: SensitivityTable, plan: BitPlan, target_bpw: float, rounds: int = 1, protect=(), protect_bits: int = 8, progress=True):
    """(best plan, [Round]) after up to `rounds` measured re-allocations."""
    history = []
    best_kl = None
    for _ in range(rounds):
        marginal, base = marginal_table(cal, table, plan, progress)
        best_kl = base if best_kl is None else best_kl
        fresh = plan_bits(marginal, target_bpw, protect=protect, protect_bits=protect_bits)
        fresh = attrs.evolve(fresh, predicted_kl=base + fresh.predicted_kl, method=f"{plan.method} + refined")
        measured = plan_kl(cal, fresh)
        kept = measured < best_kl
        history.append(Round(measured_kl=measured, predicted_kl=fresh.predicted_kl, kept=kept))
        if not kept:
            break
        plan, best_kl = fresh, measured
    return plan, history
