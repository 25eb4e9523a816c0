"""Training data: pre-training blocks (tokenised once, cached on disk) and SFT conversations with loss masks.

pt: documents (text lines or JSONL ``text``) are tokenised with an EOS after each, concatenated and
cut into ``block_size`` blocks. The blocks are saved as a datasets/Arrow folder keyed by the data
files' contents, the tokenizer and the block size, so a second run starts training immediately.

sft: Alpaca records, ``messages`` conversations or ShareGPT ``conversations`` become messages,
the one renderer of core/templates.py turns them into segments, and only the assistant segments
are trainable: every other token is labelled -100.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from cnllm.core.atomic import atomic_dir
from cnllm.core.config import OptionError
from cnllm.core.corpus import CorpusStats, corpus_files, iter_documents
from cnllm.core.errors import UsageError
from cnllm.core.hashing import hash_file
from cnllm.core.templates import (
    AUTO,
    TEMPLATE_NAMES,
    TEMPLATES,
    Message,
    Segment,
    bos_needed,
    check_template_name,
    normalize_messages,
    resolve_template,
)

IGNORE_INDEX = -100
CACHE_FORMAT = 1
CACHE_STATS = "cnllm-corpus-stats.json"
UTF8_CHECK_BYTES = 1 << 20
TOKENIZE_BATCH = 1000


def default_cache_dir() -> Path:
    if os.environ.get("CNLLM_CACHE_DIR"):
        return Path(os.environ["CNLLM_CACHE_DIR"]) / "pt-blocks"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cnllm" / "pt-blocks"


def check_data_files(paths: Iterable[Path | str], *, what: str = "data") -> list[Path]:
    """The data files (directories walked); missing, empty or non-UTF-8 files are a usage error."""
    paths = list(paths)
    try:
        files = corpus_files(paths)
    except UsageError as exc:
        raise UsageError(exc.message.replace("corpus file", f"{what} file")) from None
    if not files:
        raise UsageError(f"no {what} files found in {', '.join(str(p) for p in paths)}")
    for path in files:
        if path.stat().st_size == 0:
            raise UsageError(f"{what} file {path} is empty")
        decoder = codecs.getincrementaldecoder("utf-8")()
        with open(path, "rb") as handle:
            head = handle.read(UTF8_CHECK_BYTES)
        try:
            decoder.decode(head, final=len(head) < UTF8_CHECK_BYTES)
        except UnicodeDecodeError as exc:
            line = head[: exc.start].count(b"\n") + 1
            raise UsageError(f"{what} file {path}:{line} is not UTF-8 text (byte {exc.start}); convert it with iconv first") from None
    return files


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything that changes token ids: the full tokenizer definition and the EOS id."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(f"eos={tokenizer.eos_token_id}".encode())
    return digest.hexdigest()


def pt_cache_key(files: list[Path], tokenizer, block_size: int) -> str:
    digest = hashlib.sha256(f"cnllm-pt-blocks/{CACHE_FORMAT}/block={block_size}/".encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    for path in files:
        digest.update(hash_file(path, "sha256").encode())
    return digest.hexdigest()[:32]


def iter_blocks(files: list[Path], tokenizer, block_size: int, stats: CorpusStats) -> Iterator[list[int]]:
    """Documents → ids + EOS, concatenated and cut into full blocks (the short tail is dropped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError("the tokenizer has no EOS token; pt appends one after every document")
    buffer: list[int] = []
    batch: list[str] = []

    def flush() -> Iterator[list[int]]:
        nonlocal buffer
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buffer.extend(ids)
            buffer.append(eos)
        batch.clear()
        full = len(buffer) // block_size * block_size
        for start in range(0, full, block_size):
            yield buffer[start : start + block_size]
        buffer = buffer[full:]

    for document in iter_documents(files, stats):
        batch.append(document)
        if len(batch) >= TOKENIZE_BATCH:
            yield from flush()
    if batch:
        yield from flush()


@dataclass
class PtData:
    train: Any
    eval: Any
    train_blocks: int | None
    eval_blocks: int
    cache_path: Path | None
    cache_hit: bool
    stats: CorpusStats


def _block_dataset(files: list[Path], tokenizer, block_size: int, cache_root: Path, stats: CorpusStats):
    """The blocks of ``files`` as a memory-mapped Dataset, built once into ``cache_root/<key>``."""
    import datasets

    key = pt_cache_key(files, tokenizer, block_size)
    target = cache_root / key
    if (target / "dataset_info.json").exists() and (target / CACHE_STATS).exists():
        cached = json.loads((target / CACHE_STATS).read_text(encoding="utf-8"))
        for name, value in cached.items():
            setattr(stats, name, value)
        return datasets.load_from_disk(str(target)), target, True
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    cache_root.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target, force=True) as tmp, tempfile.TemporaryDirectory(prefix=".build-", dir=cache_root) as build:
        try:
            dataset = datasets.Dataset.from_generator(
                _generate_blocks,
                features=features,
                cache_dir=build,
                gen_kwargs={"files": [str(f) for f in files], "tokenizer": tokenizer, "block_size": block_size, "stats": stats},
                fingerprint=key,
            )
        except datasets.exceptions.DatasetGenerationError as exc:
            if isinstance(exc.__cause__, UsageError):
                raise exc.__cause__ from None
            raise
        dataset.save_to_disk(str(tmp))
        (tmp / CACHE_STATS).write_text(json.dumps(dataclasses.asdict(stats)) + "\n", encoding="utf-8")
    return datasets.load_from_disk(str(target)), target, False


