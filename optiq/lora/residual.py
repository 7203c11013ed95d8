"""Adapters that start from what quantization lost.

For each target layer the residual R = W_ref - dequant(Q(W)) is what the
quantized base gets wrong. Its singular values say how much of that error r
directions can hold (the `by_error` rank rule spends a parameter budget on
them), and its top-r singular directions are the start LoftQ gives an
adapter: scale * a @ b = (U_r S_r V_r^T)^T, so the adapted layer begins as
close to the reference as rank r allows (Eckart-Young), instead of at the
quantized base with b = 0. One LoftQ step: the base stays the quantized
weights already written (optiq's GPTQ codes), so it is not re-quantized.
"""

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import scipy.linalg

from ..cpu import dense_weight
from ..errors import OptiqError
from .plan import KL_CLIP, plan_lora

INITS = ("zero", "residual")


@attrs.frozen
class ResidualFactors:
    """One layer's residual spectrum: all singular values, and the top
    directions kept (left: (out, k) with S folded in as sqrt on each side)."""

    path: str
    singular_values: np.ndarray  # descending, min(in, out) of them
    left: np.ndarray  # (out, k) = U_k sqrt(S_k)
    right: np.ndarray  # (k, in) = sqrt(S_k) V_k^T

    @property
    def energy(self) -> float:
        return float(np.sum(self.singular_values.astype(np.float64) ** 2))

    def left_over(self, rank: int) -> float:
        """||R - best rank-r approximation||_F^2: the error a rank-r start leaves."""
        return float(np.sum(self.singular_values[rank:].astype(np.float64) ** 2))


def dequantized_weight(module: nn.Module) -> mx.array:
    """The (out, in) weight a linear computes with, in fp32."""
    return dense_weight(module).astype(mx.float32)


def residual_factors(path: str, residual: np.ndarray, keep: int) -> ResidualFactors:
    """Singular values of the (out, in) residual and its top `keep` directions."""
    u, s, vt = scipy.linalg.svd(residual.astype(np.float32), full_matrices=False, lapack_driver="gesdd", check_finite=False)
    k = min(keep, s.size)
    root = np.sqrt(s[:k])
    return ResidualFactors(path, s, np.ascontiguousarray(u[:, :k] * root), np.ascontiguousarray(root[:, None] * vt[:k]))


def layer_residuals(model: nn.Module, reference: dict, paths, keep: int):
    """Yield ResidualFactors per path; `reference` maps a path to its float
    (out, in) weight (an mx array, possibly lazy), read one at a time."""
    modules = dict(model.named_modules())
    for path in paths:
        base = modules[path]
        w_ref = reference.get(path)
        if w_ref is None:
            raise OptiqError(f"the reference model has no weight for {path}")
        w_q = dequantized_weight(base)
        if tuple(w_ref.shape) != tuple(w_q.shape):
            raise OptiqError(f"{path}: the reference weight is {tuple(w_ref.shape)}, the model's is {tuple(w_q.shape)}")
        r = np.array(w_ref.astype(mx.float32) - w_q)
        yield residual_factors(path, r, keep)


def residual_init(factors: ResidualFactors, rank: int, scale: float) -> tuple:
    """(a (in, r), b (r, out)) with scale * a @ b = the top-r approximation of R^T."""
    if rank > factors.left.shape[1]:
        raise ValueError(f"{factors.path}: rank {rank} is above the {factors.left.shape[1]} directions kept")
    root = 1.0 / np.sqrt(scale)
    a = factors.right[:rank].T * root  # (in, r)
    b = factors.left[:, :rank].T * root  # (r, out)
    return mx.array(np.ascontiguousarray(a, dtype=np.float32)), mx.array(np.ascontiguousarray(b, dtype=np.float32))


def start_from_residual(model: nn.Module, plan, factors: dict) -> float:
    """Set every planned LoRALinear's a and b from its residual (in place);
    returns the fraction of the residual energy the start leaves."""
    modules = dict(model.named_modules())
    left = total = 0.0
    for m in plan.modules:
        f = factors[m.path]
        layer = modules[m.path]
        layer.lora_a, layer.lora_b = residual_init(f, m.rank, m.alpha / m.rank)
        left, total = left + f.left_over(m.rank), total + f.energy
    mx.eval(model.trainable_parameters())
    return left / total if total > 0 else 0.0


def plan_from_residual(model: nn.Module, dims: dict, reference: dict | None, init: str, rank: int, scaling: str, factors: dict | None = None,
                       **plan_args) -> tuple:
    """(LoRAPlan, {path: ResidualFactors} or None). by_error plans from the
    spectra (directions kept up to its rank cap); any other rule plans first
    and keeps as many directions as its largest rank, for `init="residual"`.
    `factors`: residuals already taken (KL_CLIP x rank directions kept), so
    several plans over one model take them once."""
    if init not in INITS:
        raise ValueError(f"unknown adapter init {init!r}; choose from {', '.join(INITS)}")
    needs = scaling == "by_error" or init == "residual"
    if needs and factors is not None:
        plan = plan_lora(dims, rank, scaling, spectra={p: f.singular_values for p, f in factors.items()}, **plan_args)
        return attrs.evolve(plan, init=init), factors
    if needs and reference is None:
        raise ValueError(f"{'by_error' if scaling == 'by_error' else 'init residual'} needs the float weights the model was quantized from (a reference model)")
    if scaling == "by_error":
        factors = {f.path: f for f in layer_residuals(model, reference, dims, int(KL_CLIP * rank))}
        plan = plan_lora(dims, rank, scaling, spectra={p: f.singular_values for p, f in factors.items()}, **plan_args)
    else:
        plan = plan_lora(dims, rank, scaling, **plan_args)
        factors = {f.path: f for f in layer_residuals(model, reference, dims, max(m.rank for m in plan.modules))} if needs else None
    return attrs.evolve(plan, init=init), factors
