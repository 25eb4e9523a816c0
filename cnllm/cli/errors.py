"""The one place that turns exceptions into a single message line and an exit code.

0 success · 1 the operation or a check failed · 2 usage error · 130 interrupted · 143 terminated.
Tracebacks only with the root option ``--debug``. SIGTERM is turned into :class:`Terminated` while a
command runs, so it cleans up exactly as Ctrl-C does.
"""

from __future__ import annotations

import _thread
import contextlib
import errno
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

import click

from cnllm.cli import output
from cnllm.core.config import OptionError, flag
from cnllm.core.errors import CnllmError, Terminated

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


def _os_error_message(exc: OSError) -> tuple[str, int]:
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    if exc.errno == errno.ENOSPC:
        from cnllm.core.atomic import disk_full_error

        return disk_full_error(Path(exc.filename) if exc.filename else Path.cwd()).message, EXIT_FAILED
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}", EXIT_USAGE
    if exc.errno == errno.ENOENT:
        return f"no such file or directory{where}", EXIT_USAGE
    return f"{exc.strerror or exc}{where}", EXIT_FAILED


def describe(exc: BaseException) -> tuple[str, int]:
    """Message and exit code for any exception that reaches the top of a command."""
    if isinstance(exc, OptionError):  # not rendered by the command: on the command line, options are flags
        return exc.render(flag), exc.exit_code
    if isinstance(exc, CnllmError):
        return exc.message, exc.exit_code
    if isinstance(exc, click.UsageError):
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return f"{exc.format_message()}{hint}", EXIT_USAGE
    if isinstance(exc, click.ClickException):
        return exc.format_message(), exc.exit_code
    if isinstance(exc, (KeyboardInterrupt, click.Abort)):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(exc, Terminated):
        return "terminated", EXIT_TERMINATED
    if isinstance(exc, MemoryError):
        return "out of memory", EXIT_FAILED
    if isinstance(exc, OSError):
        return _os_error_message(exc)
    return f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", EXIT_FAILED


class _Signals:
    """Interruptions swallowed by C callbacks, and whether one is being sent again."""

    swallowed = 0
    signum = signal.SIGTERM
    sending = False


def _raise_for(signum: int, frame) -> None:
    if frame is not None and frame.f_code is _redeliver_swallowed.__code__:
        _Signals.swallowed += 1  # raising in the hook would be swallowed too: let the sender send it again
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _redeliver_swallowed(unraisable) -> None:
    """An interruption raised inside a callback from C (llama.cpp's log during quantizing) is swallowed
    there: send the signal again until one lands in Python code that unwinds."""
    signum = {Terminated: signal.SIGTERM, KeyboardInterrupt: signal.SIGINT}.get(type(unraisable.exc_value))
    if signum is None:
        sys.__unraisablehook__(unraisable)
        return
    _Signals.swallowed += 1
    _Signals.signum = signum
    if not _Signals.sending:
        _Signals.sending = True
        _thread.start_new_thread(_send_while_swallowed, ())


def _send_while_swallowed() -> None:
    """Every 50 ms, send the signal again if the last one sent was swallowed too (else it is unwinding)."""
    seen = 0
    while True:
        while _Signals.swallowed != seen:
            seen = _Signals.swallowed
            time.sleep(0.05)
            os.kill(os.getpid(), _Signals.signum)
        _Signals.sending = False
        if _Signals.swallowed == seen:  # else one was swallowed just now, before the hook could see a sender
            return
        _Signals.sending = True


@contextlib.contextmanager
def interruptions_unwind() -> Iterator[None]:
    """While the command runs, SIGTERM raises :class:`Terminated` (SIGINT ``KeyboardInterrupt``) in the main
    thread, and one swallowed by a C callback is delivered again (all restored afterwards)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_for) for signum in (signal.SIGTERM, signal.SIGINT)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, _redeliver_swallowed
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sys.unraisablehook = previous_hook


def run(command: click.Command, args: list[str], *, debug: Callable[[], bool]) -> int:
    """Run the Click command without its own error printing; return the process exit code."""
    try:
        with interruptions_unwind():
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
