"""Quantize a GGUF with llama.cpp's own quantizer (``llama_model_quantize`` through llama-cpp-python).

llama.cpp decides every tensor's type: the mixes behind Q4_K_M and friends, and the per-tensor
fallback when a row (the input dimension) is not a multiple of a k-quant's 256-wide block. A
vocabulary of 49,953 or 55,296 tokens only sets the number of rows, so extended Chinese
vocabularies get real k-quants; small hidden sizes (64 in the tests) fall back. This module
validates the input, hands it over, turns llama.cpp's log into progress and a summary, and keeps
the output atomic. The quantizer runs in a child process: llama.cpp offers no way to stop it, so a
Ctrl-C or SIGTERM ends the child, and the temporary output is removed at once rather than after the
quantizer has finished writing it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from cnllm.core.atomic import atomic_path, check_output
from cnllm.core.config import coerce_fields
from cnllm.core.errors import CheckFailed, UsageError
from cnllm.core.files import is_gguf
from cnllm.core.gguf.header import check_gguf
from cnllm.core.progress import NULL_PROGRESS, Progress

if TYPE_CHECKING:
    import numpy as np

UNQUANTIZED = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: str  # llama_cpp constant name (LLAMA_FTYPE_...)
    main_type: str  # the ggml type most weights get
    description: str  # llama.cpp's quantize table: size and perplexity cost on a reference model
    needs_imatrix: bool = False

    @property
    def ftype_id(self) -> int:
        import llama_cpp

        return getattr(llama_cpp, self.ftype)

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight of the main ggml type (a mix such as Q4_K_M lands a little above)."""
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.main_type]]
        return size * 8 / block


# llama.cpp's tools/quantize table (names, file types, descriptions), in its order.
QUANT_TYPES: tuple[QuantType, ...] = (
    QuantType("Q1_0", "LLAMA_FTYPE_MOSTLY_Q1_0", "Q1_0", "1.125 bpw quantization"),
    QuantType("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_0", "4.34G, +0.4685 ppl @ Llama-3-8B"),
    QuantType("Q4_1", "LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_1", "4.78G, +0.4511 ppl @ Llama-3-8B"),
    QuantType("Q5_0", "LLAMA_FTYPE_MOSTLY_Q5_0", "Q5_0", "5.21G, +0.1316 ppl @ Llama-3-8B"),
    QuantType("Q5_1", "LLAMA_FTYPE_MOSTLY_Q5_1", "Q5_1", "5.65G, +0.1062 ppl @ Llama-3-8B"),
    QuantType("IQ2_XXS", "LLAMA_FTYPE_MOSTLY_IQ2_XXS", "IQ2_XXS", "2.06 bpw quantization", True),
    QuantType("IQ2_XS", "LLAMA_FTYPE_MOSTLY_IQ2_XS", "IQ2_XS", "2.31 bpw quantization", True),
    QuantType("IQ2_S", "LLAMA_FTYPE_MOSTLY_IQ2_S", "IQ2_S", "2.5 bpw quantization", True),
    QuantType("IQ2_M", "LLAMA_FTYPE_MOSTLY_IQ2_M", "IQ2_S", "2.7 bpw quantization", True),
    QuantType("IQ1_S", "LLAMA_FTYPE_MOSTLY_IQ1_S", "IQ1_S", "1.56 bpw quantization", True),
    QuantType("IQ1_M", "LLAMA_FTYPE_MOSTLY_IQ1_M", "IQ1_M", "1.75 bpw quantization", True),
    QuantType("TQ1_0", "LLAMA_FTYPE_MOSTLY_TQ1_0", "TQ1_0", "1.69 bpw ternarization"),
    QuantType("TQ2_0", "LLAMA_FTYPE_MOSTLY_TQ2_0", "TQ2_0", "2.06 bpw ternarization"),
    QuantType("Q2_K", "LLAMA_FTYPE_MOSTLY_Q2_K", "Q2_K", "2.96G, +3.5199 ppl @ Llama-3-8B"),
    QuantType("Q2_K_S", "LLAMA_FTYPE_MOSTLY_Q2_K_S", "Q2_K", "2.96G, +3.1836 ppl @ Llama-3-8B", True),
    QuantType("IQ3_XXS", "LLAMA_FTYPE_MOSTLY_IQ3_XXS", "IQ3_XXS", "3.06 bpw quantization", True),
    QuantType("IQ3_S", "LLAMA_FTYPE_MOSTLY_IQ3_S", "IQ3_S", "3.44 bpw quantization"),
    QuantType("IQ3_M", "LLAMA_FTYPE_MOSTLY_IQ3_M", "IQ3_S", "3.66 bpw quantization mix"),
    QuantType("IQ3_XS", "LLAMA_FTYPE_MOSTLY_IQ3_XS", "IQ3_S", "3.3 bpw quantization"),
    QuantType("Q3_K_S", "LLAMA_FTYPE_MOSTLY_Q3_K_S", "Q3_K", "3.41G, +1.6321 ppl @ Llama-3-8B"),
    QuantType("Q3_K_M", "LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q3_K", "3.74G, +0.6569 ppl @ Llama-3-8B"),
    QuantType("Q3_K_L", "LLAMA_FTYPE_MOSTLY_Q3_K_L", "Q3_K", "4.03G, +0.5562 ppl @ Llama-3-8B"),
    QuantType("IQ4_NL", "LLAMA_FTYPE_MOSTLY_IQ4_NL", "IQ4_NL", "4.50 bpw non-linear quantization"),
    QuantType("IQ4_XS", "LLAMA_FTYPE_MOSTLY_IQ4_XS", "IQ4_XS", "4.25 bpw non-linear quantization"),
    QuantType("Q4_K_S", "LLAMA_FTYPE_MOSTLY_Q4_K_S", "Q4_K", "4.37G, +0.2689 ppl @ Llama-3-8B"),
    QuantType("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K", "4.58G, +0.1754 ppl @ Llama-3-8B"),
    QuantType("Q5_K_S", "LLAMA_FTYPE_MOSTLY_Q5_K_S", "Q5_K", "5.21G, +0.1049 ppl @ Llama-3-8B"),
    QuantType("Q5_K_M", "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K", "5.33G, +0.0569 ppl @ Llama-3-8B"),
    QuantType("Q6_K", "LLAMA_FTYPE_MOSTLY_Q6_K", "Q6_K", "6.14G, +0.0217 ppl @ Llama-3-8B"),
    QuantType("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0", "7.96G, +0.0026 ppl @ Llama-3-8B"),
    QuantType("F16", "LLAMA_FTYPE_MOSTLY_F16", "F16", "14.00G, +0.0020 ppl @ Mistral-7B"),
    QuantType("BF16", "LLAMA_FTYPE_MOSTLY_BF16", "BF16", "14.00G, -0.0050 ppl @ Mistral-7B"),
    QuantType("F32", "LLAMA_FTYPE_ALL_F32", "F32", "26.00G @ 7B"),
)
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def get_quant_type(name: str) -> QuantType:
    wanted = ALIASES.get(name.upper(), name.upper())
    for quant in QUANT_TYPES:
        if quant.name == wanted:
            return quant
    raise UsageError(f"unknown quantization type {name!r}; see 'cnllm quantize --list-types'")


