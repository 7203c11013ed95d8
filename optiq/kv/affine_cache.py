"""Per-layer KV caches for mlx-lm's generation loop.

mlx-lm quantizes every layer's cache to one bit-width (`kv_bits`), cannot
quantize its rotating (sliding-window) cache, and its shared-KV attention
(Gemma-4) cannot read a quantized cache. A `PlannedKVCache` carries its own
layer's bits, for keys and values separately: it keeps full precision until it
holds `start` tokens (mlx-lm's `quantized_kv_start` rule), then stores affine
codes. Storage is three of mlx-lm's own caches kept in lockstep (codes, scales,
biases): `KVCache` for full-attention layers and `RotatingKVCache` for
sliding-window layers, so the window logic, masks and trimming are mlx-lm's.
Scales and biases are stored in fp16 whatever the activations' dtype.

The cache computes its own attention (`attention`, through
optiq.kv.attention's dispatcher, which make_kv_cache installs): quantized
matmuls for a few query rows (decode), dequantized codes into an fp32
attention for many (prefill: 4.4x faster on this CPU at 2k tokens). With equal
K and V bits it also exposes `bits`/`group_size`, so mlx-lm's own quantized
attention reads it where the dispatcher is not installed. A list of these is
a `prompt_cache` that `generate`/`stream_generate` accept as is.
"""

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import BatchKVCache, KVCache, RotatingKVCache, _BaseCache

from .attention import affine_attention

_SETTINGS = 9  # scalars after the arrays in `state`


def quantize_kv(x, group_size: int, bits: int) -> tuple:
    """(codes, scales, biases) in MLX's affine layout, scales and biases in fp16."""
    w, s, b = mx.quantize(x, group_size=group_size, bits=bits)
    return w, s.astype(mx.float16), b.astype(mx.float16)


