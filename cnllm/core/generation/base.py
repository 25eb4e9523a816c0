"""The generation core shared by ``chat`` and ``serve``: one :class:`Generator` interface, two backends
(``hf.py``, ``llamacpp.py``; :mod:`cnllm.core.backends` picks one for a model path).

A backend supplies tokenize/decode, a raw token-id stream, prompt log-probabilities and embeddings;
this module adds what every front end needs on top: sampling parameters, stop strings, EOS and
length limits, timing, prompts from :mod:`cnllm.core.templates` (one renderer, one BOS rule), and an incremental
detokenizer that never emits half a character (a Chinese character split across byte-fallback
tokens is held back until its last byte arrives).
"""

from __future__ import annotations

import math
import random
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from cnllm.core.errors import UsageError
from cnllm.core.rope import RopeOptions
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


class GenerationStream:
    """Iterate for text deltas; :attr:`completion` holds the counts, timing and finish reason.

    Closing the stream early (``close()``, ``break`` then garbage collection, or ``cancel``)
    stops the backend at its next token, so a disconnected client frees its worker at once.
    """

    def __init__(self, generator: "Generator", prompt_ids: list[int], params: SamplingParams, *, strip_leading_space: bool = False):
        params.validate()
        limit = generator.context_length
        if len(prompt_ids) >= limit:
            raise ContextOverflow(len(prompt_ids), limit)
        room = limit - len(prompt_ids)
        self.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        self.generator = generator
        self.prompt_ids = prompt_ids
        self.params = params
        self.strip_leading_space = strip_leading_space
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

    def _run(self) -> Iterator[str]:
        result = self.completion
        started = time.perf_counter()
        if self.max_tokens == 0:
            result.finish_reason = "length"
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

        try:
            for token_id in ids:
                if result.time_to_first_token is None:
                    result.time_to_first_token = time.perf_counter() - started
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


class Generator(ABC):
    """A loaded model that can stream tokens, score prompts and embed texts. Close it when done."""

    path: Path
    backend: str
    context_length: int
    vocab_size: int  # valid token ids are 0 .. vocab_size - 1
    eos_ids: frozenset[int]
    bos_token: str
    eos_token: str
    adds_bos: bool  # whether the model's tokenizer puts BOS before a text (llama.cpp: the GGUF's add_bos_token)
    trained_context: int | None = None  # the context the model was trained for (before any --rope-scaling)

    @abstractmethod
    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` (special-token text such as ``<|im_end|>`` becomes its special id)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens; invalid or incomplete UTF-8 becomes U+FFFD."""

    @abstractmethod
    def generate_ids(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, cancel: threading.Event) -> Iterator[int]:
        """Raw generated ids, at most ``max_tokens`` plus EOS; stops when ``cancel`` is set or the iterator is closed."""

    @abstractmethod
    def prompt_logprobs(self, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
        """Log-probability of every token given the ones before it (the first gets None), plus the ``top`` alternatives."""

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """One L2-normalised embedding per text, and the number of tokens read."""

    @abstractmethod
    def chat_template_source(self) -> str | None:
        """The model's own Jinja chat template (tokenizer config or GGUF metadata), if any."""

    @abstractmethod
    def for_slot(self) -> "Generator":
        """A generator another server worker can use concurrently (llama.cpp: a new context; transformers: self, serialised)."""

    def speculative_stats(self) -> SpeculativeStats | None:
        return None

    def close(self) -> None:
        """Free the model now (llama-cpp-python complains at exit when left to the garbage collector)."""

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def token_text(self, token_id: int) -> str:
        """One token's text, special tokens included (``</s>``), where :meth:`decode` leaves them out."""
        return self.decode([token_id])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text, add_bos=False))

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt ids under the one BOS rule (:func:`cnllm.core.templates.bos_needed`)."""
        return self.tokenize(text, add_bos=bos_needed(text, bos_token=self.bos_token, adds_bos=self.adds_bos))

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


@dataclass
class LoadOptions:
    """Everything ``chat``/``serve`` may say about loading a model (eval scorers take a ``ModelSpec``)."""

    n_ctx: int | None = None
    threads: int | None = None
    gpu_layers: int = 0
    lora: Path | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    draft_model: Path | None = None
    draft_tokens: int = 4
    prompt_cache: bool = True  # llama.cpp: reuse the KV cache of a shared prompt prefix (fast multi-turn chat)
    trust_remote_code: bool = False
    verbose: bool = False
    rope: RopeOptions | None = None  # context extension (--rope-scaling, --rope-factor, --rope-freq-base)
    repack: bool | None = None  # llama.cpp weight repacking (--repack / --no-repack); None: cnllm decides (cnllm.core.cpu)


DEFAULT_N_CTX = 4096
