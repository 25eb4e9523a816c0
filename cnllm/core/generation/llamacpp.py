"""The llama.cpp backend (llama-cpp-python) for ``.gguf`` files: one model object that generates (chat, serve,
passkey, longbench) and scores (eval ppl, mc, pref).

Scoring reuses the generation context: perplexity windows are decoded asking llama.cpp for logits only at the
scored positions, next-token prompts re-evaluate only what differs from the previous prompt.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, ContextManager, Generator, Sequence

import numpy as np

from cnllm.core import llama_loader
from cnllm.core.errors import CnllmError, UsageError
from cnllm.core.generation.base import (
    DEFAULT_N_CTX,
    LETTER_SPELLINGS,
    ContextOverflow,
    LoadedModel,
    LoadOptions,
    SamplingParams,
    SpeculativeStats,
    TokenLogprob,
    context_window,
    log_softmax_rows,
    target_logprobs_rows,
)
from cnllm.core.generation.batching import BatchDecoder, common_prefix
from cnllm.core.generation.speculative import llama_draft
from cnllm.core.rope import ModelRope, RopeOptions, llama_cpp_kwargs

if TYPE_CHECKING:
    from llama_cpp import Llama

_SILENT_LOG_CALLBACK = None
SCORING_CHUNK = 64  # tokens per decode when scoring prompt logprobs: llama.cpp keeps a logits row per token of a batch
MAX_BATCH = 2048  # tokens per llama_decode (llama.cpp's own default n_batch)


def silence_llama_logs(verbose: bool) -> None:
    """Route llama.cpp's own log lines (model load, context setup) nowhere unless ``verbose``."""
    global _SILENT_LOG_CALLBACK
    import llama_cpp

    if verbose:
        from llama_cpp._logger import llama_log_callback

        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))
        return
    if _SILENT_LOG_CALLBACK is None:
        _SILENT_LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_SILENT_LOG_CALLBACK, ctypes.c_void_p(0))


def gguf_model_rope(path: Path) -> ModelRope | None:
    """Trained context, rotary dimension and rope base, read by loading only the vocabulary and metadata
    (fast even for large files); None when the GGUF does not say its context length."""
    try:
        header = llama_loader.open_llama(path, vocab_only=True, verbose=False)
    except (ValueError, RuntimeError, OSError) as exc:
        raise UsageError(f"llama.cpp could not read {path} ({exc}); is it a complete GGUF file?") from None
    try:
        return metadata_rope(header.metadata)
    finally:
        header.close()


def metadata_rope(meta: dict) -> ModelRope | None:
    """:class:`ModelRope` from GGUF metadata (a loaded ``Llama``'s ``metadata``); None without a context length."""
    arch = meta.get("general.architecture", "")
    trained = meta.get(f"{arch}.rope.scaling.original_context_length") or meta.get(f"{arch}.context_length")
    if not trained:
        return None
    head_dim = meta.get(f"{arch}.rope.dimension_count")
    if not head_dim and meta.get(f"{arch}.attention.head_count"):
        head_dim = int(meta[f"{arch}.embedding_length"]) // int(meta[f"{arch}.attention.head_count"])
    return ModelRope(int(trained), int(head_dim or 128), float(meta.get(f"{arch}.rope.freq_base") or 10000.0))


def llama_rope_kwargs(path: Path, rope: RopeOptions | None, n_ctx: int, facts: ModelRope | None = None) -> dict:
    """``Llama(...)`` rope arguments for ``rope`` on the GGUF at ``path`` (none when no rope option is set)."""
    if rope is None or not rope.active:
        return {}
    facts = facts or gguf_model_rope(path)
    if facts is None:
        raise UsageError(f"{path} does not record its context length; rope scaling needs it")
    return llama_cpp_kwargs(rope, facts, n_ctx)


# llama.cpp's grammar parser recurses once per nested group: a schema with maxLength 100000 overflows the C stack and
# kills the process, so deeper grammars are refused first (maxLength 1000 nests about 1000 deep and parses).
MAX_GRAMMAR_NESTING = 1200
MAX_GRAMMAR_CHARS = 1_000_000
# The converter spells every repetition out (maxLength 10**9 would be gigabytes of grammar before any check), so the
# bounds of a schema, and the atoms a pattern's quantifiers expand to, are checked first.
MAX_REPETITION = 10_000
REPETITION_KEYS = ("minLength", "maxLength", "minItems", "maxItems")
# A JSON string character as llama.cpp's own converter writes it: control characters only escaped (JSON forbids them raw).
JSON_STRING_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


