"""Perplexity of text files on any model :mod:`.models` can load.

Each file is tokenised whole (with the model's BOS) and cut into windows of ``ctx`` tokens:

* default — non-overlapping windows; every token but the first of each window is scored;
* ``stride`` — sliding windows advancing ``stride`` tokens, each scoring only tokens not scored before, so every
  scored token sees at least ``ctx - stride`` tokens of context (the Hugging Face perplexity recipe);
* ``llamacpp_compatible`` — llama.cpp's ``perplexity`` tool: only whole chunks of ``ctx`` tokens, the first token
  of each replaced by BOS, and only the second half of each chunk scored; figures match that tool's.

Bits per character (and per byte) divide the scored tokens' negative log-likelihood (in bits) by the characters
(UTF-8 bytes) those tokens stand for: unlike perplexity per token, they compare models whose tokenizers differ,
such as a base model and the same model with a merged Chinese vocabulary. They are the headline figures.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from cnllm.core.backends import load_model
from cnllm.core.config import coerce_fields
from cnllm.core.corpus import CorpusStats, iter_documents
from cnllm.core.errors import UsageError
from cnllm.core.generation.base import LoadedModel, LoadOptions
from cnllm.core.progress import NULL_PROGRESS, Progress


@dataclass(frozen=True)
class PplOptions:
    ctx: int = 512
    stride: int | None = None
    llamacpp_compatible: bool = False
    batch_size: int = 1

    def __post_init__(self) -> None:
        coerce_fields(self)

    def validate(self) -> None:
        if self.ctx < 2:
            raise UsageError(f"--ctx must be at least 2, got {self.ctx}")
        if self.stride is not None and not 1 <= self.stride <= self.ctx:
            raise UsageError(f"--stride must be between 1 and --ctx ({self.ctx}), got {self.stride}")
        if self.stride is not None and self.llamacpp_compatible:
            raise UsageError("--stride and --llamacpp-compatible exclude each other (llama.cpp scores fixed chunks)")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class Window:
    """Tokens ``start:end`` are run through the model; positions ``first`` … of the window are scored."""

    start: int
    end: int
    first: int


@dataclass
class TextScore:
    path: str
    tokens: int = 0
    windows: int = 0
    tokens_scored: int = 0
    tokens_evaluated: int = 0
    bytes_scored: int = 0
    chars_scored: int = 0
    nll_sum: float = 0.0
    seconds: float = 0.0

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens_scored

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll_sum / math.log(2) / self.bytes_scored if self.bytes_scored else None

    @property
    def bits_per_char(self) -> float | None:
        return self.nll_sum / math.log(2) / self.chars_scored if self.chars_scored else None

    @property
    def chars_per_token(self) -> float | None:
        return self.chars_scored / self.tokens_scored if self.tokens_scored else None

    @property
    def tokens_per_second(self) -> float | None:
        """Tokens run through the model (context included) per second of scoring."""
        return self.tokens_evaluated / self.seconds if self.seconds > 0 else None

    def add(self, other: "TextScore") -> None:
        for name in ("tokens", "windows", "tokens_scored", "tokens_evaluated", "bytes_scored", "chars_scored", "nll_sum", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "tokens": self.tokens,
            "windows": self.windows,
            "tokens_scored": self.tokens_scored,
            "mean_nll": self.mean_nll,
            "ppl": self.ppl,
            "bits_per_char": self.bits_per_char,
            "bits_per_byte": self.bits_per_byte,
            "chars_per_token": self.chars_per_token,
            "chars_scored": self.chars_scored,
            "bytes_scored": self.bytes_scored,
            "tokens_evaluated": self.tokens_evaluated,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": self.tokens_per_second,
        }


@dataclass
class PplResult:
    model: dict
    options: PplOptions
    files: list[TextScore] = field(default_factory=list)

    @property
    def total(self) -> TextScore:
        total = TextScore("total")
        for score in self.files:
            total.add(score)
        return total

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "settings": {
                "ctx": self.options.ctx,
                "stride": self.options.stride,
                "llamacpp_compatible": self.options.llamacpp_compatible,
                "batch_size": self.options.batch_size,
            },
            "files": [f.to_dict() for f in self.files],
            "total": self.total.to_dict(),
        }


def read_text(path: Path, progress: Progress = NULL_PROGRESS) -> str:
    """A plain file as it is (like llama.cpp reads it); a ``.jsonl`` file's ``text`` fields joined by blank lines."""
    if not path.is_file():
        raise UsageError(f"text file {path} does not exist")
    if path.suffix.lower() == ".jsonl":
        stats = CorpusStats()
        text = "\n\n".join(iter_documents([path], stats))
        skipped = stats.invalid_json_lines + stats.invalid_utf8_lines
        if skipped:
            progress.log(f"{path}: skipped {skipped} lines without a JSON string 'text' field or not valid UTF-8")
    else:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{path} is not valid UTF-8 (byte {exc.start}); convert it first") from None
    if not text.strip():
        raise UsageError(f"{path} has no text to score")
    return text


