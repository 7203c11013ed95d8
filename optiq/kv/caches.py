"""The model's prompt cache with a cache per layer as a KV plan says.

Each kv_config entry (records.KVEntry) becomes the cache that stores that
layer: mlx-lm's own where it is unquantized, an affine PlannedKVCache
(affine_cache.py, keys and values at their own bits, sliding windows kept)
or a TurboQuantKVCache (turbo_cache.py). Layers the plan does not name keep
mlx-lm's default. The result is a `prompt_cache` that mlx-lm's
`generate`/`stream_generate` accept as is.
"""

from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear

from ..records import KVEntry
from .affine_cache import LatentKVCache, PlannedKVCache, SharedKVView
from .attention import install
from .turbo_cache import TurboQuantKVCache


def shared_kv_owners(model) -> dict:
    """{shared layer: owner layer} for models whose later layers reuse an
    earlier layer's keys and values (Gemma-4's `previous_kvs`, Gemma-3n's
    `layer_idx_to_cache_idx`); empty for everything else."""
    known = model.__dict__.get("_optiq_shared_kv")
    if known is not None:  # the walk runs once per model, not once per request's cache
        return known
    found = {}
    for _, m in model.named_modules():
        owners = getattr(m, "previous_kvs", None) or getattr(m, "layer_idx_to_cache_idx", None)
        if owners:
            found = {j: int(o) for j, o in enumerate(owners) if int(o) != j}
            break
    object.__setattr__(model, "_optiq_shared_kv", found)
    return found


def uniform_layers(model, bits: int, group_size: int = 64, mode: str = "affine", v_bits: int | None = None) -> tuple:
    """KV entries giving every KV-cache layer the same bits (TurboQuant: full-attention layers only)."""
    v = v_bits if v_bits and v_bits != bits else 0
    return tuple(
        KVEntry(i, bits, group_size, mode, v)
        for i, c in enumerate(make_prompt_cache(model))
        if isinstance(c, (KVCache, RotatingKVCache)) and not (mode == "turbo" and isinstance(c, RotatingKVCache))
    )


def as_entries(plan) -> tuple:
    """A KVPlan's entries, or a list of KVEntry records or kv_config dicts, as KVEntry records."""
    return tuple(e if isinstance(e, KVEntry) else KVEntry.from_dict(e) for e in getattr(plan, "layers", plan))


def reads_latent_cache(model) -> bool:
    """Whether the model's attention computes with its cache's contents itself
    (multi-head latent attention: DeepSeek-V3 and its kin, whose per-head
    projections are MultiLinear), so a planned cache must fetch plain arrays."""
    known = model.__dict__.get("_optiq_latent_kv")
    if known is None:
        known = any(isinstance(m, (MultiLinear, QuantizedMultiLinear)) for _, m in model.named_modules())
        object.__setattr__(model, "_optiq_latent_kv", known)
    return known


def planned_cache(entry: KVEntry, mlx_cache_entry, start: int = 0, latent: bool = False):
    """The cache for one kv_config entry, replacing mlx-lm's default for that
    layer (latent: a LatentKVCache, see reads_latent_cache)."""
    idx = entry.layer_idx
    rotating = isinstance(mlx_cache_entry, RotatingKVCache)
    if not isinstance(mlx_cache_entry, (KVCache, RotatingKVCache)):
        raise ValueError(f"layer {idx} has a {type(mlx_cache_entry).__name__}, not a KV cache")
    if entry.mode == "turbo":  # quantized from the first token (no `start`)
        if latent:
            raise ValueError(f"layer {idx} caches multi-head latent attention's latent: TurboQuant's rotated-space attention does not apply, use affine bits")
        if rotating:
            raise ValueError(f"layer {idx} is a sliding-window layer: TurboQuant covers full-attention layers only")
        return TurboQuantKVCache(entry.bits, entry.seed, idx)
    bits, v_bits = entry.bits, entry.value_bits
    if min(bits, v_bits) >= 16:
        return mlx_cache_entry
    if max(bits, v_bits) >= 16:
        raise ValueError(f"layer {idx}: keys and values are quantized together (bits {bits}, v_bits {v_bits})")
    window = dict(max_size=mlx_cache_entry.max_size, keep=mlx_cache_entry.keep) if rotating else {}
    return (LatentKVCache if latent else PlannedKVCache)(bits, entry.group_size, start, v_bits=v_bits, **window)


def make_kv_cache(model, plan=None, start: int = 0) -> list:
    """The model's prompt cache with each planned layer's bits (None: mlx-lm's default).
    `plan` is a KVPlan or a list of entries (KVEntry records or kv_config dicts)."""
    caches = make_prompt_cache(model)
    if plan is None:
        return caches
    latent = reads_latent_cache(model)
    for entry in as_entries(plan):
        caches[entry.layer_idx] = planned_cache(entry, caches[entry.layer_idx], start, latent)
    if any(isinstance(c, PlannedKVCache) or hasattr(type(c), "attention") for c in caches):
        install(model)
    owners = shared_kv_owners(model)
    if owners and len(caches) < len(model.layers):
        # Gemma-4 pads the list with None for its shared layers, whose attention
        # then cannot tell a quantized owner: give each a view of its owner.
        # (Gemma-3n hands shared layers the owner's cache itself.)
        caches += [SharedKVView(caches[owners[j]]) for j in range(len(caches), len(model.layers))]
    return caches


def make_turbo_cache(model, bits=3, seed: int = 0, layers=None) -> list:
    """The model's prompt cache with TurboQuant at `bits` on every full-attention
    layer (or per layer: `layers` = {layer_idx: bits})."""
    if layers is None:
        entries = uniform_layers(model, bits, mode="turbo")
    else:
        entries = [KVEntry(i, b, 0, "turbo") for i, b in layers.items() if b is not None and b < 16]
    return make_kv_cache(model, [KVEntry(e.layer_idx, e.bits, e.group_size, e.mode, e.v_bits, seed) for e in entries])
