"""User-facing errors: the CLI prints these as one line instead of a traceback."""


class HaqError(Exception):
    """A problem with the user's input or environment, with a message that says what to change."""
