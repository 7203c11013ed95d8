"""python scripts/strip.py MODEL -o DIR: the same code as `optiq strip`."""

import sys

from optiq.commands.strip import main

if __name__ == "__main__":
    sys.exit(main(prog="scripts/strip.py"))
