"""Errors a user can mend: the CLI prints them as one line and exits 2, with no traceback. Raise UsageError for
every bad input (flag, file, environment) with what is wrong and how to mend it: any other exception reaching the
CLI is taken for a bug of the suite and shown with its traceback."""


class UsageError(Exception):
    """Bad input: the message says what is wrong and how to mend it."""
