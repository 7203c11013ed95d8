"""TurboQuantKVCache: TurboQuant-mse keys and values, attention in the rotated space.

Per layer and KV head, a seeded random rotation R. A step rotates the
queries once (q R^T), scores the codes with MLX's 1-bit quantized matmul
against XORs of the stored bit planes (optiq/turboquant.py: an exact expansion of
the Lloyd-Max codebook), scales by the key norms, takes the softmax, forms
the weighted sum of value codes the same way (weights times value norms),
and rotates the output once (out R). Keys and values are never rotated back
or dequantized to the original space; for prefill-sized calls and 4 bits the
codebook values are gathered (still in the rotated space) for an fp32 matmul,
which is faster on CPU than the 1-bit kernel there.

The cache computes its own attention (`attention`), reached through
optiq.kv.attention's dispatcher (`install`). Sliding-window layers keep an
affine cache (optiq.kv.caches).
"""

import functools

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import _BaseCache

from .. import turboquant
from .attention import apply_mask, sink_softmax


@functools.lru_cache(maxsize=128)
def layer_rotations(seed: int, layer_idx: int, heads: int, dim: int) -> tuple:
    """(key, value) rotations, one per KV head, for a layer: computed once per
    process, not once per cache (the server builds caches per request)."""
    base = (seed * 1_000_003 + layer_idx) * 1024
    rotations = tuple(mx.stack([turboquant.rotation(dim, base + 2 * h + kv) for h in range(heads)]) for kv in (0, 1))
    mx.eval(rotations)  # concrete now: a lazy array would belong to the creating thread's stream
    return rotations


class TurboQuantKVCache(_BaseCache):
    step = 256

    def __init__(self, bits: int = 3, seed: int = 0, layer_idx: int = 0):
        if bits not in (1, 2, 3, 4):
            raise ValueError(f"TurboQuant KV bits must be 1-4, got {bits}")
        self.turbo_bits, self.seed, self.layer_idx = bits, seed, layer_idx
        self.keys = self.values = self.key_norms = self.value_norms = None
        self.offset = 0

    # ---- storage -----------------------------------------------------------
    def _rotations(self, heads: int, dim: int):
        return layer_rotations(self.seed, self.layer_idx, heads, dim)

    def _encode(self, x, rot):
        # x (B, H, L, d); one rotation per head
        return turboquant.quantize_mse(x, rot[None], self.turbo_bits)

    def update_and_fetch(self, keys, values):
        B, H, L, d = keys.shape
        if d % 32:
            raise ValueError(f"TurboQuant KV needs a head dimension divisible by 32, got {d}")
        rk, rv = self._rotations(H, d)
        kp, kn = self._encode(keys, rk)
        vp, vn = self._encode(values, rv)
        kn, vn = kn.astype(mx.float16), vn.astype(mx.float16)  # one fp16 norm per vector
        prev = self.offset
        if self.keys is None or prev + L > self.keys.shape[2]:
            grow = ((L + self.step - 1) // self.step) * self.step

            def grown(old, new):
                z = mx.zeros((B, H, grow, *new.shape[3:]), new.dtype)
                return z if old is None else mx.concatenate([old[:, :, :prev], z], axis=2)

            self.keys, self.values = grown(self.keys, kp), grown(self.values, vp)
            self.key_norms, self.value_norms = grown(self.key_norms, kn), grown(self.value_norms, vn)
        self.keys[:, :, prev : prev + L] = kp
        self.values[:, :, prev : prev + L] = vp
        self.key_norms[:, :, prev : prev + L] = kn
        self.value_norms[:, :, prev : prev + L] = vn
        self.offset += L
        return self.keys[:, :, : self.offset], self.values[:, :, : self.offset]

    @property
    def bits_per_element(self) -> float:
        """Stored bits per cached element: the codes plus one fp16 norm per vector."""
        d = self.keys.shape[-1] * 32 if self.keys is not None else 0
        return self.turbo_bits + (16.0 / d if d else 0.0)

    # ---- mlx-lm's cache protocol --------------------------------------------
    @property
    def state(self):
        # Settings ride along as scalars: mlx-lm's save_prompt_cache stores state only.
        settings = [self.turbo_bits, self.seed, self.layer_idx]
        if self.keys is None:
            return settings
        o = self.offset
        return [self.keys[:, :, :o], self.values[:, :, :o], self.key_norms[:, :, :o], self.value_norms[:, :, :o], *settings]

    @state.setter
    def state(self, v):
        *arrays, bits, seed, layer_idx = v
        self.turbo_bits, self.seed, self.layer_idx = int(bits), int(seed), int(layer_idx)
        self.keys = self.values = self.key_norms = self.value_norms = None
        self.offset = 0
        if arrays:
            self.keys, self.values, self.key_norms, self.value_norms = arrays
            self.offset = self.keys.shape[2]

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(self.offset, n)
        self.offset -= n
        return n

    def size(self):
        return self.offset

    def make_mask(self, *args, **kwargs):
        return mlx_cache.create_attention_mask(*args, offset=self.offset, **kwargs)

    def attention(self, queries, keys, values, scale, mask, sinks=None):
        return turbo_attention(queries, self, scale, mask, sinks)

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.state if isinstance(a, mx.array))