@functools.lru_cache(maxsize=64)
def schema_grammar(schema_json: str) -> str:
    """The GBNF grammar of a JSON schema, by llama-cpp-python's converter (the one its own server uses), with its string
    character rule made strict: its own lets raw control characters into strings, which JSON parsers refuse."""
    from llama_cpp.llama_grammar import PRIMITIVE_RULES, json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(schema_json)
    except Exception as exc:  # noqa: BLE001 - the converter asserts, or fails on the first malformed part it reads
        raise UsageError(f"the JSON schema cannot be turned into a grammar ({type(exc).__name__}: {exc})") from None
    if len(grammar) > MAX_GRAMMAR_CHARS or grammar_nesting(grammar) > MAX_GRAMMAR_NESTING:
        raise UsageError(
            f"the JSON schema's grammar is too large for llama.cpp (more than {MAX_GRAMMAR_CHARS} characters or "
            f"{MAX_GRAMMAR_NESTING} nested groups); lower maxLength, maxItems or the number of alternatives"
        )
    return grammar.replace(f"char ::= {PRIMITIVE_RULES['char'].content}\n", f"char ::= {JSON_STRING_CHAR}\n")


def oversized_repetition(schema: object) -> str | None:
    """The first bound of ``schema`` that the converter would spell out more than MAX_REPETITION times (None: none)."""
    pending = [schema]  # walked without recursion: a schema may nest deeper than Python's stack
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in REPETITION_KEYS and isinstance(value, int) and value > MAX_REPETITION:
                    return f"{key} {value}"
                if key == "pattern" and isinstance(value, str) and pattern_atoms(value) > MAX_REPETITION:
                    return f"pattern {value[:40]!r}"
                pending.append(value)
    return None


def pattern_atoms(pattern: str) -> int:
    """How many atoms a regular expression spells out when every quantifier ``{n}``, ``{n,m}`` is written as repetitions."""
    groups = [0]  # the size of each open group
    last = 0  # the size of what a quantifier would repeat
    at = 0
    while at < len(pattern):
        char = pattern[at]
        if char == "(":
            groups.append(0)
            last = 0
        elif char == ")" and len(groups) > 1:
            last = groups.pop()
            groups[-1] += last
        elif char == "{" and (end := pattern.find("}", at)) > at and re.fullmatch(r"\d+(,\d*)?", bounds := pattern[at + 1 : end]):
            times = max(int(n) if len(n) < 10 else 10**10 for n in bounds.split(",") if n)  # int() refuses 4,300 digits
            groups[-1] += last * (times - 1)
            last *= times
            at = end
        else:
            if char == "\\":
                at += 1
            elif char == "[":
                while at + 1 < len(pattern) and pattern[at + 1] != "]":
                    at += 2 if pattern[at + 1] == "\\" else 1
                at += 1
            last = 1
            groups[-1] += 1
        at += 1
    return sum(groups)


def grammar_nesting(grammar: str) -> int:
    """The deepest parenthesis nesting of a GBNF text (quoted literals and character classes skipped)."""
    depth = deepest = 0
    closing = None  # the character that ends the literal or class being read
    at = 0
    while at < len(grammar):
        char = grammar[at]
        if closing is not None:
            if char == "\\":
                at += 1
            elif char == closing:
                closing = None
        elif char in "\"[":
            closing = "\"" if char == "\"" else "]"
        elif char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
        at += 1
    return deepest


def cached_prefix(llama, ids: Sequence[int]) -> int:
    """How many leading ``ids`` a ``Llama`` context holds already (their KV cache can be kept)."""
    return common_prefix(llama.input_ids[: llama.n_tokens].tolist(), ids)


