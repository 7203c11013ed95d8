"""LoRA plans: a rank and alpha per target module, from the same sensitivity
signal that set the weights' bits. Pure: numbers in, a record out.

Rules (`scaling`):
- constant: `rank` everywhere.
- by_bits: rank * bits / 4 (an 8-bit layer gets twice a 4-bit layer's rank,
  a 2-bit layer half); unquantized layers count as 8 bits.
- by_kl: rank * clip(kl / median kl, 1/4, 4), where kl is the layer's
  measured KL at the bits it was given (what quantization cost there), so
  adapters get capacity where quantization hurt most.
With `param_budget`, the rule's weights are scaled to spend that many
trainable parameters in total, r * (in + out) per module.
Alpha is `alpha_ratio * rank` per module, so PEFT's scale alpha / r is the
same everywhere and a rank change changes capacity, not step size.
"""

import math
import statistics

import attrs

SCALINGS = ("constant", "by_bits", "by_kl")
KL_CLIP = 4.0


@attrs.frozen
class LoRAModule:
    path: str
    rank: int
    alpha: float
    in_dims: int
    out_dims: int

    @property
    def params(self) -> int:
        return self.rank * (self.in_dims + self.out_dims)


@attrs.frozen
class LoRAPlan:
    modules: tuple = attrs.field(converter=tuple)
    scaling: str = "constant"
    base_rank: int = 8
    alpha_ratio: float = 2.0
    base_model: str = ""
    n_layers: int = 0  # the base model's blocks (0: unknown); mlx-lm export needs it

    @property
    def trainable_params(self) -> int:
        return sum(m.params for m in self.modules)

    def to_dict(self) -> dict:
        d = attrs.asdict(self)
        d["modules"] = [attrs.asdict(m) for m in self.modules]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAPlan":
        return cls(
            modules=[LoRAModule(**m) for m in d["modules"]],
            **{k: d[k] for k in ("scaling", "base_rank", "alpha_ratio", "base_model", "n_layers") if k in d},
        )


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


def plan_lora(dims: dict, rank: int = 8, scaling: str = "constant", bits: dict | None = None, kl: dict | None = None,
              param_budget: int | None = None, alpha_ratio: float = 2.0, base_model: str = "") -> LoRAPlan:
    """dims: {module path: (in, out)} for every target module, in model order."""
    if rank < 1:
        raise ValueError("rank must be at least 1")
    paths = list(dims)
    weights = _weights(paths, scaling, bits, kl)
    if param_budget is None:
        ranks = {p: max(1, round(rank * weights[p])) for p in paths}
    else:
        ranks = _fit_budget(paths, dims, weights, param_budget)
    modules = [LoRAModule(p, ranks[p], alpha_ratio * ranks[p], *dims[p]) for p in paths]
    return LoRAPlan(modules, scaling, rank, alpha_ratio, base_model)


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


def layer_signals(metadata: dict) -> tuple:
    """(bits, kl) per module path from an optiq model's optiq_metadata.json."""
    bits, kl = {}, {}
    for path, c in metadata.get("plan", {}).get("assignments", []):
        bits[path] = int(c["bits"])
    for layer in metadata.get("sensitivity", {}).get("layers", []):
        chosen = bits.get(layer["path"])
        for c, value in zip(layer["candidates"], layer["kl"]):
            if c["bits"] == chosen and math.isfinite(value):
                kl[layer["path"]] = float(value)
    return bits, kl
