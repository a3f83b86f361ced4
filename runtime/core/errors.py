"""The one exception type that carries a sentence meant for a person."""


class SpeedError(Exception):
    """A problem the user can fix; the CLI prints its message alone and exits non-zero."""
