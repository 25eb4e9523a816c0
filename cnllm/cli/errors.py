"""The one place that turns exceptions into a single message line and an exit code.

0 success · 1 the operation or a check failed · 2 usage error · 130 interrupted.
Tracebacks only with the root option ``--debug``.
"""

from __future__ import annotations

import errno
import traceback
from typing import Callable

import click

from cnllm.cli import output
from cnllm.core.errors import CnllmError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _os_error_message(exc: OSError) -> tuple[str, int]:
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device{where}; free some space and run again", EXIT_FAILED
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}", EXIT_USAGE
    if exc.errno == errno.ENOENT:
        return f"no such file or directory{where}", EXIT_USAGE
    return f"{exc.strerror or exc}{where}", EXIT_FAILED


def describe(exc: BaseException) -> tuple[str, int]:
    """Message and exit code for any exception that reaches the top of a command."""
    if isinstance(exc, CnllmError):
        return exc.message, exc.exit_code
    if isinstance(exc, click.UsageError):
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return f"{exc.format_message()}{hint}", EXIT_USAGE
    if isinstance(exc, click.ClickException):
        return exc.format_message(), exc.exit_code
    if isinstance(exc, (KeyboardInterrupt, click.Abort)):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(exc, MemoryError):
        return "out of memory", EXIT_FAILED
    if isinstance(exc, OSError):
        return _os_error_message(exc)
    return f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", EXIT_FAILED


def run(command: click.Command, args: list[str], *, debug: Callable[[], bool]) -> int:
    """Run the Click command without its own error printing; return the process exit code."""
    try:
        result = command.main(args=args, prog_name="cnllm", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError:
        # ``cnllm checksum`` alone: its help was already shown; still a usage error for scripts.
        return EXIT_USAGE
    except BaseException as exc:  # noqa: BLE001 - this is the top of the program
        if isinstance(exc, SystemExit):
            raise
        message, code = describe(exc)
        if debug():
            traceback.print_exc()
        output.print_error(message)
        return code
    return result if isinstance(result, int) else EXIT_OK
