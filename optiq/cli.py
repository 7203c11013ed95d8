"""`optiq COMMAND ...`: a thin front over optiq/commands/*.main."""

import importlib
import sys

COMMANDS = {
    "convert": "optiq.commands.convert",
    "import-gguf": "optiq.commands.import_gguf",
    "strip": "optiq.commands.strip",
    "eval": "optiq.commands.eval",
    "benchmark": "optiq.commands.benchmark",
    "kv-cache": "optiq.commands.kv_cache",
    "serve": "optiq.commands.serve",
    "lora": "optiq.commands.lora",
}


def usage() -> str:
    return "usage: optiq {" + ",".join(COMMANDS) + "} [options]   (optiq COMMAND --help)"


def main(argv=None):
    if argv is None:  # a real command line: get the fast BLAS first
        from .blas import ensure_fast_blas

        ensure_fast_blas()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"optiq: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name])
    return module.main(rest, prog=f"optiq {name}")


if __name__ == "__main__":
    sys.exit(main())
