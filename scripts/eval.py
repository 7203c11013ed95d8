"""python scripts/eval.py MODEL --task ...: the same code as `optiq eval`."""

from optiq.commands import script_entry
from optiq.commands.eval import main

if __name__ == "__main__":
    script_entry(main, prog="scripts/eval.py")
