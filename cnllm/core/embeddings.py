"""Embedding rows for the tokens a merged vocabulary adds: where they start decides what the model keeps.

A merged tokenizer keeps the base ids and appends new ones. The rows for the new ids are initialised by one of
:data:`INIT_METHODS`:

* ``subword-mean`` (the default; FVT, Gee et al. 2022): each new token's string is split by the *base* tokenizer's
  own model into base pieces, and its input (and, untied, output) row is the mean of those pieces' rows. The
  extended model then reads a new token roughly as the base read its pieces, so it starts where the base was.
* ``mean``: every new row is the mean of the base vocabulary's rows (what cnllm did before: it forgets what the
  base knew about the text those tokens stand for, and training has to relearn it).

Tokens with no meaningful decomposition — special tokens, and strings the base splits into nothing but unknown
tokens — start at the mean under either method, as do padding rows past the tokenizer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnllm.core.errors import UsageError
from cnllm.core.progress import NULL_PROGRESS, Progress

INIT_METHODS = ("subword-mean", "mean")
DEFAULT_INIT = "subword-mean"
# The help of --new-row-init (pt, sft, align, vocab extend-model) and of the recipe key.
NEW_ROW_INIT_HELP = (
    "How embedding rows for tokens the tokenizer adds start: subword-mean (the mean of the base pieces each new token "
    "splits into, so the model keeps what it knew) or mean (the mean of all rows)."
)


def check_init_method(name: str, *, where: str = "--new-row-init") -> None:
    if name not in INIT_METHODS:
        raise UsageError(f"{where} {name!r} is not one of {', '.join(INIT_METHODS)}")


@dataclass
class NewRows:
    """How the rows of ``tokenizer`` past the base vocabulary are filled.

    ``pieces`` maps each new id to the base ids its string splits into; ``fallback`` lists the new ids that start
    at the mean whatever the method (special tokens, empty decompositions), with ``reasons`` counting why."""

    base_size: int
    size: int
    pieces: dict[int, list[int]] = field(default_factory=dict)
    fallback: list[int] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def added(self) -> int:
        return self.size - self.base_size

    def to_dict(self) -> dict[str, Any]:
        lengths = [len(p) for p in self.pieces.values()]
        return {
            "base_tokens": self.base_size,
            "tokens": self.size,
            "added": self.added,
            "decomposed": len(self.pieces),
            "mean_pieces": round(sum(lengths) / len(lengths), 3) if lengths else None,
            "mean_fallback": dict(self.reasons),
        }


def _fast_model(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend.model if backend is not None else None


def check_extends(base_tokenizer, tokenizer, *, base_name: str, name: str) -> int:
    """The base vocabulary size, after checking that ``tokenizer`` keeps every base id with the same string."""
    base_vocab, vocab = base_tokenizer.get_vocab(), tokenizer.get_vocab()
    base_size, size = len(base_tokenizer), len(tokenizer)
    if size < base_size:
        raise UsageError(f"the tokenizer {name} has {size} tokens, fewer than the base tokenizer {base_name} ({base_size}): it does not extend it")
    by_id = {i: piece for piece, i in vocab.items()}
    for piece, i in base_vocab.items():
        if by_id.get(i) != piece:
            raise UsageError(
                f"the tokenizer {name} does not extend the base tokenizer {base_name}: id {i} is {by_id.get(i)!r} there but "
                f"{piece!r} in the base (a merged vocabulary keeps every base id; merge with `cnllm vocab merge --base` the model's own tokenizer)"
            )
    return base_size


def decompose_new_tokens(base_tokenizer, tokenizer, base_size: int) -> NewRows:
    """Split the string of every id from ``base_size`` on into base ids, as the base tokenizer would.

    A vocabulary piece is already in the tokenizer model's own alphabet (SentencePiece's ``▁`` for a word start,
    byte-level BPE's printable bytes), so it goes to the base tokenizer's *model* directly, past normalizer and
    pre-tokenizer, which would otherwise add a word-start marker or split it. Byte-fallback pieces (``<0xE4>``) map
    to the same byte piece of the base; a token added as text (``added_tokens``) is encoded as text."""
    from cnllm.core.tokenizers.inspect import BYTE_PIECE

    plan = NewRows(base_size, len(tokenizer))
    model = _fast_model(base_tokenizer)
    base_vocab = base_tokenizer.get_vocab()
    unknown = {base_tokenizer.unk_token_id} - {None}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items() if i >= base_size}
    for token_id in range(base_size, plan.size):
        if token_id in added and added[token_id].special:
            plan.fallback.append(token_id)
            plan.reasons["special"] = plan.reasons.get("special", 0) + 1
            continue
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if token_id in added:
            ids = base_tokenizer.encode(added[token_id].content, add_special_tokens=False)
        elif BYTE_PIECE.match(piece or ""):
            ids = [base_vocab[piece]] if piece in base_vocab else []
        elif model is not None:
            ids = [t.id for t in model.tokenize(piece)]
        else:  # a slow tokenizer: go through text
            ids = base_tokenizer.encode(tokenizer.convert_tokens_to_string([piece]), add_special_tokens=False)
        ids = [i for i in ids if i not in unknown and i < base_size]
        if ids:
            plan.pieces[token_id] = ids
        else:
            plan.fallback.append(token_id)
            plan.reasons["empty"] = plan.reasons.get("empty", 0) + 1
    return plan


def _embedding_layers(model) -> list:
    """The input embedding and, when it is a separate tensor, the output embedding."""
    layers = [model.get_input_embeddings()]
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != layers[0].weight.data_ptr():
        layers.append(head)
    return layers


def fill_new_rows(model, plan: NewRows, method: str) -> None:
    """Write the rows ``plan.base_size`` … of every embedding matrix (padding rows past the tokenizer too)."""
    import torch

    check_init_method(method)
    with torch.no_grad():
        for layer in _embedding_layers(model):
            weight = layer.weight
            base = weight[: plan.base_size].float()
            mean = base.mean(dim=0)
            rows = mean.expand(weight.shape[0] - plan.base_size, -1).clone()
            if method == "subword-mean":
                for token_id, ids in plan.pieces.items():
                    rows[token_id - plan.base_size] = base[ids].mean(dim=0)
            weight[plan.base_size :] = rows.to(weight.dtype)


def resize_and_fill(model, tokenizer, base_tokenizer, method: str, *, multiple: int, base_name: str = "the base model", name: str = "the tokenizer") -> tuple[int, int, NewRows | None]:
    """Grow the embeddings to ``tokenizer`` (padded to ``multiple``) and initialise every row past the base vocabulary.

    Returns (rows before, rows after, the plan; None when the tokenizer adds nothing). ``base_tokenizer`` is the
    model's own; rows a padded model had past its tokenizer count as new (they were never trained)."""
    old_rows = model.get_input_embeddings().weight.shape[0]
    base_size = check_extends(base_tokenizer, tokenizer, base_name=base_name, name=name) if base_tokenizer is not None else old_rows
    if base_size > old_rows:
        raise UsageError(f"the base tokenizer of {base_name} has {base_size} tokens but the model only {old_rows} embedding rows: they do not belong together")
    if len(tokenizer) <= base_size and len(tokenizer) <= old_rows:
        return old_rows, old_rows, None
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=multiple, mean_resizing=False)
    if method == "subword-mean" and base_tokenizer is not None:
        plan = decompose_new_tokens(base_tokenizer, tokenizer, base_size)
    else:
        why = "method mean" if method == "mean" else "no base tokenizer"
        plan = NewRows(base_size, len(tokenizer), fallback=list(range(base_size, len(tokenizer))), reasons={why: len(tokenizer) - base_size})
    fill_new_rows(model, plan, method)
    return old_rows, model.get_input_embeddings().weight.shape[0], plan


