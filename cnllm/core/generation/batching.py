"""Continuous batching on one llama.cpp context: every running request advances in the same ``llama_decode``.

Decoding is bound by reading the weights: N requests in one batch read them once per step, where N separate contexts
read them N times and compete for the same cores. llama-server and vLLM schedule this way; this is the same scheme on
llama.cpp's multi-sequence batch API through llama-cpp-python's low-level bindings (docs/chat_serve.md says why this
rather than a supervised llama-server).

Each request takes one sequence of the context. With the prompt cache on it takes the free sequence whose cached
tokens share the longest prefix with its prompt, so the next turn of a conversation evaluates only what is new. A
step puts every decoding request's last token in the batch first, then pieces of waiting prompts, so running streams
never stall behind a long prompt, and requests join between steps. Each request samples from its own row with its own
llama.cpp sampler chain (its temperature, top-k/top-p, repetition penalty, seed, grammar). A cancelled request frees
its sequence at the next step.
"""

from __future__ import annotations

import itertools
import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generator, Iterator, Sequence

from cnllm.core.errors import CnllmError, UsageError
from cnllm.core.generation.base import SamplingParams

PENALTY_LAST_N = 64  # tokens the repetition penalty looks back over (llama-cpp-python's default, as the one-sequence path)
_END = object()


class DecodeFailed(CnllmError):
    """llama.cpp could not decode a batch; the requests in it end with this error."""


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    sampler: Any  # a llama_sampler chain, freed when the request ends
    max_tokens: int
    cancel: threading.Event
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    evaluated: int = 0  # prompt tokens in the sequence's KV cache
    produced: int = 0
    next_token: int | None = None  # sampled, not yet decoded


@dataclass(eq=False)
class _Sequence:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # the tokens this sequence's KV cache holds, in order
    request: _Request | None = None
    last_used: int = 0


