"""python scripts/eval.py MODEL --task ...: the same code as `optiq eval`."""

import sys

from optiq.blas import ensure_fast_blas
from optiq.commands.eval import main

if __name__ == "__main__":
    ensure_fast_blas()
    sys.exit(main(prog="scripts/eval.py"))
