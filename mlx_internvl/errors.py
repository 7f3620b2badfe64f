"""Errors a user can fix. The CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(ValueError):
    """Bad input (file, key, argument) with a message that says what was expected and how to fix it."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, truncated or does not match its config."""