@dataclass
class _Row:
    """One batch position whose logits are sampled for a request."""

    request: _Request
    sequence: _Sequence
    index: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (the part of a cache a new prompt can keep)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class BatchDecoder:
    """The scheduler thread of one llama.cpp context with ``sequences`` sequences of ``seq_context`` tokens each.

    ``lock`` serialises the context between this thread and the model's other users (scoring holds
    :meth:`exclusive`, which waits for running requests to finish and keeps new ones waiting meanwhile).
    """

    def __init__(self, ctx, vocab, eos_ids: frozenset[int], *, sequences: int, seq_context: int, batch_size: int, prompt_chunk: int, prompt_cache: bool, lock: threading.Lock):
        import llama_cpp

        self._llama_cpp = llama_cpp
        self._ctx = ctx
        self._vocab = vocab
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.seq_context = seq_context
        self.batch_size = batch_size
        self.prompt_chunk = min(prompt_chunk, batch_size)
        self.prompt_cache = prompt_cache
        self._lock = lock
        self._batch = llama_cpp.llama_batch_init(batch_size, 0, 1)
        self._eos_ids = eos_ids
        self._outbox: list[tuple[queue.SimpleQueue, object]] = []  # (a request's queue, its token, error or end)
        self._sequences = [_Sequence(i) for i in range(sequences)]
        self._waiting: list[_Request] = []
        self._clock = itertools.count(1)
        self._wake = threading.Condition()
        self._held = 0  # exclusive() callers waiting or running: no request is admitted meanwhile
        self._closing = False
        self.prompt_tokens_reused = 0  # prompt tokens found in a sequence's cache instead of evaluated
        self._thread = threading.Thread(target=self._loop, name="cnllm-batch", daemon=True)
        self._thread.start()

    # -- the requests' side -------------------------------------------------------------------------------------

    def generate(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, cancel: threading.Event, grammar: str | None) -> Generator[int, None, None]:
        """Token ids for one request, as :meth:`LoadedModel.generate_ids` yields them: at most ``max_tokens`` plus
        one more (EOS, or the token the caller's own limit stops at); stops when ``cancel`` is set or it is closed."""
        if not prompt_ids:
            raise UsageError("the prompt is empty: a model needs at least one token to continue from")
        request = _Request(list(prompt_ids), self._sampler(params, grammar), max_tokens, cancel)
        with self._wake:
            if self._closing:
                self._llama_cpp.llama_sampler_free(request.sampler)
                return
            self._waiting.append(request)
            self._wake.notify_all()
        try:
            while True:
                item = request.out.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            with self._wake:
                self._wake.notify_all()

    def _sampler(self, params: SamplingParams, grammar: str | None):
        """The llama.cpp sampler chain of one request, in the order llama-cpp-python's ``Llama.generate`` builds it
        (so one request decodes alike on both paths): penalties, grammar, then greedy or top-k, top-p, temperature, draw."""
        lc = self._llama_cpp
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(self._n_vocab, PENALTY_LAST_N, params.repetition_penalty, 0.0, 0.0))
        if grammar is not None:
            from llama_cpp.llama_grammar import LLAMA_GRAMMAR_DEFAULT_ROOT

            rule = lc.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), LLAMA_GRAMMAR_DEFAULT_ROOT.encode("utf-8"))
            if not rule:
                lc.llama_sampler_free(chain)
                raise CnllmError("llama.cpp refused the grammar of this JSON schema")
            lc.llama_sampler_chain_add(chain, rule)
        if params.temperature == 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        else:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(params.top_k))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(params.temperature))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(params.resolved_seed()))
        return chain

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """The context to oneself (scoring clears it): waits for running requests to end, holding new ones back;
        afterwards no sequence keeps a cached prefix."""
        with self._wake:
            self._held += 1
            self._wake.wait_for(lambda: self._closing or all(s.request is None for s in self._sequences))
        try:
            with self._lock:
                yield
        finally:
            with self._wake:
                for sequence in self._sequences:
                    sequence.cached = []
                self._held -= 1
                self._wake.notify_all()

    @property
    def running(self) -> int:
        return sum(s.request is not None for s in self._sequences)

    def close(self) -> None:
        """End every request and stop the thread (the caller frees the context afterwards)."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._thread.join()
        self._llama_cpp.llama_batch_free(self._batch)

    # -- the scheduler thread -----------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    if not self._has_work():
                        self._deliver()
                    self._wake.wait_for(lambda: self._closing or self._has_work())
                    if self._closing:
                        break
                    self._admit()
                rows = self._fill_batch()
                self._deliver()  # the requests' threads take their tokens while llama.cpp decodes the next batch
                if self._batch.n_tokens:
                    self._step(rows)
        finally:
            with self._wake:
                for request in self._waiting:
                    self._finish(request)
                self._waiting.clear()
                for sequence in self._sequences:
                    if sequence.request is not None:
                        self._finish(sequence.request)
                        sequence.request = None
                self._deliver()

    def _has_work(self) -> bool:
        return any(s.request is not None for s in self._sequences) or (bool(self._waiting) and not self._held)

    def _admit(self) -> None:
        """Give waiting requests free sequences, first come first served (none while :meth:`exclusive` waits)."""
        for request in [r for r in self._waiting if r.cancel.is_set()]:
            self._waiting.remove(request)
            self._finish(request)
        while self._waiting and not self._held:
            free = [s for s in self._sequences if s.request is None]
            if not free:
                return
            request = self._waiting.pop(0)
            sequence = self._pick(free, request.prompt)
            self._assign(sequence, request)

    def _pick(self, free: list[_Sequence], prompt: list[int]) -> _Sequence:
        """The free sequence with the longest cached prefix of ``prompt`` (prompt cache on), else the least recently used."""
        if self.prompt_cache:
            best = max(free, key=lambda s: (common_prefix(s.cached, prompt), -s.last_used))
            if common_prefix(best.cached, prompt):
                return best
        return min(free, key=lambda s: s.last_used)

    def _assign(self, sequence: _Sequence, request: _Request) -> None:
        lc = self._llama_cpp
        keep = min(common_prefix(sequence.cached, request.prompt), len(request.prompt) - 1) if self.prompt_cache else 0
        with self._lock:
            if not lc.llama_memory_seq_rm(self._memory, sequence.seq_id, keep, -1):
                keep = 0  # a cache that cannot drop a tail (recurrent, sliding window) starts over
                lc.llama_memory_seq_rm(self._memory, sequence.seq_id, -1, -1)
        sequence.cached = request.prompt[:keep]
        self.prompt_tokens_reused += keep
        sequence.request = request
        sequence.last_used = next(self._clock)
        request.evaluated = keep

    def _fill_batch(self) -> list[_Row]:
        """The next batch: each decoding request's sampled token, then prompt pieces up to the prompt chunk size."""
        batch = self._batch
        batch.n_tokens = 0
        rows: list[_Row] = []
        with self._wake:
            active = [s for s in self._sequences if s.request is not None]
            for sequence in active:
                request = sequence.request
                if request is not None and request.cancel.is_set():
                    self._release(sequence)
        decoding = [s for s in active if s.request is not None and s.request.next_token is not None]
        prefilling = [s for s in active if s.request is not None and s.request.next_token is None]
        for sequence in decoding:
            request = sequence.request
            assert request is not None and request.next_token is not None
            rows.append(_Row(request, sequence, self._add(sequence, request.next_token, logits=True)))
        budget = max(self.prompt_chunk - len(decoding), 1)  # a prompt always advances
        for sequence in prefilling:
            request = sequence.request
            assert request is not None
            take = min(len(request.prompt) - request.evaluated, budget, self.batch_size - batch.n_tokens)
            for offset in range(take):
                position = request.evaluated + offset
                last = position == len(request.prompt) - 1
                index = self._add(sequence, request.prompt[position], logits=last)
                if last:
                    rows.append(_Row(request, sequence, index))
            request.evaluated += take
            budget -= take
            if budget <= 0:
                break
        return rows

    def _add(self, sequence: _Sequence, token: int, *, logits: bool) -> int:
        batch = self._batch
        index = batch.n_tokens
        batch.token[index] = token
        batch.pos[index] = len(sequence.cached)
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = sequence.seq_id
        batch.logits[index] = logits
        batch.n_tokens = index + 1
        sequence.cached.append(token)
        return index

    def _step(self, rows: list[_Row]) -> None:
        lc = self._llama_cpp
        with self._lock:
            status = lc.llama_decode(self._ctx, self._batch)
            if status != 0:
                self._fail(DecodeFailed(f"llama.cpp failed to decode a batch of {self._batch.n_tokens} tokens (status {status})"))
                return
            sampled = [(row, int(lc.llama_sampler_sample(row.request.sampler, self._ctx, row.index))) for row in rows]
        for row, token in sampled:
            request = row.request
            request.next_token = token
            request.produced += 1
            self._outbox.append((request.out, token))
            room = self.seq_context - len(row.sequence.cached)
            if token in self._eos_ids or request.produced > request.max_tokens or room <= 0 or request.cancel.is_set():
                with self._wake:
                    self._release(row.sequence)

    def _fail(self, error: Exception) -> None:
        """A failed decode leaves the sequences in it unknown: their requests end with ``error``, their caches are dropped."""
        lc = self._llama_cpp
        with self._wake:
            for sequence in self._sequences:
                if sequence.request is not None:
                    self._outbox.append((sequence.request.out, error))
                    self._release(sequence)
                lc.llama_memory_seq_rm(self._memory, sequence.seq_id, -1, -1)
                sequence.cached = []

    def _release(self, sequence: _Sequence) -> None:
        """End the sequence's request; its cache keeps the tokens decoded so far for a later prompt to reuse."""
        request = sequence.request
        if request is None:
            return
        sequence.request = None
        sequence.last_used = next(self._clock)
        self._finish(request)
        self._wake.notify_all()

    def _deliver(self) -> None:
        """Hand the tokens and endings of the last step to the requests' threads. Held back until the scheduler's own
        Python work for the next step is done: the threads woken then compete for the interpreter while the scheduler
        waits in llama.cpp, not while it samples and fills the next batch."""
        outbox, self._outbox = self._outbox, []
        for out, item in outbox:
            out.put(item)

    def _finish(self, request: _Request) -> None:
        self._outbox.append((request.out, _END))
        if request.sampler is not None:
            self._llama_cpp.llama_sampler_free(request.sampler)
            request.sampler = None
