"""The KV-cache path: per-layer KV sensitivity, a bit plan under an average
budget, kv_config.json, and the per-layer caches that carry it into
mlx-lm's generate/stream_generate."""

from .caches import PlannedKVCache, make_kv_cache, uniform_layers
from .plan import KVPlan, plan_kv, read_kv_config, write_kv_config
from .sensitivity import cache_layers, measure_kv

__all__ = [
    "KVPlan",
    "PlannedKVCache",
    "cache_layers",
    "make_kv_cache",
    "measure_kv",
    "plan_kv",
    "read_kv_config",
    "uniform_layers",
    "write_kv_config",
]
