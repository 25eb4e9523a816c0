"""Atomic outputs: write under a temporary sibling name, rename into place on success.

An interrupted or failed run never leaves a half-written file or directory under the final
name, an existing output is only replaced when the caller passes ``force=True``, and an output
never replaces, lands inside or contains one of the command's inputs (``inputs=``). Outputs get
the permissions a plain ``open``/``mkdir`` would give under the umask, and a full disk is
reported as such, with the space needed and free.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import IO, Iterable, Iterator

from cnllm.core.errors import CnllmError, OutputExistsError, UsageError
from cnllm.core.tensors import human_bytes

TEMP_MARK = ".cnllm-tmp-"


def check_not_input(path: Path | str, inputs: Iterable[Path | str | None]) -> None:
    """Refuse an output that is an input, lies inside an input folder or contains an input: with
    ``--force`` it would replace the input, and a new file inside a model folder changes that model."""
    output = Path(os.path.realpath(path))
    for raw in inputs:
        if raw is None or not os.path.lexists(raw):
            continue
        source = Path(os.path.realpath(raw))
        if output == source or (output.exists() and os.path.samefile(output, source)):
            relation = "is the input"
        elif source in output.parents:
            relation = "lies inside the input"
        elif output in source.parents:
            relation = "contains the input"
        else:
            continue
        raise UsageError(f"output {path} {relation} {raw}; inputs are never modified: choose another output")


def check_output(path: Path, force: bool, *, inputs: Iterable[Path | str | None] = ()) -> None:
    """Fail early (before any work) when ``path`` overlaps an input, exists and may not be overwritten, or cannot be written."""
    path = Path(path)
    check_not_input(path, inputs)
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


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged user may still write on the file system holding ``path``."""
    return shutil.disk_usage(path).free


def _mount_point(path: Path) -> Path:
    path = Path(os.path.realpath(path))
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


# Below this much free space a failed write is taken for a full disk, whatever the library said
# ("1572864 requested and 405664 written", "basic_ios::clear: iostream error").
FULL_DISK_SLACK = 16 << 20


def disk_full_error(path: Path, needed: int | None = None) -> CnllmError:
    """``no space left on DEVICE (needed ~N, free M)`` for a write under ``path``."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = free_bytes(folder)
    wanted = f"needed ~{human_bytes(needed)}, " if needed else ""
    return CnllmError(f"no space left on {_mount_point(folder)} ({wanted}free {human_bytes(free)}) writing {path}; free some space and run again")


def _is_disk_full(exc: BaseException, parent: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if isinstance(exc, UsageError) or not isinstance(exc, Exception):
        return False
    try:
        return free_bytes(parent) < FULL_DISK_SLACK
    except OSError:
        return False


def _check_space(path: Path, parent: Path, needed: int | None) -> None:
    if needed and free_bytes(parent) < needed:
        raise disk_full_error(path, needed)


def _temp_sibling(path: Path, parent: Path) -> Path:
    """A fresh temporary name beside ``path``. It is named before it is created, so an interruption at
    any point finds it in the ``try`` that removes it; created with the modes a plain ``open``/``mkdir``
    gives under the umask (``mkstemp``/``mkdtemp`` would make it private)."""
    return parent / f"{_temp_prefix(path)}{secrets.token_hex(8)}"


def _umask() -> int:
    """The process umask; read from /proc where it can be, since setting it to read it races other threads."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _give_umask_modes(path: Path) -> None:
    """Give ``path`` (and everything under it) the modes a plain ``open``/``mkdir`` gives under the umask:
    libraries that write through a private temporary file (safetensors' ``save_file``) leave 0600 behind."""
    mask = _umask()
    entries = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for entry in entries:
        info = entry.lstat()
        if stat.S_ISLNK(info.st_mode):
            continue
        wide = 0o777 if stat.S_ISDIR(info.st_mode) or info.st_mode & 0o111 else 0o666
        if stat.S_IMODE(info.st_mode) != wide & ~mask:
            os.chmod(entry, wide & ~mask)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(path: Path | str, *, force: bool = False, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path for a library that writes by file name (llama.cpp, GGUFWriter);
    on success it is renamed over ``path``, on failure removed. ``needed``: the bytes the output
    will take, checked against the free space first."""
    path = Path(path)
    check_output(path, force)
    parent = _prepare_parent(path)
    _check_space(path, parent, needed)
    tmp = _temp_sibling(path, parent)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        check_output(path, force)
        _give_umask_modes(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        full = _is_disk_full(exc, parent)
        _remove(tmp)
        if full:
            raise disk_full_error(path, needed) from exc
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
def atomic_dir(path: Path | str, *, force: bool = False, needed: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling directory; on success it replaces ``path``.

    With ``force`` an existing ``path`` is moved aside first and deleted only after the
    new directory is in place, so a failure never loses the old output. ``needed``: as for
    :func:`atomic_path`.
    """
    path = Path(path)
    check_output(path, force)
    parent = _prepare_parent(path)
    _check_space(path, parent, needed)
    tmp = _temp_sibling(path, parent)
    try:
        os.mkdir(tmp, 0o777)
        yield tmp
        check_output(path, force)
        _swap_in(tmp, path, parent)
    except BaseException as exc:
        full = _is_disk_full(exc, parent)
        _remove(tmp)
        if full:
            raise disk_full_error(path, needed) from exc
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
    _give_umask_modes(source)
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
