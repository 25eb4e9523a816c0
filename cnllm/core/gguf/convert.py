"""Hugging Face checkpoint (a family of :mod:`cnllm.core.architectures`) → GGUF, one tensor at a time through
``gguf.GGUFWriter``.

Tensor names, the q/k permutation where the family's row asks for it (Hugging Face's rotary layout →
llama.cpp's interleaved one), tensor types and metadata follow llama.cpp's reference
``convert_hf_to_gguf.py``, so llama.cpp
loads the file and computes what transformers computes. Everything that can be wrong with the
input (architecture, vocabulary sizes, tokenizer files, truncated weights) is checked from
headers before a byte is written; the output appears under its final name only when complete.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cnllm.core.architectures import Architecture, require_architecture
from cnllm.core.atomic import atomic_path, check_output
from cnllm.core.config import coerce_fields
from cnllm.core.dtypes import FLOAT_DTYPES, WORDS, DType, words_for
from cnllm.core.errors import UsageError
from cnllm.core.gguf.vocab import TokenizerVocab, build_vocab, check_added_tokens
from cnllm.core.modelio import check_vocab_agreement, has_tokenizer, load_config, vocab_sizes
from cnllm.core.progress import NULL_PROGRESS, Progress
from cnllm.core.tensors import TensorInfo, load_pickled_tensors, tensor_infos

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")
# Buffers transformers may save that llama.cpp does not use.
SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


@dataclass
class PlannedTensor:
    """One GGUF tensor: where it comes from, its name, numpy-order shape, type and the q/k permutation it needs."""

    gguf_name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int
    source: TensorInfo | None = None
    permute_heads: int | None = None
    data: Any = field(default=None, repr=False)  # generated tensors (rope_freqs) carry their data


@dataclass
class ConvertOptions:
    """What :func:`convert_to_gguf` writes. ``outtype`` is a GGUF type (f32, f16, bf16, q8_0, auto) or any
    dtype word (fp16, float16, half, …), echoed back as given."""

    outtype: str = "auto"
    vocab_only: bool = False
    pre_tokenizer: Optional[str] = None  # llama.cpp BPE pre-tokenizer name when tokenizer.json does not tell

    def __post_init__(self) -> None:
        coerce_fields(self)

    def validate(self) -> None:
        gguf_outtype(self.outtype)


def gguf_outtype(outtype: str) -> str:
    """The GGUF type an ``--outtype`` word names (``fp16``/``float16``/``half`` → ``f16``)."""
    word = outtype.strip().lower()
    if word in OUTTYPES:
        return word
    if WORDS.get(word) in FLOAT_DTYPES:
        return DType(word).gguf
    raise UsageError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)} or a dtype word ({', '.join(words_for(FLOAT_DTYPES))})")


@dataclass
class ConvertResult:
    output: Path
    outtype: str
    file_type: str
    vocab_only: bool
    tensor_count: int
    parameters: int
    bytes_written: int
    tokenizer_model: str
    tokenizer_pre: str
    vocab_size: int
    tensor_types: dict[str, int]
    seconds: float

    def to_dict(self) -> dict:
        """The one JSON shape of a conversion: ``--json``, the provenance record and the pipeline report."""
        return {
            "output": str(self.output),
            "outtype": self.outtype,
            "file_type": self.file_type,
            "vocab_only": self.vocab_only,
            "tensors": self.tensor_count,
            "tensor_types": self.tensor_types,
            "parameters": self.parameters,
            "bytes": self.bytes_written,
            "tokenizer": {"model": self.tokenizer_model, "pre": self.tokenizer_pre, "tokens": self.vocab_size},
            "seconds": round(self.seconds, 3),
        }


def _find(hparams: dict, keys: tuple[str, ...]) -> Any:
    return next((hparams[k] for k in keys if k in hparams), None)


def rope_parameters(hparams: dict) -> dict:
    """Rope settings wherever the config keeps them (``rope_parameters`` in transformers 5, ``rope_scaling`` before)."""
    params = dict(hparams.get("rope_parameters") or hparams.get("rope_scaling") or {})
    if "rope_theta" not in params and (theta := _find(hparams, ("rope_theta", "rotary_emb_base"))) is not None:
        params["rope_theta"] = theta
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    if "original_max_position_embeddings" not in params and "original_max_position_embeddings" in hparams:
        params["original_max_position_embeddings"] = hparams["original_max_position_embeddings"]
    return params


def _llama3_rope_factors(params: dict, head_dim: int) -> list[float]:
    """Per-frequency scaling of Llama 3.1-style rope (``rope_type: llama3``), written as the ``rope_freqs`` tensor."""
    base = params.get("rope_theta", 10000.0)
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_context = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    import numpy as np

    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq  # float32 arithmetic, as the reference does it in torch
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def resolve_outtype(outtype: str, infos: dict[str, TensorInfo]) -> str:
    """``auto`` keeps the checkpoint's 16-bit type (bf16 or f16) and otherwise writes f16, as the reference does."""
    outtype = gguf_outtype(outtype)
    if outtype != "auto":
        return outtype
    for info in infos.values():
        if len(info.shape) >= 2:
            return "bf16" if info.dtype.upper() in ("BF16", "BFLOAT16") else "f16"
    return "f16"


