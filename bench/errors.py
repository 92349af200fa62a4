"""Errors a user can mend: the CLI prints them as one line and exits non-zero, with no traceback."""


class UsageError(Exception):
    """Bad input: the message says what is wrong and how to mend it."""
