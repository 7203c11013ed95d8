"""python scripts/convert.py [MODEL] [options]: the same code as `optiq convert`."""

import sys

from optiq.blas import ensure_fast_blas
from optiq.commands.convert import main

if __name__ == "__main__":
    ensure_fast_blas()
    sys.exit(main(prog="scripts/convert.py"))