def load_base_tokenizer(model_dir: Path, method: str, *, trust_remote_code: bool = False):
    """The tokenizer saved with the base model, which new tokens are decomposed with and which the merged
    tokenizer must extend; None for ``mean`` on a model folder without one (its rows then count as the base)."""
    from cnllm.core.modelio import has_tokenizer, load_tokenizer

    if has_tokenizer(model_dir):
        return load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    if method == "mean":
        return None
    raise UsageError(
        f"the base model {model_dir} has no tokenizer (tokenizer.json or tokenizer.model): subword-mean initialisation splits "
        "each new token with the base tokenizer; put the model's own tokenizer there, or pass --new-row-init mean"
    )


@dataclass
class ExtendResult:
    output: Path
    method: str
    rows_before: int
    rows: int
    new_rows: dict[str, Any]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"output": str(self.output), "method": self.method, "rows_before": self.rows_before, "rows": self.rows,
                "new_rows": self.new_rows, "seconds": self.seconds}


def extend_model(
    model_dir: Path | str,
    tokenizer_dir: Path | str,
    output: Path | str,
    *,
    method: str = DEFAULT_INIT,
    multiple: int = 64,
    force: bool = False,
    trust_remote_code: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> ExtendResult:
    """The base model with its embeddings grown to ``tokenizer_dir`` and the new rows initialised, written as a
    Hugging Face model folder (in the dtype the base is stored in, safetensors, the merged tokenizer, provenance) without any
    training: step 0 of the adaptation, to evaluate, convert or chat with."""
    from cnllm.core.atomic import atomic_dir, check_output
    from cnllm.core.modelio import copy_missing_tokenizer_files, load_causal_lm, load_tokenizer
    from cnllm.core.provenance import write_record

    started = time.monotonic()
    model_dir, tokenizer_dir, output = Path(model_dir), Path(tokenizer_dir), Path(output)
    check_init_method(method)
    check_output(output, force, inputs=[model_dir, tokenizer_dir])
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    base_tokenizer = load_base_tokenizer(model_dir, method, trust_remote_code=trust_remote_code)
    progress.log(f"loading {model_dir}")
    model = load_causal_lm(model_dir, device="cpu", dtype="auto", trust_remote_code=trust_remote_code)  # written as stored
    rows_before, rows, plan = resize_and_fill(model, tokenizer, base_tokenizer, method, multiple=multiple, base_name=str(model_dir), name=str(tokenizer_dir))
    if plan is None:
        raise UsageError(f"the tokenizer {tokenizer_dir} adds no tokens to {model_dir}: there is nothing to extend")
    progress.log(f"{plan.added} new tokens: rows {rows_before} → {rows} ({method})")
    result = ExtendResult(output, method, rows_before, rows, plan.to_dict())
    with atomic_dir(output, force=force) as temporary:
        model.config.vocab_size = rows
        model.save_pretrained(str(temporary), safe_serialization=True)
        tokenizer.save_pretrained(str(temporary))
        copy_missing_tokenizer_files(tokenizer_dir, temporary)
        result.seconds = round(time.monotonic() - started, 2)
        write_record(temporary, "extend-model", inputs=[model_dir, tokenizer_dir], options={"new_row_init": method, "pad_to_multiple_of": multiple},
                     results=result.to_dict())
    return result
