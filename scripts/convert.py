"""python scripts/convert.py [MODEL] [options]: the same code as `optiq convert`."""

from optiq.commands import script_entry
from optiq.commands.convert import main

if __name__ == "__main__":
    script_entry(main, prog="scripts/convert.py")
