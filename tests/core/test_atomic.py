import os

import pytest

from cnllm.core.atomic import TEMP_MARK, atomic_dir, atomic_file, atomic_path, write_text
from cnllm.core.errors import OutputExistsError, UsageError


def leftovers(folder):
    return [p.name for p in folder.iterdir() if TEMP_MARK in p.name]


def test_atomic_file_writes_on_success(tmp_path):
    target = tmp_path / "deep" / "out.txt"
    write_text(target, "done")
    assert target.read_text() == "done"
    assert leftovers(target.parent) == []


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as handle:
            handle.write(b"half")
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert leftovers(tmp_path) == []


def test_atomic_file_refuses_existing_without_force(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        write_text(target, "new")
    write_text(target, "new", force=True)
    assert target.read_text() == "new"


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(ValueError):
        with atomic_dir(target, force=True) as tmp:
            (tmp / "b").write_text("2")
            raise ValueError("failed midway")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_dir(target, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert leftovers(tmp_path) == []


def test_parent_that_is_a_file_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError):
        write_text(blocker / "out.txt", "x")


def test_atomic_path_renames_what_a_library_wrote_by_name(tmp_path):
    target = tmp_path / "model.gguf"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and TEMP_MARK in tmp.name
        tmp.write_bytes(b"GGUF")
    assert target.read_bytes() == b"GGUF"
    with pytest.raises(OutputExistsError):
        with atomic_path(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_path(target, force=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_output_under_a_file_or_missing_folder_is_checked_up_front(tmp_path):
    from cnllm.core.atomic import check_output

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="is not a directory"):
        check_output(blocker / "sub" / "deeper" / "out", force=False)
    check_output(tmp_path / "new" / "folder" / "out", force=False)


def test_leftovers_of_killed_runs_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".model{TEMP_MARK}{pid}-abc"
    stale.mkdir()
    (stale / "shard").write_bytes(b"half")
    other = tmp_path / f".other{TEMP_MARK}{pid}-abc"
    other.mkdir()
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "ok").write_text("1")
    assert not stale.exists() and other.exists()


def test_replace_dir_restores_the_old_output_when_the_move_fails(tmp_path, monkeypatch):
    import os

    from cnllm.core import atomic

    out, built = tmp_path / "out", tmp_path / ".out.building"
    out.mkdir()
    (out / "old.txt").write_text("old")
    built.mkdir()
    (built / "new.txt").write_text("new")
    real_replace = os.replace

    def failing(source, target):
        if source == built:
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OSError):
        atomic.replace_dir(built, out, force=True)
    assert [p.name for p in out.iterdir()] == ["old.txt"] and built.is_dir()
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    with pytest.raises(OutputExistsError):
        atomic.replace_dir(built, out)
    atomic.replace_dir(built, out, force=True)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and not built.exists()
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_outputs_get_umask_modes_even_when_a_library_wrote_them_private(tmp_path, umask):
    """safetensors' save_file (and mkstemp-style writers) leave 0600 files: the output gets what open() would give."""
    import stat

    from cnllm.core.atomic import replace_dir

    previous = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            for name in ("weights.safetensors", "sub/inner.json"):
                (tmp / name).write_text("x")
                os.chmod(tmp / name, 0o600)
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "run.sh", 0o700)
        with atomic_path(tmp_path / "single.gguf") as tmp:
            os.chmod(tmp, 0o600)
        trained = tmp_path / ".trained.work"
        trained.mkdir(mode=0o700)
        (trained / "adapter_model.safetensors").write_text("x")
        os.chmod(trained / "adapter_model.safetensors", 0o600)
        replace_dir(trained, tmp_path / "trained")
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert modes == {
        "folder": 0o777 & ~umask, "folder/sub": 0o777 & ~umask, "folder/weights.safetensors": 0o666 & ~umask,
        "folder/sub/inner.json": 0o666 & ~umask, "folder/run.sh": 0o777 & ~umask, "single.gguf": 0o666 & ~umask,
        "trained": 0o777 & ~umask, "trained/adapter_model.safetensors": 0o666 & ~umask,
    }
