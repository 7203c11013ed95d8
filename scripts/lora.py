"""python scripts/lora.py {train,info,export} ...: the same code as `optiq lora`."""

from optiq.commands import script_entry
from optiq.commands.lora import main

if __name__ == "__main__":
    script_entry(main, prog="scripts/lora.py")
