"""How a layer's weights are rounded onto MLX's grids, real and simulated.

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

MLX's microscaling formats (mxfp4, nvfp4, mxfp8: float codes and an 8-bit
scale per group, no bias) take GPTQ too: each group's scale is the one
mx.quantize picks for the group's error-updated weights, and each column
rounds to the nearest code under it (`gptq.FloatGrid`; numpy on every
device, the CUDA block kernel being affine's).
"""

from typing import Mapping, Optional

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import device, gptq
from .model_tree import STACKED, is_experts, module_at
from .records import FLOAT_BITS, Candidate

QUANTIZERS = ("rtn", "gptq")
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


# -- MLX's rounding, simulated in fp32 ----------------------------------------


def row_slabs(shape) -> list:
    """Slices of about device.row_slab() weights over the first axis: rows of
    a (rows, columns) matrix, whole matrices of a stacked (experts, rows,
    columns) one."""
    per_item = int(np.prod(shape[1:])) if len(shape) > 2 else shape[-1]
    rows = max(1, device.row_slab() // max(1, per_item))
    return [slice(lo, lo + rows) for lo in range(0, shape[0], rows)]


def quantize_rows(weight: mx.array, candidate: Candidate, dtype=mx.float16) -> tuple:
    """MLX's (codes, scales, biases), scales and biases rounded through the
    dtype they are stored in. A slab of rows at a time: mx.quantize holds up
    to six times its input in temporaries at 3, 5 and 6 bits, and groups run
    along a row, so slabs give the same codes. A stacked weight (experts)
    is its rows one after another, as mx.quantize treats it."""
    shape = weight.shape
    weight = weight.reshape(-1, shape[-1])
    parts = []
    for rows in row_slabs(weight.shape):
        if candidate.mode != "affine":  # microscaling: 8-bit scales as MLX stores them, no bias
            q, scales = mx.quantize(weight[rows].astype(mx.float32), group_size=candidate.group_size, bits=candidate.bits, mode=candidate.mode)
            parts.append((q, scales))
        else:
            q, scales, biases = mx.quantize(weight[rows].astype(mx.float32), group_size=candidate.group_size, bits=candidate.bits)
            parts.append((q, scales.astype(dtype).astype(mx.float32), biases.astype(dtype).astype(mx.float32)))
        mx.eval(parts[-1])
    whole = (mx.concatenate(p) if len(p) > 1 else p[0] for p in zip(*parts))
    out = tuple(p.reshape(*shape[:-1], p.shape[-1]) for p in whole)
    return out if len(out) == 3 else (*out, None)


def dequantize_rows(parts: tuple, candidate: Candidate) -> mx.array:
    """parts: (codes, scales, biases), biases None for a microscaling format."""
    return mx.dequantize(*parts, group_size=candidate.group_size, bits=candidate.bits, mode=candidate.mode, dtype=mx.float32)


def fake_quantize(weight: mx.array, candidate: Candidate, dtype=mx.float16) -> mx.array:
    """The fp32 weight a layer holds after quantize-then-dequantize (an
    unquantized candidate: the weight rounded through the stored dtype)."""
    if candidate.bits >= FLOAT_BITS:
        return weight.astype(dtype).astype(mx.float32)
    return dequantize_rows(quantize_rows(weight, candidate, dtype), candidate)


# -- packing and GPTQ's codes ---------------------------------------------------


def pack(q, bits: int):
    """Integer codes (rows, cols) -> uint32 words, MLX's LSB-first bit stream
    per row: numpy in, numpy out; MLX arrays (a GPU's codes) in, MLX out. A
    stack of matrices (experts, rows, cols) packs row by row alike."""
    if q.ndim > 2:
        return pack(q.reshape(-1, q.shape[-1]), bits).reshape(*q.shape[:-1], -1)
    rows, cols = q.shape
    if (cols * bits) % 32:
        raise ValueError(f"{cols} columns of {bits} bits do not fill whole 32-bit words")
    if isinstance(q, mx.array):
        return pack_mx(q, bits)
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


def pack_mx(q: mx.array, bits: int) -> mx.array:
    """pack on MLX arrays: every 32 codes fill exactly `bits` words, so each
    word of a 32-code period is an OR of shifted column slices (32 whole-array
    operations, no loop over the row's length)."""
    rows, cols = q.shape
    periods = mx.pad(q.astype(mx.uint64), [(0, 0), (0, (-cols) % 32)]).reshape(rows, -1, 32)
    words = [mx.zeros(periods.shape[:2], dtype=mx.uint64) for _ in range(bits)]
    for j in range(32):
        word, offset = divmod(j * bits, 32)
        code = periods[:, :, j]
        words[word] = words[word] | ((code << offset) & 0xFFFFFFFF)
        if offset + bits > 32:
            words[word + 1] = words[word + 1] | (code >> (32 - offset))
    return mx.stack(words, axis=-1).reshape(rows, -1)[:, : cols * bits // 32].astype(mx.uint32)


def dequantize(q, scales, biases, group_size: int) -> np.ndarray:
    s = np.repeat(scales.astype(np.float32), group_size, axis=1)
    b = np.repeat(biases.astype(np.float32), group_size, axis=1)
    return q.astype(np.float32) * s + b


def experts_gptq_weight(weight: mx.array, grams: Mapping, candidate: Candidate, dtype=mx.float16, factors=None, first: int = 0):
    """gptq_weight for a routed expert stack (experts, out, in), one expert
    at a time with its own Gram ({expert: X_e^T X_e} over the tokens routed
    to it). An expert no calibration token reached has no Gram: an identity
    Gram makes GPTQ plain rounding on the same grid. factors: {expert: GPU
    factor}, filled as made; first: the stack's first expert when `weight`
    is a slab of experts."""
    identity = None
    weights, codes = [], []
    for e in range(first, first + weight.shape[0]):
        gram = grams.get(e)
        if gram is None:
            identity = mx.eye(weight.shape[-1]) if identity is None else identity
            gram = identity
        factor = None
        if factors is not None and device.on_cuda():
            factor = factors.get(e)
            if factor is None:
                factor = factors[e] = gptq.inverse_factor(gram)
        w, c = gptq_weight(weight[e - first], gram, candidate, dtype, factor)
        weights.append(w)
        codes.append(c)
    stack = mx.stack if isinstance(codes[0][0], mx.array) else np.stack
    return mx.stack(weights), tuple(None if p[0] is None else stack(list(p)) for p in zip(*codes))  # no biases in a microscaling format


def gptq_weight(weight: mx.array, gram, candidate: Candidate, dtype=mx.float16, factor=None, refit: bool = False):
    """(fp32 weight, (codes, scales, biases)) after GPTQ onto the candidate's
    grid: numpy on a CPU (every CPU result) and for a microscaling format
    (biases None), MLX arrays and the CUDA block kernel on MLX-CUDA given the
    layer's inverse_factor (computed here when not given). refit: an affine
    layer's scales and biases fitted to its codes after (gptq.refit_affine)."""
    if candidate.mode != "affine":
        q, scales, _ = gptq.gptq_numpy(np.array(weight.astype(mx.float32)), np.array(gram), candidate.bits, candidate.group_size, mode=candidate.mode)
        return dequantize_rows((mx.array(pack(q, candidate.bits)), mx.array(scales), None), candidate), (q, scales, None)
    if device.on_cuda():
        factor = factor if factor is not None else gptq.inverse_factor(gram)
        codes = gptq.gptq_mlx(weight, factor, candidate.bits, candidate.group_size, dtype, block_step=gptq.block_step_cuda)
        if refit:  # on the host: one small solve per row; inputs that never fired hold zero weights, as in GPTQ
            h = np.array(gram.astype(mx.float32))
            w = np.where(np.diag(h) == 0, 0.0, np.array(weight.astype(mx.float32)))
            fitted = gptq.refit_affine(w, h, np.array(codes[0]), candidate.group_size, dtype)
            codes = (codes[0], *(mx.array(p, dtype=mx.float32) for p in fitted))
        return gptq.dequantize_mx(*codes, candidate.group_size), codes
    q, scales, biases = gptq.gptq_numpy(np.array(weight.astype(mx.float32)), np.array(gram), candidate.bits, candidate.group_size, dtype, refit=refit)
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
    # On a GPU: each layer's GPTQ factor (gptq.inverse_factor), made once and
    # kept, since every candidate of a layer and its codes reuse it.
    factors: dict = attrs.field(factory=dict, repr=False)
    refit: bool = True  # GPTQ's affine scales and biases fitted to its codes (gptq.refit_affine); not for expert stacks

    def gram_for(self, path: str, module):
        """X^T X of the layer's input, when one was recorded ({expert: Gram}
        for a routed expert stack; none for per-head stacks, rounded by MLX)."""
        if isinstance(module, nn.Linear) or is_experts(module):
            return self.grams.get(path)
        if isinstance(module, STACKED):
            return None
        return self.head_gram

    def uses_gptq(self, path: str, module, candidate: Candidate) -> bool:
        """GPTQ where this rounding uses it and an input Gram matrix exists; else MLX's rounding."""
        return self.quantizer == "gptq" and candidate.bits < FLOAT_BITS and self.gram_for(path, module) is not None

    def rounded(self, path: str, module, weight: mx.array, candidate: Candidate, rows: slice | None = None):
        """(fp32 weight after rounding, (codes, scales, biases) to write or None
        where MLX's own rounding is used). rows: `weight` is module.weight[rows]
        (a slab of an expert stack's experts)."""
        if self.uses_gptq(path, module, candidate):
            gram = self.gram_for(path, module)
            if is_experts(module):
                # An expert stack's factors are a Gram's size per expert: keep one
                # block's, keyed by its Grams (gate_proj and up_proj share theirs).
                key = ("experts", id(gram))
                for other in [k for k in self.factors if isinstance(k, tuple) and k != key]:
                    del self.factors[other]
                first = 0 if rows is None else rows.start or 0
                return experts_gptq_weight(weight, gram, candidate, self.dtype, self.factors.setdefault(key, {}), first)
            if device.on_cuda():
                if path not in self.factors:
                    self.factors[path] = gptq.inverse_factor(gram)
                return gptq_weight(weight, gram, candidate, self.dtype, self.factors[path], refit=self.refit)
            return gptq_weight(weight, gram, candidate, self.dtype, refit=self.refit)
        return fake_quantize(weight, candidate, self.dtype), None

    def quantized(self, path: str, module, weight: mx.array, candidate: Candidate, rows: slice | None = None) -> mx.array:
        """The fp32 weight this layer holds at `candidate` (of module.weight[rows] if given)."""
        return self.rounded(path, module, weight, candidate, rows)[0]

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
