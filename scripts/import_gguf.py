"""python scripts/import_gguf.py FILE -o DIR: the same code as `optiq import-gguf`."""

from optiq.commands import script_entry
from optiq.commands.import_gguf import main

if __name__ == "__main__":
    script_entry(main, prog="scripts/import_gguf.py")
