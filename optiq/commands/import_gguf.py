"""optiq import-gguf: a llama or gemma3 GGUF file -> a folder mlx_lm.load opens."""

import sys
from dataclasses import dataclass, field

from argparse_dataclass import ArgumentParser

from . import reported
from ..errors import OptiqError


@dataclass
class ImportOptions:
    gguf: str = field(metadata=dict(args=["gguf"], help="the .gguf file"))
    output: str = field(metadata=dict(args=["-o", "--output"], help="output folder"))
    force: bool = field(default=False, metadata=dict(help="replace an existing output"))


def main(argv=None, prog="optiq import-gguf") -> int:
    from pathlib import Path

    from ..gguf_import import import_gguf
    from ..io import atomic_output

    opts = ArgumentParser(ImportOptions, prog=prog, description=__doc__).parse_args(argv)
    with reported():
        src = Path(opts.gguf)
        if not src.is_file():
            raise OptiqError(f"{src}: no such file")
        with atomic_output(opts.output, force=opts.force) as tmp:
            import_gguf(src, tmp)
    print(f"wrote {opts.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