class LlamaCppModel(LoadedModel):
    backend = "llama.cpp"

    def __init__(self, path: Path, options: LoadOptions):
        self.path = Path(path)
        self.options = options
        silence_llama_logs(options.verbose)
        facts = gguf_model_rope(self.path)
        trained = facts.trained if facts else None
        self.trained_context = trained
        n_ctx = context_window(options, trained, cap=DEFAULT_N_CTX)
        self._rope = llama_rope_kwargs(self.path, options.rope, n_ctx, facts)
        self._draft_llama = None
        self._draft = None
        if options.draft_model is not None and options.sequences > 1:
            raise UsageError("speculative decoding (--draft-model) runs one request at a time; drop --parallel or --draft-model")
        if options.draft_model is not None:
            self._draft_llama = self._load(Path(options.draft_model), n_ctx=n_ctx)
            self._draft = llama_draft(self._draft_llama, options.draft_tokens)
        self._llama = self._load(self.path, n_ctx=n_ctx * options.sequences, sequences=options.sequences, draft_model=self._draft)
        if self._draft_llama is not None and self._draft_llama.n_vocab() != self._llama.n_vocab():
            self.close()
            raise UsageError(
                f"draft model {options.draft_model} has {self._draft_llama.n_vocab()} tokens but {path} has "
                f"{self._llama.n_vocab()}; a draft model must share the target's vocabulary"
            )
        self._embedder: Llama | None = None  # opened on the first embedding request
        self._lock = threading.Lock()
        self._embed_lock = threading.Lock()
        import llama_cpp

        self.context_length = llama_cpp.llama_n_ctx_seq(self._llama.ctx)
        self.vocab_size = self._llama.n_vocab()
        self._vocab = llama_cpp.llama_model_get_vocab(self._llama.model)
        self._batcher: BatchDecoder | None = None
        self.eos_ids = frozenset(i for i in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(self._vocab, i))
        if options.sequences > 1:
            self._batcher = BatchDecoder(
                self._llama.ctx,
                self._vocab,
                self.eos_ids,
                sequences=options.sequences,
                seq_context=self.context_length,
                batch_size=self._llama.n_batch,
                prompt_chunk=self._llama.context_params.n_ubatch,
                prompt_cache=options.prompt_cache,
                lock=self._lock,
            )
        self.bos_token = self._special_text(self._llama.token_bos())
        self.eos_token = self._special_text(self._llama.token_eos())
        adds_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab)) and self._llama.token_bos() >= 0
        self.bos_id = self._llama.token_bos() if adds_bos else None
        self._piece_sizes: dict[int, tuple[int, int]] = {}  # bytes and characters of each piece
        self._letters: dict[str, set[int]] | None = None

    def _load(self, path: Path, *, n_ctx: int, sequences: int = 1, embedding: bool = False, draft_model=None):
        from llama_cpp import LLAMA_POOLING_TYPE_MEAN

        extra = {"n_batch": min(n_ctx, MAX_BATCH)}
        if embedding:
            # Mean pooling needs the whole text in one physical batch.
            extra = {"embedding": True, "pooling_type": LLAMA_POOLING_TYPE_MEAN, "n_batch": n_ctx, "n_ubatch": n_ctx}
        if self.options.threads:
            extra["n_threads"] = extra["n_threads_batch"] = self.options.threads
        try:
            return llama_loader.open_llama(
                path,
                repack=self.options.repack,
                n_ctx=n_ctx,
                n_gpu_layers=self.options.gpu_layers,
                sequences=sequences,
                draft_model=draft_model,
                verbose=self.options.verbose,
                **(self._rope if path == self.path else llama_rope_kwargs(path, self.options.rope, n_ctx)),
                **extra,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise UsageError(f"llama.cpp could not load {path} ({exc}); is the file complete and its architecture supported?") from None

    def _special_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self.token_text(token_id)

    def token_text(self, token_id: int) -> str:
        return self._llama.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def text_ids(self, text: str, *, special: bool) -> list[int]:
        return self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _piece(self, token_id: int) -> bytes:
        """The bytes a token stands for in text (special tokens: none)."""
        import llama_cpp

        buffer = ctypes.create_string_buffer(256)
        size = llama_cpp.llama_token_to_piece(self._vocab, token_id, buffer, len(buffer), 0, False)
        return buffer.raw[: max(size, 0)]

    def tokenize_with_lengths(self, text: str) -> tuple[list[int], list[int], list[int]]:
        ids = self.tokenize(text, special=False)
        for token_id in set(ids) - self._piece_sizes.keys():
            piece = self._piece(token_id)
            # characters: the bytes that start one (a character split across tokens counts where it starts)
            self._piece_sizes[token_id] = (len(piece), sum(1 for b in piece if b & 0xC0 != 0x80))
        return ids, [self._piece_sizes[t][0] for t in ids], [self._piece_sizes[t][1] for t in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return self._llama.detokenize(list(ids)).decode("utf-8", errors="replace")

    def chat_template_source(self) -> str | None:
        return self._llama.metadata.get("tokenizer.chat_template") or None

    def check_sampling(self, params: SamplingParams) -> None:
        if params.json_schema is not None:
            self._grammar(params.json_schema)

    def _grammar(self, schema: dict) -> str:
        """The schema's GBNF grammar, checked by llama.cpp's own parser first (a grammar it rejects would crash the sampler chain)."""
        import llama_cpp
        from llama_cpp.llama_grammar import LLAMA_GRAMMAR_DEFAULT_ROOT

        try:
            schema_json = json.dumps(schema, sort_keys=True)
        except RecursionError:
            raise UsageError("the JSON schema is nested too deeply to be turned into a grammar") from None
        oversized = oversized_repetition(schema)
        if oversized is not None:
            raise UsageError(f"the JSON schema's {oversized} repeats more than {MAX_REPETITION} times; lower it")
        grammar = schema_grammar(schema_json)
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), LLAMA_GRAMMAR_DEFAULT_ROOT.encode("utf-8"))
        if not sampler:
            raise UsageError(
                "llama.cpp refused the grammar of this JSON schema (its reason is on the server's stderr); "
                "lower maxLength or maxItems, or simplify the schema"
            )
        llama_cpp.llama_sampler_free(sampler)
        return grammar

    def generate_ids(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, cancel: threading.Event) -> Generator[int, None, None]:
        """Through the batch decoder when the context holds several sequences (serve --parallel), else on the one
        sequence with llama-cpp-python's ``Llama.generate`` (which also runs a draft model)."""
        grammar = self._grammar(params.json_schema) if params.json_schema is not None else None
        if self._batcher is not None:
            yield from self._batcher.generate(prompt_ids, params, max_tokens, cancel, grammar)
            return
        from llama_cpp.llama_grammar import LlamaGrammar

        with self._lock:
            llama = self._llama
            if not self.options.prompt_cache:
                # A cached prefix is evaluated in a different batch shape than a fresh prompt, which can flip
                # near-tie greedy choices: without the cache the same request always gets the same answer.
                llama.reset()
            llama.set_seed(params.resolved_seed())
            if self._draft is not None:
                self._draft.reset()
            if not self._evaluate_prompt_head(prompt_ids, cancel):
                return
            produced = 0
            tokens = llama.generate(
                prompt_ids,
                top_k=params.top_k,
                top_p=params.top_p,
                min_p=0.0,
                typical_p=1.0,
                temp=params.temperature,
                repeat_penalty=params.repetition_penalty,
                grammar=None if grammar is None else LlamaGrammar.from_string(grammar, verbose=False),
            )
            try:
                for token in tokens:
                    yield int(token)
                    produced += 1
                    if cancel.is_set() or produced > max_tokens:
                        break
            finally:
                tokens.close()

    def _evaluate_prompt_head(self, prompt_ids: list[int], cancel: threading.Event) -> bool:
        """Evaluate a long prompt up to its last physical batch (``n_ubatch`` tokens per ``llama_decode``), checking
        ``cancel`` between batches: a client that hangs up, or a server that stops, during prompt processing ends it
        within one batch instead of after the whole prompt. ``llama.generate`` then finds the evaluated part cached and
        evaluates only the rest, in the batches llama.cpp would have used for the whole prompt (the same arithmetic).

        Returns False when cancelled. A prompt that fits one batch is left to ``llama.generate`` alone."""
        llama = self._llama
        step = llama.context_params.n_ubatch
        done = cached_prefix(llama, prompt_ids[:-1])  # with the prompt cache, what the context holds already is kept
        if len(prompt_ids) - done <= step:
            return not cancel.is_set()
        llama.n_tokens = done
        while len(prompt_ids) - done > step:
            if cancel.is_set():
                return False
            llama.eval(prompt_ids[done : done + step])
            done += step
        return not cancel.is_set()

    def _scoring(self) -> ContextManager[object]:
        """The context for scoring, which clears it: with the batch decoder, once its running requests have ended."""
        return self._batcher.exclusive() if self._batcher is not None else self._lock

    def speculative_stats(self) -> SpeculativeStats | None:
        return self._draft.stats if self._draft is not None else None

    def prompt_logprobs(self, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
        ids = list(ids)
        if len(ids) > self.context_length:
            raise ContextOverflow(len(ids), self.context_length)
        pieces = self.token_pieces(ids)
        result = [TokenLogprob(ids[0], pieces[0], None)] if ids else []
        with self._scoring():
            llama = self._llama
            llama.reset()
            llama._ctx.kv_cache_seq_rm(-1, 0, -1)
            n_vocab = llama.n_vocab()
            chunk = min(SCORING_CHUNK, llama.n_batch)
            try:
                for start in range(0, len(ids) - 1, chunk):
                    batch = ids[start : start + chunk]
                    llama._batch.set_batch(batch=batch, n_past=start, logits_all=True)
                    llama._ctx.decode(llama._batch)
                    logits = np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(len(batch), n_vocab))
                    for row, position in enumerate(range(start, start + len(batch))):
                        if position + 1 >= len(ids):
                            break
                        values = logits[row].astype(np.float64)
                        peak = values.max()
                        logsum = peak + math.log(np.exp(values - peak).sum())
                        target = ids[position + 1]
                        alternatives = []
                        if top:
                            best = np.argpartition(-values, top - 1)[:top]
                            best = best[np.argsort(-values[best])]
                            alternatives = [(self.token_text(int(i)), float(values[i] - logsum)) for i in best]
                        result.append(TokenLogprob(target, pieces[position + 1], float(values[target] - logsum), alternatives))
            finally:
                llama._ctx.kv_cache_seq_rm(-1, 0, -1)
                llama.reset()
        return result

    def target_logprobs(self, windows: Sequence[Sequence[int]], first: int) -> list[np.ndarray]:
        """Each window decoded in a fresh context asking llama.cpp for logits only at the scored positions
        (as its perplexity tool does), so no logits row is computed, copied or kept for unscored tokens."""
        import llama_cpp

        results = []
        with self._scoring():
            ctx = self._llama._ctx.ctx
            memory = llama_cpp.llama_get_memory(ctx)
            step = self._llama.n_batch
            batch = llama_cpp.llama_batch_init(step, 0, 1)
            try:
                for window in windows:
                    window = list(window)
                    llama_cpp.llama_memory_clear(memory, True)
                    picked = []
                    for start in range(0, len(window), step):
                        part = window[start : start + step]
                        batch.n_tokens = len(part)
                        scored = [p for p in range(start, start + len(part)) if first - 1 <= p < len(window) - 1]
                        for k, token in enumerate(part):
                            batch.token[k], batch.pos[k], batch.n_seq_id[k] = token, start + k, 1
                            batch.seq_id[k][0] = 0
                            batch.logits[k] = first - 1 <= start + k < len(window) - 1
                        if llama_cpp.llama_decode(ctx, batch) != 0:
                            raise CnllmError(f"llama.cpp failed to decode a window of {len(window)} tokens")
                        if scored:  # the rows come in batch order
                            rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(scored), self.vocab_size))
                            picked.append(target_logprobs_rows(rows, np.asarray([window[p + 1] for p in scored])))
                    results.append(np.concatenate(picked))
            finally:
                llama_cpp.llama_batch_free(batch)
                llama_cpp.llama_memory_clear(memory, True)
                self._llama.reset()
        return results

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """One prompt at a time in one context, re-evaluating only what differs from the tokens the context holds
        (few-shot prompts of a subject share their long prefix)."""
        rows = []
        with self._scoring():
            llama = self._llama
            for prompt in prompts:
                prompt = list(prompt)
                keep = cached_prefix(llama, prompt[:-1])
                llama.n_tokens = keep
                llama.eval(prompt[keep:])
                rows.append(log_softmax_rows(np.ctypeslib.as_array(llama._ctx.get_logits_ith(-1), shape=(self.vocab_size,))))
        return np.stack(rows)

    def letter_piece_ids(self, letter: str) -> set[int]:
        if self._letters is None:
            import llama_cpp

            wanted = {s.format(x).encode("utf-8"): x for x in "ABCD" for s in LETTER_SPELLINGS}
            self._letters = {x: set() for x in "ABCD"}
            for token_id in range(self.vocab_size):
                text = llama_cpp.llama_vocab_get_text(self._vocab, token_id)
                if text in wanted:
                    self._letters[wanted[text]].add(token_id)
        return set(self._letters.get(letter, set()))

    def describe(self) -> dict:
        rope = self.options.rope
        return {
            "path": str(self.path),
            "backend": self.backend,
            "n_ctx": self.context_length,
            "threads": self._llama.n_threads,
            "repack": self._llama.repack_in_effect,
            "sequences": self.options.sequences,
            "trained_context": self.trained_context,
            "rope": rope.to_dict() if rope is not None and rope.active else None,
        }

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        with self._embed_lock:
            if self._embedder is None:
                self._embedder = self._load(self.path, n_ctx=self.context_length, embedding=True)
            for text in texts:
                count = len(self.tokenize(text))
                if count > self.context_length:
                    raise ContextOverflow(count, self.context_length)
            vectors, count = self._embedder.embed(list(texts), normalize=True, truncate=False, return_count=True)
        return [list(map(float, v)) for v in vectors], int(count)

    def close(self) -> None:
        batcher = getattr(self, "_batcher", None)  # absent when loading failed
        if batcher is not None:
            batcher.close()
            self._batcher = None
        for name in ("_llama", "_embedder", "_draft_llama"):
            model = getattr(self, name, None)
            if model is not None:
                model.close()
                setattr(self, name, None)
