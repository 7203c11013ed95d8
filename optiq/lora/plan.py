"""LoRA plans: a rank and alpha per target module, from the same sensitivity
signal that set the weights' bits. Pure: numbers in, a record out.

Rules (`scaling`):
- constant: `rank` everywhere.
- by_bits: rank * bits / 4 (an 8-bit layer gets twice a 4-bit layer's rank,
  a 2-bit layer half); unquantized layers count as 8 bits.
- by_kl: rank * clip(kl / median kl, 1/4, 4), where kl is the layer's
  measured KL at the bits it was given (what quantization cost there), so
  adapters get capacity where quantization hurt most.
- by_error: ranks from the spectrum of each layer's quantization residual
  W_ref - dequant(Q(W)) (lora/residual.py): a budget (by default constant
  rank's parameter count) is spent greedily on the singular directions with
  the most residual energy per parameter, sigma^2 / (in + out), rank 1 at
  least and KL_CLIP x rank at most per module. That minimises the total
  residual a rank-r start (`--init residual`) leaves, sum ||R - R_r||_F^2.
With `param_budget`, the rule's weights are scaled to spend that many
trainable parameters in total, r * (in + out) per module.
Alpha is `alpha_ratio * rank` per module, so PEFT's scale alpha / r is the
same everywhere and a rank change changes capacity, not step size.
"""

import heapq
import math
import statistics

from ..records import BitPlan, Candidate, LayerSensitivity, LoRAModule, LoRAPlan, SensitivityTable

SCALINGS = ("constant", "by_bits", "by_kl", "by_error")
KL_CLIP = 4.0


def layer_bits(plan: BitPlan | None) -> dict:
    """{path: bits} of a weight plan (16: kept float)."""
    return {path: c.bits for path, c in plan.assignments} if plan is not None else {}


def layer_kl(plan: BitPlan | None, table: SensitivityTable | None) -> dict:
    """{path: KL} at the candidate the plan gave each layer: what quantization cost there."""
    if plan is None or table is None:
        return {}
    chosen = plan.as_dict()
    out = {}
    for layer in table.layers:
        c = chosen.get(layer.path)
        if c in layer.candidates and math.isfinite(layer.kl_of(c)):
            out[layer.path] = float(layer.kl_of(c))
    return out


def _weights(paths, scaling, bits, kl) -> dict:
    if scaling == "constant":
        return {p: 1.0 for p in paths}
    if scaling == "by_bits":
        if not bits:
            raise ValueError("by_bits needs per-layer bits (an optiq model's optiq_metadata.json)")
        return {p: min(bits.get(p, 8), 8) / 4.0 for p in paths}
    if scaling == "by_kl":
        if not kl:
            raise ValueError("by_kl needs per-layer sensitivity (an optiq model's optiq_metadata.json)")
        values = [kl[p] for p in paths if p in kl and kl[p] > 0]
        median = statistics.median(values) if values else 1.0
        return {p: min(max(kl.get(p, median) / median, 1 / KL_CLIP), KL_CLIP) for p in paths}
    raise ValueError(f"unknown rank scaling {scaling!r}; choose from {', '.join(SCALINGS)}")


def plan_lora(dims: dict, rank: int = 8, scaling: str = "constant", plan: BitPlan | None = None, table: SensitivityTable | None = None,
              param_budget: int | None = None, alpha_ratio: float = 2.0, base_model: str = "", spectra: dict | None = None) -> LoRAPlan:
    """dims: {module path: (in, out)} for every target module, in model order;
    `plan` and `table`: the weights' BitPlan and SensitivityTable (by_bits
    reads the plan's bits, by_kl the table's KL at each planned candidate);
    `spectra`: {path: descending singular values of the quantization
    residual} for by_error."""
    if rank < 1:
        raise ValueError("rank must be at least 1")
    paths = list(dims)
    if scaling == "by_error":
        if not spectra or any(p not in spectra for p in paths):
            raise ValueError("by_error needs each target's quantization residual (a float --reference model)")
        budget = param_budget if param_budget is not None else rank * sum(sum(dims[p]) for p in paths)
        ranks = spend_on_residual(paths, dims, spectra, budget, int(KL_CLIP * rank))
    else:
        weights = _weights(paths, scaling, layer_bits(plan), layer_kl(plan, table))
        if param_budget is None:
            ranks = {p: max(1, round(rank * weights[p])) for p in paths}
        else:
            ranks = _fit_budget(paths, dims, weights, param_budget)
    modules = [LoRAModule(p, ranks[p], alpha_ratio * ranks[p], *dims[p]) for p in paths]
    return LoRAPlan(modules, scaling, rank, alpha_ratio, base_model)


def spend_on_residual(paths, dims, spectra, budget: int, max_rank: int) -> dict:
    """Ranks under `budget` parameters that keep the most residual energy:
    rank 1 everywhere, then the next singular direction of whichever module
    gives the most sigma^2 per parameter, while it fits. Each module's gains
    fall with its rank, so taking the best ratio first is the fractional
    optimum; a direction that no longer fits is skipped for cheaper ones."""
    floor = sum(sum(dims[p]) for p in paths)
    if budget < floor:
        raise ValueError(f"a budget of {budget} parameters is below rank 1 everywhere ({floor})")
    ranks = {p: 1 for p in paths}
    order = {p: i for i, p in enumerate(paths)}  # ties go to the earlier module
    left = budget - floor

    def offer(p):
        s = spectra[p]
        r = ranks[p]
        if r < min(max_rank, len(s)):
            heapq.heappush(heap, (-float(s[r]) ** 2 / sum(dims[p]), order[p], p))

    heap = []
    for p in paths:
        offer(p)
    while heap:
        _, _, p = heapq.heappop(heap)
        cost = sum(dims[p])
        if cost <= left:
            ranks[p] += 1
            left -= cost
            offer(p)
    return ranks


def _fit_budget(paths, dims, weights, budget) -> dict:
    """The largest scale s with sum max(1, round(s w)) (in + out) <= budget (bisection)."""
    cost = lambda s: sum(max(1, round(s * weights[p])) * sum(dims[p]) for p in paths)  # noqa: E731
    floor = sum(sum(dims[p]) for p in paths)
    if budget < floor:
        raise ValueError(f"a budget of {budget} parameters is below rank 1 everywhere ({floor})")
    lo, hi = 0.0, 1.0
    while cost(hi) <= budget:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    return {p: max(1, round(lo * weights[p])) for p in paths}


def weight_signals(metadata: dict) -> tuple:
    """(BitPlan or None, SensitivityTable or None) from an optiq model's optiq_metadata.json."""
    plan = BitPlan.from_dict(metadata["plan"]) if "plan" in metadata else None
    table = SensitivityTable.from_dict(metadata["sensitivity"]) if "sensitivity" in metadata else None
    return plan, table


def signals_from(bits: dict | None = None, kl: dict | None = None, group_size: int = 64) -> tuple:
    """(BitPlan, SensitivityTable) from plain {path: bits} and {path: KL} maps,
    for bits or sensitivities that came from somewhere other than an optiq
    convert (another quantizer's recipe, a hand-made plan). A layer missing
    from `bits` counts as 4-bit, one missing from `kl` as 0."""
    paths = list(bits or kl or {})
    chosen = {p: Candidate((bits or {}).get(p, 4), group_size) for p in paths}
    plan = BitPlan([(p, chosen[p]) for p in paths], 0.0, 0.0, 0.0, "given")
    layers = [LayerSensitivity(p, 1, [chosen[p]], [(kl or {}).get(p, 0.0)], [True], [0.0]) for p in paths]
    return plan, SensitivityTable("given", layers)
