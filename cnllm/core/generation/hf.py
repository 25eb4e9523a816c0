"""The transformers backend for Hugging Face model directories (optionally with a LoRA adapter applied through PEFT),
loaded by :func:`cnllm.core.modelio.load_causal_lm` like every other Hugging Face model in cnllm: one model object
that generates (chat, serve, passkey, longbench) and scores (eval ppl, mc, pref).

``model.generate`` runs in a worker thread and hands each new id to a queue streamer; a stopping
criterion watches the cancel flag, so stop strings, ``max_tokens`` and disconnected clients end it
at the next step. One model serves one generation at a time (a lock), so server workers queue.
Scoring runs whole batches: windows through the decoder and the output head a slice at a time, next-token
prompts left-padded with an attention mask.
"""

from __future__ import annotations

import inspect
import queue
import threading
from pathlib import Path
from typing import Any, Generator, Sequence

import numpy as np

from cnllm.core.dtypes import DType
from cnllm.core.errors import CnllmError, UsageError
from cnllm.core.generation.base import (
    LETTER_SPELLINGS,
    ContextOverflow,
    LoadedModel,
    LoadOptions,
    SamplingParams,
    SpeculativeStats,
    TokenLogprob,
    context_window,
)
from cnllm.core.generation.speculative import ForwardCounter
from cnllm.core.modelio import (
    check_tokenizer_files,
    has_tokenizer,
    load_causal_lm,
    load_config,
    load_tokenizer,
    tokenizer_adds_bos,
    tokenizer_length,
)
from cnllm.core.rope import hf_model_rope
from cnllm.core.runtime import quiet_libraries

HEAD_ROWS = 1024  # positions put through the output layer at once, so no context × vocabulary matrix is ever built
PREFILL_CHUNK = 512  # prompt tokens run between two cancellation checks (llama.cpp's default physical batch)


