"""``vocab train``: a SentencePiece vocabulary for Chinese, trained with LLaMA's settings so it merges cleanly."""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional

from cnllm.core.atomic import atomic_file, check_output
from cnllm.core.config import OptionError, coerce_fields
from cnllm.core.corpus import CorpusStats, corpus_files, iter_documents
from cnllm.core.errors import UsageError
from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.tokenizers.spm import load_proto, train_spm

MIN_CHARACTER_COVERAGE = 0.98
MAX_VOCAB_SIZE = 1 << 20  # 1M pieces, ten times the largest LLaMA-family vocabulary


@dataclass
class TrainVocabOptions:
    """SentencePiece settings of :func:`train_vocab` (``cnllm vocab train`` flags; a recipe's vocab step)."""

    vocab_size: int = 20000
    model_type: Literal["bpe", "unigram"] = "bpe"
    character_coverage: float = 0.9995
    input_sentence_size: int = 0  # 0: every line
    threads: Optional[int] = None  # None: every CPU

    def __post_init__(self) -> None:
        coerce_fields(self)

    def validate(self) -> None:
        if not 8 <= self.vocab_size <= MAX_VOCAB_SIZE:
            raise OptionError("{vocab_size} must be between 8 and {maximum}, got {value}", maximum=MAX_VOCAB_SIZE, value=self.vocab_size)
        if not MIN_CHARACTER_COVERAGE <= self.character_coverage <= 1.0:  # SentencePiece's own bound, checked before it runs
            raise OptionError("{character_coverage} must be between {minimum} and 1, got {value}", minimum=MIN_CHARACTER_COVERAGE, value=self.character_coverage)
        if 0 < self.input_sentence_size <= 100 or self.input_sentence_size < 0:
            raise UsageError("--input-sentence-size must be 0 (use every line) or more than 100")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")


@dataclass
class TrainResult:
    output: Path
    pieces: int
    model_type: str
    seconds: float
    corpus: CorpusStats

    def to_dict(self) -> dict:
        """The one JSON shape of a vocabulary training: ``--json``, the provenance record and the pipeline report."""
        return {
            "output": str(self.output),
            "pieces": self.pieces,
            "model_type": self.model_type,
            "seconds": round(self.seconds, 3),
            "corpus": {k: v for k, v in vars(self.corpus).items() if k != "skipped_files"},
        }


def _counted(documents: Iterator[str], progress: Progress) -> Iterator[str]:
    for document in documents:
        progress.advance(len(document.encode("utf-8")) + 1)
        yield document


def train_vocab(
    corpus: Iterable[Path | str],
    output: Path | str,
    options: TrainVocabOptions | None = None,
    *,
    force: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> TrainResult:
    """Train on every text/JSONL file given (directories walked) and write ``output`` atomically,
    its provenance record beside it (``output.cnllm.json``)."""
    from cnllm.core.provenance import write_file_record

    output = Path(output)
    options = options or TrainVocabOptions()
    options.validate()
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
            vocab_size=options.vocab_size,
            model_type=options.model_type,
            character_coverage=options.character_coverage,
            input_sentence_size=options.input_sentence_size,
            threads=options.threads or os.cpu_count() or 1,
        )
    finally:
        progress.finish()
    with atomic_file(output, force=force) as handle:
        handle.write(model)
    pieces = len(load_proto(output).pieces)
    result = TrainResult(output, pieces, options.model_type, time.perf_counter() - started, stats)
    write_file_record(output, "vocab-train", inputs=files, options=dataclasses.asdict(options), results=result.to_dict())
    return result
