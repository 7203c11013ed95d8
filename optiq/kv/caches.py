"""Per-layer KV caches for mlx-lm's generation loop.

mlx-lm quantizes every layer's cache to one bit-width (`kv_bits`). A
`PlannedKVCache` carries its own layer's bits: it stores keys and values in
full precision until it holds `start` tokens (mlx-lm's `quantized_kv_start`
rule), then moves to mlx-lm's own `QuantizedKVCache`. mlx-lm's attention picks
its quantized kernel by `hasattr(cache, "bits")`, so `bits` exists exactly
when the cache is quantized. A list of these is a `prompt_cache` that
`generate`/`stream_generate` accept as is: no patching of mlx-lm.
"""

from mlx_lm.models.cache import KVCache, QuantizedKVCache, _BaseCache, make_prompt_cache


class PlannedKVCache(_BaseCache):
    def __init__(self, bits: int, group_size: int = 64, start: int = 0):
        self.plan_bits, self.plan_group_size, self.start = bits, group_size, start
        self._cache = KVCache()

    @property
    def quantized(self) -> bool:
        return isinstance(self._cache, QuantizedKVCache)

    def __getattr__(self, name):
        # `bits`/`group_size` only once quantized, like mlx-lm's own caches.
        if name in ("bits", "group_size") and self.quantized:
            return getattr(self._cache, name)
        raise AttributeError(name)

    def update_and_fetch(self, keys, values):
        if not self.quantized and self._cache.offset >= self.start and self.plan_bits < 16:
            self._cache = self._cache.to_quantized(group_size=self.plan_group_size, bits=self.plan_bits)
        return self._cache.update_and_fetch(keys, values)

    @property
    def offset(self):
        return self._cache.offset

    @property
    def state(self):
        return self._cache.state

    @state.setter
    def state(self, v):
        self._cache.state = v

    def is_trimmable(self):
        return True

    def trim(self, n):
        return self._cache.trim(n)

    def make_mask(self, *args, **kwargs):
        return self._cache.make_mask(*args, **kwargs)

    def empty(self):
        return self._cache.empty()

    @property
    def nbytes(self):
        return self._cache.nbytes


def uniform_layers(model, bits: int, group_size: int = 64, mode: str = "affine") -> list:
    """kv_config entries giving every KV-cache layer the same bits."""
    extra = {"mode": mode} if mode != "affine" else {}
    return [
        {"layer_idx": i, "bits": bits, "group_size": group_size, **extra}
        for i, c in enumerate(make_prompt_cache(model))
        if isinstance(c, KVCache)
    ]


def make_kv_cache(model, plan=None, start: int = 0) -> list:
    """The model's prompt cache with each planned layer's bits (None: mlx-lm's default).
    `plan` is a KVPlan or a list of kv_config entries."""
    caches = make_prompt_cache(model)
    if plan is None:
        return caches
    layers = list(getattr(plan, "layers", plan))
    if any(layer.get("mode") == "turbo" for layer in layers):
        from .turbo import TurboQuantKVCache, install

        install(model)
    for layer in layers:
        idx = layer["layer_idx"]
        if not isinstance(caches[idx], KVCache):
            raise ValueError(f"layer {idx} has a {type(caches[idx]).__name__}, not a KV cache")
        if layer.get("mode", "affine") == "turbo":  # quantized from the first token (no `start`)
            caches[idx] = TurboQuantKVCache(layer["bits"], layer.get("seed", 0), idx)
        elif layer["bits"] < 16:
            caches[idx] = PlannedKVCache(layer["bits"], layer["group_size"], start)
    return caches
