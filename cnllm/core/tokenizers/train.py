"""``vocab train``: a SentencePiece vocabulary for Chinese, trained with LLaMA's settings so it merges cleanly."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from cnllm.core.atomic import atomic_file, check_output
from cnllm.core.corpus import CorpusStats, corpus_files, iter_documents
from cnllm.core.errors import UsageError
from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.tokenizers.spm import load_proto, train_spm

MODEL_TYPES = ("bpe", "unigram")


@dataclass
class TrainResult:
    output: Path
    pieces: int
    model_type: str
    seconds: float
    corpus: CorpusStats


def _counted(documents: Iterator[str], progress: Progress) -> Iterator[str]:
    for document in documents:
        progress.advance(len(document.encode("utf-8")) + 1)
        yield document


def train_vocab(
    corpus: Iterable[Path | str],
    output: Path | str,
    *,
    vocab_size: int = 20000,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    input_sentence_size: int = 0,
    threads: int | None = None,
    force: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> TrainResult:
    """Train on every text/JSONL file given (directories walked) and write ``output`` atomically."""
    output = Path(output)
    if model_type not in MODEL_TYPES:
        raise UsageError(f"--model-type must be one of {', '.join(MODEL_TYPES)}, not {model_type}")
    if vocab_size < 8:
        raise UsageError("--vocab-size must be at least 8")
    if not 0.0 < character_coverage <= 1.0:
        raise UsageError("--character-coverage must be in (0, 1]")
    if 0 < input_sentence_size <= 100:
        raise UsageError("--input-sentence-size must be 0 (use every line) or more than 100")
    corpus = list(corpus)
    check_output(output, force, inputs=corpus)
    files = corpus_files(corpus)
    if not files:
        raise UsageError("the corpus holds no text files (.txt, .jsonl, .md)")
    stats = CorpusStats()
    started = time.perf_counter()
    progress.start(sum(f.stat().st_size for f in files), "reading corpus", unit="B")
    documents = _counted(iter_documents(files, stats), progress)
    try:
        first = next(documents, None)
        if first is None:
            raise UsageError(f"the corpus ({', '.join(str(f) for f in files[:3])}{' …' if len(files) > 3 else ''}) has no text lines")
        model = train_spm(
            itertools.chain([first], documents),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            threads=threads or os.cpu_count() or 1,
        )
    finally:
        progress.finish()
    with atomic_file(output, force=force) as handle:
        handle.write(model)
    pieces = len(load_proto(output).pieces)
    return TrainResult(output, pieces, model_type, time.perf_counter() - started, stats)
