"""The two things evaluation asks of a model — log-probabilities of the tokens of fixed windows (perplexity) and
next-token log-probabilities after many prompts (multiple choice) — on transformers and on llama.cpp.

The chat/serve generators stream tokens one request at a time; scoring needs whole logit matrices, batches with
left padding (transformers) and a reused llama.cpp context, so these thin scorers sit beside them and share the
dispatcher (:func:`cnllm.core.backends.load_scorer`), the Hugging Face loader (:func:`cnllm.core.modelio.load_causal_lm`),
the prompt renderer and BOS rule (:mod:`cnllm.core.templates`) and llama.cpp's log silencing.
"""

from __future__ import annotations

import ctypes
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cnllm.core.dtypes import DType
from cnllm.core.errors import CnllmError, UsageError
from cnllm.core.rope import RopeOptions
from cnllm.core.templates import PromptFormat, resolve_template

# How one letter can appear as a vocabulary piece: bare, SentencePiece word start, byte-level BPE space, plain space.
LETTER_SPELLINGS = ("{}", "\u2581{}", "\u0120{}", " {}")
SOFTMAX_ROWS = 8  # logits rows log-softmaxed at once: a few float64 rows stay in cache (large blocks run 100× slower)
HEAD_ROWS = 1024  # positions put through the output layer at once, so no context × vocabulary matrix is ever built


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a Hugging Face directory (optionally with an unmerged LoRA adapter) or a GGUF file."""

    path: Path
    lora: Path | None = None
    device: str | None = None
    dtype: str | None = None  # a dtype word (fp16, bfloat16, …; echoed back); None: bf16/fp16 on accelerators, fp32 on CPU
    n_ctx: int = 2048  # llama.cpp context size
    threads: int | None = None
    trust_remote_code: bool = False
    rope: RopeOptions | None = None  # context extension on either backend (cnllm.core.rope)
    repack: bool | None = None  # llama.cpp weight repacking: None lets cnllm decide (cnllm.core.cpu.decide_repack)


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


class ScoringModel(ABC):
    backend: str
    path: Path
    bos_token: str
    eos_token: str
    adds_bos: bool  # whether the model's tokenizer puts BOS before a text
    bos_id: int | None  # the BOS id when the model's tokenizer adds one, else None
    trained_context: int | None = None  # the context the model was trained for (before any rope scaling)

    @abstractmethod
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids; BOS only when ``add_bos`` and the model adds one; ``special`` parses special-token text."""

    @abstractmethod
    def tokenize_with_lengths(self, text: str) -> tuple[list[int], list[int], list[int]]:
        """Ids of the whole text (with BOS) and, per token, how many UTF-8 bytes and how many characters of the
        text it stands for (what bits per byte and per character divide by)."""

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
    def chat_template_source(self) -> str | None:
        """The model's own Jinja chat template, if it has one."""

    @abstractmethod
    def describe(self) -> dict:
        """What was loaded, for results files."""

    def prompt_format(self, template: str | None) -> PromptFormat:
        """The renderer for ``template`` (a built-in name, ``auto`` or ``none``) on this model."""
        return resolve_template(template, jinja_source=self.chat_template_source(), bos_token=self.bos_token, eos_token=self.eos_token)

    def close(self) -> None:
        """Free the model now."""

    def __enter__(self) -> "ScoringModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TransformersModel(ScoringModel):
    backend = "transformers"

    def __init__(self, spec: ModelSpec):
        from cnllm.core.modelio import has_tokenizer, load_causal_lm, load_tokenizer, tokenizer_adds_bos

        self.path, self.spec = spec.path, spec
        dtype = DType(spec.dtype, where="--dtype").torch if spec.dtype else None
        # an adapter that extended the vocabulary carries its tokenizer (as generation reads it)
        tokenizer_dir = spec.lora if spec.lora is not None and has_tokenizer(spec.lora) else spec.path
        try:
            self.tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=spec.trust_remote_code)
            self.model = load_causal_lm(
                spec.path,
                lora=spec.lora,
                device=spec.device,
                dtype=dtype,
                trust_remote_code=spec.trust_remote_code,
                rope=spec.rope,
                n_ctx=spec.n_ctx,
            )
        except CnllmError:
            raise
        except Exception as exc:  # safetensors, torch and config errors all mean: this model cannot be used
            raise UsageError(f"cannot load model {spec.path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        from cnllm.core.rope import hf_model_rope

        self.trained_context = hf_model_rope(self.model.config).trained
        self.device = next(self.model.parameters()).device
        self.bos_token = self.tokenizer.bos_token or ""
        self.eos_token = self.tokenizer.eos_token or ""
        self.adds_bos = tokenizer_adds_bos(self.tokenizer)
        self.bos_id = self.tokenizer.bos_token_id if self.adds_bos else None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._vocab: dict[str, int] | None = None

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"]
        return [self.tokenizer.bos_token_id, *ids] if add_bos and self.adds_bos else list(ids)

    def tokenize_with_lengths(self, text: str) -> tuple[list[int], list[int], list[int]]:
        encoded = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        ids, sizes, chars, covered = list(encoded["input_ids"]), [], [], 0
        for _, end in encoded["offset_mapping"]:
            end = max(end, covered)
            sizes.append(len(text[covered:end].encode("utf-8")))
            chars.append(end - covered)
            covered = end
        if sizes:  # text after the last token (trailing whitespace some tokenizers drop) belongs to it
            sizes[-1] += len(text[covered:].encode("utf-8"))
            chars[-1] += len(text) - covered
        if self.adds_bos:
            ids, sizes, chars = [self.tokenizer.bos_token_id, *ids], [0, *sizes], [0, *chars]
        return ids, sizes, chars

    def target_logprobs(self, windows: Sequence[Sequence[int]], first: int) -> list[np.ndarray]:
        import torch

        head, softcap = self.model.get_output_embeddings(), getattr(self.model.config, "final_logit_softcapping", None)
        with torch.inference_mode():
            ids = torch.tensor([list(w) for w in windows], device=self.device)
            hidden = self.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, first - 1 : -1]
            targets, picked = ids[:, first:], []
            for at in range(0, hidden.shape[1], HEAD_ROWS):  # the causal LM's own head, a slice of positions at a time
                logits = head(hidden[:, at : at + HEAD_ROWS]).float()
                if softcap:  # Gemma 2/3 squash the final logits
                    logits = torch.tanh(logits / softcap) * softcap
                picked.append(torch.log_softmax(logits, dim=-1).gather(-1, targets[:, at : at + HEAD_ROWS, None])[..., 0])
        return list(torch.cat(picked, dim=1).double().cpu().numpy())

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """One forward pass for the batch: left padding, an attention mask, positions counted from each prompt's start."""
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1).logits[:, -1]
            return torch.log_softmax(logits.float(), dim=-1).double().cpu().numpy()

    def letter_piece_ids(self, letter: str) -> set[int]:
        if self._vocab is None:
            self._vocab = self.tokenizer.get_vocab()
        return {self._vocab[s.format(letter)] for s in LETTER_SPELLINGS if s.format(letter) in self._vocab}

    def chat_template_source(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or None

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "backend": self.backend,
            "lora": str(self.spec.lora) if self.spec.lora else None,
            "device": str(self.device),
            "dtype": str(self.spec.dtype) if self.spec.dtype else str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "trained_context": self.trained_context,
            "rope": self.spec.rope.to_dict() if self.spec.rope is not None and self.spec.rope.active else None,
        }

    def close(self) -> None:
        self.model = None


