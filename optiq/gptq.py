"""GPTQ (Frantar et al., 2022) onto MLX's affine grid, two implementations
of one algorithm.

GPTQ quantizes a layer's input columns one at a time and moves each
column's rounding error onto the columns not yet quantized, weighted by the
inverse of the layer's input Gram matrix H = X^T X, so the layer's *output*
error on the calibration inputs is what gets minimised. Groups keep MLX's
layout (a scale and a bias per `group_size` inputs, rounded to the dtype
the written model stores them in).

- `gptq_numpy`: the CPU implementation every CPU result comes from (fp64
  inverse, fp32 column updates).
- `gptq_mlx`: the same blocks on MLX arrays for a GPU: the factor U
  (H^-1 = U^T U, upper) once per layer, then per block of 128 columns one
  kernel that walks the block's columns for every row at once (rows are
  independent given U: one CUDA thread a row, the row in shared memory) and
  one matmul that moves the block's errors onto the remaining columns.
  `block_step_mlx` is the kernel's reference in plain MLX ops, which the
  CPU tests run against `gptq_numpy`.
"""

import functools

import mlx.core as mx
import numpy as np
import scipy.linalg

from .records import FP_MODES

DAMP = 0.01
BLOCK = 128
REFIT_BYTES = 256 << 20  # refit_affine's working set per batch of rows (a Llama-3-8B down_proj: 10 rows)


def round_stored(x: np.ndarray, dtype=mx.float16) -> np.ndarray:
    """fp32 values rounded through the stored dtype."""
    if dtype == mx.float16:
        return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)
    return np.array(mx.array(np.asarray(x, dtype=np.float32)).astype(dtype).astype(mx.float32))


def _group_params(w: np.ndarray, bits: int, dtype):
    """MLX's affine parameters for a (rows, group) block, rounded as stored."""
    levels = (1 << bits) - 1
    lo, hi = w.min(axis=1), w.max(axis=1)
    return round_stored(np.maximum((hi - lo) / levels, 1e-8), dtype), round_stored(lo, dtype)


class AffineGrid:
    """MLX's affine grid: a scale and a bias per group, codes 0..2^bits-1."""

    def __init__(self, bits: int, dtype):
        self.bits, self.dtype, self.levels = bits, dtype, (1 << bits) - 1

    def group(self, w: np.ndarray) -> tuple:
        return _group_params(w, self.bits, self.dtype)

    def round(self, column: np.ndarray, params: tuple) -> tuple:
        s, b = params
        code = np.clip(np.rint((column - b) / s), 0, self.levels)
        return code, code * s + b


class FloatGrid:
    """One of MLX's microscaling grids (mxfp4, nvfp4, mxfp8): float codes
    and an 8-bit scale per group, no bias. The group's scale is the one
    mx.quantize picks for the group's current weights; each column then
    rounds to the nearest code under it. Code values and scale values are
    read back through mx.dequantize, so the grid is MLX's by construction."""

    def __init__(self, mode: str):
        self.mode = mode
        self.bits, self.group_size = FP_MODES[mode]
        self.values, self.scale_values = float_grid(mode)
        # -0 is left out: mx.quantize writes +0 for inputs that round to zero
        kept = np.isfinite(self.values) & ~((self.values == 0) & np.signbit(self.values))
        order = np.argsort(self.values[kept], kind="stable")
        self.sorted_values = self.values[kept][order]
        self.sorted_codes = np.nonzero(kept)[0][order]

    def group(self, w: np.ndarray) -> tuple:
        _, scales = mx.quantize(mx.array(w, dtype=mx.float32), group_size=self.group_size, bits=self.bits, mode=self.mode)
        byte = np.array(scales)[:, 0]
        return byte, self.scale_values[byte]

    def round(self, column: np.ndarray, params: tuple) -> tuple:
        _, scale = params
        x = np.divide(column, scale, out=np.zeros_like(column), where=scale > 0)
        hi = np.clip(np.searchsorted(self.sorted_values, x), 1, len(self.sorted_values) - 1)
        nearer_lo = (x - self.sorted_values[hi - 1]) <= (self.sorted_values[hi] - x)
        k = np.where(nearer_lo, hi - 1, hi)
        return self.sorted_codes[k], self.sorted_values[k] * scale