def ggml_type_id(name: str) -> int:
    """A ggml tensor type (for --output-tensor-type / --token-embedding-type) by name."""
    import gguf

    try:
        return int(gguf.GGMLQuantizationType[name.upper()])
    except KeyError:
        known = ", ".join(t.name for t in gguf.GGMLQuantizationType)
        raise UsageError(f"unknown tensor type {name!r}; one of {known}") from None


@dataclass
class GgufSummary:
    size: int
    parameters: int
    tensor_bytes: int
    tensor_types: dict[str, int]

    @property
    def bits_per_weight(self) -> float:
        return self.tensor_bytes * 8 / self.parameters if self.parameters else 0.0

    @property
    def quantized(self) -> bool:
        return any(t not in UNQUANTIZED for t in self.tensor_types)


def read_gguf_summary(path: Path) -> GgufSummary:
    """Sizes and tensor types of a GGUF; a usage error for anything that is not a complete GGUF file."""
    import gguf

    if not path.is_file():
        raise UsageError(f"input {path} does not exist" if not path.exists() else f"input {path} is not a file")
    if not is_gguf(path):
        raise UsageError(f"{path} is not a GGUF file (no GGUF magic); convert a Hugging Face model with 'cnllm convert-gguf' first")
    check_gguf(path)  # also refuses tensors that end past the file
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, OSError) as exc:
        raise UsageError(f"{path} is truncated or corrupted: {exc}") from None
    size = path.stat().st_size
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return GgufSummary(
        size=size,
        parameters=sum(int(t.n_elements) for t in reader.tensors),
        tensor_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        tensor_types=types,
    )