def _file_type(outtype: str):
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]


def _tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: str):
    """F32 for 1-D tensors and norms, the output type otherwise (Q8_0 rows not divisible by 32 fall back to F16)."""
    import gguf

    q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return q.F32
    qtype = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[outtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return q.F16
    return qtype


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * type_size


def gguf_arch(architecture: Architecture):
    """The ``gguf.MODEL_ARCH`` member of a row."""
    import gguf

    return next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture.gguf_arch)


def plan_tensors(infos: dict[str, TensorInfo], hparams: dict, outtype: str, architecture: Architecture) -> list[PlannedTensor]:
    """GGUF names, shapes and types of every tensor, from the checkpoint headers alone (``hparams`` completed by
    :func:`with_config_defaults`)."""
    import gguf
    import numpy as np

    n_layers = hparams["num_hidden_layers"]
    n_head = hparams["num_attention_heads"]
    n_kv_head = hparams["num_key_value_heads"]
    name_map = gguf.get_tensor_name_map(gguf_arch(architecture), n_layers)
    plan: list[PlannedTensor] = []
    params = rope_parameters(hparams)
    if str(params.get("rope_type", "")).lower() == "llama3":
        factors = np.asarray(_llama3_rope_factors(params, head_dim(hparams)), dtype=np.float32)
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(PlannedTensor(name, factors.shape, gguf.GGMLQuantizationType.F32, factors.nbytes, data=factors))
    # The reference converter's order (files by name, tensors by name), so the two files can be byte-identical.
    for hf_name, info in sorted(infos.items(), key=lambda item: (item[1].file.name, item[0])):
        if hf_name.endswith(SKIPPED_SUFFIXES):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UsageError(f"{info.file}: tensor {hf_name} has no llama.cpp counterpart; is this a plain {architecture.hf_classes[0]} checkpoint?")
        permute = None
        if architecture.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            permute = n_head
        elif architecture.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            permute = n_kv_head
        qtype = _tensor_type(gguf_name, info.shape, outtype)
        plan.append(PlannedTensor(gguf_name, info.shape, qtype, _nbytes(info.shape, qtype), source=info, permute_heads=permute))
    return plan


