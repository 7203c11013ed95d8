"""One module per command: an argparse-dataclass options record and main(argv)."""

import sys
from contextlib import contextmanager

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


def int_list(text: str) -> tuple:
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise OptiqError(f"expected comma-separated integers, got {text!r}")
