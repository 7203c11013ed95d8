"""python scripts/serve.py [--model M] [--kv-config F] [--adapter A]: the same code as `optiq serve`."""

from optiq.commands import script_entry
from optiq.commands.serve import main

if __name__ == "__main__":
    script_entry(main, prog="scripts/serve.py")
