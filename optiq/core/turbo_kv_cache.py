"""The seed's import path: `from optiq.core.turbo_kv_cache import TurboQuantKVCache`."""

from ..kv.attention import install
from ..kv.caches import make_turbo_cache
from ..kv.turbo_cache import TurboQuantKVCache, turbo_attention

__all__ = ["TurboQuantKVCache", "install", "make_turbo_cache", "turbo_attention"]