class LlamaCppModel(ScoringModel):
    """A GGUF through llama-cpp-python. ``logits_all`` keeps a logits row per context position; without it only the
    last row exists, which is all multiple choice needs (a 256k vocabulary × context is large). Perplexity asks
    llama.cpp for the scored rows alone (:meth:`target_logprobs`) and needs neither."""

    backend = "llama.cpp"

    def __init__(self, spec: ModelSpec, *, logits_all: bool):
        import llama_cpp

        from cnllm.core.generation.llamacpp import llama_rope_kwargs, metadata_rope, silence_llama_logs
        from cnllm.core.llama_loader import open_llama

        self.path, self.spec, self.logits_all = spec.path, spec, logits_all
        silence_llama_logs(False)
        rope = llama_rope_kwargs(spec.path, spec.rope, spec.n_ctx)
        threads = {"n_threads": spec.threads, "n_threads_batch": spec.threads} if spec.threads else {}
        try:
            self.llm = open_llama(
                spec.path,
                repack=spec.repack,
                n_ctx=spec.n_ctx,
                n_batch=min(spec.n_ctx, 2048),
                logits_all=logits_all,
                verbose=False,
                **rope,
                **threads,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise UsageError(f"llama.cpp cannot load {spec.path} ({exc}); is the file complete and its architecture supported?") from None
        facts = metadata_rope(self.llm.metadata)
        self.trained_context = facts.trained if facts else None
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = self.llm.n_vocab()
        self.bos_token = self._piece(self.llm.token_bos(), special=True).decode("utf-8", errors="replace")
        self.eos_token = self._piece(self.llm.token_eos(), special=True).decode("utf-8", errors="replace")
        self.adds_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab)) and self.llm.token_bos() >= 0
        self.bos_id = self.llm.token_bos() if self.adds_bos else None
        self._piece_sizes: dict[int, tuple[int, int]] = {}  # bytes and characters of each piece
        self._letters: dict[str, set[int]] | None = None
        self._context: list[int] = []  # tokens whose KV entries the context currently holds (prefix reuse)

    def _piece(self, token_id: int, *, special: bool = False) -> bytes:
        import llama_cpp

        if token_id < 0:
            return b""
        buffer = ctypes.create_string_buffer(256)
        size = llama_cpp.llama_token_to_piece(self.vocab, token_id, buffer, len(buffer), 0, special)
        return buffer.raw[: max(size, 0)]

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def tokenize_with_lengths(self, text: str) -> tuple[list[int], list[int], list[int]]:
        ids = self.tokenize(text)
        for token_id in set(ids) - self._piece_sizes.keys():
            piece = self._piece(token_id)
            # characters: the bytes that start one (a character split across tokens counts where it starts)
            self._piece_sizes[token_id] = (len(piece), sum(1 for b in piece if b & 0xC0 != 0x80))
        return ids, [self._piece_sizes[t][0] for t in ids], [self._piece_sizes[t][1] for t in ids]

    def target_logprobs(self, windows: Sequence[Sequence[int]], first: int) -> list[np.ndarray]:
        """Each window decoded in a fresh context asking llama.cpp for logits only at the scored positions
        (as its perplexity tool does), so no logits row is computed, copied or kept for unscored tokens."""
        import llama_cpp

        ctx = self.llm._ctx.ctx
        memory = llama_cpp.llama_get_memory(ctx)
        step = self.llm.n_batch
        batch = llama_cpp.llama_batch_init(step, 0, 1)
        results = []
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
                        rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(scored), self.n_vocab))
                        picked.append(target_logprobs_rows(rows, np.asarray([window[p + 1] for p in scored])))
                results.append(np.concatenate(picked))
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_memory_clear(memory, True)
            self.llm.reset()
            self._context = []
        return results

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """One prompt at a time in one context, re-evaluating only what differs from the previous prompt
        (few-shot prompts of a subject share their long prefix)."""
        rows = []
        for prompt in prompts:
            prompt = list(prompt)
            keep = 0
            for old, new in zip(self._context, prompt[:-1]):
                if old != new:
                    break
                keep += 1
            self.llm.n_tokens = keep
            self.llm.eval(prompt[keep:])
            self._context = prompt
            last = self.llm.scores[len(prompt) - 1] if self.logits_all else np.ctypeslib.as_array(
                self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,)
            )
            rows.append(log_softmax_rows(last))
        return np.stack(rows)

    def letter_piece_ids(self, letter: str) -> set[int]:
        if self._letters is None:
            import llama_cpp

            wanted = {s.format(x).encode("utf-8"): x for x in "ABCD" for s in LETTER_SPELLINGS}
            self._letters = {x: set() for x in "ABCD"}
            for token_id in range(self.n_vocab):
                text = llama_cpp.llama_vocab_get_text(self.vocab, token_id)
                if text in wanted:
                    self._letters[wanted[text]].add(token_id)
        return set(self._letters.get(letter, set()))

    def chat_template_source(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template") or None

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "backend": self.backend,
            "n_ctx": self.llm.n_ctx(),
            "threads": self.llm.n_threads,
            "repack": self.llm.repack_in_effect,
            "trained_context": self.trained_context,
            "rope": self.spec.rope.to_dict() if self.spec.rope is not None and self.spec.rope.active else None,
        }

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None
