"""Errors that mean "bad input from the user": the CLI prints them as one line and exits non-zero."""

__all__ = ["UsageError", "DataError", "CheckpointError", "MissingExtraError", "EXIT_PREEMPTED"]


class UsageError(ValueError):
    """A bad argument, name or file given by the user."""


class DataError(UsageError):
    """A data folder is missing or not in the expected layout."""


class CheckpointError(UsageError):
    """A checkpoint is missing, unreadable or does not fit the requested model."""


class MissingExtraError(UsageError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""

# `madfast distill` stopped by SIGTERM/SIGUSR1 with its checkpoint: the same command continues it
# (EX_TEMPFAIL: a temporary failure, retry).
EXIT_PREEMPTED = 75