class PlannedKVCache(_BaseCache):
    def __init__(self, bits: int, group_size: int = 64, start: int = 0, v_bits: int | None = None, max_size: int | None = None, keep: int = 0):
        for b in (bits, v_bits or bits):
            if b not in (2, 3, 4, 5, 6, 8):
                raise ValueError(f"KV bits must be one of 2, 3, 4, 5, 6, 8, got {b}")
        self.k_bits, self.v_bits = bits, v_bits or bits
        self.plan_group_size, self.start = group_size, start
        self.max_size, self.keep = max_size, keep
        self._full, self._parts = self._new(), None

    def _new(self):
        return KVCache() if self.max_size is None else RotatingKVCache(self.max_size, self.keep)

    @property
    def quantized(self) -> bool:
        return self._parts is not None

    @property
    def split(self) -> bool:
        return self.k_bits != self.v_bits

    def __getattr__(self, name):
        # `bits`/`group_size` only once quantized with one width, like mlx-lm's
        # caches: mlx-lm's attention takes its quantized path exactly then.
        # `attention` (optiq's dispatcher, which make_kv_cache installs) takes
        # precedence: it is faster on prefill and reads split widths.
        d = self.__dict__
        if name in ("bits", "group_size") and d.get("_parts") is not None and d["k_bits"] == d["v_bits"]:
            return d["k_bits"] if name == "bits" else d["plan_group_size"]
        if name == "attention" and d.get("_parts") is not None:
            return self._attention
        raise AttributeError(name)

    def _attention(self, queries, keys, values, scale, mask, sinks=None):
        return affine_attention(queries, keys, values, scale, mask, self.plan_group_size, self.k_bits, self.v_bits, sinks=sinks)

    @property
    def batchable(self) -> bool:
        """Whether BatchGenerator can merge this cache with others: quantized
        from the first token, full attention (a window rotates per sequence)."""
        return self.start == 0 and self.max_size is None

    @classmethod
    def merge(cls, caches):
        """mlx-lm's BatchGenerator merges per-sequence caches through this."""
        return BatchPlannedKVCache.merge(caches)

    def _quantize(self):
        g = self.plan_group_size
        parts = [self._new() for _ in range(3)]
        full = self._full
        if full.keys is not None:
            ks, vs = quantize_kv(full.keys, g, self.k_bits), quantize_kv(full.values, g, self.v_bits)
            for part, k, v in zip(parts, ks, vs):
                part.__dict__.update(full.__dict__)  # offset and, when rotating, the write index
                part.keys, part.values = k, v
        self._full, self._parts = None, parts

    def update_and_fetch(self, keys, values):
        if self._parts is None and self._full.offset >= self.start:
            self._quantize()
        if self._parts is None:
            return self._full.update_and_fetch(keys, values)
        g = self.plan_group_size
        ks, vs = quantize_kv(keys, g, self.k_bits), quantize_kv(values, g, self.v_bits)
        fetched = [p.update_and_fetch(k, v) for p, k, v in zip(self._parts, ks, vs)]
        return tuple(f[0] for f in fetched), tuple(f[1] for f in fetched)

    def keys_and_values(self):
        """What the last update returned (Gemma-3n's shared layers read their owner this way)."""
        if self._parts is None:
            return self._full.keys_and_values()
        fetched = [p.keys_and_values() for p in self._parts]
        return tuple(f[0] for f in fetched), tuple(f[1] for f in fetched)

    @property
    def _caches(self):
        return [self._full] if self._parts is None else self._parts

    @property
    def offset(self):
        return self._caches[0].offset

    def size(self):
        return self._caches[0].size()

    def is_trimmable(self):
        return self._caches[0].is_trimmable()

    def trim(self, n):
        return [c.trim(n) for c in self._caches][0]

    def make_mask(self, *args, **kwargs):
        return self._caches[0].make_mask(*args, **kwargs)

    def empty(self):
        return self._caches[0].empty()

    @property
    def nbytes(self):
        return sum(c.nbytes for c in self._caches)

    # mlx-lm's save_prompt_cache stores `state` only: settings ride along as scalars.
    @property
    def state(self):
        first = self._caches[0]
        settings = [self.k_bits, self.v_bits, self.plan_group_size, self.start, self.max_size or 0, self.keep, first.offset, getattr(first, "_idx", 0), int(self.quantized)]
        if first.keys is None:
            return settings
        return [a for c in self._caches for a in (c.keys, c.values)] + settings

    @state.setter
    def state(self, v):
        arrays, s = v[:-_SETTINGS], [int(x) for x in v[-_SETTINGS:]]
        self.__init__(s[0], s[2], s[3], s[1], s[4] or None, s[5])
        if s[8]:
            self._full, self._parts = None, [self._new() for _ in range(3)]
        for i, c in enumerate(self._caches):
            c.offset = s[6]
            if self.max_size is not None:
                c._idx = s[7]
            if arrays:
                c.keys, c.values = arrays[2 * i], arrays[2 * i + 1]


class LatentKVCache(PlannedKVCache):
    """A PlannedKVCache for attention that computes with what its cache
    returns instead of handing it to scaled_dot_product_attention: DeepSeek's
    multi-head latent attention caches the compressed latent and the rotary
    key part, multiplies them itself and projects the latent through its
    per-head matrices (mlx-lm's QuantizedKVCache fails there). The codes are
    stored; each fetch returns them dequantized in the activations' dtype, so
    the memory is the plan's and the model's own arithmetic is unchanged. One
    sequence at a time (no batch merge)."""

    def __getattr__(self, name):  # neither `bits` nor `attention`: the model reads plain arrays
        raise AttributeError(name)

    @property
    def batchable(self) -> bool:
        return False

    def _dense(self, fetched, dtype):
        if self._parts is None:
            return fetched
        (k, v), g = fetched, self.plan_group_size
        return tuple(mx.dequantize(w, s.astype(dtype), b.astype(dtype), group_size=g, bits=bits) for (w, s, b), bits in ((k, self.k_bits), (v, self.v_bits)))

    def update_and_fetch(self, keys, values):
        return self._dense(super().update_and_fetch(keys, values), keys.dtype)

    def keys_and_values(self):
        return self._dense(super().keys_and_values(), mx.float32)


