"""File hashing and checksum manifests (``cnllm checksum``, provenance records, merge outputs).

Reads in large chunks into one reused buffer (hashlib releases the GIL on big updates), hashes
several files at once on threads, and reads the manifest formats that model releases publish:
GNU coreutils (``<hex>  path`` / ``<hex> *path``), BSD tags (``SHA256 (path) = <hex>``), Markdown
tables of ``SHA256.md`` files, and plain MD5 lists.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence, cast

from cnllm.core.atomic import atomic_file, check_output
from cnllm.core.errors import UsageError
from cnllm.core.progress import NULL_PROGRESS, Progress

ALGORITHMS = ("sha256", "md5", "sha1", "blake2b")
HEX_LENGTH = {"md5": 32, "sha1": 40, "sha256": 64, "blake2b": 128}
ALGORITHM_BY_HEX_LENGTH = {length: name for name, length in HEX_LENGTH.items()}
BSD_TAGS = {"MD5": "md5", "SHA1": "sha1", "SHA256": "sha256", "SHA2-256": "sha256", "BLAKE2B": "blake2b", "BLAKE2B-512": "blake2b"}
CHUNK_SIZE = 4 << 20
SMALL_READ = 64 << 10  # reads after a small file's expected end (it grew, or to see EOF)

OK, FAILED, MISSING = "OK", "FAILED", "MISSING"


def hash_file(
    path: Path | str,
    algorithm: str = "sha256",
    *,
    on_bytes: Callable[[int], None] | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> str:
    """Hex digest of one file, calling ``on_bytes(n)`` after each chunk read.

    Only regular files are read (a FIFO or ``/dev/zero`` named in a manifest would block or never end).
    Small files take one plain read; large ones are read into a buffer each thread reuses.
    """
    hasher = hashlib.new(algorithm)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(0, f"{file_kind(info.st_mode)}, not a regular file", str(path))
        if info.st_size < chunk_size:
            data = os.read(fd, info.st_size + 1)
            while data:
                hasher.update(data)
                if on_bytes is not None:
                    on_bytes(len(data))
                data = os.read(fd, SMALL_READ)
            return hasher.hexdigest()
        buffer = _buffer(chunk_size)
        view = memoryview(buffer)
        with open(fd, "rb", buffering=0, closefd=False) as handle:
            while read := handle.readinto(buffer):
                hasher.update(view[:read])
                if on_bytes is not None:
                    on_bytes(read)
        return hasher.hexdigest()
    finally:
        os.close(fd)


class NotRegularFile(OSError):
    """A FIFO, device, socket or directory where a file to hash was expected; it is never read."""


_local = threading.local()


def _buffer(size: int) -> bytearray:
    if len(getattr(_local, "buffer", b"")) != size:
        _local.buffer = bytearray(size)
    return _local.buffer


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((word for test, word in kinds if test(mode)), "not a regular file")


def hash_files(
    tasks: Sequence[tuple[Path | str, str]],
    *,
    jobs: int | None = None,
    progress: Progress = NULL_PROGRESS,
    description: str = "hashing",
) -> dict[tuple[Path | str, str], str | OSError]:
    """Hash each ``(path, algorithm)`` once; a file that cannot be read maps to its ``OSError``.

    Files are started largest first so that threads finish together; progress counts bytes
    across all files. Each thread takes the next file from a shared counter (no task object per
    file: manifests list 100,000 small files), and all stop at the next file once interrupted.
    """
    jobs = max(1, jobs or os.cpu_count() or 1)
    unique = list(dict.fromkeys(tasks))
    sizes = {}
    for path, _ in unique:
        try:
            sizes[path] = os.stat(path).st_size
        except OSError:
            sizes[path] = 0
    unique.sort(key=lambda task: sizes[task[0]], reverse=True)
    progress.start(sum(sizes[p] for p, _ in unique), description, unit="B")
    results: list[str | OSError | None] = [None] * len(unique)
    positions = itertools.count()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            index = next(positions)
            if index >= len(unique):
                return
            path, algorithm = unique[index]
            try:
                results[index] = hash_file(path, algorithm, on_bytes=progress.advance)
            except OSError as exc:
                results[index] = exc

    try:
        workers = min(jobs, len(unique))
        if workers <= 1:
            work()
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                try:
                    for future in [pool.submit(work) for _ in range(workers)]:
                        future.result()
                except BaseException:
                    stop.set()
                    raise
    finally:
        progress.finish()
    return dict(zip(unique, cast("list[str | OSError]", results)))  # every slot is filled once the threads finish


def describe_os_error(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


# --- creating manifests -------------------------------------------------------------------


@dataclass
class HashedFile:
    path: str
    digest: str
    size: int


@dataclass
class CreateResult:
    algorithm: str
    files: list[HashedFile]
    manifest: Path | None
    seconds: float

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def text(self) -> str:
        return "".join(format_gnu_line(f.digest, f.path) for f in self.files)

    def to_dict(self) -> dict:
        """The one JSON shape of a manifest creation (``checksum create --json``)."""
        return {
            "manifest": str(self.manifest) if self.manifest else None,
            "algorithm": self.algorithm,
            "files": [{"path": f.path, "digest": f.digest, "size": f.size} for f in self.files],
            "total_bytes": self.total_bytes,
            "seconds": round(self.seconds, 3),
        }


def format_gnu_line(digest: str, path: str) -> str:
    """One coreutils line; names with a backslash or newline are escaped the way sha256sum does."""
    if any(ch in path for ch in "\\\n\r"):
        escaped = path.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return f"\\{digest}  {escaped}\n"
    return f"{digest}  {path}\n"


def collect_files(paths: Iterable[Path | str], *, exclude: Iterable[Path] = ()) -> list[Path]:
    """Files named directly, plus every file under each directory (sorted), each once."""
    excluded = {Path(p).resolve() for p in exclude}
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.as_posix()))
        elif path.is_file():
            found.append(path)
        elif path.exists():
            raise UsageError(f"{path} is neither a file nor a directory")
        else:
            raise UsageError(f"no such file or directory: {path}")
    unique: dict[Path, Path] = {}
    for path in found:
        resolved = path.resolve()
        if resolved not in excluded and resolved not in unique:
            unique[resolved] = path
            _check_utf8_name(path)
    return list(unique.values())


def _check_utf8_name(path: Path) -> None:
    """A manifest is UTF-8 text: a file name in another encoding cannot be listed in it (nor verified later)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise UsageError(f"file name {shown} is not valid UTF-8 and cannot be listed in a manifest; rename the file") from None


