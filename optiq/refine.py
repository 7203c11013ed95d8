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
from .model_tree import module_at, start_block
from .plan import plan_bits
from .probe_hooks import run_it
from .records import BitPlan, LayerSensitivity, SensitivityTable
from .reference import ReferencePass, reference_pass
from .rounding import Rounding
from .standins import weights_swapped


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


def plan_kl(reference: ReferencePass, rounding: Rounding, plan: BitPlan) -> float:
    """Measured KL of a whole plan on the calibration positions."""
    with simulated(reference.model, plan.assignments, rounding):
        return reference.probe(0)


def marginal_probes(table: SensitivityTable, plan: BitPlan) -> int:
    """How many probes one round of marginal_table runs."""
    chosen = plan.as_dict()
    return sum(len(neighbours(l, chosen[l.path])) - 1 for l in table.layers if l.path in chosen)


def marginal_table(reference: ReferencePass, rounding: Rounding, table: SensitivityTable, plan: BitPlan, on_probe=run_it):
    """(table of KL changes around `plan`, KL of `plan`), measured with the plan in place."""
    chosen = plan.as_dict()
    model = reference.model
    originals = {p: module_at(model, p).weight for p in chosen}
    layers, n = [], 0
    with simulated(model, plan.assignments, rounding):
        here = reference_pass(model, reference.tokens, reference.batches[0].shape[0], reference.kl_stride, refs=reference.refs)
        base = here.probe(0)
        for layer in (l for l in table.layers if l.path in chosen):
            module = module_at(model, layer.path)
            cands = neighbours(layer, chosen[layer.path])
            start = start_block(layer.path, len(here.blocks))
            deltas = []
            for c in cands:
                if c == chosen[layer.path]:
                    deltas.append(0.0)
                    continue

                def run(path=layer.path, module=module, c=c, start=start):
                    with weights_swapped([(module, rounding.quantized(path, module, originals[path], c))]):
                        return here.probe(start) - base

                deltas.append(on_probe(n, layer.path, c, run))
                n += 1
            layers.append(attrs.evolve(layer, candidates=cands, kl=deltas, measured=[True] * len(cands), error=[0.0] * len(cands)))
    mx.clear_cache()
    return attrs.evolve(table, layers=tuple(layers), method="marginal around plan"), base


def refine(reference: ReferencePass, rounding: Rounding, table: SensitivityTable, plan: BitPlan, target_bpw: float, rounds: int = 1,
           protect=(), protect_bits: int = 8, on_probe=run_it):
    """(best plan, [Round]) after up to `rounds` measured re-allocations."""
    history = []
    best_kl = None
    for _ in range(rounds):
        marginal, base = marginal_table(reference, rounding, table, plan, on_probe)
        best_kl = base if best_kl is None else best_kl
        fresh = plan_bits(marginal, target_bpw, protect=protect, protect_bits=protect_bits)
        fresh = attrs.evolve(fresh, predicted_kl=base + fresh.predicted_kl, method=f"{plan.method} + refined")
        measured = plan_kl(reference, rounding, fresh)
        kept = measured < best_kl
        history.append(Round(measured_kl=measured, predicted_kl=fresh.predicted_kl, kept=kept))
        if not kept:
            break
        plan, best_kl = fresh, measured
    return plan, history
