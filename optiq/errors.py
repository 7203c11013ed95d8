"""The one exception type the commands turn into a one-line message and exit 2."""


class OptiqError(Exception):
    """Bad input or an unsupported model: the message names the problem."""