def cache_argument(model) -> str:
    """What transformers calls the KV cache, as an argument and an output field: ``cache`` since 5.x, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.get_decoder().forward).parameters else "past_key_values"


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class HfTokenizerModel(LoadedModel):
    """What a backend driven by a Hugging Face tokenizer shares (transformers, vLLM): the tokenizer loaded as everywhere
    in cnllm (an adapter's own tokenizer first), its ids, pieces and lengths, and the model's own chat template."""

    tokenizer: Any
    _vocab: dict[str, int] | None = None

    def _load_hf_tokenizer(self, path: Path, options: LoadOptions) -> None:
        tokenizer_dir = options.lora if options.lora is not None and has_tokenizer(options.lora) else path
        check_tokenizer_files(tokenizer_dir)
        try:
            self.tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=options.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UsageError(f"could not load the tokenizer in {tokenizer_dir}: {exc}") from None
        self.bos_token = self.tokenizer.bos_token or ""
        self.eos_token = self.tokenizer.eos_token or ""
        self.bos_id = self.tokenizer.bos_token_id if tokenizer_adds_bos(self.tokenizer) else None

    def text_ids(self, text: str, *, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"])

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
        if self.bos_id is not None:
            ids, sizes, chars = [self.bos_id, *ids], [0, *sizes], [0, *chars]
        return ids, sizes, chars

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def chat_template_source(self) -> str | None:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) and template else None

    def letter_piece_ids(self, letter: str) -> set[int]:
        if self._vocab is None:
            self._vocab = self.tokenizer.get_vocab()
        return {self._vocab[s.format(letter)] for s in LETTER_SPELLINGS if s.format(letter) in self._vocab}


class TransformersModel(HfTokenizerModel):
    backend = "transformers"

    def __init__(self, path: Path, options: LoadOptions):
        quiet_libraries(options.verbose)
        self.path = Path(path)
        self.options = options
        load_config(self.path)  # a malformed config.json is one clear line before any library reads it
        self._load_hf_tokenizer(self.path, options)
        self.model = self._load_model(self.path, lora=options.lora)
        self.trained_context = hf_model_rope(self.model.config).trained if getattr(self.model.config, "max_position_embeddings", None) else None
        self.context_length = context_window(options, self.trained_context, cap=None)
        self.device = next(self.model.parameters()).device
        # An id must both decode and have an embedding row (either may be padded beyond the other).
        self.vocab_size = min(len(self.tokenizer), self.model.get_input_embeddings().weight.shape[0])
        generation_config = getattr(self.model, "generation_config", None)
        self.eos_ids = frozenset(_id_list(getattr(generation_config, "eos_token_id", None)) + _id_list(self.tokenizer.eos_token_id))
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self._lock = threading.Lock()
        self.draft = None
        self._counter: ForwardCounter | None = None
        self._last_generated = 0
        if options.draft_model is not None:
            self.draft = self._load_draft(Path(options.draft_model))

    def _load_model(self, path: Path, *, lora: Path | None = None):
        """Through the one loader, with its device and dtype rules (bf16/fp16 on accelerators, fp32 on CPU)."""
        options = self.options
        try:
            return load_causal_lm(
                path,
                lora=lora,
                device=options.device,
                dtype=DType(options.dtype, where="--dtype").torch if options.dtype else None,
                load_in_4bit=options.load_in_4bit,
                load_in_8bit=options.load_in_8bit,
                trust_remote_code=options.trust_remote_code,
                rope=options.rope,
                n_ctx=options.n_ctx,
            )
        except CnllmError:
            raise
        except Exception as exc:  # safetensors, torch and config errors all mean: this model cannot be used
            raise UsageError(f"cannot load model {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc

    def _load_draft(self, draft_path: Path):
        if not (draft_path / "config.json").is_file():
            raise UsageError(f"--draft-model {draft_path} is not a Hugging Face model directory (the target is one)")
        if has_tokenizer(draft_path) and tokenizer_length(draft_path) != len(self.tokenizer):
            raise UsageError(
                f"draft model {draft_path} has {tokenizer_length(draft_path)} tokens but the target's tokenizer has "
                f"{len(self.tokenizer)}; a draft model must share the target's vocabulary"
            )
        draft = self._load_model(draft_path)
        draft.generation_config.num_assistant_tokens = self.options.draft_tokens
        self._counter = ForwardCounter(self.model, draft)
        return draft

    def generate_ids(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, cancel: threading.Event) -> Generator[int, None, None]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        class QueueStreamer(BaseStreamer):
            """Forwards new ids to a queue; the first call carries the prompt, which is skipped."""

            def __init__(self):
                self.ids: queue.Queue = queue.Queue()
                self.prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    self.ids.put(int(token))

            def end(self):
                self.ids.put(None)

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        streamer = QueueStreamer()
        inputs = torch.tensor([prompt_ids], device=self.model.device)
        kwargs = {
            "input_ids": inputs,
            "attention_mask": torch.ones_like(inputs),
            "max_new_tokens": max_tokens,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([Cancelled()]),
            "pad_token_id": self._pad_id,
            "eos_token_id": sorted(self.eos_ids) or None,
            "repetition_penalty": params.repetition_penalty,
            "do_sample": params.temperature > 0,
        }
        if params.temperature > 0:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.draft is not None:
            kwargs["assistant_model"] = self.draft
        failure: list[BaseException] = []

        def work():
            try:
                with self._lock, torch.inference_mode():
                    if self.draft is None:  # assisted generation runs the prompt itself (and counts its forward calls)
                        cache = self._evaluate_prompt_head(inputs, cancel)
                        if cancel.is_set():
                            return
                        if cache is not None:
                            kwargs[cache_argument(self.model)] = cache
                    if params.seed is not None:
                        torch.manual_seed(params.seed)
                    if self._counter is not None:
                        self._counter.reset()
                    self.model.generate(**kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread
                failure.append(exc)
            finally:
                streamer.end()

        worker = threading.Thread(target=work, name="cnllm-generate", daemon=True)
        worker.start()
        produced = 0
        try:
            while (token := streamer.ids.get()) is not None:
                produced += 1
                yield token
            if failure:
                raise failure[0]
        finally:
            cancel.set()
            worker.join()
            self._last_generated = produced

    def _evaluate_prompt_head(self, inputs, cancel: threading.Event):
        """The KV cache of a long prompt up to its last ``PREFILL_CHUNK`` piece, computed a piece at a time through the
        decoder (no output layer), ``cancel`` checked between pieces: a client that hangs up, or a server that stops,
        during prompt processing ends it within one piece. ``generate`` given the cache evaluates only the rest.

        None for a prompt that fits one piece (``generate`` runs it alone), or when cancelled."""
        length = inputs.shape[1]
        if length <= PREFILL_CHUNK:
            return None
        decoder, name, cache = self.model.get_decoder(), cache_argument(self.model), None
        for start in range(0, length - 1, PREFILL_CHUNK):
            if length - start <= PREFILL_CHUNK or cancel.is_set():
                break
            output = decoder(input_ids=inputs[:, start : start + PREFILL_CHUNK], use_cache=True, **({name: cache} if cache is not None else {}))
            cache = output[name]
        return None if cancel.is_set() else cache

    def speculative_stats(self) -> SpeculativeStats | None:
        return self._counter.stats(self._last_generated) if self._counter is not None else None

    def prompt_logprobs(self, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
        import torch

        ids = list(ids)
        if len(ids) > self.context_length:
            raise ContextOverflow(len(ids), self.context_length)
        if not ids:
            return []
        pieces = self.token_pieces(ids)
        with self._lock, torch.inference_mode():
            logits = self.model(torch.tensor([ids], device=self.model.device)).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1).cpu()
        result = [TokenLogprob(ids[0], pieces[0], None)]
        for position in range(1, len(ids)):
            row = logprobs[position - 1]
            alternatives = []
            if top:
                values, indices = row.topk(top)
                alternatives = [(self.token_text(int(i)), float(v)) for v, i in zip(values, indices)]
            result.append(TokenLogprob(ids[position], pieces[position], float(row[ids[position]]), alternatives))
        return result

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        import torch

        vectors, count = [], 0
        for text in texts:
            ids = self.tokenize(text)
            if len(ids) > self.context_length:
                raise ContextOverflow(len(ids), self.context_length)
            count += len(ids)
            with self._lock, torch.inference_mode():
                output = self.model(torch.tensor([ids], device=self.model.device), output_hidden_states=True)
            pooled = output.hidden_states[-1][0].float().mean(dim=0)
            vectors.append(torch.nn.functional.normalize(pooled, dim=0).cpu().tolist())
        return vectors, count

    def target_logprobs(self, windows: Sequence[Sequence[int]], first: int) -> list[np.ndarray]:
        import torch

        head, softcap = self.model.get_output_embeddings(), getattr(self.model.config, "final_logit_softcapping", None)
        with self._lock, torch.inference_mode():
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
        ids = torch.tensor([[self._pad_id] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1).logits[:, -1]
            return torch.log_softmax(logits.float(), dim=-1).double().cpu().numpy()

    def describe(self) -> dict:
        rope = self.options.rope
        return {
            "path": str(self.path),
            "backend": self.backend,
            "lora": str(self.options.lora) if self.options.lora else None,
            "device": str(self.device),
            "dtype": str(self.options.dtype) if self.options.dtype else str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "trained_context": self.trained_context,
            "rope": rope.to_dict() if rope is not None and rope.active else None,
        }

    def close(self) -> None:
        if self._counter is not None:
            self._counter.remove()
            self._counter = None
        self.model = self.draft = None
