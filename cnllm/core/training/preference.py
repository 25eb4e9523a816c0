"""Preference pairs: one prompt, a preferred (``chosen``) answer and a worse (``rejected``) one.

Training data beside sft's (:mod:`cnllm.core.training.data`, whose record reader and cache rules it shares).
Read by ``cnllm align`` (training) and ``cnllm eval pref`` (preference accuracy). Two shapes are accepted
per record (JSON array or JSONL, as sft reads):

* plain — ``prompt``, ``chosen``, ``rejected`` strings, optional ``system`` and ``history``
  (earlier ``[question, answer]`` turns);
* conversational, as TRL defines it — ``chosen`` and ``rejected`` lists of ``{role, content}``
  messages ending in the assistant's answer, with the prompt either given as its own message list
  (``prompt``) or implicit (the messages the two lists share).

A bad record is ``file:line: reason``; with ``skip_invalid`` it is counted and reported instead.
Rendering goes through the one template renderer (:mod:`cnllm.core.templates`), so the prompt is
laid out exactly as sft trained it and chat shows it: the answer is the last (trainable) segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from cnllm.core.config import OptionError
from cnllm.core.errors import UsageError
from cnllm.core.templates import Message, Segment, bos_needed, normalize_messages
from cnllm.core.training.data import check_data_files, default_cache_dir, read_records, segment_function, tokenizer_fingerprint


@dataclass(frozen=True)
class PreferencePair:
    where: str  # file:line
    prompt: list[Message]  # ends with the user turn
    chosen: str
    rejected: str


@dataclass
class PreferenceRead:
    pairs: list[PreferencePair]
    skipped: list[str] = field(default_factory=list)


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' is missing or empty")
    return value


def _answer(messages: Any, key: str, shared: int) -> str:
    rest = messages[shared:]
    if len(rest) != 1 or not isinstance(rest[0], dict) or rest[0].get("role") != "assistant":
        raise ValueError(f"'{key}' must end in exactly one assistant message after the prompt")
    content = rest[0].get("content")
    if not isinstance(content, str) or not content.strip():
        raise ValueError(f"'{key}': the assistant answer is empty")
    return content


def _messages(value: Any, key: str) -> list[dict]:
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise ValueError(f"'{key}' must be a string or a list of {{role, content}} messages")
    return value


def record_pair(record: Any, where: str) -> PreferencePair:
    """One record as a pair; a ``ValueError`` says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "chosen" not in record or "rejected" not in record:
        raise ValueError("a preference record needs 'chosen' and 'rejected' (and 'prompt', or message lists sharing it)")
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, list) or isinstance(rejected, list):
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        if "prompt" in record:
            prompt = _messages(record["prompt"], "prompt")
            chosen_answer, rejected_answer = _answer(chosen, "chosen", 0), _answer(rejected, "rejected", 0)
        else:  # implicit prompt: the messages both lists share
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            prompt = chosen[:shared]
            chosen_answer, rejected_answer = _answer(chosen, "chosen", shared), _answer(rejected, "rejected", shared)
    else:
        prompt_text, chosen_answer, rejected_answer = _text(record, "prompt"), _text(record, "chosen"), _text(record, "rejected")
        prompt = []
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError("'system' must be a string")
        if system and system.strip():
            prompt.append({"role": "system", "content": system})
        history = record.get("history") or []
        if not isinstance(history, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history):
            raise ValueError("'history' must be a list of [question, answer] string pairs")
        for question, answer in history:
            prompt += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        prompt.append({"role": "user", "content": prompt_text})
    if chosen_answer == rejected_answer:
        raise ValueError("'chosen' and 'rejected' are the same answer")
    try:
        normalized = normalize_messages(prompt)
    except UsageError as exc:
        raise ValueError(f"prompt: {exc.message}") from None
    if normalized[-1].role != "user":
        raise ValueError("the prompt must end with a user message")
    return PreferencePair(where, normalized, chosen_answer, rejected_answer)


