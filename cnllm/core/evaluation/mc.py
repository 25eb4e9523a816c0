"""Multiple-choice exams (C-Eval, CMMLU, MMLU) scored from next-token log-probabilities, no generation.

Layouts, as the datasets are published:

* C-Eval — ``DIR/{dev,val,test}/{subject}_{split}.csv`` with ``id,question,A,B,C,D,answer[,explanation]``
  (the test split has no answers) and an optional ``DIR/subject_mapping.json``:
  ``{subject: [English name, Chinese name, category]}``;
* CMMLU — ``DIR/{dev,test}/{subject}.csv`` with ``Question,A,B,C,D,Answer`` (often after an unnamed index column);
* MMLU — headerless ``DIR/{dev,val,test}/{subject}_{split}.csv``: question, A, B, C, D, answer.

The prompt is the one the Chinese-LLaMA-Alpaca C-Eval scripts build: a header naming the subject, ``shots``
solved examples from the dev split, then the question ending in ``答案：``. Each option letter is scored by
the log-probability of every token that can spell it next (the token the tokenizer produces for the letter
right after the prompt, the bare letter piece and its word-start/space forms), summed over spellings; the four
letter probabilities are renormalised and the most likely letter is the prediction.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from cnllm.core.backends import load_model
from cnllm.core.config import coerce_fields
from cnllm.core.errors import UsageError
from cnllm.core.generation.base import LoadedModel, LoadOptions
from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.templates import NONE, Message, PromptFormat, check_template_name

LETTERS = ("A", "B", "C", "D")
FORMATS = ("ceval", "cmmlu", "mmlu")
SPLITS = {"ceval": ("dev", "val", "test"), "cmmlu": ("dev", "test"), "mmlu": ("dev", "val", "test")}
DEFAULT_SPLIT = {"ceval": "val", "cmmlu": "test", "mmlu": "val"}
HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
MAPPING_FILE = "subject_mapping.json"


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str | None  # None where the split is published without answers


@dataclass
class Subject:
    key: str
    name: str  # what the prompt calls it: the Chinese name from the mapping, else the key
    category: str | None
    questions: list[Question]
    dev: list[Question]


@dataclass
class Prediction:
    id: str
    subject: str
    prediction: str
    answer: str | None
    probabilities: dict[str, float]

    @property
    def correct(self) -> bool | None:
        return None if self.answer is None else self.prediction == self.answer

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "subject": self.subject,
            "prediction": self.prediction,
            "answer": self.answer,
            "probabilities": self.probabilities,
            "correct": self.correct,
        }


@dataclass
class GroupScore:
    """A subject or a category: question count and, where answers are known, how many were right."""

    name: str
    questions: int
    correct: int | None
    display_name: str | None = None  # subjects: the name the prompt used
    category: str | None = None  # subjects: their category, if the mapping gives one
    subjects: int | None = None  # categories: how many subjects they gather

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else self.correct / self.questions

    def to_dict(self) -> dict:
        optional = {"display_name": self.display_name, "category": self.category, "subjects": self.subjects}
        return {
            "name": self.name,
            **{k: v for k, v in optional.items() if v is not None},
            "questions": self.questions,
            "correct": self.correct,
            "accuracy": self.accuracy,
        }


@dataclass(frozen=True)
class McOptions:
    format: str = "ceval"
    split: Optional[str] = None  # None: the format's default (DEFAULT_SPLIT: val; test for cmmlu, which has no val)
    shots: int = 5
    subjects: tuple[str, ...] = ()
    template: str | None = None  # None or "none": the plain prompt; a built-in name or "auto" (the model's own, else none)
    batch_size: int = 8
    ctx: int = 4096  # longest prompt allowed, in tokens (also the llama.cpp context size)

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.split is None:
            object.__setattr__(self, "split", DEFAULT_SPLIT.get(self.format, "val"))

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise UsageError(f"unknown --format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.split not in SPLITS[self.format]:
            raise UsageError(f"{self.format} has no {self.split!r} split; choose one of {', '.join(SPLITS[self.format])}")
        if self.shots < 0:
            raise UsageError(f"--shots must be >= 0, got {self.shots}")
        if self.shots and self.split == "dev":
            raise UsageError("few-shot examples come from the dev split; evaluate --split dev with --shots 0")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.ctx < 8:
            raise UsageError(f"--ctx must be at least 8, got {self.ctx}")
        check_template_name(self.template or NONE)


@dataclass
class McResult:
    model: dict
    options: McOptions
    data: Path
    subjects: list[GroupScore]
    categories: list[GroupScore]
    predictions: list[Prediction]
    seconds: float
    prompt_tokens: int

    @property
    def labelled(self) -> bool:
        return all(p.answer is not None for p in self.predictions)

    @property
    def average(self) -> float | None:
        """Mean of the subjects' accuracies (C-Eval's average)."""
        scores = [s.accuracy for s in self.subjects]
        known = [a for a in scores if a is not None]
        return None if len(known) < len(scores) else sum(known) / len(known)

    @property
    def overall(self) -> float | None:
        """Correct answers over all questions."""
        if not self.labelled:
            return None
        return sum(bool(p.correct) for p in self.predictions) / len(self.predictions)

    @property
    def questions_per_second(self) -> float | None:
        return len(self.predictions) / self.seconds if self.seconds > 0 else None

    def submission(self) -> dict[str, dict[str, str]]:
        """C-Eval's submission format: ``{subject: {id: letter}}``."""
        out: dict[str, dict[str, str]] = {}
        for p in self.predictions:
            out.setdefault(p.subject, {})[p.id] = p.prediction
        return out

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "data": str(self.data),
            "settings": {
                "format": self.options.format,
                "split": self.options.split,
                "shots": self.options.shots,
                "template": self.options.template or "none",
                "subjects": list(self.options.subjects) or "all",
                "batch_size": self.options.batch_size,
                "ctx": self.options.ctx,
            },
            "questions": len(self.predictions),
            "labelled": self.labelled,
            "average": self.average,
            "overall": self.overall,
            "subjects": [s.to_dict() for s in self.subjects],
            "categories": [c.to_dict() for c in self.categories],
            "seconds": round(self.seconds, 3),
            "questions_per_second": self.questions_per_second,
            "prompt_tokens": self.prompt_tokens,
        }


