"""python scripts/benchmark.py MODEL [--baseline B]: the same code as `optiq benchmark`."""

from optiq.commands import script_entry
from optiq.commands.benchmark import main

if __name__ == "__main__":
    script_entry(main, prog="scripts/benchmark.py")
