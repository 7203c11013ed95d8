"""TurboQuant (Zandieh et al., 2025, arXiv 2504.19874) as pure functions.

TurboQuant-mse: keep each vector's norm, rotate the unit vector by a seeded
random orthogonal matrix, and quantize every coordinate with the Lloyd-Max
codebook of the coordinate distribution of a random unit vector in dimension
d, (1 - x^2)^((d-3)/2) on [-1, 1] (a Beta((d-1)/2, (d-1)/2) stretched to
[-1, 1]). The codebook is solved here with scipy and cached, never hard-coded.

TurboQuant-prod: (b-1)-bit TurboQuant-mse plus a 1-bit QJL sketch, sign(S r),
of the residual r with its norm: an unbiased inner-product estimate.

Codes are stored as b bit-planes of d bits (MLX's LSB-first 1-bit packing,
d/32 uint32 words each). That layout lets attention read codes with MLX's
1-bit quantized matmul: any codebook over b bits is a multilinear polynomial
in the bits; in +-1 form, s_k = 2 b_k - 1, a symmetric codebook keeps only
odd-degree terms, and each term's product of signs is (-1)^|S| (1 - 2 XOR_S),
so q . codebook[idx] is a sum of 1-bit matmuls against XORs of the planes,
each with one scalar scale and bias (see `plane_terms`).
"""

import functools
import itertools
import json
import math

import attrs
import mlx.core as mx
import numpy as np
from scipy import special, stats

from .io import write_json
from .source import cache_dir

PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}  # reported D_mse per unit vector, for comparison


def mse_bound(bits: int) -> float:
    """The paper's upper bound on D_mse for a unit vector: (sqrt(3) pi / 2) 4^-b."""
    return math.sqrt(3) * math.pi / 2 * 4.0 ** -bits


def prod_bound(bits: int, dim: int, q_norm_sq: float = 1.0) -> float:
    """The paper's bound on E|<q,x> - estimate|^2 for unit x: sqrt(3) pi^2 ||q||^2 / d 4^-b."""
    return math.sqrt(3) * math.pi ** 2 * q_norm_sq / dim * 4.0 ** -bits


@attrs.frozen
class Codebook:
    dim: int
    bits: int
    centroids: tuple  # ascending, 2^bits values in [-1, 1]
    thresholds: tuple  # 2^bits - 1 midpoints
    mse: float  # expected squared error per unit vector (all d coordinates)


def _solve_lloyd_max(dim: int, bits: int, iters: int = 1000, tol: float = 1e-12) -> Codebook:
    a = (dim - 1) / 2.0  # (x + 1) / 2 ~ Beta(a, a)
    levels = 2 ** bits
    c = 2 * stats.beta.ppf((np.arange(levels) + 0.5) / levels, a, a) - 1
    for _ in range(iters):
        t = (c[1:] + c[:-1]) / 2
        edges = (np.concatenate([[-1.0], t, [1.0]]) + 1) / 2  # in Beta's [0, 1]
        mass = np.diff(special.betainc(a, a, edges))
        # E[Y 1{Y in [l, u]}] = 1/2 (I_u(a+1, a) - I_l(a+1, a)) for Y ~ Beta(a, a)
        first = 0.5 * np.diff(special.betainc(a + 1, a, edges))
        new = np.where(mass > 1e-300, 2 * first / np.maximum(mass, 1e-300) - 1, c)
        done = np.max(np.abs(new - c)) < tol
        c = new
        if done:
            break
    t = (c[1:] + c[:-1]) / 2
    edges = (np.concatenate([[-1.0], t, [1.0]]) + 1) / 2
    mass = np.diff(special.betainc(a, a, edges))
    mse = 1.0 - dim * float(np.sum(mass * c ** 2))  # E||u - Q(u)||^2 = d (E[x^2] - sum p c^2), E[x^2] = 1/d
    return Codebook(dim, bits, tuple(float(x) for x in c), tuple(float(x) for x in t), mse)


@functools.lru_cache(maxsize=None)
def codebook(dim: int, bits: int) -> Codebook:
    """The Lloyd-Max codebook for dimension `dim`, solved once and cached on disk."""
    if not 1 <= bits <= 4 or dim < 2:
        raise ValueError(f"TurboQuant codebooks cover 1-4 bits and dim >= 2, got bits={bits}, dim={dim}")
    path = cache_dir() / "turbo" / f"lloyd-max-d{dim}-b{bits}.json"
    try:
        return Codebook(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    book = _solve_lloyd_max(dim, bits)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, attrs.asdict(book))
    except OSError:
        pass  # a read-only cache only costs the solve next time
    return book


def rotation(dim: int, seed: int) -> mx.array:
    """A random orthogonal matrix (Haar, via QR with the sign fix), fp32."""
    g = np.random.default_rng(seed).standard_normal((dim, dim))
    q, r = np.linalg.qr(g)
    return mx.array((q * np.sign(np.diag(r))).astype(np.float32))


def sketch_matrix(dim: int, seed: int) -> mx.array:
    """QJL's Gaussian projection S (dim x dim), fp32."""
    return mx.array(np.random.default_rng(seed).standard_normal((dim, dim)).astype(np.float32))


# ---- bit planes ---------------------------------------------------------------

