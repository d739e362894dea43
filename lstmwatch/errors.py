"""Errors shared by the command line and what it runs (the demo), kept apart so neither imports the other."""


class UsageError(Exception):
    """A bad argument or an unreadable file: one line for the person, exit code 2."""