def _generate_blocks(files: list[str], tokenizer, block_size: int, stats: CorpusStats) -> Iterator[dict]:
    blocks = 0
    for block in iter_blocks([Path(f) for f in files], tokenizer, block_size, stats):
        blocks += 1
        yield {"input_ids": block}
    if blocks == 0:
        raise OptionError("the data holds fewer than {block_size} {value} tokens ({documents} documents); lower {block_size} or add data",
                          value=block_size, documents=stats.lines)


def build_pt_data(
    files: list[Path],
    tokenizer,
    *,
    block_size: int,
    validation_files: Sequence[Path] = (),
    validation_split: float = 0.0,
    streaming: bool = False,
    cache_dir: Path | None = None,
    seed: int = 42,
) -> PtData:
    """Train (and eval) blocks. Eval comes from ``validation_files`` when given, else a ``validation_split`` share."""
    import datasets

    stats = CorpusStats()
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    eval_dataset, eval_blocks = None, 0
    if validation_files:
        eval_dataset, _, _ = _block_dataset(list(validation_files), tokenizer, block_size, cache_root, CorpusStats())
        eval_blocks = len(eval_dataset)
    if streaming:
        train = datasets.IterableDataset.from_generator(
            _generate_blocks,
            features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}),
            gen_kwargs={"files": [str(f) for f in files], "tokenizer": tokenizer, "block_size": block_size, "stats": stats},
        )
        return PtData(train, eval_dataset, None, eval_blocks, None, False, stats)
    dataset, path, hit = _block_dataset(files, tokenizer, block_size, cache_root, stats)
    if eval_dataset is None and validation_split > 0 and len(dataset) >= 2:
        import random

        held = max(1, round(len(dataset) * validation_split))
        order = list(range(len(dataset)))
        random.Random(seed).shuffle(order)
        eval_dataset = dataset.select(sorted(order[:held]), keep_in_memory=True)
        dataset, eval_blocks = dataset.select(sorted(order[held:]), keep_in_memory=True), held
    return PtData(dataset, eval_dataset, len(dataset), eval_blocks, path, hit, stats)


# ----------------------------------------------------------------------------------------- sft

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "system": "system"}


@dataclass
class SftRecord:
    where: str
    messages: list[Message]


@dataclass
class SftReadResult:
    records: list[SftRecord]
    skipped: list[str] = field(default_factory=list)


