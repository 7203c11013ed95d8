"""The seed's import paths, kept working: `optiq.core.turbo_kv_cache`."""