# mlx-lm's load_prompt_cache looks cache classes up by name in its own module.
mlx_cache.TurboQuantKVCache = TurboQuantKVCache


def _codes_matmul(x, planes, bits: int, transpose: bool):
    """x @ codebook[codes]^T (transpose) or x @ codebook[codes], in the rotated space.

    Few rows (decode): 1-bit matmuls straight off the bit planes. Many rows
    (prefill): gather the codebook values once and use an fp32 matmul, which
    on CPU is far faster than quantized matmuls over many rows (optiq/cpu.py)."""
    d = planes.shape[-1] * 32
    const, terms = turboquant.plane_terms(d, bits)
    rows = x.shape[-2]
    # Measured here at 8k tokens, 3 rows: 1-bit matmuls cost ~4 ms per plane
    # term, the codebook gather ~20 ms in all, so planes win up to 4 terms (3 bits).
    if rows > 16 or len(terms) > 4:
        w = turboquant.rotated_values(planes, bits, d)
        return x @ (mx.swapaxes(w, -1, -2) if transpose else w)
    out = _planes_matmul(x, planes, terms, transpose)
    if const:
        out = out + const * mx.sum(x, axis=-1, keepdims=True)
    return out


def _planes_matmul(x, planes, terms, transpose: bool):
    """sum over terms of x @ (scale * XOR_S(planes) + bias), with MLX's 1-bit kernel."""
    d32 = planes.shape[-1]
    group = 64 if (d32 * 32) % 64 == 0 else 32
    shape = (*planes.shape[:-2], d32 * 32 // group)
    out = None
    for subset, scale, bias in terms:
        w = turboquant.xor_plane(planes, subset)
        s = mx.broadcast_to(mx.array(scale, mx.float32), shape)
        b = mx.broadcast_to(mx.array(bias, mx.float32), shape)
        y = mx.quantized_matmul(x, w, s, b, transpose=transpose, group_size=group, bits=1)
        out = y if out is None else out + y
    return out


def turbo_attention(queries, cache: TurboQuantKVCache, scale: float, mask, sinks=None):
    """Attention over a TurboQuant cache, computed in the rotated space
    (`sinks`: gpt-oss's attention sinks, attention.sink_softmax)."""
    B, n_q, L, d = queries.shape
    H = cache.keys.shape[1]
    rep = n_q // H
    rk, rv = cache._rotations(H, d)
    o = cache.offset
    kp, vp = cache.keys[:, :, :o], cache.values[:, :, :o]
    q = (queries.astype(mx.float32) * scale).reshape(B, H, rep * L, d) @ rk.transpose(0, 2, 1)[None]
    scores = _codes_matmul(q, kp, cache.turbo_bits, transpose=True)  # (B, H, rep L, T)
    scores = (scores * cache.key_norms[:, :, None, :o].astype(mx.float32)).reshape(B, H, rep, L, o)
    scores = apply_mask(scores, mask, grouped=True)
    weights = sink_softmax(scores, sinks).reshape(B, H, rep * L, o)
    weights = weights * cache.value_norms[:, :, None, :o].astype(mx.float32)
    out = _codes_matmul(weights, vp, cache.turbo_bits, transpose=False)  # (B, H, rep L, d), rotated
    out = out @ rv[None]
    return out.reshape(B, n_q, L, d).astype(queries.dtype)
