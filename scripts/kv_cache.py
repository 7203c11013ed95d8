"""python scripts/kv_cache.py [MODEL] --target-bits B -o DIR: the same code as `optiq kv-cache`."""

from optiq.commands import script_entry
from optiq.commands.kv_cache import main

if __name__ == "__main__":
    script_entry(main, prog="scripts/kv_cache.py")
