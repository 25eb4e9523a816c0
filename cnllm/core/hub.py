"""Hugging Face model ids where a model path is expected: ``hfl/chinese-alpaca-2-7b`` → its cached snapshot.

Only the local cache is read (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else huggingface_hub's default),
through huggingface_hub with ``local_files_only``; an id that is not cached is a usage error naming the
cache, unless downloading was allowed (``cnllm --allow-download …``), which then goes through
``snapshot_download``, every request of which gives up after ``HF_HUB_DOWNLOAD_TIMEOUT`` seconds (default 30)
without an answer. A local path always wins over an id spelled the same.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cnllm.core.errors import UsageError

# org/name[@revision]: what the Hub accepts as a model repo id (one slash, no leading dot or dash).
REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w./-]+))?$")


def looks_like_repo_id(text: str) -> bool:
    return bool(REPO_ID.match(text)) and ".." not in text and not text.endswith((".", "-"))


def cache_dir() -> Path:
    """The hub cache huggingface_hub would use now (read from the environment at call time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


DEFAULT_DOWNLOAD_TIMEOUT = 30.0


def download_timeout() -> float:
    """Seconds a Hub request may wait for an answer: ``HF_HUB_DOWNLOAD_TIMEOUT`` (huggingface_hub's own variable), else 30."""
    try:
        value = float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT") or DEFAULT_DOWNLOAD_TIMEOUT)
    except ValueError:
        raise UsageError(f"HF_HUB_DOWNLOAD_TIMEOUT must be a number of seconds, not {os.environ['HF_HUB_DOWNLOAD_TIMEOUT']!r}") from None
    return value if value > 0 else DEFAULT_DOWNLOAD_TIMEOUT


def _bound_timeouts(request) -> None:
    """An httpx request hook: every timeout the request leaves unset (``None``: wait forever) becomes
    :func:`download_timeout`. huggingface_hub asks for no timeout on some calls (``repo_info``)."""
    seconds = download_timeout()
    asked = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {kind: asked.get(kind) or seconds for kind in ("connect", "read", "write", "pool")}


def _download(repo: str, revision: str | None, cache: Path) -> str:
    from huggingface_hub import get_session, snapshot_download

    hooks = getattr(get_session(), "event_hooks", None)  # httpx clients (huggingface_hub 1.0 and later) have them
    if hooks is not None and _bound_timeouts not in hooks.get("request", []):
        hooks.setdefault("request", []).append(_bound_timeouts)
    return snapshot_download(repo, revision=revision, cache_dir=cache, etag_timeout=download_timeout())


def _network_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's transport errors (no answer, connection refused), which are not OSErrors."""
    import importlib

    for client in ("httpx2", "httpx"):  # huggingface_hub's HTTP client, whichever of the two this release uses
        try:
            return (importlib.import_module(client).TransportError,)
        except ImportError:
            continue
    return ()


def _timed_out(exc: BaseException | None) -> bool:
    """Whether a request timing out caused ``exc`` (huggingface_hub wraps it in LocalEntryNotFoundError)."""
    while exc is not None:
        if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def resolve_model_id(text: str, *, allow_download: bool = False) -> Path:
    """The snapshot folder of the cached model ``text`` (``org/name`` or ``org/name@revision``)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    match = REPO_ID.match(text)
    if match is None:
        raise UsageError(f"{text} is not a Hugging Face model id (org/name)")
    repo, revision = match.group("repo"), match.group("revision")
    cache = cache_dir()
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        if not allow_download:
            raise UsageError(
                f"{text}: no such file or folder, and no model {repo}{'@' + revision if revision else ''} in the Hugging Face cache "
                f"({cache}); download it first (huggingface-cli download {repo}) or let cnllm do it: cnllm --allow-download …"
            ) from None
    failures: tuple[type[BaseException], ...] = (HfHubHTTPError, OSError, ValueError, *_network_errors())
    try:
        return Path(_download(repo, revision, cache))
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise UsageError(f"{text}: not found on the Hugging Face Hub ({str(exc).splitlines()[0]})") from None
    except failures as exc:
        if _timed_out(exc):
            raise UsageError(
                f"{text}: download from {constants.ENDPOINT} failed: no answer within {download_timeout():g} s "
                "(HF_HUB_DOWNLOAD_TIMEOUT sets the limit)"
            ) from None
        raise UsageError(f"{text}: download failed: {str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__}") from None
