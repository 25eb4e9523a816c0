"""The loaded model every command uses (:class:`LoadedModel`: ``chat``, ``serve`` and every ``eval``), its one
:class:`LoadOptions`, and the generation core on top of it. Three backends implement it (``hf.py``, ``llamacpp.py``, ``vllm.py``;
:mod:`cnllm.core.backends` picks one for a model path).

A backend supplies tokens, decoding, a raw token-id stream, log-probabilities (per prompt token, per window, for the
next token) and embeddings; this module adds what every front end needs on top: the BOS rule, the context rule,
sampling parameters, stop strings, EOS and length limits, timing, prompts from :mod:`cnllm.core.templates` (one
renderer, one BOS rule), and an incremental detokenizer that never emits half a character (a Chinese character
split across byte-fallback tokens is held back until its last byte arrives).
"""

from __future__ import annotations

import math
import random
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator, Iterator, Sequence

import numpy as np

from cnllm.core.errors import UsageError
from cnllm.core.rope import MAX_CONTEXT, RopeOptions
from cnllm.core.templates import PromptFormat, bos_needed, resolve_template

REPLACEMENT = "\ufffd"


class ContextOverflow(UsageError):
    """The prompt does not fit in the context window (serve answers 400 with code context_length_exceeded)."""

    def __init__(self, prompt_tokens: int, context_length: int):
        super().__init__(
            f"the prompt is {prompt_tokens} tokens but the context window is {context_length}; "
            "shorten it or load the model with a larger --n-ctx"
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. ``temperature == 0`` is greedy; ``max_tokens=None`` fills the context."""

    max_tokens: int | None = 512
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_schema: dict | None = None  # structured output: the answer must be JSON this schema accepts (None: free text)

    def validate(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise UsageError(f"{name} must be a finite number, got {value}")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise UsageError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise UsageError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def resolved_seed(self) -> int:
        return self.seed if self.seed is not None else random.randrange(2**31)


@dataclass
class SpeculativeStats:
    """Draft-model statistics of one generation: how many proposed tokens the target model accepted."""

    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None


@dataclass
class Completion:
    """The outcome of one generation (filled in as the stream runs; final once it is exhausted)."""

    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length" (max tokens / context), "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    time_to_first_token: float | None = None
    token_ids: list[int] = field(default_factory=list)
    eos_id: int | None = None  # the EOS token that ended the answer (not in token_ids or completion_tokens)
    speculative: SpeculativeStats | None = None

    @property
    def generated_ids(self) -> list[int]:
        """The answer's tokens with the EOS that ended it: clients count it and score it (lm-eval's loglikelihood needs it)."""
        return self.token_ids + ([self.eos_id] if self.eos_id is not None else [])

    @property
    def tokens_per_second(self) -> float | None:
        """Decoding speed: tokens after the first over the time after the first (prompt processing excluded)."""
        if self.completion_tokens < 2 or self.time_to_first_token is None:
            return None
        decode_time = self.seconds - self.time_to_first_token
        return (self.completion_tokens - 1) / decode_time if decode_time > 0 else None


@dataclass
class TokenLogprob:
    """One token of a scored sequence: its text piece, log-probability given the tokens before it, and the top-k."""

    token_id: int
    text: str
    logprob: float | None  # None for the first token (nothing to condition on)
    top: list[tuple[str, float]] = field(default_factory=list)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that are always whole characters.

    Decoding token by token breaks multi-byte characters (byte-fallback pieces like ``<0xE4>``
    decode to U+FFFD on their own) and loses SentencePiece's leading spaces. Instead each step
    decodes a short window that starts at the last emitted boundary and emits only the new
    suffix, holding it back while it ends in an incomplete character.
    """

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = ()):
        self._decode = decode
        self._ids = list(context)
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self, *, keep_incomplete: bool = False) -> str:
        """What is left when generation ends; an incomplete trailing character is dropped (or kept as U+FFFD when scoring)."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if not keep_incomplete:
            after = after.rstrip(REPLACEMENT)
        self._prefix = self._read = len(self._ids)
        return after[len(before) :] if len(after) > len(before) else ""


class StopMatcher:
    """Cuts the text at the first stop string, holding back a tail that could still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        self._pending += text
        hits = [index for index in (self._pending.find(s) for s in self.stops) if index >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(stop[:size]):
                    hold = size
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


class GenerationObserver:
    """Told how a stream progresses (the server's metrics); runs in the generating thread, so it must be quick."""

    def token(self, seconds: float, first: bool) -> None:
        """A token arrived ``seconds`` after the previous one (``first``: after the stream started)."""

    def finished(self, completion: Completion) -> None:
        """The stream ended (answered, stopped, cancelled or failed); ``completion`` is final."""


class GenerationStream:
    """Iterate for text deltas; :attr:`completion` holds the counts, timing and finish reason.

    Closing the stream early (``close()``, ``break`` then garbage collection, or ``cancel``)
    stops the backend at its next token (or the next piece of a long prompt it is still evaluating), so a
    disconnected client frees its worker at once.
    """

    def __init__(
        self,
        generator: "LoadedModel",
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        strip_leading_space: bool = False,
        observer: GenerationObserver | None = None,
    ):
        params.validate()
        generator.check_sampling(params)
        limit = generator.context_length
        if len(prompt_ids) >= limit:
            raise ContextOverflow(len(prompt_ids), limit)
        room = limit - len(prompt_ids)
        self.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        self.generator = generator
        self.prompt_ids = prompt_ids
        self.params = params
        self.strip_leading_space = strip_leading_space
        self.observer = observer or GenerationObserver()
        self.completion = Completion(prompt_tokens=len(prompt_ids))
        self.cancelled = threading.Event()
        self._iterator = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._iterator

    def __next__(self) -> str:
        return next(self._iterator)

    def cancel(self) -> None:
        """Ask the stream to stop; safe from another thread (the backend sees it before its next token)."""
        self.cancelled.set()

    def close(self) -> None:
        self.cancelled.set()
        self._iterator.close()

    def read(self) -> Completion:
        """Run to the end and return the completion."""
        for _ in self:
            pass
        return self.completion

    def _run(self) -> Generator[str, None, None]:
        result = self.completion
        started = time.perf_counter()
        if self.max_tokens == 0:
            result.finish_reason = "length"
            self.observer.finished(result)
            return
        detok = IncrementalDetokenizer(self.generator.decode, self.prompt_ids[-4:])
        stopper = StopMatcher(self.params.stop)
        eos = self.generator.eos_ids
        ids = self.generator.generate_ids(self.prompt_ids, self.params, self.max_tokens, self.cancelled)
        pieces: list[str] = []
        leading = self.strip_leading_space
        hit_stop_string = False

        def emit(text: str) -> str:
            nonlocal leading
            if leading and text:
                text = text.lstrip()
                leading = not text
            if text:
                pieces.append(text)
                result.text = "".join(pieces)
            return text

        previous = started
        try:
            for token_id in ids:
                now = time.perf_counter()
                self.observer.token(now - previous, first=result.time_to_first_token is None)
                if result.time_to_first_token is None:
                    result.time_to_first_token = now - started
                previous = now
                if token_id in eos:
                    result.finish_reason, result.eos_id = "stop", token_id
                    break
                result.completion_tokens += 1
                result.token_ids.append(token_id)
                text, stopped = stopper.feed(detok.add(token_id))
                if (text := emit(text)):
                    yield text
                if stopped:
                    result.finish_reason, hit_stop_string = "stop", True
                    break
                if self.cancelled.is_set():
                    result.finish_reason = "cancelled"
                    break
                if result.completion_tokens >= self.max_tokens:
                    result.finish_reason = "length"
                    break
            else:
                result.finish_reason = "cancelled" if self.cancelled.is_set() else "length"
            if not hit_stop_string:
                tail, stopped = stopper.feed(detok.flush())
                tail += "" if stopped else stopper.flush()
                if stopped:
                    result.finish_reason = "stop"
                if (tail := emit(tail)):
                    yield tail
        except GeneratorExit:
            result.finish_reason = result.finish_reason or "cancelled"
            raise
        finally:
            self.cancelled.set()
            ids.close()
            result.seconds = time.perf_counter() - started
            result.speculative = self.generator.speculative_stats()
            self.observer.finished(result)


class LoadedModel(ABC):
    """One loaded model, on either backend, for every command: it streams tokens (chat, serve, passkey, longbench),
    scores windows and next tokens (eval ppl, mc, pref) and embeds texts (serve). Close it when done.

    Backends supply the raw pieces; what the commands share is here: the BOS rule (:meth:`tokenize`, :meth:`encode_prompt`),
    the prompt renderer (:meth:`prompt_format`) and UTF-8-safe token pieces.
    """

    path: Path
    backend: str
    options: "LoadOptions"
    context_length: int
    vocab_size: int  # valid token ids are 0 .. vocab_size - 1
    eos_ids: frozenset[int]
    bos_token: str
    eos_token: str
    bos_id: int | None  # the BOS id when the model's tokenizer puts one before a text (llama.cpp: the GGUF's add_bos_token), else None
    trained_context: int | None = None  # the context the model was trained for (before any --rope-scaling)

    @property
    def adds_bos(self) -> bool:
        """Whether the model's tokenizer puts BOS before a text."""
        return self.bos_id is not None

    @abstractmethod
    def text_ids(self, text: str, *, special: bool) -> list[int]:
        """Token ids of ``text`` alone, no BOS; ``special``: special-token text such as ``<|im_end|>`` becomes its id."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens; invalid or incomplete UTF-8 becomes U+FFFD."""

    @abstractmethod
    def generate_ids(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, cancel: threading.Event) -> Generator[int, None, None]:
        """Raw generated ids, at most ``max_tokens`` plus EOS; stops when ``cancel`` is set (also while the prompt is
        still being evaluated) or the iterator is closed."""

    @abstractmethod
    def prompt_logprobs(self, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
        """Log-probability of every token given the ones before it (the first gets None), plus the ``top`` alternatives."""

    @abstractmethod
    def tokenize_with_lengths(self, text: str) -> tuple[list[int], list[int], list[int]]:
        """Ids of the whole text (with BOS, special-token text read literally) and, per token, how many UTF-8 bytes and
        how many characters of the text it stands for (what bits per byte and per character divide by)."""

    @abstractmethod
    def target_logprobs(self, windows: Sequence[Sequence[int]], first: int) -> list[np.ndarray]:
        """For each window (all the same length): log P(window[t] | window[:t]) for t = first … len-1 (first >= 1)."""

    @abstractmethod
    def next_token_logprobs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Log-probabilities of the token following each prompt: an array [len(prompts), vocab]."""

    @abstractmethod
    def letter_piece_ids(self, letter: str) -> set[int]:
        """Vocabulary ids whose piece spells ``letter`` alone (bare, after a word-start marker or a space)."""

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """One L2-normalised embedding per text, and the number of tokens read."""

    @abstractmethod
    def chat_template_source(self) -> str | None:
        """The model's own Jinja chat template (tokenizer config or GGUF metadata), if any."""

    @abstractmethod
    def describe(self) -> dict:
        """What was loaded, for results files."""

    def speculative_stats(self) -> SpeculativeStats | None:
        return None

    def check_sampling(self, params: SamplingParams) -> None:
        """Refuse what this backend cannot honour before generation starts (serve: a 400 before a slot is leased).
        Structured output is decoding constrained by a grammar, which only the llama.cpp backend has."""
        if params.json_schema is not None:
            raise UsageError(
                "structured output (response_format json_object or json_schema; a forced tool call) needs a GGUF model: it constrains decoding "
                "with a llama.cpp grammar; convert this model with `cnllm convert-gguf` and serve the .gguf"
            )

    def close(self) -> None:  # noqa: B027 - an optional hook: a backend with nothing to free keeps it
        """Free the model now (llama-cpp-python complains at exit when left to the garbage collector)."""

    def __enter__(self) -> "LoadedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids of ``text``, BOS first when ``add_bos`` and the model's tokenizer adds one."""
        ids = self.text_ids(text, special=special)
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def encode_prompt(self, text: str, *, special: bool = True) -> list[int]:
        """Prompt ids under the one BOS rule (:func:`cnllm.core.templates.bos_needed`)."""
        return self.tokenize(text, add_bos=bos_needed(text, bos_token=self.bos_token, adds_bos=self.adds_bos), special=special)

    def token_text(self, token_id: int) -> str:
        """One token's text, special tokens included (``</s>``), where :meth:`decode` leaves them out."""
        return self.decode([token_id])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text, add_bos=False))

    def prompt_format(self, template: str | None) -> PromptFormat:
        """The renderer for ``template`` (a built-in name, ``auto`` or ``none``) on this model."""
        return resolve_template(template, jinja_source=self.chat_template_source(), bos_token=self.bos_token, eos_token=self.eos_token)

    def stream(self, prompt: str | list[int], params: SamplingParams, *, strip_leading_space: bool = False) -> GenerationStream:
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        return GenerationStream(self, ids, params, strip_leading_space=strip_leading_space)

    def complete(self, prompt: str | list[int], params: SamplingParams) -> Completion:
        return self.stream(prompt, params).read()

    def token_pieces(self, ids: Sequence[int]) -> list[str]:
        """Each token's share of the decoded text (a byte-fallback character belongs to its last byte), so pieces join to the text."""
        detok = IncrementalDetokenizer(self.decode)
        pieces = [detok.add(i) for i in ids]
        if pieces:
            pieces[-1] += detok.flush(keep_incomplete=True)
        return pieces


