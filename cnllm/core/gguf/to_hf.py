"""GGUF → Hugging Face: a trainable checkpoint from a GGUF-only model, through transformers' GGUF loader.

The GGUF architectures it takes are those of :mod:`cnllm.core.architectures` (llama, which Mistral GGUFs are
too, and qwen2).

transformers reads the GGUF (de-quantizing every tensor to float and undoing llama.cpp's q/k
permutation) and rebuilds the tokenizer from ``tokenizer.ggml.*``, chat template included. A
GGUF-loaded model refuses ``save_pretrained``, so its weights are copied into a plain model built
from the same config, which is saved as safetensors. A SentencePiece GGUF also gets its
``tokenizer.model`` back (pieces, scores and types), so the output converts to GGUF again. The
file is checked first (magic, architecture, every tensor's data inside the file), so a wrong or
truncated input is one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from cnllm.core.architectures import GGUF_ARCHITECTURES
from cnllm.core.atomic import atomic_dir, check_output
from cnllm.core.config import coerce_fields
from cnllm.core.dtypes import DType
from cnllm.core.errors import UsageError
from cnllm.core.files import is_gguf
from cnllm.core.gguf.header import check_gguf
from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.provenance import finish_output_folder
from cnllm.core.tensors import DEFAULT_SHARD_SIZE, ShardSize


@dataclass
class GgufToHfOptions:
    """How :func:`gguf_to_hf` writes the checkpoint (``cnllm gguf-to-hf`` flags)."""

    dtype: DType = DType("fp32")  # quantized tensors come back as floats; fp32 keeps them exactly
    max_shard_size: ShardSize = DEFAULT_SHARD_SIZE

    def __post_init__(self) -> None:
        coerce_fields(self)


@dataclass
class GgufToHfResult:
    output: Path
    source: Path
    architecture: str
    file_type: str
    tensors: int
    parameters: int
    vocab_size: int
    tied_embeddings: bool
    chat_template: bool
    sentencepiece_model: bool  # tokenizer.model rebuilt from the GGUF's SentencePiece vocabulary
    dtype: str
    files: list[str] = field(default_factory=list)
    total_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """The one JSON shape of a GGUF → Hugging Face conversion: ``--json`` and the provenance record."""
        return {
            "output": str(self.output),
            "source": str(self.source),
            "architecture": self.architecture,
            "file_type": self.file_type,
            "tensors": self.tensors,
            "parameters": self.parameters,
            "vocab_size": self.vocab_size,
            "tied_embeddings": self.tied_embeddings,
            "chat_template": self.chat_template,
            "sentencepiece_model": self.sentencepiece_model,
            "dtype": self.dtype,
            "files": self.files,
            "total_bytes": self.total_bytes,
            "seconds": round(self.seconds, 3),
        }


def inspect_gguf(path: Path) -> tuple[str, str, int]:
    """``(architecture, file type, tensor count)`` of a GGUF, refusing an architecture the table does not have."""
    import gguf

    if not path.is_file():
        raise UsageError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    if not is_gguf(path):
        raise UsageError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    check_gguf(path)  # also refuses tensors that end past the file
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError) as exc:
        raise UsageError(f"{path} is truncated or corrupted: {exc}") from None
    fields = {f.name: f for f in reader.fields.values()}
    architecture = fields["general.architecture"].contents() if "general.architecture" in fields else None
    if architecture not in GGUF_ARCHITECTURES:
        raise UsageError(f"{path} is a {architecture or 'unknown'} model; gguf-to-hf converts {', '.join(GGUF_ARCHITECTURES)} GGUFs")
    file_type = fields["general.file_type"].contents() if "general.file_type" in fields else None
    name = gguf.LlamaFileType(file_type).name if file_type is not None else "unknown"
    return architecture, name, len(reader.tensors)


SPECIAL_ID_KEYS = {"unk_id": "unknown_token_id", "bos_id": "bos_token_id", "eos_id": "eos_token_id", "pad_id": "padding_token_id"}


def sentencepiece_model(path: Path, progress: Progress = NULL_PROGRESS) -> bytes | None:
    """``tokenizer.model`` rebuilt from a SentencePiece GGUF's vocabulary (None for byte-level BPE GGUFs, or, said
    on ``progress``, when SentencePiece refuses the vocabulary): the pieces, scores and types llama.cpp uses."""
    import gguf
    import sentencepiece

    from cnllm.core.tokenizers.spm import proto_from_pieces

    fields = gguf.GGUFReader(path).fields

    def value(key: str, default=None):
        field = fields.get(f"tokenizer.ggml.{key}")
        return default if field is None else field.contents()

    if value("model") != "llama" or value("tokens") is None:
        return None
    tokens = value("tokens")
    proto = proto_from_pieces(
        tokens,
        value("scores", [0.0] * len(tokens)),
        value("token_type", [1] * len(tokens)),
        special_ids={name: value(key, -1) for name, key in SPECIAL_ID_KEYS.items()},
        add_dummy_prefix=value("add_space_prefix", True),
    )
    data = proto.SerializeToString()
    try:
        sentencepiece.SentencePieceProcessor(model_proto=data)
    except RuntimeError as exc:
        progress.log(f"no tokenizer.model written: SentencePiece refuses this GGUF's vocabulary ({str(exc).strip()[:200]}); "
                     "convert-gguf will need the original tokenizer.model")
        return None
    return data


@contextlib.contextmanager
def _reporting_dequantization(progress: Progress) -> Iterator[None]:
    """Route the tensor loop of transformers' GGUF loader (a bare tqdm bar on stderr) to ``progress``."""
    from transformers import modeling_gguf_pytorch_utils as loader

    def reported(tensors, desc: str = ""):
        progress.start(len(tensors), "de-quantizing GGUF tensors", unit="tensor")
        for tensor in tensors:
            yield tensor
            progress.advance(1)
        progress.finish()

    original = loader.tqdm
    loader.tqdm = reported
    try:
        yield
    finally:
        loader.tqdm = original