class BatchPlannedKVCache(_BaseCache):
    """Planned caches of a batch of sequences, for mlx-lm's BatchGenerator:
    the codes, scales and biases of every sequence in three of mlx-lm's own
    BatchKVCaches kept in lockstep (left padding, merging, extending,
    filtering, extracting are mlx-lm's), so requests with a KV plan decode
    together instead of one step each. Attention reads the codes with the
    batch's left padding (the fused kernel on MLX-CUDA)."""

    def __init__(self, k_bits: int, v_bits: int, group_size: int, parts: list):
        self.k_bits, self.v_bits, self.plan_group_size = k_bits, v_bits, group_size
        self.parts = parts

    @classmethod
    def merge(cls, caches):
        first = caches[0]
        if any(not c.batchable or (c.k_bits, c.v_bits, c.plan_group_size) != (first.k_bits, first.v_bits, first.plan_group_size) for c in caches):
            raise ValueError("only planned caches quantized from the first token, full attention and one plan, batch together")
        per_part = [[(c._parts or [c._full] * 3)[i] for c in caches] for i in range(3)]
        return cls(first.k_bits, first.v_bits, first.plan_group_size, [BatchKVCache.merge(p) for p in per_part])

    def update_and_fetch(self, keys, values):
        g = self.plan_group_size
        ks, vs = quantize_kv(keys, g, self.k_bits), quantize_kv(values, g, self.v_bits)
        fetched = [p.update_and_fetch(k, v) for p, k, v in zip(self.parts, ks, vs)]
        return tuple(f[0] for f in fetched), tuple(f[1] for f in fetched)

    def keys_and_values(self):
        fetched = [p.keys_and_values() for p in self.parts]
        return tuple(f[0] for f in fetched), tuple(f[1] for f in fetched)

    def attention(self, queries, keys, values, scale, mask, sinks=None):
        # Decode: the mask is causal plus each sequence's left padding, which the kernel reads itself.
        lp = self.parts[0].left_padding
        return affine_attention(queries, keys, values, scale, mask, self.plan_group_size, self.k_bits, self.v_bits, left_padding=lp, sinks=sinks)

    def extract(self, idx):
        cache = PlannedKVCache(self.k_bits, self.plan_group_size, 0, self.v_bits)
        cache._full, cache._parts = None, [p.extract(idx) for p in self.parts]
        return cache

    def prepare(self, **kwargs):
        for p in self.parts:
            p.prepare(**kwargs)

    def finalize(self):
        for p in self.parts:
            p.finalize()

    def filter(self, batch_indices):
        for p in self.parts:
            p.filter(batch_indices)

    def extend(self, other):
        for p, q in zip(self.parts, other.parts):
            p.extend(q)

    @property
    def offset(self):
        return self.parts[0].offset

    @property
    def left_padding(self):
        return self.parts[0].left_padding

    @property
    def state(self):
        return [a for p in self.parts for a in p.state]

    def size(self):
        return self.parts[0].size()

    def empty(self):
        return self.parts[0].empty()

    def is_trimmable(self):
        return True

    def trim(self, n):
        return [p.trim(n) for p in self.parts][0]

    def make_mask(self, *args, **kwargs):
        return self.parts[0].make_mask(*args, **kwargs)

    @property
    def nbytes(self):
        return sum(p.nbytes for p in self.parts)


class SharedKVView(_BaseCache):
    """A KV-shared layer's cache entry (Gemma-4): the layer receives its owner's
    fetched keys and values, and this view hands them through unchanged while
    telling attention how the owner stores them."""

    def __init__(self, owner):
        self.owner = owner

    def update_and_fetch(self, keys, values):
        return keys, values

    def __getattr__(self, name):
        if name in ("bits", "group_size", "attention"):
            return getattr(self.__dict__["owner"], name)
        raise AttributeError(name)

    @property
    def offset(self):
        return self.owner.offset

    def make_mask(self, *args, **kwargs):
        return self.owner.make_mask(*args, **kwargs)

    def is_trimmable(self):
        return True

    def trim(self, n):  # the owner trims itself
        return n

    def size(self):
        return self.owner.size()

    def empty(self):
        return self.owner.empty()

    @property
    def nbytes(self):
        return 0


# mlx-lm's load_prompt_cache looks cache classes up by name in its own module.
mlx_cache.PlannedKVCache = PlannedKVCache