def _json_array_items(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """(line, value) for each element of a top-level JSON array, so errors can name the record's line."""
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    line = text.count("\n", 0, index) + 1
    length = len(text)
    while True:
        while index < length and text[index] in " \t\r\n":
            if text[index] == "\n":
                line += 1
            index += 1
        if index < length and text[index] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise UsageError(f"{path}:{line}: invalid JSON (nested too deeply)") from None
        yield line, value
        line += text.count("\n", index, end)
        index = end
        while index < length and text[index] in " \t\r\n,":
            if text[index] == "\n":
                line += 1
            index += 1


def _record_messages(record: Any) -> list[Message]:
    """One record as messages; a ``ValueError`` says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
            raise ValueError("'messages' must be a list of {role, content} objects")
        messages = raw
    elif "conversations" in record:
        raw = record["conversations"]
        if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
            raise ValueError("'conversations' must be a list of {from, value} objects")
        messages = []
        for turn in raw:
            role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise ValueError(f"unknown ShareGPT speaker {turn.get('from')!r} (expected human, gpt or system)")
            messages.append({"role": role, "content": turn.get("value")})
    elif "instruction" in record or "output" in record:
        instruction, extra, answer = record.get("instruction"), record.get("input", ""), record.get("output")
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("'instruction' is missing or empty")
        if extra is None:
            extra = ""
        if not isinstance(extra, str):
            raise ValueError("'input' must be a string")
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError("'output' is missing or empty")
        prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        if isinstance(record.get("system"), str) and record["system"].strip():
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise ValueError("not an Alpaca record (instruction/input/output), a 'messages' conversation or a ShareGPT 'conversations' list")
    try:
        normalized = normalize_messages(messages)
    except UsageError as exc:
        raise ValueError(exc.message) from None
    if not any(m.role == "assistant" and m.content.strip() for m in normalized):
        raise ValueError("no assistant answer to learn from")
    return normalized


def _records_in_file(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        yield from _json_array_items(text, path)
        return
    if path.suffix.lower() == ".json" and stripped.startswith("{") and "\n{" not in stripped.rstrip():
        try:
            yield text[: len(text) - len(stripped)].count("\n") + 1, json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise UsageError(f"{path}: invalid JSON (nested too deeply)") from None
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, ValueError(f"invalid JSON ({exc.msg} at column {exc.colno})")
        except RecursionError:
            yield number, ValueError("invalid JSON (nested too deeply)")


def read_records(
    paths: Iterable[Path | str], convert: Callable[[Any, str], Any], *, skip_invalid: bool, what: str = "data", kind: str = "records"
) -> tuple[list, list[str]]:
    """Each record of JSON arrays / JSONL files through ``convert(record, "file:line")``: (items, skipped).

    Bad JSON or a ``ValueError`` from ``convert`` is one ``file:line: reason`` error, or with
    ``skip_invalid`` skipped and counted; sft records and preference pairs are read alike.
    """
    paths = list(paths)
    items: list = []
    skipped: list[str] = []
    for path in check_data_files(paths, what=what):
        for line, record in _records_in_file(path):
            where = f"{path}:{line}"
            try:
                if isinstance(record, ValueError):
                    raise record
                items.append(convert(record, where))
            except ValueError as exc:
                if not skip_invalid:
                    raise OptionError("{where}: {problem} (pass {skip_invalid} to skip such records)", where=where, problem=exc) from None
                skipped.append(f"{where}: {exc}")
    if not items:
        raise UsageError(f"no usable {kind} in {', '.join(str(p) for p in paths)}")
    return items, skipped


def read_sft_records(paths: Iterable[Path | str], *, skip_invalid: bool = False) -> SftReadResult:
    """Conversations from JSON arrays / JSONL files; a bad record is ``file:line: reason`` (or skipped and counted)."""
    records, skipped = read_records(paths, lambda record, where: SftRecord(where, _record_messages(record)), skip_invalid=skip_invalid)
    return SftReadResult(records, skipped)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class SftStats:
    samples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    trainable_tokens: int = 0
    total_tokens: int = 0


def segment_function(template: str, tokenizer, system: str | None) -> Callable[[list[Message]], list[Segment]]:
    """The template as ``messages → segments`` through the one renderer (``auto``: the tokenizer's own Jinja
    chat template). sft needs a template: it teaches where an answer ends (``none`` is for chat, serve, eval)."""
    check_template_name(template, allowed=TEMPLATE_NAMES)
    source = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    if template == AUTO and not source:
        raise OptionError("{template} auto: the tokenizer has no chat template; choose {allowed}", allowed=", ".join(TEMPLATES))
    prompt_format = resolve_template(template, jinja_source=source, bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "</s>")
    return lambda messages: prompt_format.segments(messages, system, add_generation_prompt=False)


def encode_conversation(segments: list[Segment], tokenizer, *, add_bos: bool) -> Example:
    """Token ids and labels: trainable segments keep their ids as labels, the rest is -100."""
    ids: list[int] = []
    labels: list[int] = []
    if add_bos:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    encoded = tokenizer([s.text for s in segments], add_special_tokens=False)["input_ids"]
    for segment, piece in zip(segments, encoded):
        ids.extend(piece)
        labels.extend(piece if segment.trainable else [IGNORE_INDEX] * len(piece))
    return Example(ids, labels)


def tokenize_records(
    records: list[SftRecord], tokenizer, *, template: str, system: str | None, max_seq_length: int, stats: SftStats
) -> list[Example]:
    """Examples cut to ``max_seq_length``; samples left without a trainable token are dropped (they make NaN losses).
    BOS follows the one rule chat and serve follow (:func:`cnllm.core.templates.bos_needed`)."""
    from cnllm.core.modelio import tokenizer_adds_bos

    to_segments = segment_function(template, tokenizer, system)
    adds_bos, bos_token = tokenizer_adds_bos(tokenizer), tokenizer.bos_token or ""
    examples = []
    for record in records:
        try:
            segments = to_segments(record.messages)
        except UsageError as exc:
            raise UsageError(f"{record.where}: {exc.message}") from None
        add_bos = bos_needed(segments[0].text if segments else "", bos_token=bos_token, adds_bos=adds_bos)
        example = encode_conversation(segments, tokenizer, add_bos=add_bos)
        stats.samples += 1
        if len(example.input_ids) > max_seq_length:
            stats.truncated += 1
            example = Example(example.input_ids[:max_seq_length], example.labels[:max_seq_length])
        trainable = sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)
        if trainable == 0:
            stats.dropped_no_target += 1
            continue
        stats.trainable_tokens += trainable
        stats.total_tokens += len(example.input_ids)
        examples.append(example)
    return examples


def pack_examples(examples: list[Example], max_seq_length: int) -> list[Example]:
    """Whole examples concatenated in order into sequences of at most ``max_seq_length`` tokens."""
    packed: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    for example in examples:
        if ids and len(ids) + len(example.input_ids) > max_seq_length:
            packed.append(Example(ids, labels))
            ids, labels = [], []
        ids = ids + example.input_ids
        labels = labels + example.labels
    if ids:
        packed.append(Example(ids, labels))
    return packed


@dataclass
class SftData:
    train: Any
    eval: Any
    stats: SftStats
    skipped: list[str]
    eval_samples: int


def _as_dataset(examples: list[Example]):
    import datasets

    return datasets.Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    )


def build_sft_data(
    files: list[Path],
    tokenizer,
    *,
    template: str,
    system: str | None,
    max_seq_length: int,
    packing: bool = False,
    validation_files: Sequence[Path] = (),
    validation_split: float = 0.0,
    skip_invalid: bool = False,
    seed: int = 42,
) -> SftData:
    import random

    read = read_sft_records(files, skip_invalid=skip_invalid)
    records = read.records
    eval_records: list[SftRecord] = []
    if validation_files:
        eval_read = read_sft_records(validation_files, skip_invalid=skip_invalid)
        eval_records = eval_read.records
        read.skipped.extend(eval_read.skipped)
    elif validation_split > 0 and len(records) >= 2:
        held = max(1, round(len(records) * validation_split))
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        eval_ids = set(order[:held])
        eval_records = [r for i, r in enumerate(records) if i in eval_ids]
        records = [r for i, r in enumerate(records) if i not in eval_ids]
    stats = SftStats()
    train_examples = tokenize_records(records, tokenizer, template=template, system=system, max_seq_length=max_seq_length, stats=stats)
    eval_examples = (
        tokenize_records(eval_records, tokenizer, template=template, system=system, max_seq_length=max_seq_length, stats=stats) if eval_records else []
    )
    if not train_examples:
        raise OptionError("no training sample has a trainable token within {max_seq_length} {value}; raise it", value=max_seq_length)
    if packing:
        train_examples = pack_examples(train_examples, max_seq_length)
    eval_dataset = _as_dataset(eval_examples) if eval_examples else None
    return SftData(_as_dataset(train_examples), eval_dataset, stats, read.skipped, len(eval_examples))