# ---------------------------------------------------------------- reading the data


def read_mapping(data_dir: Path) -> dict[str, tuple[str, str, str]]:
    path = data_dir / MAPPING_FILE
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path} must map each subject to [English name, Chinese name, category]")
    mapping = {}
    for key, value in raw.items():
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)):
            raise UsageError(f"{path}: subject {key!r} must map to [English name, Chinese name, category]")
        mapping[key] = (value[0], value[1], value[2])
    return mapping


def split_file(data_dir: Path, fmt: str, split: str, subject: str) -> Path:
    name = f"{subject}.csv" if fmt == "cmmlu" else f"{subject}_{split}.csv"
    return data_dir / split / name


def list_subjects(data_dir: Path, fmt: str, split: str) -> list[str]:
    folder = data_dir / split
    suffix = ".csv" if fmt == "cmmlu" else f"_{split}.csv"
    subjects = sorted(p.name[: -len(suffix)] for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix))
    if not subjects:
        raise UsageError(f"{folder} has no subject files (*{suffix})")
    return subjects


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-empty CSV record."""
    try:
        handle = open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    with handle:
        reader = csv.reader(handle)
        try:
            for fields in reader:
                if any(f.strip() for f in fields):
                    yield reader.line_num, fields
        except (csv.Error, UnicodeDecodeError) as exc:
            raise UsageError(f"{path}: line {reader.line_num}: unreadable CSV ({exc})") from None


def _answer(path: Path, line: int, raw: str | None, required: bool) -> str | None:
    value = (raw or "").strip().upper()
    if not value:
        if required:
            raise UsageError(f"{path}: line {line}: no answer (expected one of A, B, C, D)")
        return None
    if value not in LETTERS:
        raise UsageError(f"{path}: line {line}: answer {raw!r} is not one of A, B, C, D")
    return value


def read_questions(path: Path, fmt: str, *, answers_required: bool) -> list[Question]:
    """Questions of one subject file; a missing column, a bad answer or an empty file is a usage error naming it."""
    rows = iter(_rows(path))
    questions: list[Question] = []
    if fmt == "mmlu":
        for line, fields in rows:
            if len(fields) < 6:
                raise UsageError(f"{path}: line {line}: expected 6 fields (question, A, B, C, D, answer), got {len(fields)}")
            answer = _answer(path, line, fields[5], answers_required)
            questions.append(Question(str(len(questions)), fields[0], (fields[1], fields[2], fields[3], fields[4]), answer))
    else:
        header = next(rows, None)
        if header is None:
            raise UsageError(f"{path} is empty")
        columns = {name.strip(): index for index, name in enumerate(header[1])}
        names = ("id", "question", "answer") if fmt == "ceval" else ("", "Question", "Answer")
        id_column, question_column, answer_column = names
        needed = [question_column, *LETTERS] + ([id_column] if fmt == "ceval" else [])
        if answers_required:
            needed.append(answer_column)
        missing = [n for n in needed if n not in columns]
        if missing:
            raise UsageError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} (header: {','.join(header[1])})")
        for line, fields in rows:
            if len(fields) < len(header[1]):
                raise UsageError(f"{path}: line {line}: {len(fields)} fields where the header has {len(header[1])}")
            answer = _answer(path, line, fields[columns[answer_column]] if answer_column in columns else None, answers_required)
            qid = fields[columns[id_column]].strip() if id_column in columns else str(len(questions))
            a, b, c, d = (fields[columns[letter]] for letter in LETTERS)
            questions.append(Question(qid, fields[columns[question_column]], (a, b, c, d), answer))
    if not questions:
        raise UsageError(f"{path} has no questions")
    if not answers_required:
        known = [q.answer is not None for q in questions]
        if any(known) and not all(known):
            raise UsageError(f"{path}: question {questions[known.index(False)].id} has no answer while others have; answer all or none")
    return questions


def load_subjects(data_dir: Path, options: McOptions) -> list[Subject]:
    """Every requested subject with its questions and few-shot examples; all files are checked up front."""
    options.validate()
    split = options.split
    assert split is not None  # __post_init__ puts the format's default in
    if not data_dir.is_dir():
        raise UsageError(f"data directory {data_dir} does not exist")
    if not (data_dir / split).is_dir():
        raise UsageError(f"{data_dir / split} does not exist: no {split!r} split in {data_dir}")
    mapping = read_mapping(data_dir)
    keys = list(options.subjects) or list_subjects(data_dir, options.format, split)
    subjects = []
    for key in keys:
        _, chinese, category = mapping.get(key, (key, key, None))
        questions = read_questions(split_file(data_dir, options.format, split, key), options.format, answers_required=split != "test")
        dev: list[Question] = []
        if options.shots:
            dev_path = split_file(data_dir, options.format, "dev", key)
            dev = read_questions(dev_path, options.format, answers_required=True)
            if len(dev) < options.shots:
                raise UsageError(f"{dev_path} has {len(dev)} examples; --shots {options.shots} needs that many")
            dev = dev[: options.shots]
        subjects.append(Subject(key, chinese or key, category, questions, dev))
    return subjects


# ---------------------------------------------------------------- prompts


def format_example(question: Question, *, include_answer: bool) -> str:
    text = question.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices))
    return text + (f"\n答案：{question.answer}\n\n" if include_answer else "\n答案：")


def build_prompt(subject: Subject, question: Question) -> str:
    """Header, the subject's few-shot examples, then the question ending in ``答案：``."""
    shots = "".join(format_example(example, include_answer=True) for example in subject.dev)
    return HEADER.format(subject=subject.name) + shots + format_example(question, include_answer=False)


