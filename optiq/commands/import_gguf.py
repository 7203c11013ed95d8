"""optiq import-gguf: a llama, qwen2 or gemma3 GGUF file -> a folder mlx_lm.load opens."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import run_command, script_entry
from ..errors import OptiqError
from ..gguf_import import import_gguf
from ..io import atomic_output


@dataclass
class ImportOptions:
    gguf: str = field(metadata=dict(args=["gguf"], help="the .gguf file"))
    output: str = field(metadata=dict(args=["-o", "--output"], help="output folder"))
    tokenizer: Optional[str] = field(default=None, metadata=dict(help="a folder of tokenizer files to copy instead of rebuilding them from the GGUF"))
    force: bool = field(default=False, metadata=dict(help="replace an existing output"))


def run(opts: ImportOptions):
    src = Path(opts.gguf)
    if not src.is_file():
        raise OptiqError(f"{src}: no such file")
    if opts.tokenizer is not None and not (Path(opts.tokenizer) / "tokenizer_config.json").is_file():
        raise OptiqError(f"--tokenizer {opts.tokenizer}: no tokenizer_config.json there")
    with atomic_output(opts.output, force=opts.force) as tmp:
        import_gguf(src, tmp, opts.tokenizer)
    print(f"wrote {opts.output}")


def main(argv=None, prog="optiq import-gguf") -> int:
    return run_command(ImportOptions, run, argv, prog, __doc__)


if __name__ == "__main__":
    script_entry(main)