@functools.cache  # a pure function of the mode, asked for at every layer's every probe
def float_grid(mode: str) -> tuple:
    """(value of each code at scale 1, value of each scale byte) of an MLX
    microscaling mode, from mx.dequantize of every (scale byte, code) pair."""
    bits, group = FP_MODES[mode]
    n = 1 << bits
    cols = max(n, group)
    codes = np.tile(np.arange(n, dtype=np.uint32), (256, cols // n))
    nibbles = codes if bits == 8 else codes[:, 0::2] | (codes[:, 1::2] << 4)
    words = mx.array(np.ascontiguousarray(nibbles.astype(np.uint8)).view(np.uint32))  # MLX's order: low bits first
    scales = mx.array(np.repeat(np.arange(256, dtype=np.uint8)[:, None], cols // group, axis=1))
    table = np.array(mx.dequantize(words, scales, group_size=group, bits=bits, mode=mode, dtype=mx.float32))[:, :n]
    unit = UNIT_SCALE[mode]
    values = table[unit]
    one = int(np.nonzero(values == 1.0)[0][0])
    return values, table[:, one]


# The scale byte that means 1.0: E8M0's bias is 127; nvfp4's scale is E4M3 (bias 7).
UNIT_SCALE = {"mxfp4": 127, "mxfp8": 127, "nvfp4": 0x38}


def gptq_numpy(weight: np.ndarray, gram: np.ndarray, bits: int, group_size: int, dtype=mx.float16, damp: float = DAMP, block: int = BLOCK,
               mode: str = "affine", refit: bool = False):
    """(codes, scales, biases) for `weight` (out, in) given H = X^T X (in, in);
    for a microscaling `mode`, (codes, scale bytes, None). refit: the affine
    scales and biases fitted to the codes afterwards (`refit_affine`)."""
    g = group_size
    grid = AffineGrid(bits, dtype) if mode == "affine" else FloatGrid(mode)
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
    params = [None] * (n_in // g)
    block = max(g, (block // g) * g)
    for start in range(0, n_in, block):
        stop = min(start + block, n_in)
        w1 = w[:, start:stop].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if col % g == 0:
                params[col // g] = grid.group(w1[:, i : i + g])
            code, value = grid.round(w1[:, i], params[col // g])
            q[:, col] = code
            e = (w1[:, i] - value) / h1[i, i]
            w1[:, i:] -= np.outer(e, h1[i, i:])
            err1[:, i] = e
        w[:, stop:] -= err1 @ hinv[start:stop, stop:]
    if mode != "affine":
        return q, np.stack([p[0] for p in params], axis=1).astype(np.uint8), None
    if refit:
        return (q, *refit_affine(np.where(dead, 0.0, weight), gram, q, g, dtype, damp))
    return q, np.stack([p[0] for p in params], axis=1), np.stack([p[1] for p in params], axis=1)


def refit_affine(weight: np.ndarray, gram: np.ndarray, q: np.ndarray, group_size: int, dtype=mx.float16, damp: float = DAMP, rows: int | None = None):
    """(scales, biases) that minimise each row's output error (w - w_hat)^T H (w - w_hat)
    with the codes `q` fixed: w_hat = s_g * q + b_g per group is linear in the
    row's (s, b), so the best ones solve a 2G x 2G system per row (G groups).
    GPTQ picks the codes against a min/max grid; this fits the grid to the
    codes under the same Gram (damped as GPTQ damps it), rounded as stored.
    rows: rows solved at once (default: as many as keep the (rows, G, in)
    product near REFIT_BYTES)."""
    w = np.asarray(weight, dtype=np.float64)
    h = np.array(gram, dtype=np.float64)
    n_out, n_in = w.shape
    groups = n_in // group_size
    rows = rows or max(1, min(n_out, REFIT_BYTES // (groups * n_in * 8)))
    h[np.diag_indices(n_in)] += damp * np.mean(np.diag(h)) + 1e-12
    scales, biases = np.empty((n_out, groups)), np.empty((n_out, groups))
    h_rows = h.reshape(groups, group_size, n_in)  # H's rows, by the group of their input
    ones_h = h_rows.sum(axis=1)  # (G, in): each group's indicator times H
    ones_h_ones = ones_h.reshape(groups, groups, group_size).sum(axis=-1)  # (G, G)
    for start in range(0, n_out, rows):
        qs = np.asarray(q[start : start + rows], dtype=np.float64)  # (r, in)
        ws = w[start : start + rows]
        r = len(qs)
        q_groups = qs.reshape(r, groups, group_size)
        # (r, G, in): each group's codes (zero elsewhere) times H, one batched matmul per group
        qg_h = np.matmul(q_groups.transpose(1, 0, 2), h_rows).transpose(1, 0, 2)
        by_group = qg_h.reshape(r, groups, groups, group_size)
        a = np.empty((r, 2 * groups, 2 * groups))
        a[:, :groups, :groups] = np.einsum("rghk,rhk->rgh", by_group, q_groups)
        a[:, :groups, groups:] = by_group.sum(axis=-1)
        a[:, groups:, :groups] = a[:, :groups, groups:].transpose(0, 2, 1)
        a[:, groups:, groups:] = ones_h_ones
        rhs = np.concatenate([np.einsum("rgi,ri->rg", qg_h, ws), ws @ ones_h.T], axis=1)
        # a group whose codes are all equal has a singular block: a ridge keeps it solvable
        a[:, np.arange(2 * groups), np.arange(2 * groups)] += 1e-9 * np.abs(a).max(axis=(1, 2))[:, None]
        theta = np.linalg.solve(a, rhs[..., None])[..., 0]
        scales[start : start + rows], biases[start : start + rows] = theta[:, :groups], theta[:, groups:]
    return round_stored(scales, dtype), round_stored(biases, dtype)


def output_error(weight, gram, w_hat) -> float:
    """sum over rows of (w - w_hat)^T H (w - w_hat): the layer's squared output error on the Gram's inputs."""
    d = np.asarray(weight, dtype=np.float64) - np.asarray(w_hat, dtype=np.float64)
    return float(np.einsum("ri,ij,rj->", d, np.asarray(gram, dtype=np.float64), d))


# -- on MLX arrays (a GPU) -----------------------------------------------------------


def inverse_factor(gram: mx.array, damp: float = DAMP):
    """(U, dead): U upper triangular with H^-1 = U^T U for the damped Gram,
    and the mask of inputs that never fired (their weights are zeroed).
    With J the reversal, chol(J H J) = L gives H = (J L J)(J L J)^T, so
    U = (J L J)^-1: one Cholesky and one triangular inverse, no full inverse."""
    h = gram.astype(mx.float32)
    diag = mx.diagonal(h)
    dead = diag == 0
    h = h + mx.diag(dead.astype(mx.float32) + damp * mx.mean(diag))
    try:  # on the default device, where MLX has a Cholesky kernel (MLX-CUDA does)
        upper = mx.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
        mx.eval(upper)
    except (ValueError, RuntimeError):
        return host_factor(h), dead
    u = upper_inverse(upper)
    mx.eval(u)
    return u, dead


LEAF = 512


def upper_inverse(u: mx.array) -> mx.array:
    """The inverse of an upper-triangular matrix by halves,
    [[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]]: the work is
    matmuls on the default device (MLX-CUDA has no triangular inverse), the
    leaves of LEAF rows inverted by LAPACK."""
    n = u.shape[0]
    if n <= LEAF:
        if mx.default_device() == mx.cpu:
            return mx.linalg.tri_inv(u, upper=True)
        inv, info = scipy.linalg.lapack.strtri(np.array(u, dtype=np.float32), lower=0)
        if info != 0:
            raise np.linalg.LinAlgError(f"strtri failed ({info})")
        return mx.array(inv)
    half = n // 2
    a_inv, c_inv = upper_inverse(u[:half, :half]), upper_inverse(u[half:, half:])
    top = -(a_inv @ u[:half, half:]) @ c_inv
    return mx.concatenate([mx.concatenate([a_inv, top], axis=1),
                           mx.concatenate([mx.zeros((n - half, half), dtype=u.dtype), c_inv], axis=1)], axis=0)


def host_factor(h: mx.array) -> mx.array:
    """inverse_factor's U through numpy and LAPACK (OpenBLAS, every core):
    where MLX's backend lacks a Cholesky kernel, and MLX's own CPU stream
    would use the reference LAPACK its CUDA wheel bundles."""
    lower = np.linalg.cholesky(np.array(h, dtype=np.float32)[::-1, ::-1])
    u, info = scipy.linalg.lapack.strtri(np.ascontiguousarray(lower[::-1, ::-1]), lower=0)
    if info != 0:
        raise np.linalg.LinAlgError(f"strtri failed ({info})")
    return mx.array(u)


def stored_mx(x: mx.array, dtype) -> mx.array:
    return x.astype(dtype).astype(mx.float32)


def block_step_mlx(w1: mx.array, u1: mx.array, bits: int, group_size: int, dtype):
    """One block of GPTQ in plain MLX ops: (codes, scales, biases, errors)
    for the block's columns w1 (rows, nb), given its block u1 (nb, nb) of U.
    The reference the CUDA kernel is checked against."""
    levels = (1 << bits) - 1
    rows, nb = w1.shape
    codes, scales, biases, errors = [], [], [], []
    s = b = None
    for i in range(nb):
        if i % group_size == 0:
            group = w1[:, i : i + group_size]
            lo, hi = mx.min(group, axis=1), mx.max(group, axis=1)
            s, b = stored_mx(mx.maximum((hi - lo) / levels, 1e-8), dtype), stored_mx(lo, dtype)
            scales.append(s)
            biases.append(b)
        x = w1[:, i]
        c = mx.clip(mx.round((x - b) / s), 0, levels)
        e = (x - (c * s + b)) / u1[i, i]
        w1 = w1 - e[:, None] * u1[i][None, :]  # columns up to i are done: only later ones are read
        codes.append(c)
        errors.append(e)
    return (mx.stack(codes, axis=1).astype(mx.uint8), mx.stack(scales, axis=1), mx.stack(biases, axis=1), mx.stack(errors, axis=1))


def gptq_mlx(weight: mx.array, factor, bits: int, group_size: int, dtype=mx.float16, block: int = BLOCK, block_step=block_step_mlx):
    """(codes uint8, scales, biases) as MLX arrays, given inverse_factor's (U, dead)."""
    u, dead = factor
    w = mx.where(dead[None, :], 0.0, weight.astype(mx.float32))
    n_in = w.shape[1]
    block = max(group_size, (block // group_size) * group_size)
    codes, scales, biases = [], [], []
    for start in range(0, n_in, block):
        stop = min(start + block, n_in)
        q1, s1, b1, err1 = block_step(w[:, start:stop], u[start:stop, start:stop], bits, group_size, dtype)
        codes.append(q1)
        scales.append(s1)
        biases.append(b1)
        if stop < n_in:
            w = mx.concatenate([w[:, :stop], w[:, stop:] - err1 @ u[start:stop, stop:]], axis=1)
        mx.eval(w, q1, s1, b1)  # one block at a time: the graph stays small, the next block needs it
    return mx.concatenate(codes, axis=1), mx.concatenate(scales, axis=1), mx.concatenate(biases, axis=1)


def dequantize_mx(codes, scales, biases, group_size: int) -> mx.array:
    rows, cols = codes.shape
    g = cols // scales.shape[1]
    c = codes.astype(mx.float32).reshape(rows, -1, g)
    return (c * scales[..., None] + biases[..., None]).reshape(rows, cols)


# The CUDA kernel of one block: a thread a row, the row's block of columns in
# shared memory (column j of thread t at j * THREADS + t: consecutive threads,
# consecutive banks). Each thread walks the block's columns in order: a
# group's scale and bias from the current (already compensated) values, the
# code, the error divided by U's diagonal, the error spread onto the row's
# later columns. The products are rounded as block_step_mlx rounds them
# (no fused multiply-add), so the two agree to the last bit in most codes.
GPTQ_HEADER = """
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float optiq_stored(float x, int store) {
  if (store == 0) return __half2float(__float2half_rn(x));
  if (store == 1) return __bfloat162float(__float2bfloat16_rn(x));
  return x;
}
"""

GPTQ_BLOCK_SOURCE = """
  constexpr int LEVELS = (1 << BITS) - 1;
  constexpr int NG = NB / G;
  extern __shared__ float row_smem[];
  const int t = threadIdx.x;
  const long r = (long)blockIdx.x * THREADS + t;
  const long rows = w_shape[0];
  if (r >= rows) return;
  float* row = row_smem + t;
  for (int j = 0; j < NB; ++j) row[j * THREADS] = w[r * NB + j];
  float s = 1.0f, b = 0.0f;
  for (int i = 0; i < NB; ++i) {
    if (i % G == 0) {
      float lo = row[i * THREADS], hi = lo;
      for (int j = 1; j < G; ++j) {
        float v = row[(i + j) * THREADS];
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
      }
      s = optiq_stored(fmaxf(__fdiv_rn(__fsub_rn(hi, lo), (float)LEVELS), 1e-8f), STORE);
      b = optiq_stored(lo, STORE);
      scales[r * NG + i / G] = s;
      biases[r * NG + i / G] = b;
    }
    const float x = row[i * THREADS];
    const float c = fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(x, b), s)), 0.0f), (float)LEVELS);
    codes[r * NB + i] = (uint8_t)c;
    const float e = __fdiv_rn(__fsub_rn(x, __fadd_rn(__fmul_rn(c, s), b)), u[i * NB + i]);
    errors[r * NB + i] = e;
    for (int j = i + 1; j < NB; ++j) row[j * THREADS] = __fsub_rn(row[j * THREADS], __fmul_rn(e, u[i * NB + j]));
  }
"""

GPTQ_THREADS = 64
STORE_CODES = {mx.float16: 0, mx.bfloat16: 1, mx.float32: 2}
_kernels = {}


def gptq_block_kernel():
    if "gptq" not in _kernels:
        _kernels["gptq"] = mx.fast.cuda_kernel(
            name="optiq_gptq_block", input_names=["w", "u"], output_names=["codes", "scales", "biases", "errors"],
            source=GPTQ_BLOCK_SOURCE, header=GPTQ_HEADER, shared_memory=BLOCK * GPTQ_THREADS * 4,
        )
    return _kernels["gptq"]


def block_step_cuda(w1: mx.array, u1: mx.array, bits: int, group_size: int, dtype):
    """block_step_mlx as one CUDA kernel launch."""
    rows, nb = w1.shape
    outputs = gptq_block_kernel()(
        inputs=[w1, u1],
        template=[("NB", nb), ("G", group_size), ("BITS", bits), ("STORE", STORE_CODES[dtype]), ("THREADS", GPTQ_THREADS)],
        grid=(-(-rows // GPTQ_THREADS) * GPTQ_THREADS, 1, 1),
        threadgroup=(GPTQ_THREADS, 1, 1),
        output_shapes=[(rows, nb), (rows, nb // group_size), (rows, nb // group_size), (rows, nb)],
        output_dtypes=[mx.uint8, mx.float32, mx.float32, mx.float32],
    )
    return tuple(outputs)
