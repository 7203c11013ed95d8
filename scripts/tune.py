"""python scripts/tune.py MODEL -o DIR: the same code as `optiq tune`."""

from optiq.commands import script_entry
from optiq.commands.tune import main

if __name__ == "__main__":
    script_entry(main, prog="scripts/tune.py")
