"""Attention for caches mlx-lm's own attention cannot read.

mlx-lm's attention calls `scaled_dot_product_attention` imported into each
model module, and picks its quantized kernel by `hasattr(cache, "bits")` with
one bit-width for keys and values. Two optiq caches need more: TurboQuant
(attention in the rotated space) and affine caches whose keys and values have
different bits. There is no public hook for a new cache kind, so `install`
wraps that one name in the model's own modules with a dispatcher: a cache
with an `attention` method computes its own, everything else goes to mlx-lm's
function unchanged. Caches that mlx-lm reads natively never need it.
"""

import sys

import mlx.core as mx

from . import kernels


def _dispatching(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        attend = getattr(cache, "attention", None)
        if attend is not None:
            return attend(queries, keys, values, scale, mask, sinks=sinks)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention.optiq_dispatch = True
    return scaled_dot_product_attention


def install(model):
    """Route attention over caches that define `attention` to them (idempotent;
    the module walk runs once per model)."""
    if getattr(model, "_optiq_attention_installed", False):
        return model
    modules = {sys.modules[type(m).__module__] for _, m in model.named_modules()}
    for module in modules:
        fn = getattr(module, "scaled_dot_product_attention", None)
        if fn is not None and not getattr(fn, "optiq_dispatch", False):
            module.scaled_dot_product_attention = _dispatching(fn)
    object.__setattr__(model, "_optiq_attention_installed", True)
    return model


def apply_mask(scores, mask, grouped: bool):
    """mlx-lm's mask conventions ("causal", boolean or additive arrays) on
    scores shaped (..., L, T); `grouped` when queries carry a head-repeat axis."""
    if mask is None:
        return scores
    if isinstance(mask, str):
        L, T = scores.shape[-2:]
        mask = mx.arange(T - L, T)[:, None] >= mx.arange(T)[None]
    elif grouped and mask.ndim > 3:
        mask = mx.expand_dims(mask, -3)
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.finfo(scores.dtype).min)
    return scores + mask


def sink_softmax(scores, sinks):
    """softmax over the last axis of grouped scores (B, H_kv, rep, L, T), with
    gpt-oss's attention sinks: one learned logit per query head that joins
    every row's normaliser and carries no value (as mx.fast's `sinks`)."""
    if sinks is None:
        return mx.softmax(scores, axis=-1, precise=True)
    B, n_kv, rep, L, _ = scores.shape
    sink = mx.broadcast_to(sinks.astype(scores.dtype).reshape(1, n_kv, rep, 1, 1), (B, n_kv, rep, L, 1))
    return mx.softmax(mx.concatenate([scores, sink], axis=-1), axis=-1, precise=True)[..., :-1]


def split_quantized_attention(queries, q_keys, q_values, scale, mask, group_size: int, k_bits: int, v_bits: int, sinks=None):
    """Attention through MLX's quantized matmuls, keys and values at their own
    bits. The query heads that share a KV head are folded into rows, (B,
    H_kv, rep * L, D) against (B, H_kv, T, ...): plain batched products.
    (mlx-lm instead broadcasts a repeat axis over the codes, a shape
    MLX-CUDA's quantized_matmul has no kernel for: "1x8193x128x32,
    transpose: true" fails at decode.)"""
    B, n_q, L, D = queries.shape
    n_kv = q_keys[0].shape[-3]
    rep = n_q // n_kv
    q = (queries * scale).reshape(B, n_kv, rep * L, D)
    scores = mx.quantized_matmul(q, *q_keys, transpose=True, group_size=group_size, bits=k_bits)
    T = scores.shape[-1]
    scores = apply_mask(scores.reshape(B, n_kv, rep, L, T), mask, grouped=True)
    scores = sink_softmax(scores, sinks).reshape(B, n_kv, rep * L, T)
    out = mx.quantized_matmul(scores, *q_values, transpose=False, group_size=group_size, bits=v_bits)
    return out.reshape(B, n_q, L, -1)


# Measured on this CPU (SmolLM2 shapes, 4-bit): a 2048-token prefill through
# quantized matmuls takes 3.2 s per layer, dequantizing the codes into an fp32
# attention 0.73 s (unquantized: 0.68 s); one decode row is the other way
# round (quantized matmul 8 ms against 16 ms at 8k keys). So few rows read the
# codes, many rows dequantize once.
FEW_ROWS = 8


def dequantized_attention(queries, q_keys, q_values, scale, mask, group_size: int, k_bits: int, v_bits: int, sinks=None):
    """The codes dequantized into the queries' dtype, then MLX's fused attention."""
    dt = queries.dtype

    def dense(w, s, b, bits):
        return mx.dequantize(w, s.astype(dt), b.astype(dt), group_size=group_size, bits=bits)

    keys, values = dense(*q_keys, k_bits), dense(*q_values, v_bits)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask, sinks=sinks)


def affine_attention(queries, q_keys, q_values, scale, mask, group_size: int, k_bits: int, v_bits: int, left_padding=None, sinks=None):
    """Attention over affine codes (keys and values at their own bits), by
    whichever formulation is fastest where it runs: on MLX-CUDA the fused
    decode kernel reads the codes (kernels.py); on a CPU (or Metal) few
    query rows go through quantized matmuls; many rows, or a mask the kernel
    does not take, dequantize once. `left_padding`: a batch's padding, which
    the kernel reads in place of the mask array. `sinks`: gpt-oss's
    attention sinks (the fused kernel has none: the other formulations)."""
    kernel_mask = None if left_padding is not None and queries.shape[2] == 1 else mask
    if sinks is None and kernels.supported(queries, q_keys, kernel_mask, k_bits, v_bits):
        return kernels.decode_attention(queries, q_keys, q_values, scale, kernel_mask, group_size, k_bits, v_bits, left_padding)
    if queries.shape[2] <= FEW_ROWS and not mx.cuda.is_available():
        return split_quantized_attention(queries, q_keys, q_values, scale, mask, group_size, k_bits, v_bits, sinks)
    return dequantized_attention(queries, q_keys, q_values, scale, mask, group_size, k_bits, v_bits, sinks)
