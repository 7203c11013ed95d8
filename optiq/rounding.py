"""Error-compensating rounding (GPTQ) onto MLX's affine grid.

Round-to-nearest quantizes every weight on its own. GPTQ (Frantar et al.,
2022) quantizes a layer's input columns one at a time and moves each column's
rounding error onto the columns not yet quantized, weighted by the inverse of
the layer's input Gram matrix H = X^T X, so the layer's *output* error on the
calibration inputs is what gets minimised. Groups keep MLX's layout (a scale
and a bias per `group_size` inputs, rounded to the dtype the output stores
them in: fp16, or bf16 for a bf16 model), and `pack` writes the
integer codes in MLX's own bit order, so the result loads in stock mlx-lm.
"""

from contextlib import contextmanager
from contextvars import ContextVar

import mlx.core as mx
import numpy as np

from .records import Candidate

# The dtype a written model stores scales, biases and float layers in: every
# simulated quantization rounds them the same way, so that what the probes
# measure is what the output computes. fp16 unless a conversion says otherwise.
_STORED = ContextVar("optiq_stored_dtype", default=mx.float16)


@contextmanager
def stored_as(dtype):
    """Round scales, biases and float layers through `dtype` (mx.float16 or mx.bfloat16) inside."""
    token = _STORED.set(dtype)
    try:
        yield
    finally:
        _STORED.reset(token)


def store_as(dtype):
    """stored_as for the rest of this context (a script or benchmark measuring one model)."""
    _STORED.set(dtype)


def stored_dtype():
    return _STORED.get()


def round_stored(x: np.ndarray) -> np.ndarray:
    """fp32 values rounded through the stored dtype."""
    if stored_dtype() == mx.float16:
        return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)
    return np.array(mx.array(np.asarray(x, dtype=np.float32)).astype(stored_dtype()).astype(mx.float32))


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes (rows, cols) -> uint32 words, MLX's LSB-first bit stream per row."""
    rows, cols = q.shape
    if (cols * bits) % 32:
        raise ValueError(f"{cols} columns of {bits} bits do not fill whole 32-bit words")
    q = q.astype(np.uint64)
    pos = np.arange(cols, dtype=np.uint64) * np.uint64(bits)
    word, offset = pos // np.uint64(32), pos % np.uint64(32)
    out = np.zeros((rows, cols * bits // 32), dtype=np.uint64)
    low = (q << offset) & np.uint64(0xFFFFFFFF)
    for w in range(out.shape[1]):  # codes that start in word w (and their spill into w + 1)
        sel = word == w
        if sel.any():
            out[:, w] |= np.bitwise_or.reduce(low[:, sel], axis=1)
    spill = offset + np.uint64(bits) > np.uint64(32)
    for c in np.nonzero(spill)[0]:
        out[:, word[c] + 1] |= q[:, c] >> (np.uint64(32) - offset[c])
    return out.astype(np.uint32)


def dequantize(q, scales, biases, group_size: int) -> np.ndarray:
    s = np.repeat(scales.astype(np.float32), group_size, axis=1)
    b = np.repeat(biases.astype(np.float32), group_size, axis=1)
    return q.astype(np.float32) * s + b


def _group_params(w: np.ndarray, bits: int):
    """MLX's affine parameters for a (rows, group) block, rounded as stored."""
    levels = (1 << bits) - 1
    lo, hi = w.min(axis=1), w.max(axis=1)
    return round_stored(np.maximum((hi - lo) / levels, 1e-8)), round_stored(lo)


def gptq(weight: np.ndarray, gram: np.ndarray, candidate: Candidate, damp: float = 0.01, block: int = 128):
    """(codes, scales, biases) for `weight` (out, in) given H = X^T X (in, in)."""
    bits, g = candidate.bits, candidate.group_size
    levels = (1 << bits) - 1
    # fp64 for the inverse; the column updates in fp32 give the same output
    # error (2.5033e6 vs 2.5035e6 on a SmolLM2 down_proj) in half the time.
    w = np.array(weight, dtype=np.float32)
    h = np.array(gram, dtype=np.float64)
    n_in = w.shape[1]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(n_in)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)  # upper factor of H^-1
    q = np.zeros(w.shape, dtype=np.int64)
    scales = np.zeros((w.shape[0], n_in // g), dtype=np.float32)
    biases = np.zeros_like(scales)
    block = max(g, (block // g) * g)
    for start in range(0, n_in, block):
        stop = min(start + block, n_in)
        w1 = w[:, start:stop].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if col % g == 0:
                s, b = _group_params(w1[:, i : i + g], bits)
                scales[:, col // g], biases[:, col // g] = s, b
            s, b = scales[:, col // g], biases[:, col // g]
            code = np.clip(np.rint((w1[:, i] - b) / s), 0, levels)
            q[:, col] = code
            e = (w1[:, i] - (code * s + b)) / h1[i, i]
            w1[:, i:] -= np.outer(e, h1[i, i:])
            err1[:, i] = e
        w[:, stop:] -= err1 @ hinv[start:stop, stop:]
    return q, scales, biases


def rtn(weight: np.ndarray, candidate: Candidate):
    """Round-to-nearest with the same grid (for comparison and for layers without a Gram)."""
    bits, g = candidate.bits, candidate.group_size
    w = np.asarray(weight, dtype=np.float32)
    blocks = w.reshape(w.shape[0], -1, g)
    levels = (1 << bits) - 1
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)
    scales = round_stored(np.maximum((hi - lo) / levels, 1e-8))
    biases = round_stored(lo)
    q = np.clip(np.rint((blocks - biases[..., None]) / scales[..., None]), 0, levels).reshape(w.shape)
    return q.astype(np.int64), scales, biases
