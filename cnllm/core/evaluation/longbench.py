"""LongBench (Bai et al. 2023, THUDM/LongBench) on a local copy of its data: one ``{dataset}.jsonl`` per dataset
with ``{input, context, answers, length, dataset, language, all_classes, _id}`` records, as LongBench publishes it.

Per dataset, as LongBench's ``pred.py`` and ``eval.py`` do: its prompt (``dataset2prompt``) and generation length
(``dataset2maxlen``); prompts longer than ``max_length`` tokens keep their first and last ``max_length / 2`` tokens
(middle truncation); greedy decoding (samsum stops at a newline); a chat template only where LongBench uses one
(not for trec, triviaqa, samsum, lsht, lcc, repobench-p, whose prompts are few-shot continuations); the first line
of the answer for trec, triviaqa, samsum and lsht; the best score over the reference answers; ×100 per dataset.

Metrics are LongBench's, written out here (a few lines each) rather than pulled in as dependencies:

* QA F1 — token-overlap F1 after SQuAD normalisation (English) or, for Chinese, over words with Chinese and
  ASCII punctuation removed; words come from jieba when it is installed, else single characters (recorded as
  ``segmentation`` in the results: the two give different figures);
* ROUGE-L — LCS-based F1 over whitespace tokens (English) or segmented words (Chinese summaries: dureader, vcsum);
  LongBench calls the ``rouge`` package, whose summary-level variant can differ slightly on multi-sentence text;
* classification — the classes named in the answer; 1 / (how many) when the right one is among them, else 0;
* passage retrieval / count — the share of numbers in the answer equal to the right paragraph / count;
* code edit similarity — the first line that is not a comment or a fence, scored as fuzzywuzzy's ``ratio``
  (``2·LCS / (len a + len b)`` over characters, rounded to a whole percent).
"""

from __future__ import annotations

import json
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from cnllm.core.backends import load_model
from cnllm.core.config import coerce_fields
from cnllm.core.errors import UsageError
from cnllm.core.generation.base import LoadOptions, SamplingParams
from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.templates import Message, check_template_name

# LongBench's config/dataset2prompt.json (the datasets cnllm supports: all of LongBench v1).
PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# LongBench's config/dataset2maxlen.json: new tokens generated per dataset.
MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32, "2wikimqa": 32,
    "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512, "vcsum": 512, "trec": 64,
    "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32, "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

NO_CHAT_TEMPLATE = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")  # few-shot continuations
FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum", "lsht")
DATASETS = tuple(PROMPTS)
ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."


# ---------------------------------------------------------------- segmentation and metrics


def segmentation() -> str:
    """``jieba`` when it is installed, else ``char`` (one word per character)."""
    try:
        import jieba  # noqa: F401
    except ImportError:
        return "char"
    return "jieba"


def zh_words(text: str, segmenter: str) -> list[str]:
    if segmenter == "jieba":
        import jieba

        return list(jieba.cut(text, cut_all=False))
    return list(text)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower case, no Chinese or ASCII punctuation, no whitespace."""
    punctuation = set(string.punctuation + ZH_PUNCTUATION)
    return "".join("".join(ch for ch in text.lower() if ch not in punctuation).split())


def f1(prediction: Sequence[str], truth: Sequence[str]) -> float:
    same = sum((Counter(prediction) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, truth: str, **_) -> float:
    return f1(normalize_answer(prediction).split(), normalize_answer(truth).split())


def qa_f1_zh(prediction: str, truth: str, *, segmenter: str = "char", **_) -> float:
    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(t) for t in zh_words(text, segmenter)) if w]

    return f1(words(prediction), words(truth))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Longest common subsequence length (dynamic programming, one row at a time)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_tokens(prediction: Sequence[str], truth: Sequence[str]) -> float:
    """ROUGE-L F1: LCS over both lengths' precision and recall."""
    common = lcs_length(prediction, truth)
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(truth)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, truth: str, **_) -> float:
    return rouge_l_tokens(prediction.split(), truth.split())


def rouge_l_zh(prediction: str, truth: str, *, segmenter: str = "char", **_) -> float:
    def words(text: str) -> list[str]:
        return [w for w in zh_words(text, segmenter) if w.strip()]

    return rouge_l_tokens(words(prediction), words(truth))


def classification(prediction: str, truth: str, *, all_classes: Sequence[str] = (), **_) -> float:
    """The classes named in the prediction, less those that are only part of the right class's name."""
    named = [c for c in all_classes if c in prediction]
    named = [c for c in named if not (c in truth and c != truth)]
    return 1.0 / len(named) if truth in named else 0.0


def _share_equal(prediction: str, wanted: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == wanted for n in numbers) / len(numbers) if numbers else 0.0


def count(prediction: str, truth: str, **_) -> float:
    return _share_equal(prediction, str(truth))


def retrieval(prediction: str, truth: str, **_) -> float:
    found = re.findall(r"Paragraph (\d+)", truth)
    return _share_equal(prediction, found[0]) if found else 0.0


