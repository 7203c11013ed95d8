"""How a layer's weights are rounded onto MLX's affine grid, real and simulated.

Two quantizers share one grid (a scale and a bias per `group_size` inputs,
rounded to the dtype the written model stores them in: fp16, or bf16 for a
bf16 model):
- round-to-nearest, MLX's own `mx.quantize`;
- GPTQ (Frantar et al., 2022), which quantizes a layer's input columns one at
  a time and moves each column's rounding error onto the columns not yet
  quantized, weighted by the inverse of the layer's input Gram matrix
  H = X^T X, so the layer's *output* error on the calibration inputs is what
  gets minimised.

`Rounding` is the one protocol every model family measures, simulates and
writes with: which quantizer, the dtype scales are stored in, and the Grams
GPTQ needs. The stored dtype is always an argument, never ambient state, so
what a probe measures is what the written model computes. `pack` writes
integer codes in MLX's own bit order, so the output loads in stock mlx-lm.
"""

from typing import Mapping, Optional

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .model_tree import module_at
from .records import FLOAT_BITS, Candidate

ROW_SLAB = 1 << 20  # weights per slab of rows (quantizing, probing and estimating large layers)
QUANTIZERS = ("rtn", "gptq")
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def round_stored(x: np.ndarray, dtype=mx.float16) -> np.ndarray:
    """fp32 values rounded through the stored dtype."""
    if dtype == mx.float16:
        return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)
    return np.array(mx.array(np.asarray(x, dtype=np.float32)).astype(dtype).astype(mx.float32))


# -- MLX's rounding, simulated in fp32 ----------------------------------------


