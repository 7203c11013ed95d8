"""python -m optiq.http: the same entry point as `optiq serve`."""

from ..commands import script_entry
from ..commands.serve import main

if __name__ == "__main__":
    script_entry(main, prog="python -m optiq.http")