def retrieval_zh(prediction: str, truth: str, **_) -> float:
    found = re.findall(r"段落(\d+)", truth)
    return _share_equal(prediction, found[0]) if found else 0.0


def code_similarity(prediction: str, truth: str, **_) -> float:
    line = next((x for x in prediction.lstrip("\n").split("\n") if "`" not in x and "#" not in x and "//" not in x), "")
    total = len(line) + len(truth)
    ratio = 2 * lcs_length(line, truth) / total if total else 1.0
    return round(100 * ratio) / 100


METRICS: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1, "qasper": qa_f1, "multifieldqa_en": qa_f1, "multifieldqa_zh": qa_f1_zh, "hotpotqa": qa_f1,
    "2wikimqa": qa_f1, "musique": qa_f1, "dureader": rouge_l_zh, "gov_report": rouge_l, "qmsum": rouge_l,
    "multi_news": rouge_l, "vcsum": rouge_l_zh, "trec": classification, "triviaqa": qa_f1, "samsum": rouge_l,
    "lsht": classification, "passage_retrieval_en": retrieval, "passage_count": count,
    "passage_retrieval_zh": retrieval_zh, "lcc": code_similarity, "repobench-p": code_similarity,
}


def score_prediction(dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None, segmenter: str) -> float:
    """The best score over the reference answers, in [0, 1] (LongBench's ``scorer`` before ×100)."""
    if dataset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[dataset]
    return max((metric(prediction, truth, all_classes=all_classes or (), segmenter=segmenter) for truth in answers), default=0.0)


# ---------------------------------------------------------------- data, prompts, runs


@dataclass(frozen=True)
class LongBenchOptions:
    datasets: tuple[str, ...] = ()  # empty: every supported dataset found in the data folder
    max_length: int = 3500  # prompt tokens kept (LongBench's model2maxlen for 4K LLaMA-2 models)
    limit: int | None = None  # samples per dataset (first N), for quick runs
    template: str = "none"

    def __post_init__(self) -> None:
        coerce_fields(self)

    def validate(self) -> None:
        unknown = [d for d in self.datasets if d not in PROMPTS]
        if unknown:
            raise UsageError(f"unknown LongBench dataset {unknown[0]!r}; supported: {', '.join(DATASETS)}")
        if self.max_length < 16:
            raise UsageError(f"--max-length must be at least 16, got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be at least 1, got {self.limit}")


@dataclass(frozen=True)
class Sample:
    dataset: str
    id: str
    input: str
    context: str
    answers: tuple[str, ...]
    all_classes: tuple[str, ...] | None
    length: int | None
    language: str | None


def read_dataset(path: Path, dataset: str, limit: int | None = None) -> list[Sample]:
    """LongBench's JSONL: one record a line; a line that is not a record with ``answers`` names its line number."""
    samples = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError(f"{path}:{number}: not UTF-8 text (LongBench's files are UTF-8 JSONL)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                answers = record["answers"]
                if not isinstance(answers, list):
                    raise TypeError("answers is not a list")
                samples.append(
                    Sample(
                        dataset,
                        str(record.get("_id", number)),
                        str(record.get("input") or ""),
                        str(record.get("context") or ""),
                        tuple(str(a) for a in answers),
                        tuple(record["all_classes"]) if record.get("all_classes") else None,
                        record.get("length"),
                        record.get("language"),
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"{path}:{number}: not a LongBench record ({exc})") from None
            except RecursionError:
                raise UsageError(f"{path}:{number}: not a LongBench record (nested too deeply)") from None
            if limit is not None and len(samples) >= limit:
                break
    if not samples:
        raise UsageError(f"{path} has no records")
    return samples


def find_datasets(data_dir: Path, chosen: Sequence[str]) -> list[tuple[str, Path]]:
    """``(dataset, file)`` for each chosen dataset (default: each supported one with a file in ``data_dir``)."""
    if not data_dir.is_dir():
        raise UsageError(f"LongBench data folder {data_dir} does not exist")
    if chosen:
        missing = [d for d in chosen if not (data_dir / f"{d}.jsonl").is_file()]
        if missing:
            raise UsageError(f"{data_dir} has no {missing[0]}.jsonl")
        return [(d, data_dir / f"{d}.jsonl") for d in chosen]
    found = [(d, data_dir / f"{d}.jsonl") for d in DATASETS if (data_dir / f"{d}.jsonl").is_file()]
    if not found:
        raise UsageError(f"{data_dir} holds none of LongBench's {{dataset}}.jsonl files ({', '.join(DATASETS[:4])}, …)")
    return found


def truncate_middle(ids: Sequence[int], max_length: int, decode: Callable[[Sequence[int]], str]) -> str | None:
    """LongBench's truncation: the text of the first and last ``max_length / 2`` tokens; None when it fits.
    Each cut moves (by at most three tokens) to a whole character, so a byte-fallback character is never split
    (some decoders turn a whole run of byte tokens into U+FFFD when its last character is incomplete)."""
    if len(ids) <= max_length:
        return None
    half = max_length // 2
    head = next((decode(ids[:k]) for k in range(half, max(half - 4, 0), -1) if not decode(ids[:k]).endswith("\ufffd")), decode(ids[:half]))
    tail = next((decode(ids[-k:]) for k in range(half, max(half - 4, 0), -1) if not decode(ids[-k:]).startswith("\ufffd")), decode(ids[-half:]))
    return head + tail


@dataclass
class DatasetScore:
    dataset: str
    samples: int = 0
    score: float = 0.0  # mean × 100, as LongBench reports it
    truncated: int = 0
    seconds: float = 0.0
    predictions: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "samples": self.samples, "score": self.score, "truncated": self.truncated, "seconds": round(self.seconds, 3)}


@dataclass
class LongBenchResult:
    model: dict
    options: LongBenchOptions
    segmentation: str
    datasets: list[DatasetScore] = field(default_factory=list)

    @property
    def average(self) -> float | None:
        return round(sum(d.score for d in self.datasets) / len(self.datasets), 2) if self.datasets else None

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "settings": {"max_length": self.options.max_length, "limit": self.options.limit, "template": self.options.template},
            "segmentation": self.segmentation,
            "scores": {d.dataset: d.score for d in self.datasets},
            "average": self.average,
            "datasets": [d.to_dict() for d in self.datasets],
        }