def plan_windows(n_tokens: int, options: PplOptions) -> list[Window]:
    ctx = options.ctx
    if options.llamacpp_compatible:
        # llama.cpp's perplexity: whole chunks only; logits from position ctx/2 on predict tokens ctx/2+1 … ctx-1.
        return [Window(i * ctx, (i + 1) * ctx, ctx // 2 + 1) for i in range(n_tokens // ctx)]
    if options.stride is None:
        return [Window(start, min(start + ctx, n_tokens), 1) for start in range(0, n_tokens, ctx) if n_tokens - start >= 2]
    windows, scored_until = [], 0
    for start in range(0, n_tokens, options.stride):
        end = min(start + ctx, n_tokens)
        first = max(1, scored_until - start)
        if end - start > first:
            windows.append(Window(start, end, first))
        scored_until = end
        if end == n_tokens:
            break
    return windows


def _batches(windows: Sequence[Window], size: int) -> list[list[Window]]:
    """Consecutive windows of the same shape, at most ``size`` at a time."""
    batches: list[list[Window]] = []
    for window in windows:
        last = batches[-1] if batches else None
        if last and len(last) < size and (last[0].end - last[0].start, last[0].first) == (window.end - window.start, window.first):
            last.append(window)
        else:
            batches.append([window])
    return batches


def score_text(model: LoadedModel, text: str, options: PplOptions, *, name: str, progress: Progress = NULL_PROGRESS) -> TextScore:
    ids, sizes, chars = model.tokenize_with_lengths(text)
    score = TextScore(name, tokens=len(ids))
    windows = plan_windows(len(ids), options)
    if not windows:
        need = options.ctx if options.llamacpp_compatible else 2
        raise UsageError(f"{name} has {len(ids)} tokens; at least {need} are needed with --ctx {options.ctx}")
    progress.start(len(windows), f"perplexity {Path(name).name}", unit="window")
    started = time.perf_counter()
    try:
        for batch in _batches(windows, options.batch_size):
            tokens = [list(ids[w.start : w.end]) for w in batch]
            if options.llamacpp_compatible and model.bos_id is not None:
                for row in tokens:
                    row[0] = model.bos_id
            first = batch[0].first
            for window, logprobs in zip(batch, model.target_logprobs(tokens, first)):
                score.nll_sum -= float(logprobs.sum())
                score.tokens_scored += len(logprobs)
                score.tokens_evaluated += window.end - window.start
                score.bytes_scored += sum(sizes[window.start + first : window.end])
                score.chars_scored += sum(chars[window.start + first : window.end])
                score.windows += 1
            progress.advance(len(batch), ppl=score.ppl)
    finally:
        progress.finish()
    score.seconds = time.perf_counter() - started
    return score


def evaluate_perplexity(
    model: Path, files: Sequence[Path], options: PplOptions, load_options: LoadOptions | None = None, *, progress: Progress = NULL_PROGRESS
) -> PplResult:
    """Perplexity of each file (and of all together); every input is read and checked before the model loads."""
    options.validate()
    if not files:
        raise UsageError("no text files given (--data FILE)")
    texts = [(Path(f), read_text(Path(f), progress)) for f in files]
    with load_model(model, replace(load_options or LoadOptions(), n_ctx=options.ctx)) as loaded:
        result = PplResult(loaded.describe(), options)
        for path, text in texts:
            result.files.append(score_text(loaded, text, options, name=str(path), progress=progress))
    return result


@dataclass
class PplSweep:
    """Perplexity at several context sizes (one model load each: llama.cpp contexts and rope scaling depend on it)."""

    results: list[PplResult]

    @property
    def contexts(self) -> list[int]:
        return [r.options.ctx for r in self.results]

    @property
    def trained_context(self) -> int | None:
        return self.results[0].model.get("trained_context") if self.results else None

    def to_dict(self) -> dict:
        first = self.results[0].to_dict()
        return {
            "model": {k: v for k, v in first["model"].items() if k != "n_ctx"},
            "settings": {**first["settings"], "ctx": self.contexts},
            "contexts": [{"ctx": r.options.ctx, "files": [f.to_dict() for f in r.files], "total": r.total.to_dict()} for r in self.results],
        }


def evaluate_perplexity_sweep(
    model: Path,
    files: Sequence[Path],
    options: PplOptions,
    contexts: Sequence[int],
    load_options: LoadOptions | None = None,
    *,
    progress: Progress = NULL_PROGRESS,
) -> PplSweep:
    """Perplexity of ``files`` at each of ``contexts`` (the classic perplexity-vs-context-length curve)."""
    if not contexts:
        raise UsageError("no context sizes given (--ctx N)")
    for ctx in contexts:
        replace(options, ctx=ctx).validate()
    return PplSweep([evaluate_perplexity(model, files, replace(options, ctx=ctx), load_options, progress=progress) for ctx in sorted(set(contexts))])


def plot_sweep(sweep: PplSweep, path: Path, *, force: bool = False) -> None:
    """Perplexity against context length, one line per file (and the total), the trained context marked."""
    from cnllm.core.evaluation.plots import plot_lines

    names = [Path(f.path).name for f in sweep.results[0].files]
    series = {name: [r.files[i].ppl for r in sweep.results] for i, name in enumerate(names)}
    if len(names) > 1:
        series["total"] = [r.total.ppl for r in sweep.results]
    rope = sweep.results[0].model.get("rope") or {}
    method = rope.get("scaling") or "model's own rope"
    trained = sweep.trained_context
    plot_lines(
        path,
        sweep.contexts,
        series,
        title=f"perplexity by context: {Path(sweep.results[0].model['path']).name} ({method})",
        xlabel="context (tokens)",
        ylabel="perplexity",
        marker_x=trained,
        marker_label=f"trained context {trained}" if trained else "",
        log_y=True,
        force=force,
    )


def write_sweep_report(sweep: PplSweep, path: Path, *, force: bool = False) -> None:
    """The sweep as JSON at ``path`` with its provenance record beside it."""
    import json

    from cnllm.core.atomic import write_text
    from cnllm.core.provenance import write_file_record

    document = sweep.to_dict()
    write_text(path, json.dumps(document, ensure_ascii=False, indent=2) + "\n", force=force)
    totals = {str(c["ctx"]): c["total"] for c in document["contexts"]}
    inputs = [f.path for f in sweep.results[0].files]
    write_file_record(path, "eval-ppl", inputs=inputs, options={"model": document["model"], **document["settings"]}, results=totals)


def write_report(result: PplResult, path: Path, *, force: bool = False) -> None:
    """The result as JSON at ``path`` (atomically) with its provenance record beside it (``path.cnllm.json``)."""
    import json

    from cnllm.core.atomic import write_text
    from cnllm.core.provenance import write_file_record

    document = result.to_dict()
    write_text(path, json.dumps(document, ensure_ascii=False, indent=2) + "\n", force=force)
    # the model is named, not hashed (as eval mc): hashing gigabytes would dwarf a quick evaluation
    write_file_record(path, "eval-ppl", inputs=[f.path for f in result.files], options={"model": result.model, **document["settings"]}, results=document["total"])
