"""One module per command: an argparse-dataclass options record and main(argv)."""

import sys
from contextlib import contextmanager

from argparse_dataclass import ArgumentParser

from ..blas import ensure_fast_blas
from ..device import check_backend, describe
from ..errors import OptiqError


def fail(message: str) -> int:
    print(f"optiq: error: {message}", file=sys.stderr)
    return 2


@contextmanager
def reported():
    """Turn OptiqError (bad input) into a one-line message and exit status 2."""
    try:
        yield
    except OptiqError as exc:
        raise SystemExit(fail(str(exc)))


def announce_device(quiet: bool = False):
    """Refuse a broken MLX install, then say (on stderr) where the work runs."""
    check_backend()
    if not quiet:
        print(f"optiq: {describe()}", file=sys.stderr, flush=True)


def int_list(text: str) -> tuple:
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise OptiqError(f"expected comma-separated integers, got {text!r}")


class OneLineParser(ArgumentParser):
    """argparse-dataclass's parser, whose errors are one `optiq: error:` line
    (exit 2) instead of argparse's usage block."""

    def error(self, message):
        raise SystemExit(fail(f"{message} (see {self.prog} --help)"))


def run_command(options_class, run, argv, prog: str, description: str) -> int:
    """Parse argv into the command's options record and run it; bad input exits 2."""
    opts = OneLineParser(options_class, prog=prog, description=description).parse_args(argv)
    with reported():
        run(opts)
    return 0


def script_entry(main, prog=None):
    """`python scripts/x.py` / `python -m optiq.commands.x`: fast BLAS first
    (a re-exec, so the slow BLAS this process may have loaded goes with it), then main."""
    ensure_fast_blas()
    sys.exit(main(prog=prog) if prog else main())
