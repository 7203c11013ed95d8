"""The KV-cache path: per-layer KV sensitivity, a bit plan under an average
budget, kv_config.json, and the per-layer caches that carry it into
mlx-lm's generate/stream_generate."""

from ..records import KVEntry, KVPlan
from .affine_cache import PlannedKVCache
from .caches import make_kv_cache, make_turbo_cache, uniform_layers
from .plan import plan_kv, read_kv_config, write_kv_config
from .sensitivity import cache_layers, measure_kv
from .turbo_cache import TurboQuantKVCache

__all__ = [
    "KVEntry",
    "KVPlan",
    "PlannedKVCache",
    "TurboQuantKVCache",
    "cache_layers",
    "make_kv_cache",
    "make_turbo_cache",
    "measure_kv",
    "plan_kv",
    "read_kv_config",
    "uniform_layers",
    "write_kv_config",
]
