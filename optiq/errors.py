"""The one exception type the commands turn into a one-line message and exit 2."""

import importlib


class OptiqError(Exception):
    """Bad input or an unsupported model: the message names the problem."""


def require_extra(module: str, what: str, extra: str):
    """Import an optional library, or name the optiq extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise OptiqError(f"{what} need {module.replace('_', '-')}: pip install 'optiq[{extra}]' ({exc})")
