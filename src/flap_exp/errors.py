"""The one exception type for user mistakes: the CLI prints its message on one line, no traceback."""


class FlapError(Exception):
    """Bad input or a refused operation, explained in one line for the user."""
