"""Errors a user can act on: tools print them as one line and exit non-zero."""


class MegalignError(Exception):
    """Bad input, a bad option or a bad file: the message says what and what would work."""