def row_slabs(shape) -> list:
    """Slices of about ROW_SLAB weights over the rows of a (rows, columns) matrix."""
    rows = max(1, ROW_SLAB // max(1, shape[-1]))
    return [slice(lo, lo + rows) for lo in range(0, shape[0], rows)]


def quantize_rows(weight: mx.array, candidate: Candidate, dtype=mx.float16) -> tuple:
    """MLX's (codes, scales, biases), scales and biases rounded through the
    dtype they are stored in. A slab of rows at a time: mx.quantize holds up
    to six times its input in temporaries at 3, 5 and 6 bits, and groups run
    along a row, so slabs give the same codes."""
    parts = []
    for rows in row_slabs(weight.shape):
        q, scales, biases = mx.quantize(weight[rows].astype(mx.float32), group_size=candidate.group_size, bits=candidate.bits)
        parts.append((q, scales.astype(dtype).astype(mx.float32), biases.astype(dtype).astype(mx.float32)))
        mx.eval(parts[-1])
    return tuple(mx.concatenate(p) if len(p) > 1 else p[0] for p in zip(*parts))


def dequantize_rows(parts: tuple, candidate: Candidate) -> mx.array:
    return mx.dequantize(*parts, group_size=candidate.group_size, bits=candidate.bits)


def fake_quantize(weight: mx.array, candidate: Candidate, dtype=mx.float16) -> mx.array:
    """The fp32 weight a layer holds after quantize-then-dequantize (an
    unquantized candidate: the weight rounded through the stored dtype)."""
    if candidate.bits >= FLOAT_BITS:
        return weight.astype(dtype).astype(mx.float32)
    return dequantize_rows(quantize_rows(weight, candidate, dtype), candidate)


# -- GPTQ and round-to-nearest in numpy (the written codes) ----------------------


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


def _group_params(w: np.ndarray, bits: int, dtype):
    """MLX's affine parameters for a (rows, group) block, rounded as stored."""
    levels = (1 << bits) - 1
    lo, hi = w.min(axis=1), w.max(axis=1)
    return round_stored(np.maximum((hi - lo) / levels, 1e-8), dtype), round_stored(lo, dtype)


def gptq(weight: np.ndarray, gram: np.ndarray, candidate: Candidate, dtype=mx.float16, damp: float = 0.01, block: int = 128):
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
                s, b = _group_params(w1[:, i : i + g], bits, dtype)
                scales[:, col // g], biases[:, col // g] = s, b
            s, b = scales[:, col // g], biases[:, col // g]
            code = np.clip(np.rint((w1[:, i] - b) / s), 0, levels)
            q[:, col] = code
            e = (w1[:, i] - (code * s + b)) / h1[i, i]
            w1[:, i:] -= np.outer(e, h1[i, i:])
            err1[:, i] = e
        w[:, stop:] -= err1 @ hinv[start:stop, stop:]
    return q, scales, biases


def rtn(weight: np.ndarray, candidate: Candidate, dtype=mx.float16):
    """Round-to-nearest with the same grid (for comparison and for layers without a Gram)."""
    bits, g = candidate.bits, candidate.group_size
    w = np.asarray(weight, dtype=np.float32)
    blocks = w.reshape(w.shape[0], -1, g)
    levels = (1 << bits) - 1
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)
    scales = round_stored(np.maximum((hi - lo) / levels, 1e-8), dtype)
    biases = round_stored(lo, dtype)
    q = np.clip(np.rint((blocks - biases[..., None]) / scales[..., None]), 0, levels).reshape(w.shape)
    return q.astype(np.int64), scales, biases


def gptq_weight(weight: mx.array, gram, candidate: Candidate, dtype=mx.float16):
    """(fp32 weight, (codes, scales, biases)) after GPTQ onto MLX's affine grid."""
    q, scales, biases = gptq(np.array(weight.astype(mx.float32)), np.array(gram), candidate, dtype)
    return mx.array(dequantize(q, scales, biases, candidate.group_size)), (q, scales, biases)


# -- the protocol ------------------------------------------------------------------


@attrs.frozen(eq=False)
class Rounding:
    """How every layer is rounded: `quantizer` ("rtn": MLX's round-to-nearest;
    "gptq": GPTQ with the Gram of the layer's calibration inputs, Linears
    with a recorded Gram only, and a tied embedding with its head's Gram),
    scales and biases stored in `dtype`. Measurement, simulation and the
    writers all take one, so probes and output round alike."""

    quantizer: str = "rtn"
    dtype: object = mx.float16
    grams: Mapping = attrs.field(factory=dict)  # {path: X^T X} of each Linear's inputs (may live on disk)
    head_gram: Optional[mx.array] = None  # X^T X of a tied head's input, for the embedding's head role

    def gram_for(self, path: str, module):
        """X^T X of the layer's input, when one was recorded."""
        if isinstance(module, nn.Linear):
            return self.grams.get(path)
        return self.head_gram

    def uses_gptq(self, path: str, module, candidate: Candidate) -> bool:
        """GPTQ where this rounding uses it and an input Gram matrix exists; else MLX's rounding."""
        return self.quantizer == "gptq" and candidate.bits < FLOAT_BITS and self.gram_for(path, module) is not None

    def rounded(self, path: str, module, weight: mx.array, candidate: Candidate):
        """(fp32 weight after rounding, (codes, scales, biases) to write or None
        where MLX's own rounding is used)."""
        if self.uses_gptq(path, module, candidate):
            return gptq_weight(weight, self.gram_for(path, module), candidate, self.dtype)
        return fake_quantize(weight, candidate, self.dtype), None

    def quantized(self, path: str, module, weight: mx.array, candidate: Candidate) -> mx.array:
        """The fp32 weight this layer holds at `candidate`."""
        return self.rounded(path, module, weight, candidate)[0]

    def codes(self, path: str, module, weight: mx.array, candidate: Candidate):
        """(codes, scales, biases) to write, or None where mlx-lm's own rounding is used."""
        return self.rounded(path, module, weight, candidate)[1] if self.uses_gptq(path, module, candidate) else None


def plan_codes(rounding: Rounding, model, plan) -> dict:
    """{path: (codes, scales, biases)} for every planned layer `rounding`
    rounds itself (GPTQ); quantize() writes them as they are."""
    codes = {}
    for path, cand in plan.assignments:
        module = module_at(model, path)
        c = rounding.codes(path, module, module.weight, cand)
        if c is not None:
            codes[path] = c
    return codes
