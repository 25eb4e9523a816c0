"""``vocab merge``: extend a LLaMA tokenizer with new Chinese pieces and write a Hugging Face directory.

SentencePiece bases get the established method (append every piece of ADD the base lacks, in
ADD's order, as a normal piece; the base's pieces, ids, scores, normalizer and trainer spec stay
untouched), with one change by default: new pieces get distinct scores above every base piece,
decreasing in ADD's order, so the exported ``tokenizer.json`` (merges ranked by score) and
sentencepiece break no ties differently. ``scores="zero"`` reproduces the published file.
Byte-level BPE bases (Llama-3) are extended by :mod:`cnllm.core.tokenizers.bpe`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Iterable, Literal, Optional, Sequence

from cnllm.core.atomic import atomic_dir, check_output
from cnllm.core.config import coerce_fields
from cnllm.core.errors import UsageError
from cnllm.core.files import read_json_object
from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.provenance import write_record
from cnllm.core.tokenizers import sources
from cnllm.core.tokenizers.hf_export import write_spm_tokenizer_dir
from cnllm.core.tokenizers.sources import PAD_PIECE, padded_size, spm_candidates
from cnllm.core.tokenizers.spm import (
    PIECE_CONTROL,
    PIECE_NORMAL,
    PIECE_UNUSED,
    PIECE_USER_DEFINED,
    model_proto_class,
)

SCORES_RANKED: Final = "ranked"
SCORES_ZERO: Final = "zero"
SPM_TYPE_BPE = 2
ZERO_SCORES_WARNING = (
    "--scores zero gives every new piece score 0 (the published method): sentencepiece then breaks ties by "
    "position while tokenizer.json breaks them by merge rank, so the two can tokenise Chinese text differently; "
    "use the default --scores ranked unless you must reproduce a published file"
)


@dataclass
class SourceCount:
    path: str
    kind: str
    candidates: int
    added: int


@dataclass
class MergeVocabOptions:
    """How :func:`merge_vocab` extends the base (``cnllm vocab merge`` flags; a recipe's vocab step)."""

    scores: Literal["ranked", "zero"] = SCORES_RANKED
    add_pad_token: bool = False
    pad_to_multiple_of: Optional[int] = None

    def __post_init__(self) -> None:
        coerce_fields(self)

    def validate(self) -> None:
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise UsageError("--pad-to-multiple-of must be a positive integer")


@dataclass
class MergeResult:
    output: Path
    family: str
    base_size: int
    final_size: int
    added: int
    already_present: int
    skipped: int
    padding: int
    pad_token_id: int | None
    scores: str
    seconds: float
    sources: list[SourceCount] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unreachable: int = 0  # BPE: offered tokens that could not get merges (not added)
    unproducible: int = 0  # SentencePiece: new pieces that no text can produce (kept, as the published method keeps them)

    def to_dict(self) -> dict:
        """The one JSON shape of a vocabulary merge: ``--json``, the provenance record and the pipeline report."""
        return {
            "output": str(self.output),
            "family": self.family,
            "base_size": self.base_size,
            "final_size": self.final_size,
            "added": self.added,
            "already_present": self.already_present,
            "skipped": self.skipped,
            "unreachable": self.unreachable,
            "unproducible": self.unproducible,
            "padding": self.padding,
            "pad_token_id": self.pad_token_id,
            "scores": self.scores,
            "sources": [vars(s) for s in self.sources],
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


def unused_names(taken: set[str], count: int) -> list[str]:
    """``count`` names for padding pieces that no text can produce: absent from ``taken`` and not
    splittable into two existing pieces (so no BPE merge can ever form them)."""
    names: list[str] = []
    index = 0
    while len(names) < count:
        name = f"<unused{index}>"
        index += 1
        formable = any(name[:cut] in taken and name[cut:] in taken for cut in range(1, len(name)))
        if name not in taken and not formable:
            names.append(name)
            taken.add(name)
    return names


def unproducible_count(proto, start: int) -> int:
    """How many pieces from id ``start`` on no text can produce: BPE starts from characters and only
    joins two pieces into a piece, so a longer piece needs a split into two producible pieces.
    (A unigram ADD has such pieces; they are kept, as the published method keeps them.)"""
    mergeable = sorted((p.piece for p in proto.pieces if p.type in (PIECE_NORMAL, PIECE_USER_DEFINED)), key=len)
    producible: set[str] = set()
    for piece in mergeable:
        if len(piece) == 1 or any(piece[:cut] in producible and piece[cut:] in producible for cut in range(1, len(piece))):
            producible.add(piece)
    return sum(1 for p in proto.pieces[start:] if p.type == PIECE_NORMAL and p.piece not in producible)


def extend_spm(
    base,
    adds: Sequence[sources.TokenizerSource],
    *,
    scores: str = SCORES_RANKED,
    add_pad_token: bool = False,
    pad_to_multiple_of: int | None = None,
):
    """A copy of the ModelProto ``base`` with ADD's missing pieces appended; returns (proto, counts).

    Ids: base pieces, then ``<pad>`` (if asked and absent), then new pieces in ADD order, then
    unused padding pieces up to a multiple of ``pad_to_multiple_of``.
    """
    proto = model_proto_class()()
    proto.CopyFrom(base)
    taken = {p.piece for p in proto.pieces}
    pad_id = None
    if add_pad_token:
        if PAD_PIECE in taken:
            pad_id = next(i for i, p in enumerate(proto.pieces) if p.piece == PAD_PIECE)
        else:
            proto.pieces.add(piece=PAD_PIECE, score=0.0, type=PIECE_CONTROL)
            taken.add(PAD_PIECE)
            pad_id = len(proto.pieces) - 1
    new: list[str] = []
    counts: list[SourceCount] = []
    already = skipped = 0
    for source in adds:
        candidates, not_mergeable = spm_candidates(source)
        skipped += not_mergeable
        before = len(new)
        for piece in candidates:
            if piece in taken:
                already += 1
                continue
            taken.add(piece)
            new.append(piece)
        # Then the characters of its new pieces that neither base nor ADD has (a word list's):
        # sentencepiece joins any two symbols, but tokenizer.json spells a character it lacks as
        # bytes, so a piece over a missing character would be reachable in only one of them.
        missing = dict.fromkeys(char for piece in new[before:] for char in piece if char not in taken)
        taken.update(missing)
        new.extend(missing)
        counts.append(SourceCount(str(source.path), source.kind, len(candidates), len(new) - before))
    top = math.floor(max(p.score for p in base.pieces)) + len(new)
    for rank, piece in enumerate(new):
        # type left unset (NORMAL by default), as the published script does: --scores zero is byte-identical.
        proto.pieces.add(piece=piece, score=0.0 if scores == SCORES_ZERO else float(top - rank))
    padding = padded_size(len(proto.pieces), pad_to_multiple_of) - len(proto.pieces)
    for name in unused_names(taken, padding):
        proto.pieces.add(piece=name, score=0.0, type=PIECE_UNUSED)
    return proto, dict(new=len(new), already=already, skipped=skipped, padding=padding, pad_id=pad_id, sources=counts)


def _base_config(directory: Path | None) -> dict:
    path = directory / "tokenizer_config.json" if directory else None
    return read_json_object(path) if path is not None and path.is_file() else {}


def _write_spm_output(proto, tmp: Path, base: sources.TokenizerSource) -> None:
    config = _base_config(base.directory)
    max_length = config.get("model_max_length")
    write_spm_tokenizer_dir(
        proto,
        tmp,
        add_bos=config.get("add_bos_token", True),
        add_eos=config.get("add_eos_token", False),
        model_max_length=max_length if isinstance(max_length, int) else 4096,
        chat_template=config.get("chat_template") if isinstance(config.get("chat_template"), str) else None,
    )


def _check_spm_loads(proto) -> None:
    import sentencepiece as spm

    spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def merge_vocab(
    base_path: Path | str,
    add_paths: Iterable[Path | str],
    output: Path | str,
    options: MergeVocabOptions | None = None,
    *,
    force: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> MergeResult:
    """Merge every ADD into BASE and write OUTPUT as a complete Hugging Face tokenizer directory."""
    output = Path(output)
    add_paths = [Path(p) for p in add_paths]
    options = options or MergeVocabOptions()
    options.validate()
    scores, add_pad_token, pad_to_multiple_of = options.scores, options.add_pad_token, options.pad_to_multiple_of
    if not add_paths:
        raise UsageError("give at least one --add model or word list")
    check_output(output, force, inputs=[base_path, *add_paths])
    started = time.perf_counter()
    base = sources.load_source(base_path)
    adds = [sources.load_source(path, allow_words=True) for path in add_paths]
    if base.kind == sources.BPE and scores == SCORES_ZERO:
        raise UsageError(f"--scores applies to SentencePiece bases; {base.path} is a BPE tokenizer.json (its new merges rank after the base's)")
    if base.kind == sources.SPM:
        result = _merge_into_spm(base, adds, output, scores, add_pad_token, pad_to_multiple_of, force)
    else:
        result = _merge_into_bpe(base, adds, output, add_pad_token, pad_to_multiple_of, force, progress)
    result.seconds = time.perf_counter() - started
    if scores == SCORES_ZERO and base.kind == sources.SPM:
        result.warnings.append(ZERO_SCORES_WARNING)
    return result


def _refuse_bpe_adds(base: sources.TokenizerSource, adds: Sequence[sources.TokenizerSource]) -> None:
    """ADD is a source of new pieces: a SentencePiece model or a word list, never a BPE tokenizer.json."""
    for add in adds:
        if add.kind == sources.BPE:
            into = f"the SentencePiece base {base.path}" if base.kind == sources.SPM else "a byte-level BPE base"
            raise UsageError(
                f"{add.path} is a BPE tokenizer.json and cannot be merged into {into}; give a SentencePiece model "
                "(train one with 'cnllm vocab train') or a word list as --add"
            )


def _merge_into_spm(base, adds, output, scores, add_pad_token, pad_to_multiple_of, force) -> MergeResult:
    if base.proto.trainer_spec.model_type != SPM_TYPE_BPE:
        raise UsageError(
            f"{base.path} is a non-BPE SentencePiece model; cnllm vocab merge extends BPE SentencePiece bases "
            "(LLaMA / LLaMA-2 style tokenizer.model)"
        )
    _refuse_bpe_adds(base, adds)
    proto, counts = extend_spm(base.proto, adds, scores=scores, add_pad_token=add_pad_token, pad_to_multiple_of=pad_to_multiple_of)
    _check_spm_loads(proto)
    result = MergeResult(
        output=output,
        family=sources.SPM,
        base_size=len(base.proto.pieces),
        final_size=len(proto.pieces),
        added=counts["new"],
        already_present=counts["already"],
        skipped=counts["skipped"],
        padding=counts["padding"],
        pad_token_id=counts["pad_id"],
        scores=scores,
        seconds=0.0,
        sources=counts["sources"],
        unproducible=unproducible_count(proto, len(base.proto.pieces)),
    )
    with atomic_dir(output, force=force) as tmp:
        _write_spm_output(proto, tmp, base)
        _record(tmp, base, adds, result, scores=scores, add_pad_token=add_pad_token, pad_to_multiple_of=pad_to_multiple_of)
    return result


def _merge_into_bpe(base, adds, output, add_pad_token, pad_to_multiple_of, force, progress: Progress) -> MergeResult:
    from cnllm.core.tokenizers import bpe

    if not sources.is_byte_level(base.spec):
        raise UsageError(
            f"{base.path} is not a byte-level BPE tokenizer.json; for a SentencePiece tokenizer give its tokenizer.model"
        )
    _refuse_bpe_adds(base, adds)
    extension = bpe.extend_byte_level(
        base.spec, adds, add_pad_token=add_pad_token, pad_to_multiple_of=pad_to_multiple_of, progress=progress
    )
    result = MergeResult(
        output=output,
        family=sources.BPE,
        base_size=extension.base_size,
        final_size=extension.final_size,
        added=extension.added,
        already_present=extension.already_present,
        skipped=extension.skipped,
        padding=extension.padding,
        pad_token_id=extension.pad_token_id,
        scores="merge-rank",
        seconds=0.0,
        sources=[SourceCount(str(s.path), s.kind, n, k) for s, (n, k) in zip(adds, extension.per_source)],
        unreachable=extension.unreachable,
    )
    with atomic_dir(output, force=force) as tmp:
        bpe.write_bpe_tokenizer_dir(extension, tmp, _base_config(base.directory), base.directory)
        _record(tmp, base, adds, result, add_pad_token=add_pad_token, pad_to_multiple_of=pad_to_multiple_of)
    return result


def _record(tmp: Path, base, adds, result: MergeResult, **options) -> None:
    write_record(
        tmp,
        "vocab",
        inputs=[base.path, *(a.path for a in adds)],
        options={"base": base.path, "add": [a.path for a in adds], "family": result.family, **options},
        results={k: v for k, v in result.to_dict().items() if k not in ("output", "seconds")},
    )