def read_preference_pairs(paths: Iterable[Path | str], *, skip_invalid: bool = False, what: str = "data") -> PreferenceRead:
    """Pairs from JSON arrays / JSONL files; a bad record is ``file:line: reason`` (or skipped and counted)."""
    pairs, skipped = read_records(paths, record_pair, skip_invalid=skip_invalid, what=what, kind="preference pairs")
    return PreferenceRead(pairs, skipped)


def split_pairs(pairs: Sequence[PreferencePair], share: float, seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held out): a ``share`` of the pairs held out, chosen by ``seed`` (the same rule as sft's split)."""
    import random

    pairs = list(pairs)
    if share <= 0 or len(pairs) < 2:
        return pairs, []
    held = max(1, round(len(pairs) * share))
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    eval_ids = set(order[:held])
    return [p for i, p in enumerate(pairs) if i not in eval_ids], [p for i, p in enumerate(pairs) if i in eval_ids]


def render_pair(pair: PreferencePair, segments: Callable[[list[Message]], list[Segment]]) -> tuple[list[Segment], str, str]:
    """(prompt segments, chosen text, rejected text): the answers as the template ends them (end marker included;
    text a template puts after the marker, such as ChatML's newline, is left out)."""
    rendered = []
    for answer in (pair.chosen, pair.rejected):
        try:
            parts = segments([*pair.prompt, Message("assistant", answer)])
        except UsageError as exc:
            raise UsageError(f"{pair.where}: {exc.message}") from None
        last = max((i for i, part in enumerate(parts) if part.trainable), default=None)
        if last is None:
            raise UsageError(f"{pair.where}: the template left no answer to score")
        rendered.append((parts[:last], parts[last].text))  # what follows the answer's end marker is not scored
    return rendered[0][0], rendered[0][1], rendered[1][1]


# ------------------------------------------------------------------------------- training data

CACHE_FORMAT = 1
CACHE_STATS = "cnllm-preference-stats.json"


@dataclass
class PreferenceStats:
    pairs: int = 0
    eval_pairs: int = 0
    skipped_invalid: int = 0
    truncated_prompts: int = 0
    truncated_answers: int = 0
    dropped_no_answer: int = 0
    total_tokens: int = 0


@dataclass
class PreferenceData:
    train: Any
    eval: Any
    stats: PreferenceStats
    skipped: list[str]
    cache_path: Path | None
    cache_hit: bool


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer, *, template: str, system: str | None, max_length: int,
                   max_prompt_length: int, stats: PreferenceStats) -> list[dict]:
    """Rows of ``prompt_ids``/``chosen_ids``/``rejected_ids`` (TRL's tokenised preference format).

    The prompt keeps its end (the question next to the answer) within ``max_prompt_length``, BOS kept in
    front; answers are cut so prompt + answer fit ``max_length``. BOS follows the one rule of sft and chat.
    """
    from cnllm.core.modelio import tokenizer_adds_bos

    to_segments = segment_function(template, tokenizer, system)
    adds_bos, bos_token = tokenizer_adds_bos(tokenizer), tokenizer.bos_token or ""
    rows = []
    for pair in pairs:
        prompt_segments, chosen, rejected = render_pair(pair, to_segments)
        pieces = tokenizer([s.text for s in prompt_segments] + [chosen, rejected], add_special_tokens=False)["input_ids"]
        prompt_ids = [token for piece in pieces[:-2] for token in piece]
        head = [tokenizer.bos_token_id] if bos_needed(prompt_segments[0].text if prompt_segments else "", bos_token=bos_token, adds_bos=adds_bos) else []
        if len(head) + len(prompt_ids) > max_prompt_length:
            stats.truncated_prompts += 1
            prompt_ids = prompt_ids[len(prompt_ids) - (max_prompt_length - len(head)):]
        prompt_ids = head + prompt_ids
        room = max_length - len(prompt_ids)
        chosen_ids, rejected_ids = pieces[-2], pieces[-1]
        if room < 1:
            stats.dropped_no_answer += 1
            continue
        if len(chosen_ids) > room or len(rejected_ids) > room:
            stats.truncated_answers += 1
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        stats.total_tokens += 2 * len(prompt_ids) + len(chosen_ids) + len(rejected_ids)
        rows.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    return rows


