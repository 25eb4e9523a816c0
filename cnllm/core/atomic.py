"""Atomic outputs: write under a temporary sibling name, rename into place on success.

An interrupted or failed run never leaves a half-written file or directory under the final
name, and an existing output is only replaced when the caller passes ``force=True``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from cnllm.core.errors import OutputExistsError, UsageError

TEMP_MARK = ".cnllm-tmp-"


def check_output(path: Path, force: bool) -> None:
    """Fail early (before any work) when ``path`` exists and may not be overwritten, or cannot be written."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not force:
        raise OutputExistsError(path)
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"cannot write {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK):
        raise UsageError(f"cannot write {path}: {ancestor} is not writable")


def _temp_prefix(path: Path) -> str:
    """Temporary siblings carry the writer's pid, so leftovers of killed runs can be recognised."""
    return f".{path.name}{TEMP_MARK}{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(path: Path, parent: Path) -> None:
    """Delete temporary siblings left by runs that were killed (their pid is gone): a killed
    7B merge would otherwise leave gigabytes behind."""
    marker = f".{path.name}{TEMP_MARK}"
    for sibling in parent.iterdir():
        if not sibling.name.startswith(marker):
            continue
        pid = sibling.name[len(marker):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            _remove(sibling)


def _prepare_parent(path: Path) -> Path:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {parent}: {exc.strerror or exc}") from exc
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output folder {parent} is not writable")
    _remove_stale_temporaries(path, parent)
    return parent


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(path: Path | str, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path for a library that writes by file name (llama.cpp, GGUFWriter);
    on success it is renamed over ``path``, on failure removed."""
    path = Path(path)
    check_output(path, force)
    parent = _prepare_parent(path)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path), dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        check_output(path, force)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: Path | str, *, force: bool = False, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success fsync and rename it over ``path``."""
    with atomic_path(path, force=force) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_dir(path: Path | str, *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling directory; on success it replaces ``path``.

    With ``force`` an existing ``path`` is moved aside first and deleted only after the
    new directory is in place, so a failure never loses the old output.
    """
    path = Path(path)
    check_output(path, force)
    parent = _prepare_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=parent))
    try:
        yield tmp
        check_output(path, force)
        _swap_in(tmp, path, parent)
    except BaseException:
        _remove(tmp)
        raise


def replace_dir(source: Path | str, path: Path | str, *, force: bool = False) -> None:
    """Move the finished directory ``source`` (a sibling of ``path``) to ``path``, as :func:`atomic_dir` does:
    an existing ``path`` (only with ``force``) is moved aside, put back if the move fails, deleted after;
    leftovers of killed runs are removed first. For outputs built in a directory of their own (training)."""
    path = Path(path)
    check_output(path, force)
    _swap_in(Path(source), path, _prepare_parent(path))


def _swap_in(source: Path, path: Path, parent: Path) -> None:
    """Rename ``source`` over ``path``; the old ``path`` waits under a temporary name that
    :func:`_remove_stale_temporaries` recognises, so a killed swap never loses or leaks it."""
    old = None
    if path.exists() or path.is_symlink():
        old = parent / f"{_temp_prefix(path)}old"
        _remove(old)
        os.replace(path, old)
    try:
        os.replace(source, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        _remove(old)


def write_text(path: Path | str, text: str, *, force: bool = False) -> None:
    """Atomically write a small UTF-8 text file."""
    with atomic_file(path, force=force, mode="w") as handle:
        handle.write(text)
