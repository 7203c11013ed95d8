"""`optiq COMMAND ...`: a thin front over optiq/commands/*.main."""

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

from .blas import ensure_fast_blas

COMMANDS = {
    "convert": "optiq.commands.convert",
    "import-gguf": "optiq.commands.import_gguf",
    "strip": "optiq.commands.strip",
    "tune": "optiq.commands.tune",
    "eval": "optiq.commands.eval",
    "benchmark": "optiq.commands.benchmark",
    "kv-cache": "optiq.commands.kv_cache",
    "serve": "optiq.commands.serve",
    "lora": "optiq.commands.lora",
}


def purpose(module: str) -> str:
    """A command's one-line purpose: its module docstring's first line after
    the name, read from the source (importing every command would load MLX)."""
    source = Path(importlib.util.find_spec(module).origin).read_text()
    first = (ast.get_docstring(ast.parse(source)) or "").split("\n\n")[0].replace("\n", " ")
    return first.split(":", 1)[1].strip() if ":" in first else first


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: optiq COMMAND [options]   (optiq COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {purpose(module)}" for name, module in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    if argv is None:  # a real command line: get the fast BLAS before MLX loads
        ensure_fast_blas()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"optiq: error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name])
    return module.main(rest, prog=f"optiq {name}")


if __name__ == "__main__":
    sys.exit(main())