DEFAULT_N_CTX = 4096  # the context a model loads with when neither --n-ctx nor a rope factor sets one (llama.cpp caps at it)


@dataclass(frozen=True)
class LoadOptions:
    """Everything a command may say about loading a model, on either backend (the CLI's model-loading group fills it)."""

    n_ctx: int | None = None  # None: context_window's rule
    threads: int | None = None
    gpu_layers: int = 0
    device: str | None = None  # transformers: a device name; None: CUDA, else MPS, else CPU
    dtype: str | None = None  # transformers: a dtype word (fp16, bf16, …; echoed back); None: bf16/fp16 on accelerators, fp32 on CPU
    lora: Path | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    draft_model: Path | None = None
    draft_tokens: int = 4
    prompt_cache: bool = True  # llama.cpp: reuse the KV cache of a shared prompt prefix (fast multi-turn chat)
    sequences: int = 1  # llama.cpp: requests decoded together in one context (serve --parallel), n_ctx tokens each
    trust_remote_code: bool = False
    verbose: bool = False
    rope: RopeOptions | None = None  # context extension (--rope-scaling, --rope-factor, --rope-freq-base)
    repack: bool | None = None  # llama.cpp weight repacking (--repack / --no-repack); None: cnllm decides (cnllm.core.cpu)
    engine: str = "auto"  # the backend (cnllm.core.backends.ENGINES); auto: what the model path holds decides
    tensor_parallel_size: int = 1  # vLLM: devices each layer is split across
    pipeline_parallel_size: int = 1  # vLLM: devices (or nodes) the layers are divided between


