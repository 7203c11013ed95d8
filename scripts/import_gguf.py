"""python scripts/import_gguf.py FILE -o DIR: the same code as `optiq import-gguf`."""

import sys

from optiq.blas import ensure_fast_blas
from optiq.commands.import_gguf import main

if __name__ == "__main__":
    ensure_fast_blas()
    sys.exit(main(prog="scripts/import_gguf.py"))
