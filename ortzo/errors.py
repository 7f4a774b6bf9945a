"""The one error type the CLI turns into a single line and exit code 2."""


class OrtzoError(Exception):
    """A user-facing problem: bad input, a missing file, an unknown name."""