def letter_candidates(model: LoadedModel, text: str, ids: Sequence[int], templated: bool) -> list[list[int]]:
    """Per letter, the ids that can spell it as the next token: the tokenizer's own choice after this prompt
    (the first token of ``prompt + letter`` beyond the prompt's tokens) and the vocabulary's letter pieces."""
    candidates = []
    for letter in LETTERS:
        ids_for_letter = model.letter_piece_ids(letter)
        extended = model.encode_prompt(text + letter, special=templated)
        if len(extended) > len(ids) and extended[: len(ids)] == list(ids):
            ids_for_letter.add(extended[len(ids)])
        if not ids_for_letter:
            raise UsageError(f"{model.path}: no token spells the option letter {letter!r}; this tokenizer cannot answer by letter")
        candidates.append(sorted(ids_for_letter))
    return candidates


def letter_probabilities(logprobs: np.ndarray, candidates: Sequence[Sequence[int]]) -> np.ndarray:
    """Each letter's probability (summed over its spellings), renormalised over the four letters."""
    scores = np.array([np.logaddexp.reduce(logprobs[list(ids)]) for ids in candidates])
    scores = np.exp(scores - scores.max())
    return scores / scores.sum()


# ---------------------------------------------------------------- scoring


@dataclass
class _Item:
    subject: Subject
    question: Question
    ids: list[int]
    candidates: list[list[int]]
    probabilities: np.ndarray | None = field(default=None)


