"""python scripts/benchmark.py MODEL [--baseline B]: the same code as `optiq benchmark`."""

import sys

from optiq.blas import ensure_fast_blas
from optiq.commands.benchmark import main

if __name__ == "__main__":
    ensure_fast_blas()
    sys.exit(main(prog="scripts/benchmark.py"))