def load_imatrix(path: Path) -> dict[str, "np.ndarray"]:
    """Per-tensor importance (mean squared activations) from a GGUF imatrix file (llama-imatrix's format)."""
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise UsageError(f"{path} is not a GGUF imatrix file (legacy .dat imatrix files are not supported): {exc}") from None
    tensors = {t.name: t for t in reader.tensors}
    entries: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts_tensor = tensors.get(f"{base}.counts")
        if counts_tensor is None:
            raise UsageError(f"{path}: {base} has sums but no counts; not a llama.cpp imatrix file")
        sums = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        counts = np.asarray(counts_tensor.data, dtype=np.float32).reshape(-1)
        per_row = sums.reshape(len(counts), -1)
        values = np.where(counts[:, None] > 0, per_row / np.maximum(counts[:, None], 1e-30), 1.0)
        entries[base] = values.reshape(-1).astype(np.float32)
    if not entries:
        raise UsageError(f"{path} holds no importance-matrix entries (*.in_sum2 tensors)")
    return entries


class _LlamaLog:
    """llama.cpp's log, as the child process sends it: per-tensor progress, fallback count, the failure reason;
    echoed only when verbose."""

    TENSOR_LINE = re.compile(r"^\[\s*\d+/\s*(\d+)\]\s+(\S+)")  # "[  3/ 21] blk.0.attn_q.weight - ..."

    def __init__(self, progress: Progress, verbose: bool) -> None:
        self.progress, self.verbose = progress, verbose
        self.buffer = ""
        self.lines: list[str] = []
        self.total: int | None = None
        self.fallbacks = 0

    def feed(self, text: bytes) -> None:
        self.buffer += text.decode("utf-8", errors="replace")
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self._on_line(line)

    def _on_line(self, line: str) -> None:
        self.lines.append(line)
        if self.verbose:
            self.progress.log(line)
        self.fallbacks += "not divisible by" in line
        match = self.TENSOR_LINE.match(line)
        if match:
            if self.total is None:
                self.total = int(match.group(1))
                self.progress.start(self.total, "quantizing", unit="tensor")
            self.progress.advance(1, tensor=match.group(2))

    def failure(self) -> str:
        for line in reversed(self.lines + [self.buffer]):
            if "failed to quantize" in line:
                return line.split("failed to quantize:", 1)[1].strip()
        return "llama.cpp's quantizer failed (run with --verbose for its log)"

    def finish(self) -> None:
        if self.total is not None:
            self.progress.finish()


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL when the parent dies, so a killed ``cnllm`` leaves no quantizer writing on."""
    import os
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before that took effect
        os._exit(1)


def _quantize_in_child(connection, input_path: str, output: str, options: "QuantizeOptions", ftype: int) -> None:
    """The child process: llama.cpp quantizes ``input_path`` into ``output``; its log, then the result code (or a
    message), go to the parent through ``connection``. Interruptions are the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        import llama_cpp

        callback = llama_cpp.llama_log_callback(lambda level, text, user_data: connection.send(("log", text)))
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = options.threads or 0
        params.allow_requantize = options.allow_requantize
        params.quantize_output_tensor = not options.leave_output_tensor
        if options.output_tensor_type is not None:
            params.output_tensor_type = ggml_type_id(options.output_tensor_type)
        if options.token_embedding_type is not None:
            params.token_embedding_type = ggml_type_id(options.token_embedding_type)
        entries = load_imatrix(Path(options.imatrix)) if options.imatrix is not None else {}
        imatrix_array = _imatrix_array(entries) if entries else None  # kept alive until llama.cpp returns
        if imatrix_array is not None:
            params.imatrix = ctypes.cast(imatrix_array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        connection.send(("code", llama_cpp.llama_model_quantize(input_path.encode(), output.encode(), ctypes.byref(params))))
    except Exception as exc:  # noqa: BLE001 - reported by the parent, in one line
        connection.send(("error", str(exc) or type(exc).__name__))


def _run_quantizer(input_path: Path, output: Path, options: "QuantizeOptions", ftype: int, log: _LlamaLog) -> int:
    """Quantize in a child process and return llama.cpp's result code; an interruption of this process
    (Ctrl-C, SIGTERM) kills the child first, so nothing writes ``output`` after this returns or raises."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_quantize_in_child, args=(sender, str(input_path), str(output), options, ftype), daemon=True)
    code: int | None = None
    try:
        child.start()
        sender.close()
        while True:
            try:
                kind, value = receiver.recv()
            except EOFError:
                break
            if kind == "log":
                log.feed(value)
            elif kind == "code":
                code = value
            else:
                raise CheckFailed(f"quantizing {input_path} failed: {value}")
        child.join()
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        receiver.close()
    if code is None:
        raise CheckFailed(f"llama.cpp's quantizer process ended without a result (exit status {child.exitcode}; out of memory?)")
    return code


@dataclass
class QuantizeOptions:
    """How :func:`quantize_gguf` quantizes (``cnllm quantize`` flags; a recipe's quantize step per type)."""

    type: str  # Q4_K_M, Q8_0, … (see QUANT_TYPES and ALIASES)
    threads: Optional[int] = None  # None: all cores
    allow_requantize: bool = False
    leave_output_tensor: bool = False
    output_tensor_type: Optional[str] = None
    token_embedding_type: Optional[str] = None
    imatrix: Optional[Path] = None

    def __post_init__(self) -> None:
        coerce_fields(self)

    def validate(self) -> None:
        get_quant_type(self.type)
        for name in (self.output_tensor_type, self.token_embedding_type):
            if name is not None:
                ggml_type_id(name)
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        if self.imatrix is not None and not self.imatrix.is_file():
            raise UsageError(f"--imatrix {self.imatrix} is not a file")


@dataclass
class QuantizeResult:
    input: Path
    output: Path
    type: str
    input_size: int
    output_size: int
    parameters: int
    bits_per_weight: float
    tensor_types: dict[str, int]
    fallbacks: int
    imatrix_entries: int
    seconds: float

    @property
    def ratio(self) -> float:
        return self.input_size / self.output_size if self.output_size else 0.0

    def to_dict(self) -> dict:
        """The one JSON shape of a quantization: ``--json``, the provenance record and the pipeline report."""
        return {
            "input": str(self.input),
            "output": str(self.output),
            "type": self.type,
            "input_bytes": self.input_size,
            "output_bytes": self.output_size,
            "ratio": round(self.ratio, 4),
            "parameters": self.parameters,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "tensor_types": self.tensor_types,
            "fallback_tensors": self.fallbacks,
            "imatrix_entries": self.imatrix_entries,
            "seconds": round(self.seconds, 3),
        }


def _imatrix_array(entries: dict[str, "np.ndarray"]):
    """A null-terminated ``llama_model_imatrix_data`` array (the arrays it points into must stay alive)."""
    import llama_cpp

    array = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
    for slot, (name, values) in zip(array, entries.items()):
        slot.name = name.encode("utf-8")
        slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        slot.size = values.size
    return array


def quantize_gguf(
    input_path: Path | str,
    output: Path | str,
    options: QuantizeOptions,
    *,
    force: bool = False,
    verbose: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> QuantizeResult:
    """Quantize ``input_path`` into ``output`` with llama.cpp, its provenance record beside it
    (``output.cnllm.json``); see the module docstring."""
    from cnllm.core.provenance import write_file_record

    started = time.perf_counter()
    options.validate()
    allow_requantize, imatrix = options.allow_requantize, options.imatrix
    input_path, output = Path(input_path), Path(output)
    quant = get_quant_type(options.type)
    check_output(output, force, inputs=[input_path, imatrix])
    before = read_gguf_summary(input_path)
    if before.quantized and not allow_requantize:
        quantized = ", ".join(t for t in before.tensor_types if t not in UNQUANTIZED)
        raise UsageError(
            f"{input_path} is already quantized ({quantized}); re-quantizing loses quality — quantize the f16/bf16/f32 GGUF, "
            "or pass --allow-requantize"
        )
    entries = load_imatrix(Path(imatrix)) if imatrix is not None else {}

    needed = before.size - before.tensor_bytes + int(before.parameters * quant.bits_per_weight / 8)
    log = _LlamaLog(progress, verbose)
    with atomic_path(output, force=force, needed=needed) as tmp:
        try:
            code = _run_quantizer(input_path, tmp, options, quant.ftype_id, log)
        finally:
            log.finish()
        if code != 0:
            reason = log.failure()
            if "imatrix" in reason:
                raise UsageError(f"{quant.name}: {reason}; pass --imatrix FILE (computed with llama-imatrix) or pick a k-quant such as Q4_K_M")
            raise CheckFailed(f"quantizing {input_path} to {quant.name} failed: {reason}")
        after = read_gguf_summary(tmp)
    result = QuantizeResult(
        input=input_path,
        output=output,
        type=quant.name,
        input_size=before.size,
        output_size=after.size,
        parameters=after.parameters,
        bits_per_weight=after.bits_per_weight,
        tensor_types=after.tensor_types,
        fallbacks=log.fallbacks,
        imatrix_entries=len(entries),
        seconds=time.perf_counter() - started,
    )
    write_file_record(output, "quantize", inputs=[input_path, *([imatrix] if imatrix else [])], options=dataclasses.asdict(options), results=result.to_dict())
    return result