def preference_cache_key(files: Sequence[Path], tokenizer, settings: dict) -> str:
    import hashlib
    import json

    from cnllm.core.hashing import hash_file

    digest = hashlib.sha256(f"cnllm-preference/{CACHE_FORMAT}/{json.dumps(settings, sort_keys=True, default=str)}/".encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    for path in files:
        digest.update(f"{path}:{hash_file(path, 'sha256')}".encode())
    return digest.hexdigest()[:32]


def build_preference_data(
    files: list[Path],
    tokenizer,
    *,
    template: str,
    system: str | None,
    max_length: int,
    max_prompt_length: int,
    validation_files: Sequence[Path] = (),
    validation_split: float = 0.0,
    skip_invalid: bool = False,
    seed: int = 42,
    cache_dir: Path | None = None,
) -> PreferenceData:
    """Train and held-out rows, tokenised once and cached (keyed by the files' contents, tokenizer and settings)."""
    import dataclasses
    import json

    import datasets

    from cnllm.core.atomic import atomic_dir

    all_files = check_data_files(files) + (check_data_files(validation_files, what="validation data") if validation_files else [])
    settings = {"template": template, "system": system, "max_length": max_length, "max_prompt_length": max_prompt_length,
                "validation_files": [str(p) for p in validation_files], "validation_split": validation_split, "seed": seed,
                "skip_invalid": skip_invalid}
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir().parent) / "preference"
    target = root / preference_cache_key(all_files, tokenizer, settings)
    if (target / CACHE_STATS).is_file():
        saved = json.loads((target / CACHE_STATS).read_text(encoding="utf-8"))
        held = datasets.load_from_disk(str(target / "eval")) if (target / "eval").is_dir() else None
        return PreferenceData(datasets.load_from_disk(str(target / "train")), held, PreferenceStats(**saved["stats"]), saved["skipped"], target, True)

    read = read_preference_pairs(files, skip_invalid=skip_invalid)
    if validation_files:
        held_read = read_preference_pairs(validation_files, skip_invalid=skip_invalid, what="validation data")
        train_pairs, eval_pairs = read.pairs, held_read.pairs
        read.skipped.extend(held_read.skipped)
    else:
        train_pairs, eval_pairs = split_pairs(read.pairs, validation_split, seed)
    stats = PreferenceStats(skipped_invalid=len(read.skipped))
    train_rows, eval_rows = (
        tokenize_pairs(pairs, tokenizer, template=template, system=system, max_length=max_length, max_prompt_length=max_prompt_length, stats=stats)
        for pairs in (train_pairs, eval_pairs)
    )
    if not train_rows:
        raise OptionError("no preference pair leaves room for an answer within {max_length} {value}; raise it or lower {max_prompt_length}",
                          value=max_length)
    stats.pairs, stats.eval_pairs = len(train_rows), len(eval_rows)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target, force=True) as tmp:
        datasets.Dataset.from_list(train_rows).save_to_disk(str(tmp / "train"))
        if eval_rows:
            datasets.Dataset.from_list(eval_rows).save_to_disk(str(tmp / "eval"))
        (tmp / CACHE_STATS).write_text(json.dumps({"stats": dataclasses.asdict(stats), "skipped": read.skipped}, ensure_ascii=False) + "\n", encoding="utf-8")
    held = datasets.load_from_disk(str(target / "eval")) if eval_rows else None
    return PreferenceData(datasets.load_from_disk(str(target / "train")), held, stats, read.skipped, target, False)
