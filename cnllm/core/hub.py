"""Hugging Face model ids where a model path is expected: ``hfl/chinese-alpaca-2-7b`` → its cached snapshot.

Only the local cache is read (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else huggingface_hub's default),
through huggingface_hub with ``local_files_only``; an id that is not cached is a usage error naming the
cache, unless downloading was allowed (``cnllm --allow-download …``), which then goes through
``snapshot_download``. A local path always wins over an id spelled the same.
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


def _download(repo: str, revision: str | None, cache: Path) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo, revision=revision, cache_dir=cache)


def resolve_model_id(text: str, *, allow_download: bool = False) -> Path:
    """The snapshot folder of the cached model ``text`` (``org/name`` or ``org/name@revision``)."""
    from huggingface_hub import snapshot_download
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
    try:
        return Path(_download(repo, revision, cache))
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise UsageError(f"{text}: not found on the Hugging Face Hub ({str(exc).splitlines()[0]})") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise UsageError(f"{text}: download failed: {str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__}") from None
