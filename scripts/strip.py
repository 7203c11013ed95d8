"""python scripts/strip.py MODEL -o DIR: the same code as `optiq strip`."""

from optiq.commands import script_entry
from optiq.commands.strip import main

if __name__ == "__main__":
    script_entry(main, prog="scripts/strip.py")