MANIFEST_SNIFF_BYTES = 64 << 10


def _looks_like_manifest(path: Path) -> bool:
    """Whether the file's first line is a checksum line (an earlier manifest), from a bounded read."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(MANIFEST_SNIFF_BYTES)
    except OSError:
        return False
    first = head.decode("utf-8-sig", errors="replace").lstrip().split("\n", 1)[0]
    parsed = parse_manifest(first)
    return bool(parsed.entries) and not parsed.malformed


def _check_not_listed(manifest: Path, paths: Iterable[Path | str]) -> None:
    """A manifest written into a folder it hashes may replace an earlier manifest there (with ``--force``),
    never one of the files it would list: that file would be lost, and missing from the manifest too."""
    if not manifest.is_file():
        return
    target = Path(os.path.realpath(manifest))
    folders = [Path(os.path.realpath(p)) for p in paths if Path(p).is_dir()]
    if any(folder in target.parents for folder in folders) and not _looks_like_manifest(manifest):
        raise UsageError(f"output {manifest} is one of the files to hash, not an earlier manifest; inputs are never modified: choose another output")


def create_manifest(
    paths: Sequence[Path | str],
    *,
    manifest: Path | None = None,
    algorithm: str = "sha256",
    jobs: int | None = None,
    force: bool = False,
    relative_to: Path | None = None,
    progress: Progress = NULL_PROGRESS,
) -> CreateResult:
    """Hash ``paths`` and, when ``manifest`` is given, write a GNU-format manifest atomically.

    Paths in the manifest are relative to ``relative_to`` (default: its folder; the current folder
    without one): the root ``verify`` confines them to.
    """
    if algorithm not in ALGORITHMS:
        raise UsageError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if not paths:
        raise UsageError("nothing to hash: name at least one file or directory")
    if manifest is not None:
        check_output(manifest, force, inputs=[p for p in paths if not Path(p).is_dir()])
        _check_not_listed(manifest, paths)
    files = collect_files(paths, exclude=[manifest] if manifest is not None else [])
    if not files:
        raise UsageError("nothing to hash: the directories given contain no files")
    base = (relative_to or (manifest.parent if manifest is not None else Path("."))).resolve()
    started = time.perf_counter()
    digests = hash_files([(f, algorithm) for f in files], jobs=jobs, progress=progress)
    hashed = []
    for f in files:
        digest = digests[(f, algorithm)]
        if isinstance(digest, OSError):
            raise UsageError(f"cannot read {f}: {describe_os_error(digest)}")
        relative = Path(os.path.relpath(f.resolve(), base)).as_posix()
        hashed.append(HashedFile(relative, digest, f.stat().st_size))
    result = CreateResult(algorithm, hashed, manifest, time.perf_counter() - started)
    if manifest is not None:
        with atomic_file(manifest, force=force, mode="w") as handle:
            handle.write(result.text())
    return result


# --- reading manifests ----------------------------------------------------------------------


@dataclass
class ManifestEntry:
    line: int
    path: str
    digest: str
    algorithm: str


@dataclass
class MalformedLine:
    line: int
    text: str
    reason: str


@dataclass
class ParsedManifest:
    entries: list[ManifestEntry] = field(default_factory=list)
    malformed: list[MalformedLine] = field(default_factory=list)
    formats: set[str] = field(default_factory=set)


_GNU_LINE = re.compile(r"^(\\)?([0-9a-fA-F]+)(?: \*| {1,2}|\t)(.+)$")
_BSD_LINE = re.compile(r"^(\\)?([A-Za-z0-9-]+) ?\((.+)\) ?= ?([0-9a-fA-F]+)$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_TABLE_RULE = re.compile(r"^:?-{3,}:?$")


def _unescape(name: str) -> str:
    out, i = [], 0
    while i < len(name):
        if name[i] == "\\" and i + 1 < len(name):
            out.append({"\\": "\\", "n": "\n", "r": "\r"}.get(name[i + 1], name[i + 1]))
            i += 2
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def _algorithm_for(digest: str, override: str | None) -> str:
    """The algorithm a digest belongs to, or raise ValueError with the reason."""
    if override:
        if len(digest) != HEX_LENGTH[override]:
            raise ValueError(f"a {override} digest has {HEX_LENGTH[override]} hex digits, this one {len(digest)}")
        return override
    try:
        return ALGORITHM_BY_HEX_LENGTH[len(digest)]
    except KeyError:
        raise ValueError(f"a digest of {len(digest)} hex digits matches no supported algorithm") from None


def _table_cells(line: str) -> list[str]:
    cells = line.strip().strip("|").split("|")
    return [c.strip().strip("`*_ ").strip() for c in cells]


def _is_digest(cell: str) -> bool:
    return bool(_HEX.match(cell)) and len(cell) in ALGORITHM_BY_HEX_LENGTH


def parse_manifest(text: str, *, algorithm: str | None = None) -> ParsedManifest:
    """Parse any supported manifest format; unusable lines are kept with their line number."""
    parsed = ParsedManifest()
    unparsed: list[MalformedLine] = []
    header: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("|"):
            cells = _table_cells(stripped)
            if all(_TABLE_RULE.match(c) or not c for c in cells):
                continue
            digest_columns = [i for i, c in enumerate(cells) if _is_digest(c)]
            if not digest_columns:
                header = cells
                continue
            names = [c for i, c in enumerate(cells) if i not in digest_columns and c and c != "-"]
            for column in digest_columns:
                if len(digest_columns) > 1:
                    name = header[column] if column < len(header) and "." in header[column] else ""
                else:
                    name = names[0] if names else ""
                if not name:
                    parsed.malformed.append(MalformedLine(number, line, "table row: cannot tell which file this digest belongs to"))
                    continue
                try:
                    algo = _algorithm_for(cells[column], algorithm)
                except ValueError as exc:
                    parsed.malformed.append(MalformedLine(number, line, str(exc)))
                    continue
                parsed.entries.append(ManifestEntry(number, name, cells[column].lower(), algo))
                parsed.formats.add("markdown")
            continue
        bsd = _BSD_LINE.match(line)
        if bsd and bsd.group(2).upper() in BSD_TAGS:
            escaped, tag, name, digest = bsd.groups()
            tagged = BSD_TAGS[tag.upper()]
            algo = algorithm or tagged
            if len(digest) != HEX_LENGTH[algo]:
                unparsed.append(MalformedLine(number, line, f"a {algo} digest has {HEX_LENGTH[algo]} hex digits, this one {len(digest)}"))
                continue
            parsed.entries.append(ManifestEntry(number, _unescape(name) if escaped else name, digest.lower(), algo))
            parsed.formats.add("bsd")
            continue
        gnu = _GNU_LINE.match(line)
        if gnu:
            escaped, digest, name = gnu.groups()
            try:
                algo = _algorithm_for(digest, algorithm)
            except ValueError as exc:
                unparsed.append(MalformedLine(number, line, str(exc)))
                continue
            parsed.entries.append(ManifestEntry(number, _unescape(name) if escaped else name, digest.lower(), algo))
            parsed.formats.add("md5-list" if algo == "md5" else "gnu")
            continue
        unparsed.append(MalformedLine(number, line, "not a checksum line (expected '<hex>  <file>', 'ALGO (file) = <hex>' or a Markdown table row)"))
    if "markdown" in parsed.formats and parsed.formats == {"markdown"}:
        # A SHA256.md file is mostly prose: lines outside its tables are not checksum lines.
        unparsed = [m for m in unparsed if "hex digits" in m.reason]
    parsed.malformed.extend(unparsed)
    parsed.malformed.sort(key=lambda m: m.line)
    return parsed


# --- verifying --------------------------------------------------------------------------------


@dataclass
class FileCheck:
    path: str
    status: str
    algorithm: str
    expected: str
    actual: str | None = None
    reason: str | None = None
    line: int = 0


@dataclass
class VerifyResult:
    manifest: str
    root: Path
    checks: list[FileCheck]
    malformed: list[MalformedLine]
    formats: list[str]
    seconds: float

    def count(self, status: str) -> int:
        return sum(1 for c in self.checks if c.status == status)

    @property
    def passed(self) -> bool:
        return all(c.status == OK for c in self.checks)

    def to_dict(self) -> dict:
        """The one JSON shape of a verification (``checksum verify --json``, diff-recover's ``verify``)."""
        return {
            "manifest": self.manifest,
            "root": str(self.root),
            "formats": self.formats,
            "passed": self.passed,
            **{status.lower(): self.count(status) for status in (OK, FAILED, MISSING)},
            "malformed": [{"line": m.line, "text": m.text, "reason": m.reason} for m in self.malformed],
            "files": [
                {"path": c.path, "status": c.status, "algorithm": c.algorithm, "expected": c.expected, "actual": c.actual, "reason": c.reason, "line": c.line}
                for c in self.checks
            ],
            "seconds": round(self.seconds, 3),
        }


MAX_MANIFEST_BYTES = 64 << 20  # ~600,000 lines; anything larger is not a manifest (a model file, /dev/zero)


def read_manifest_text(manifest: Path | str) -> str:
    """Read a manifest (``-`` for stdin) as text, with a clear error when it cannot be.

    Only a regular file of at most :data:`MAX_MANIFEST_BYTES` is read, and never more than that
    (a device, a FIFO or a model file named by mistake is refused before it fills memory).
    """
    import sys

    too_large = f"is larger than {MAX_MANIFEST_BYTES >> 20} MiB; a checksum manifest is text, one line per file"
    if str(manifest) == "-":
        try:
            text = sys.stdin.read(MAX_MANIFEST_BYTES + 1)
        except UnicodeDecodeError:
            raise UsageError("the manifest on standard input is not UTF-8 text") from None
        if len(text) > MAX_MANIFEST_BYTES:
            raise UsageError(f"the manifest on standard input {too_large}")
        return text
    path = Path(manifest)
    if not path.exists():
        raise UsageError(f"manifest {path} does not exist")
    if path.is_dir():
        raise UsageError(f"manifest {path} is a directory; name the checksum file inside it")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise UsageError(f"manifest {path} is {file_kind(info.st_mode)}, not a regular file")
            if info.st_size > MAX_MANIFEST_BYTES:
                raise UsageError(f"manifest {path} {too_large}")
            with open(fd, "rb", closefd=False) as handle:
                data = handle.read(MAX_MANIFEST_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise UsageError(f"cannot read manifest {path}: {describe_os_error(exc)}") from exc
    if len(data) > MAX_MANIFEST_BYTES:
        raise UsageError(f"manifest {path} {too_large}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"manifest {path} is not UTF-8 text") from None


def outside_reason(name: str) -> str | None:
    """Why a listed path leads out of the folder it is relative to (absolute, or climbing with ``..``), if it does."""
    if os.path.isabs(name) or name.startswith("\\"):
        return "absolute path"
    normal = os.path.normpath(name)
    if normal == ".." or normal.startswith("../"):
        return "path leads outside"
    return None


def link_targets_allowed(root: Path) -> tuple[str, ...]:
    """The real folders a symbolic link under ``root`` may lead into (each ending in a separator): ``root`` itself,
    and for a Hugging Face cache snapshot (``models--org--name/snapshots/<commit>``) its ``blobs/``, where every
    file of a snapshot is a link to."""
    allowed = [os.path.join(os.path.realpath(root), "")]
    blobs = Path(root).absolute().parent.parent / "blobs"
    if Path(root).absolute().parent.name == "snapshots" and blobs.is_dir():
        allowed.append(os.path.join(os.path.realpath(blobs), ""))
    return tuple(allowed)


def linked_outside_reason(target: str, allowed: tuple[str, ...]) -> str | None:
    """Why ``target`` (inside the root by name) leads elsewhere once symbolic links are followed, if it does
    (``allowed``: :func:`link_targets_allowed`)."""
    if os.path.join(os.path.realpath(target), "").startswith(allowed):
        return None
    return "symbolic link leads outside"


def verify_manifest(
    manifest: Path | str,
    *,
    root: Path | None = None,
    algorithm: str | None = None,
    jobs: int | None = None,
    allow_outside: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> VerifyResult:
    """Check every file a manifest lists; paths resolve against ``root`` (default: the manifest's folder).

    A published manifest is untrusted input: paths that leave ``root`` (absolute, ``../``, a symbolic
    link to a file elsewhere) are FAILED unless ``allow_outside``, and only regular files are read (never a FIFO or a device).
    """
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise UsageError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    text = read_manifest_text(manifest)
    parsed = parse_manifest(text, algorithm=algorithm)
    if not parsed.entries:
        if parsed.malformed:
            lines = ", ".join(str(m.line) for m in parsed.malformed[:10])
            first = parsed.malformed[0]
            raise UsageError(f"{manifest}: no usable checksum line (malformed lines: {lines}; line {first.line}: {first.reason})")
        raise UsageError(f"{manifest}: the manifest is empty")
    if root is None:
        root = Path(".") if str(manifest) == "-" else Path(manifest).parent
    if not root.is_dir():
        raise UsageError(f"--root {root} is not a directory")
    started = time.perf_counter()
    checks: list[FileCheck] = []
    tasks: list[tuple[str, str]] = []
    targets: list[str | None] = []
    folder = os.fspath(root)
    link_targets = link_targets_allowed(root)
    for entry in parsed.entries:
        target = os.path.join(folder, entry.path)  # plain strings: manifests list 100,000 files
        check = FileCheck(entry.path, OK, entry.algorithm, entry.digest, line=entry.line)
        checks.append(check)
        targets.append(None)
        outside = None if allow_outside else outside_reason(entry.path) or linked_outside_reason(target, link_targets)
        if outside:
            check.status, check.reason = FAILED, f"{outside} of {root}; not read (allow with --allow-outside)"
            continue
        tasks.append((target, entry.algorithm))
        targets[-1] = target
    digests = hash_files(tasks, jobs=jobs, progress=progress, description="verifying")
    for check, hashed in zip(checks, targets):
        if hashed is None:
            continue
        digest = digests[(hashed, check.algorithm)]
        if isinstance(digest, FileNotFoundError):
            check.status, check.reason = MISSING, "no such file"
        elif isinstance(digest, NotRegularFile):
            check.status, check.reason = FAILED, f"{digest.strerror}; not read"
        elif isinstance(digest, OSError):
            check.status, check.reason = FAILED, f"cannot read: {describe_os_error(digest)}"
        elif digest != check.expected:
            check.status, check.actual, check.reason = FAILED, digest, "checksum mismatch"
        else:
            check.actual = digest
    return VerifyResult(str(manifest), root, checks, parsed.malformed, sorted(parsed.formats), time.perf_counter() - started)


# --- published tables keyed by model name, matched by digest ------------------------------------
#
# Releases such as Chinese-LLaMA-Alpaca publish SHA256.md tables whose rows are model names
# ("| Chinese-Alpaca-7B | fbfc… |", "| 13B | 01 | d5cc… |"), one digest per shard joined by <br/>,
# TBA or - where nothing is published yet, and the file kind only in a heading or column title.
# No row names a file, so a downloaded file is identified by its digest instead.

PLACEHOLDERS = {"", "-", "--", "—", "tba", "tbd", "n/a", "na", "todo"}
_BREAK = re.compile(r"<br\s*/?>", re.I)
_FILE_KIND = re.compile(r"[\w.*-]*\.(?:pth|bin|safetensors|zip|model|gguf|json|tar\.gz|7z)\b", re.I)
_FILE_LIKE = re.compile(r"^[^\s|]*[^\s|.]\.[A-Za-z0-9]{1,12}$")
_PARTS_TITLE = re.compile(r"^(parts?|shards?)$", re.I)
MATCH, NO_MATCH = "MATCH", "NO MATCH"


@dataclass
class PublishedEntry:
    """One published digest: its row label, the file kind the table covers, its part or place in a multi-digest cell."""

    line: int
    label: str
    kind: str | None
    heading: str
    digest: str
    algorithm: str
    part: str | None = None
    index: int = 1
    count: int = 1

    def describe(self) -> str:
        words = [self.label] + ([self.kind] if self.kind else []) + ([f"part {self.part}"] if self.part else [])
        if self.count > 1:
            words.append(f"file {self.index} of {self.count}")
        return ", ".join(words) + (f" [{self.heading}]" if self.heading else "")

    def to_dict(self) -> dict:
        return {"label": self.label, "kind": self.kind, "part": self.part, "heading": self.heading, "index": self.index, "count": self.count,
                "line": self.line, "algorithm": self.algorithm, "digest": self.digest, "description": self.describe()}


@dataclass
class PublishedTables:
    entries: list[PublishedEntry] = field(default_factory=list)
    placeholders: list[PublishedEntry] = field(default_factory=list)  # rows published as TBA / - (no digest)

    @property
    def name_keyed(self) -> bool:
        """Whether some row names a model rather than a file (then only digests can tell which file is which)."""
        return any(not _FILE_LIKE.match(entry.label) for entry in self.entries + self.placeholders)


def _heading_text(line: str) -> str:
    return line.lstrip("#").strip().strip("*_` ").strip()


def _kind(*texts: str) -> str | None:
    for text in texts:
        found = _FILE_KIND.search(text or "")
        if found:
            return found.group(0)
    return None


def parse_published_tables(text: str) -> PublishedTables:
    """Rows of the Markdown tables in ``text`` whose digest columns are not titled by a file name."""
    tables = PublishedTables()
    heading, in_table = "", False
    header: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped.startswith("|"):
            in_table, header = False, []
            if stripped.startswith("#"):
                heading = _heading_text(stripped)
            continue
        cells = _table_cells(stripped)
        if not in_table:
            in_table, header = True, cells
            continue
        if all(_TABLE_RULE.match(c) or not c for c in cells):
            continue
        values = [[v.strip().strip("`*_ ") for v in _BREAK.split(cell)] for cell in cells]
        digests = [i for i, parts in enumerate(values) if all(_is_digest(v) for v in parts)]
        parts_column = next((i for i, title in enumerate(header) if _PARTS_TITLE.match(title)), None)
        spare = [i for i in range(len(cells)) if i not in digests and i != parts_column]
        placeholder_columns = [i for i in spare[1:] if cells[i].lower() in PLACEHOLDERS]
        if not spare or cells[spare[0]].lower() in PLACEHOLDERS:
            continue
        label_column = spare[0]
        titles = header + [""] * (len(cells) - len(header))  # a column's title; "" past the header's end
        if any(_FILE_LIKE.match(titles[i]) for i in digests):
            continue  # a column per file ("| | tokenizer.model | adapter_model.bin |"): parse_manifest names those
        part = cells[parts_column] if parts_column is not None and parts_column < len(cells) else None
        label = cells[label_column]
        for column in digests:
            kind = _kind(titles[column], titles[label_column], heading)
            for index, digest in enumerate(values[column], start=1):
                algorithm = ALGORITHM_BY_HEX_LENGTH[len(digest)]
                tables.entries.append(PublishedEntry(number, label, kind, heading, digest.lower(), algorithm, part, index, len(values[column])))
        for column in placeholder_columns if not digests else []:
            tables.placeholders.append(PublishedEntry(number, label, _kind(titles[column], titles[label_column], heading), heading, "", "", part))
    return tables


@dataclass
class FileMatch:
    path: str
    status: str
    digests: dict[str, str]
    matches: list[PublishedEntry] = field(default_factory=list)
    reason: str | None = None


@dataclass
class MatchResult:
    manifest: str
    files: list[FileMatch]
    entries: int
    placeholders: list[PublishedEntry]
    seconds: float

    @property
    def passed(self) -> bool:
        return bool(self.files) and all(f.status == MATCH for f in self.files)

    def to_dict(self) -> dict:
        """The JSON shape of ``checksum verify`` against a name-keyed published table."""
        return {
            "manifest": self.manifest,
            "mode": "match-by-digest",
            "passed": self.passed,
            "matched": sum(1 for f in self.files if f.status == MATCH),
            "unmatched": sum(1 for f in self.files if f.status != MATCH),
            "published_digests": self.entries,
            "not_yet_published": [{"label": e.label, "kind": e.kind, "part": e.part, "line": e.line} for e in self.placeholders],
            "files": [
                {"path": f.path, "status": f.status, "digests": f.digests, "reason": f.reason, "matches": [m.to_dict() for m in f.matches]}
                for f in self.files
            ],
            "seconds": round(self.seconds, 3),
        }


def match_published(
    manifest: Path | str,
    files: Sequence[Path] = (),
    *,
    root: Path | None = None,
    jobs: int | None = None,
    progress: Progress = NULL_PROGRESS,
) -> MatchResult:
    """Tell for each file which published entry its digest is, or that none is.

    ``files`` (files or folders) are checked; without them, every file under ``root`` (default: the
    manifest's folder), the manifest itself left out. Rows of any manifest format count; a name-keyed
    table's rows are described by label, file kind, part and place in a multi-digest cell.
    """
    text = read_manifest_text(manifest)
    tables = parse_published_tables(text)
    entries = list(tables.entries)
    for listed in parse_manifest(text).entries:  # file-keyed lines and tables: the label is the listed path
        if not any(e.digest == listed.digest for e in entries):
            entries.append(PublishedEntry(listed.line, listed.path, None, "", listed.digest, listed.algorithm))
    if not entries:
        raise UsageError(f"{manifest}: no published digest in it (only placeholders such as TBA or -)" if tables.placeholders else f"{manifest}: no checksum in it")
    if files:
        targets = collect_files(files)
    else:
        if root is None:
            root = Path(".") if str(manifest) == "-" else Path(manifest).parent
        if not root.is_dir():
            raise UsageError(f"--root {root} is not a directory")
        targets = collect_files([root], exclude=[Path(manifest)] if str(manifest) != "-" else [])
        if not targets:
            raise UsageError(f"{root} holds no files to check against {manifest}")
    started = time.perf_counter()
    algorithms = sorted({e.algorithm for e in entries})
    digests = hash_files([(path, algo) for path in targets for algo in algorithms], jobs=jobs, progress=progress, description="verifying")
    by_digest: dict[str, list[PublishedEntry]] = {}
    for entry in entries:
        by_digest.setdefault(entry.digest, []).append(entry)
    results = []
    for path in targets:
        hashed = {algo: digests[(path, algo)] for algo in algorithms}
        error = next((d for d in hashed.values() if isinstance(d, OSError)), None)
        shown = path.relative_to(root).as_posix() if not files and root is not None else str(path)
        if error is not None:
            results.append(FileMatch(shown, NO_MATCH, {}, reason=f"cannot read: {describe_os_error(error)}"))
            continue
        found = {algo: digest for algo, digest in hashed.items() if isinstance(digest, str)}  # all of them: none failed
        matches = [e for algo, digest in found.items() for e in by_digest.get(digest, []) if e.algorithm == algo]
        status = MATCH if matches else NO_MATCH
        results.append(FileMatch(shown, status, dict(found), matches, None if matches else "no published digest matches"))
    return MatchResult(str(manifest), results, len(entries), tables.placeholders, time.perf_counter() - started)


def is_name_keyed(manifest: Path | str) -> bool:
    """Whether a manifest file holds a table keyed by model names (checked by digest, :func:`match_published`)."""
    path = Path(manifest)
    if str(manifest) == "-" or not path.is_file():
        return False
    try:
        return parse_published_tables(read_manifest_text(path)).name_keyed
    except UsageError:
        return False
