"""Exceptions that carry the message a user sees and the exit code the CLI returns.

Exit codes: 0 success, 1 the operation or a check failed, 2 usage error (bad option,
missing or unreadable input, output already exists), 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations


class CnllmError(Exception):
    """An error with a one-line, user-facing message and an exit code."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CnllmError):
    """The user asked for something impossible: bad option, missing or invalid input."""

    exit_code = 2


class OutputExistsError(UsageError):
    """The output already exists and --force was not given."""

    def __init__(self, path):
        super().__init__(f"output {path} already exists; pass --force to overwrite it")
        self.path = path


class CheckFailed(CnllmError):
    """A verification ran to completion and found a problem (checksum mismatch, tolerance exceeded)."""

    exit_code = 1


class Terminated(BaseException):
    """The process received SIGTERM (a timeout, ``docker stop``, Slurm). Raised in the main thread like
    ``KeyboardInterrupt`` so every ``finally`` and atomic-output cleanup runs, but not caught where Ctrl-C
    only cancels a step (chat): the command ends with exit 143."""