def gguf_to_hf(
    source: Path | str,
    output: Path | str,
    options: GgufToHfOptions | None = None,
    *,
    force: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> GgufToHfResult:
    """Write ``output`` (safetensors, config, generation config, tokenizer with its chat template) from ``source``."""
    architecture, file_type, tensors = inspect_gguf(Path(source))  # before torch loads: a bad header is refused at once
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cnllm.core.runtime import quiet_libraries

    quiet_libraries()
    started = time.perf_counter()
    options = options or GgufToHfOptions()
    source, output = Path(source), Path(output)
    check_output(output, force, inputs=[source])
    progress.log(f"reading {source.name} ({architecture}, {file_type}, {tensors} tensors) with transformers' GGUF loader")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        with _reporting_dequantization(progress):
            loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UsageError(f"transformers cannot load {source}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    config = loaded.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=options.dtype.torch)
    plain = plain.to_empty(device="cpu")
    state = loaded.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    progress.start(total, "copying de-quantized weights", unit="B")
    with torch.no_grad():
        for name, target in plain.state_dict(keep_vars=True).items():
            value = state[name]
            target.data.copy_(value.to(options.dtype.torch))
            progress.advance(value.numel() * value.element_size())
    progress.finish()
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    spm_model = sentencepiece_model(source, progress)
    parameters = sum(p.numel() for p in plain.parameters())
    del loaded, state
    result = GgufToHfResult(
        output=output,
        source=source,
        architecture=architecture,
        file_type=file_type,
        tensors=tensors,
        parameters=parameters,
        vocab_size=config.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
        sentencepiece_model=spm_model is not None,
        dtype=str(options.dtype),
    )
    with atomic_dir(output, force=force) as tmp:
        progress.log(f"writing {output}")
        plain.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=options.max_shard_size.bytes)
        tokenizer.save_pretrained(str(tmp))
        if spm_model is not None:
            (tmp / "tokenizer.model").write_bytes(spm_model)
        result.files, result.total_bytes = finish_output_folder(
            tmp, "gguf-to-hf", inputs=[source], options=dataclasses.asdict(options), results=result.to_dict()
        )
    result.seconds = time.perf_counter() - started
    return result