def evaluate_longbench(model: Path, data_dir: Path, options: LongBenchOptions, load_options: LoadOptions | None = None, *, progress: Progress = NULL_PROGRESS) -> LongBenchResult:
    """Generate and score every sample of the chosen datasets; every file is read and checked before the model loads."""

    options.validate()
    check_template_name(options.template)
    chosen = find_datasets(Path(data_dir), options.datasets)
    data = [(name, read_dataset(path, name, options.limit)) for name, path in chosen]
    load_options = load_options or LoadOptions()
    n_ctx = load_options.n_ctx or options.max_length + max(MAX_NEW_TOKENS[name] for name, _ in data) + 8
    segmenter = segmentation()
    with load_model(model, replace(load_options, n_ctx=n_ctx)) as generator:
        result = LongBenchResult(
            {
                "path": str(model),
                "backend": generator.backend,
                "n_ctx": generator.context_length,
                "trained_context": generator.trained_context,
                "rope": load_options.rope.to_dict() if load_options.rope is not None and load_options.rope.active else None,
            },
            options,
            segmenter,
        )
        prompt_format = generator.prompt_format(options.template)
        for name, samples in data:
            score = DatasetScore(name)
            started = time.perf_counter()
            progress.start(len(samples), f"longbench {name}", unit="sample")
            try:
                total = 0.0
                for sample in samples:
                    prompt = PROMPTS[name].format(context=sample.context, input=sample.input)
                    shortened = truncate_middle(generator.tokenize(prompt, add_bos=False), options.max_length, generator.decode)
                    if shortened is not None:
                        prompt, score.truncated = shortened, score.truncated + 1
                    stop: tuple[str, ...] = ("\n",) if name == "samsum" else ()  # LongBench ends samsum at its first line
                    if name not in NO_CHAT_TEMPLATE and not prompt_format.is_plain:
                        prompt = prompt_format.render([Message("user", prompt)])
                        stop += prompt_format.stop
                    params = SamplingParams(max_tokens=MAX_NEW_TOKENS[name], temperature=0.0, repetition_penalty=1.0, seed=0, stop=stop)
                    answer = generator.complete(generator.encode_prompt(prompt), params).text
                    value = score_prediction(name, answer, sample.answers, sample.all_classes, segmenter)
                    total += value
                    score.samples += 1
                    score.predictions.append(
                        {"pred": answer, "answers": list(sample.answers), "all_classes": sample.all_classes, "length": sample.length, "_id": sample.id, "score": value}
                    )
                    progress.advance(1, score=round(100 * total / score.samples, 2))
            finally:
                progress.finish()
            score.score = round(100 * total / score.samples, 2)
            score.seconds = time.perf_counter() - started
            result.datasets.append(score)
    return result


def write_outputs(result: LongBenchResult, out_dir: Path, *, force: bool = False) -> list[str]:
    """``result.json`` (LongBench's scores per dataset, plus the average), ``pred/{dataset}.jsonl`` and provenance."""
    from cnllm.core.atomic import atomic_dir
    from cnllm.core.provenance import write_record

    written = ["result.json"]
    with atomic_dir(out_dir, force=force) as tmp:
        document = result.to_dict()
        (tmp / "result.json").write_text(json.dumps(document, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        (tmp / "pred").mkdir()
        for score in result.datasets:
            lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in score.predictions)
            (tmp / "pred" / f"{score.dataset}.jsonl").write_text(lines, encoding="utf-8")
            written.append(f"pred/{score.dataset}.jsonl")
        write_record(tmp, "eval-longbench", options={"model": result.model, **document["settings"]}, results={"scores": document["scores"], "average": document["average"]})
    return written
