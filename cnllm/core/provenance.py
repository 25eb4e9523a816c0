"""Provenance records: every output says what made it.

A record holds the command, its options, each input with size and SHA-256, the versions of
cnllm and its main libraries, and the result (the result's ``to_dict()``). An output directory
carries it inside as ``cnllm-<kind>.json``, and a model folder is finished by
:func:`finish_output_folder` (record, then ``SHA256SUMS`` over everything, sizes); a single-file output (a
``.gguf``, a ``.model``, a JSON report) carries it beside it as ``<file>.cnllm.json`` (:func:`write_file_record`).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

from cnllm.core.hashing import create_manifest, hash_file

FILE_RECORD_SUFFIX = ".cnllm.json"
MANIFEST_NAME = "SHA256SUMS"
# Result keys a folder's own record leaves out: where it was moved to, and what finishing it measures.
UNKNOWN_WHEN_FINISHING = ("output", "files", "total_bytes", "seconds")
TRACKED_PACKAGES = ("torch", "transformers", "peft", "sentencepiece", "tokenizers", "gguf", "llama_cpp_python")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def describe_input(path: Path | str) -> dict[str, Any]:
    """Size and SHA-256 of a file, or of every file under a directory (sorted, relative paths)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {
            "path": str(path),
            "kind": "directory",
            "files": [
                {"path": p.relative_to(path).as_posix(), "size": p.stat().st_size, "sha256": hash_file(p, "sha256")}
                for p in files
            ],
        }
    return {"path": str(path), "kind": "file", "size": path.stat().st_size, "sha256": hash_file(path, "sha256")}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def build_record(
    kind: str,
    *,
    inputs: Iterable[Path | str] = (),
    options: Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    from cnllm import __version__

    return {
        "cnllm_record": kind,
        "cnllm_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv[0:1] and [Path(sys.argv[0]).name, *sys.argv[1:]],
        "python": platform.python_version(),
        "packages": package_versions(),
        "inputs": [describe_input(p) for p in inputs],
        "options": _jsonable(options or {}),
        "results": _jsonable(results or {}),
    }


def record_name(kind: str) -> str:
    return f"cnllm-{kind}.json"


def write_record(directory: Path | str, kind: str, **fields: Any) -> Path:
    """Write ``cnllm-<kind>.json`` into ``directory`` (normally the temporary output dir)."""
    target = Path(directory) / record_name(kind)
    target.write_text(json.dumps(build_record(kind, **fields), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return target


def finish_output_folder(
    folder: Path | str, kind: str, *, inputs: Iterable[Path | str], options: Mapping[str, Any], results: Mapping[str, Any]
) -> tuple[list[str], int]:
    """The last step of every command that writes a model folder (merge-lora, convert-meta, gguf-to-hf, diff-recover,
    diff-make): its record (``results`` without :data:`UNKNOWN_WHEN_FINISHING`), then ``SHA256SUMS`` over every file,
    the record included. Returns the files (``SHA256SUMS`` last) and their total size in bytes."""
    folder = Path(folder)
    kept = {key: value for key, value in results.items() if key not in UNKNOWN_WHEN_FINISHING}
    write_record(folder, kind, inputs=inputs, options=options, results=kept)
    manifest = create_manifest([folder], manifest=folder / MANIFEST_NAME)
    return [f.path for f in manifest.files] + [MANIFEST_NAME], manifest.total_bytes


def file_record_path(path: Path | str) -> Path:
    """Where the record of a single-file output lives: ``X.gguf`` → ``X.gguf.cnllm.json``."""
    path = Path(path)
    return path.with_name(f"{path.name}{FILE_RECORD_SUFFIX}")


def write_file_record(path: Path | str, kind: str, **fields: Any) -> Path:
    """Write the record of the single file ``path`` beside it, atomically (replacing a stale one)."""
    from cnllm.core.atomic import write_text

    target = file_record_path(path)
    write_text(target, json.dumps(build_record(kind, **fields), ensure_ascii=False, indent=2) + "\n", force=True)
    return target


def read_file_record(path: Path | str) -> dict[str, Any]:
    return json.loads(file_record_path(path).read_text(encoding="utf-8"))


def read_record(directory: Path | str, kind: str) -> dict[str, Any]:
    return json.loads((Path(directory) / record_name(kind)).read_text(encoding="utf-8"))