def _prepare(model: LoadedModel, prompt_format: PromptFormat, subjects: Sequence[Subject], options: McOptions, progress: Progress) -> list[_Item]:
    """Each question as one user turn of the chat template (or as plain text with ``none``), tokenised."""
    templated = not prompt_format.is_plain
    items = []
    progress.start(sum(len(s.questions) for s in subjects), "building prompts", unit="question")
    try:
        for subject in subjects:
            for question in subject.questions:
                text = prompt_format.render([Message("user", build_prompt(subject, question))])
                ids = model.encode_prompt(text, special=templated)  # templated prompts carry special-token text, plain ones are read literally
                if len(ids) >= options.ctx:
                    raise UsageError(
                        f"{subject.key} question {question.id}: the prompt is {len(ids)} tokens, --ctx is {options.ctx}; "
                        "raise --ctx or use fewer --shots"
                    )
                items.append(_Item(subject, question, ids, letter_candidates(model, text, ids, templated)))
                progress.advance(1)
    finally:
        progress.finish()
    return items


def _score(model: LoadedModel, items: list[_Item], batch_size: int, progress: Progress) -> None:
    """Fill every item's probabilities; similar lengths share a batch so padding stays small."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    if model.backend == "llama.cpp":  # one context, reused: keep each subject's shared prefix in cache
        order = list(range(len(items)))
    progress.start(len(items), "scoring", unit="question")
    try:
        for begin in range(0, len(order), batch_size):
            batch = [items[i] for i in order[begin : begin + batch_size]]
            logprobs = model.next_token_logprobs([item.ids for item in batch])
            for item, row in zip(batch, logprobs):
                item.probabilities = letter_probabilities(row, item.candidates)
            progress.advance(len(batch))
    finally:
        progress.finish()


def _group_scores(predictions: Sequence[Prediction], subjects: Sequence[Subject]) -> tuple[list[GroupScore], list[GroupScore]]:
    by_subject: dict[str, list[Prediction]] = {}
    for p in predictions:
        by_subject.setdefault(p.subject, []).append(p)
    subject_scores = []
    for subject in subjects:
        preds = by_subject[subject.key]
        correct = None if any(p.answer is None for p in preds) else sum(bool(p.correct) for p in preds)
        subject_scores.append(GroupScore(subject.key, len(preds), correct, display_name=subject.name, category=subject.category))
    categories: dict[str, GroupScore] = {}
    for score in subject_scores:
        if score.category is None:
            continue
        group = categories.setdefault(score.category, GroupScore(score.category, 0, 0, subjects=0))
        group.questions += score.questions
        group.correct = None if group.correct is None or score.correct is None else group.correct + score.correct
        group.subjects = (group.subjects or 0) + 1
    return subject_scores, [categories[name] for name in sorted(categories)]


def evaluate_multiple_choice(
    model_path: Path, data_dir: Path, options: McOptions, load_options: LoadOptions | None = None, *, progress: Progress = NULL_PROGRESS
) -> McResult:
    """Read and check every file, load the model, build and tokenise every prompt, then score in batches."""
    options.validate()
    data_dir = Path(data_dir)
    subjects = load_subjects(data_dir, options)
    with load_model(model_path, replace(load_options or LoadOptions(), n_ctx=options.ctx)) as model:
        prompt_format = model.prompt_format(options.template or NONE)
        items = _prepare(model, prompt_format, subjects, options, progress)
        started = time.perf_counter()
        _score(model, items, options.batch_size, progress)
        seconds = time.perf_counter() - started
        described = {**model.describe(), "template": prompt_format.name}
    predictions = []
    for item in items:
        probabilities = item.probabilities
        assert probabilities is not None  # _score filled every item
        predictions.append(
            Prediction(
                item.question.id,
                item.subject.key,
                LETTERS[int(np.argmax(probabilities))],
                item.question.answer,
                {letter: float(p) for letter, p in zip(LETTERS, probabilities)},
            )
        )
    subject_scores, category_scores = _group_scores(predictions, subjects)
    return McResult(described, options, data_dir, subject_scores, category_scores, predictions, seconds, sum(len(i.ids) for i in items))


def write_outputs(result: McResult, out_dir: Path, *, force: bool = False) -> list[str]:
    """``results.json``, ``predictions.jsonl``, ``submission.json`` (test split) and the provenance record, atomically."""
    from cnllm.core.atomic import atomic_dir
    from cnllm.core.provenance import write_record

    written = ["results.json", "predictions.jsonl"]
    with atomic_dir(out_dir, force=force) as tmp:
        (tmp / "results.json").write_text(json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as handle:
            for p in result.predictions:
                handle.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
        if result.options.split == "test":
            (tmp / "submission.json").write_text(json.dumps(result.submission(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            written.append("submission.json")
        write_record(
            tmp,
            "eval-mc",
            inputs=[result.data],  # the model is named, not hashed: hashing gigabytes would dwarf a quick evaluation
            options={"model": result.model, **result.to_dict()["settings"]},
            results={"average": result.average, "overall": result.overall, "questions": len(result.predictions)},
        )
    return written