def pack_bits(bits: mx.array) -> mx.array:
    """{0,1} values (..., d) -> uint32 (..., d/32), LSB first (MLX's 1-bit layout)."""
    d = bits.shape[-1]
    if d % 32:
        raise ValueError(f"dimension {d} is not a multiple of 32")
    words = bits.astype(mx.uint32).reshape(*bits.shape[:-1], d // 32, 32) << mx.arange(32, dtype=mx.uint32)
    return mx.sum(words, axis=-1).astype(mx.uint32)  # distinct bits: the sum is the OR


def unpack_bits(words: mx.array) -> mx.array:
    """uint32 (..., w) -> {0,1} uint32 (..., 32 w)."""
    bits = (words[..., None] >> mx.arange(32, dtype=mx.uint32)) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * 32)


def to_planes(idx: mx.array, bits: int) -> mx.array:
    """Codebook indices (..., d) -> bit planes (..., bits, d/32)."""
    idx = idx.astype(mx.uint32)
    return mx.stack([pack_bits((idx >> k) & 1) for k in range(bits)], axis=-2)


def from_planes(planes: mx.array) -> mx.array:
    """Bit planes (..., bits, d/32) -> indices (..., d)."""
    bits = planes.shape[-2]
    return sum(unpack_bits(planes[..., k, :]) << k for k in range(bits))


@functools.lru_cache(maxsize=None)
def plane_terms(dim: int, bits: int) -> tuple:
    """((subset of planes, scale, bias), ...) and a constant per unit of sum(q):
    codebook[idx] = const + sum over terms of (scale * XOR_S(planes) + bias),
    exactly, for every index (Walsh-Hadamard expansion of the codebook)."""
    values = np.array(codebook(dim, bits).centroids)
    idx = np.arange(2 ** bits)
    signs = [2 * ((idx >> k) & 1) - 1 for k in range(bits)]
    const, terms = 0.0, []
    for size in range(bits + 1):
        for subset in itertools.combinations(range(bits), size):
            prod = np.prod([signs[k] for k in subset], axis=0) if subset else np.ones_like(idx)
            coef = float(np.mean(values * prod))
            if abs(coef) < 1e-12:
                continue
            if not subset:
                const += coef
            else:  # coef * (-1)^|S| * (1 - 2 XOR_S)
                sign = (-1) ** len(subset)
                terms.append((subset, -2.0 * coef * sign, coef * sign))
    return const, tuple(terms)


def xor_plane(planes: mx.array, subset) -> mx.array:
    out = planes[..., subset[0], :]
    for k in subset[1:]:
        out = out ^ planes[..., k, :]
    return out


# ---- TurboQuant-mse -------------------------------------------------------------

def quantize_mse(x: mx.array, rot: mx.array, bits: int):
    """x (..., d) -> (planes (..., bits, d/32) uint32, norms (...) fp32)."""
    x = x.astype(mx.float32)
    norms = mx.linalg.norm(x, axis=-1)
    unit = x / mx.maximum(norms, 1e-30)[..., None]
    y = unit @ mx.swapaxes(rot, -1, -2)
    t = mx.array(codebook(x.shape[-1], bits).thresholds, dtype=mx.float32)
    idx = mx.sum(y[..., None] > t, axis=-1)
    return to_planes(idx, bits), norms


def rotated_values(planes: mx.array, bits: int, dim: int) -> mx.array:
    """Codebook values in the rotated space (..., d) for unit vectors."""
    c = mx.array(codebook(dim, bits).centroids, dtype=mx.float32)
    return mx.take(c, from_planes(planes))


def dequantize_mse(planes: mx.array, norms: mx.array, rot: mx.array, bits: int) -> mx.array:
    return (rotated_values(planes, bits, rot.shape[-1]) @ rot) * norms[..., None]


# ---- TurboQuant-prod ------------------------------------------------------------

def quantize_prod(x: mx.array, rot: mx.array, sketch: mx.array, bits: int):
    """(b-1)-bit mse codes (None at b = 1), norms, residual sign bits (packed) and residual norms."""
    x = x.astype(mx.float32)
    norms = mx.linalg.norm(x, axis=-1)
    unit = x / mx.maximum(norms, 1e-30)[..., None]
    if bits > 1:
        planes, _ = quantize_mse(unit, rot, bits - 1)
        residual = unit - dequantize_mse(planes, mx.ones(norms.shape), rot, bits - 1)
    else:
        planes, residual = None, unit
    signs = pack_bits(residual @ sketch.T > 0)
    return planes, norms, signs, mx.linalg.norm(residual, axis=-1)


def inner_product_prod(q: mx.array, code, rot: mx.array, sketch: mx.array, bits: int) -> mx.array:
    """Unbiased estimate of <q, x> for each coded x: q (..., d), codes broadcast against it."""
    planes, norms, signs, rnorms = code
    d = q.shape[-1]
    q = q.astype(mx.float32)
    base = 0.0
    if planes is not None:
        base = mx.sum(q * dequantize_mse(planes, mx.ones(norms.shape), rot, bits - 1), axis=-1)
    s = unpack_bits(signs).astype(mx.float32) * 2 - 1
    qjl = math.sqrt(math.pi / 2) / d * rnorms * mx.sum((q @ sketch.T) * s, axis=-1)
    return norms * (base + qjl)