def permute_for_rope(weights, n_head: int):
    """Hugging Face stores each head's rotary halves apart; llama.cpp wants them interleaved."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


class _TensorReader:
    """Reads planned tensors in order as numpy arrays, keeping one checkpoint file open at a time.

    f16/f32 safetensors are read straight into numpy, so torch is imported only for bf16 weights or
    ``.bin`` checkpoints (it alone would double the converter's resident memory).
    """

    NUMPY_DTYPES = ("F16", "F32", "F64")

    def __init__(self) -> None:
        self._path: Path | None = None
        self._handles: dict[str, Any] = {}
        self._state: dict | None = None

    def get(self, info: TensorInfo):
        if info.file != self._path:
            self.close()
            self._path = info.file
        if info.file.suffix != ".safetensors":
            if self._state is None:
                self._state = load_pickled_tensors(info.file)
            return self._to_numpy(self._state.pop(info.name))
        framework = "np" if info.dtype.upper() in self.NUMPY_DTYPES else "pt"
        if framework not in self._handles:
            from safetensors import safe_open

            self._handles[framework] = safe_open(str(info.file), framework=framework)
        from safetensors import SafetensorError

        try:
            tensor = self._handles[framework].get_tensor(info.name)
        except SafetensorError as exc:
            raise UsageError(f"{info.file} is corrupted: {exc}") from exc
        return tensor if framework == "np" else self._to_numpy(tensor)

    @staticmethod
    def _to_numpy(tensor):
        import torch

        if tensor.dtype not in (torch.float16, torch.float32):
            tensor = tensor.to(torch.float32)
        return tensor.numpy()

    def close(self) -> None:
        self._handles, self._state, self._path = {}, None, None


def tensor_data(array, planned: PlannedTensor):
    """The bytes llama.cpp expects for one tensor (permuted, converted or quantized by gguf's own routines)."""
    import gguf
    import numpy as np

    if array.dtype not in (np.float16, np.float32):
        array = array.astype(np.float32)
    if planned.permute_heads is not None:
        array = permute_for_rope(array, planned.permute_heads)
    return gguf.quants.quantize(array, planned.qtype)


def head_dim(hparams: dict) -> int:
    """The attention head width: config's ``head_dim`` where the family keeps one, else hidden size / heads."""
    return hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]


# The keys a row's gguf_extra_keys may name, as the reference converter writes them.
EXTRA_KEYS = {
    "vocab_size": lambda writer, hparams: writer.add_vocab_size(hparams["vocab_size"]),
    "rope_dimension_count": lambda writer, hparams: writer.add_rope_dimension_count(head_dim(hparams)),
}


def add_hyperparameters(writer, hparams: dict, file_type, architecture: Architecture) -> None:
    """``<arch>.*`` keys, in the reference converter's order."""
    writer.add_block_count(hparams["num_hidden_layers"])
    if (n_ctx := _find(hparams, ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length"))) is not None:
        writer.add_context_length(n_ctx)
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(hparams["num_key_value_heads"])
    if hparams.get("is_causal") is False:
        writer.add_causal_attention(False)
    params = rope_parameters(hparams)
    add_rope_scaling(writer, params)
    if (theta := params.get("rope_theta")) is not None:
        writer.add_rope_freq_base(theta)
    if (eps := _find(hparams, ("rms_norm_eps", "norm_eps"))) is not None:
        writer.add_layer_norm_rms_eps(eps)
    if "head_dim" in hparams:
        writer.add_key_length(hparams["head_dim"])
        writer.add_value_length(hparams["head_dim"])
    writer.add_file_type(file_type)
    for key in architecture.gguf_extra_keys:
        EXTRA_KEYS[key](writer, hparams)


def add_rope_scaling(writer, params: dict) -> None:
    """Linear (position interpolation) and YaRN scaling; ``llama3`` goes into the rope_freqs tensor instead."""
    import gguf

    rope_type, factor = params.get("rope_type"), params.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        if "original_max_position_embeddings" not in params:
            raise UsageError("config.json: YaRN rope scaling needs original_max_position_embeddings")
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        if (ext := params.get("extrapolation_factor")) is not None:
            writer.add_rope_scaling_yarn_ext_factor(ext)
        if (attn := params.get("attention_factor", params.get("attn_factor"))) is not None:
            writer.add_rope_scaling_yarn_attn_factor(attn)
        if (beta_fast := params.get("beta_fast")) is not None:
            writer.add_rope_scaling_yarn_beta_fast(beta_fast)
        if (beta_slow := params.get("beta_slow")) is not None:
            writer.add_rope_scaling_yarn_beta_slow(beta_slow)


def with_config_defaults(config: dict, architecture: Architecture) -> dict:
    """config.json completed with the defaults of the family's transformers config class for the keys llama.cpp
    needs (old configs omit some), as the reference converter sees them through AutoConfig."""
    hparams = dict(config)
    for key, value in architecture.config_defaults:
        hparams.setdefault(key, value)
    hparams.setdefault("num_key_value_heads", hparams["num_attention_heads"])
    if architecture.derives_head_dim:
        hparams.setdefault("head_dim", hparams["hidden_size"] // hparams["num_attention_heads"])
    if "rope_theta" not in rope_parameters(hparams):
        hparams["rope_theta"] = 10000.0
    return hparams


def preflight(model_dir: Path) -> tuple[Architecture, dict, dict[str, TensorInfo]]:
    """Every check that needs no tensor data: architecture, tokenizer files, vocabulary sizes, headers."""
    config = load_config(model_dir)
    architecture = require_architecture(config, str(model_dir), "convert-gguf")
    if not has_tokenizer(model_dir):
        raise UsageError(f"{model_dir} has no tokenizer (tokenizer.model or tokenizer.json); copy the tokenizer files next to the weights")
    check_added_tokens(model_dir)
    check_vocab_agreement(vocab_sizes(model_dir), where=str(model_dir))
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size", "vocab_size"):
        if key not in config:
            raise UsageError(f"{model_dir / 'config.json'} has no {key}")
    return architecture, with_config_defaults(config, architecture), tensor_infos(model_dir)


def convert_to_gguf(
    model_dir: Path | str,
    output: Path | str,
    options: ConvertOptions | None = None,
    *,
    force: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> ConvertResult:
    """Write ``output`` (GGUF) from a Hugging Face model directory, and its provenance record beside it
    (``output.cnllm.json``); see the module docstring."""
    import gguf
    import numpy as np

    from cnllm.core.provenance import write_file_record
    from cnllm.core.runtime import quiet_libraries

    quiet_libraries()
    started = time.perf_counter()
    options = options or ConvertOptions()
    options.validate()
    vocab_only, pre_tokenizer = options.vocab_only, options.pre_tokenizer
    model_dir, output = Path(model_dir), Path(output)
    check_output(output, force, inputs=[model_dir])
    architecture, hparams, infos = preflight(model_dir)
    outtype = resolve_outtype(options.outtype, infos)
    file_type = _file_type(outtype)
    vocab: TokenizerVocab = build_vocab(
        model_dir, hparams["vocab_size"], pre_tokenizer=pre_tokenizer, space_prefix_from_config=architecture.space_prefix_from_tokenizer_config
    )
    plan = [] if vocab_only else plan_tensors(infos, hparams, outtype, architecture)

    writer = gguf.GGUFWriter(path=None, arch=architecture.gguf_arch)
    for planned in plan:
        writer.add_tensor_info(planned.gguf_name, planned.shape, np.dtype(np.float32), planned.nbytes, raw_dtype=planned.qtype)
    total, shared, expert, expert_count = writer.get_total_parameter_count()
    writer.add_type(gguf.GGUFType.MODEL)
    metadata = gguf.Metadata.load(None, model_dir, None, total)
    if metadata.name is None:
        metadata.name = model_dir.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, expert_count)
    metadata.set_gguf_meta_model(writer)
    add_hyperparameters(writer, hparams, file_type, architecture)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.add_to(writer, model_dir)

    total_bytes = sum(p.nbytes for p in plan)
    reader = _TensorReader()
    with atomic_path(output, force=force, needed=total_bytes) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            if plan:
                writer.write_ti_data_to_file()
                progress.start(total_bytes, f"converting {model_dir.name}", unit="B")
                for planned in plan:
                    data = planned.data if planned.source is None else tensor_data(reader.get(planned.source), planned)
                    writer.write_tensor_data(data)
                    progress.advance(planned.nbytes)
                progress.finish()
        finally:
            reader.close()
            writer.close()

    types: dict[str, int] = {}
    for planned in plan:
        types[planned.qtype.name] = types.get(planned.qtype.name, 0) + 1
    result = ConvertResult(
        output=output,
        outtype=outtype if options.outtype == "auto" else options.outtype,
        file_type=file_type.name,
        vocab_only=vocab_only,
        tensor_count=len(plan),
        parameters=total,
        bytes_written=output.stat().st_size,
        tokenizer_model=vocab.model,
        tokenizer_pre=vocab.pre,
        vocab_size=len(vocab.tokens),
        tensor_types=types,
        seconds=time.perf_counter() - started,
    )
    write_file_record(output, "convert-gguf", inputs=[model_dir], options=dataclasses.asdict(options), results=result.to_dict())
    return result