def context_window(options: LoadOptions, trained: int | None, *, cap: int | None) -> int:
    """The one context rule of both backends: ``--n-ctx``, else the trained context × ``--rope-factor``, else the
    trained context (DEFAULT_N_CTX when the model does not say), at most ``cap`` (llama.cpp allocates it up front)."""
    extended = options.rope.extended_context(trained) if options.rope else None
    window = options.n_ctx or extended
    if window:
        if window > MAX_CONTEXT:
            source = f"--n-ctx {options.n_ctx}" if options.n_ctx else f"the trained context × --rope-factor ({window})"
            raise UsageError(f"{source} is beyond the largest context window cnllm loads ({MAX_CONTEXT} tokens)")
        return window
    natural = trained or DEFAULT_N_CTX
    return min(natural, cap) if cap else natural


# How one letter can appear as a vocabulary piece: bare, SentencePiece word start, byte-level BPE space, plain space.
LETTER_SPELLINGS = ("{}", "\u2581{}", "\u0120{}", " {}")
SOFTMAX_ROWS = 8  # logits rows log-softmaxed at once: a few float64 rows stay in cache (large blocks run 100× slower)


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (llama.cpp hands back float32 logits)."""
    logits = np.asarray(logits, dtype=np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    return logits - peak - np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True))


def target_logprobs_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log P(targets[i]) under row i of ``logits``, in float64, without materialising the log-softmax matrix."""
    picked = np.empty(len(targets))
    for at in range(0, len(targets), SOFTMAX_ROWS):
        rows = np.asarray(logits[at : at + SOFTMAX_ROWS], dtype=np.float64)
        peak = rows.max(axis=-1)
        rows -= peak[:, None]
        own = rows[np.arange(len(rows)), targets[at : at + SOFTMAX_ROWS]]
        np.exp(rows, out=rows)
        picked[at : at + len(rows)] = own - np.log(rows.sum(axis=-1))
    return picked
