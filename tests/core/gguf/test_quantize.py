"""quantize_gguf: llama.cpp's quantizer on tiny GGUFs, input validation, importance matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnllm.core.errors import UsageError
from cnllm.core.gguf.convert import ConvertOptions
from cnllm.core.gguf.quantize import QUANT_TYPES, QuantizeOptions, get_quant_type, load_imatrix, quantize_gguf, read_gguf_summary
from tests.core.gguf.util import gguf_tensors


@pytest.fixture(scope="module")
def f16_gguf(tmp_path_factory, tiny_llama_dir) -> Path:
    from cnllm.core.gguf.convert import convert_to_gguf

    return convert_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("q") / "f16.gguf", ConvertOptions(outtype="f16")).output


def test_type_table_matches_llama_cpp_constants():
    import llama_cpp

    assert len({q.name for q in QUANT_TYPES}) == len(QUANT_TYPES)
    assert get_quant_type("q4_k_m").ftype_id == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert get_quant_type("Q4_K").name == "Q4_K_M"
    assert get_quant_type("Q8_0").bits_per_weight == pytest.approx(8.5)
    assert get_quant_type("Q4_K_M").bits_per_weight == pytest.approx(4.5)
    for quant in QUANT_TYPES:
        assert isinstance(quant.ftype_id, int)
    with pytest.raises(UsageError, match="unknown quantization type"):
        get_quant_type("Q7_X")


def test_k_quant_falls_back_per_tensor_on_rows_not_divisible_by_256(tmp_path, f16_gguf):
    result = quantize_gguf(f16_gguf, tmp_path / "q4.gguf", QuantizeOptions(type="Q4_K_M"))
    assert result.fallbacks > 0
    assert result.output_size < result.input_size
    types = {t for t, _, _ in gguf_tensors(result.output).values()}
    assert "F32" in types and not types & {"F16", "Q4_K"}
    assert 4 < result.bits_per_weight < 9


def test_leave_output_tensor_and_type_overrides(tmp_path, f16_gguf):
    result = quantize_gguf(f16_gguf, tmp_path / "q.gguf", QuantizeOptions(type="Q8_0", leave_output_tensor=True, token_embedding_type="f16"))
    tensors = gguf_tensors(result.output)
    assert tensors["output.weight"][0] == "F16"
    assert tensors["token_embd.weight"][0] == "F16"
    assert tensors["blk.0.ffn_up.weight"][0] == "Q8_0"


class RecordingProgress:
    def __init__(self) -> None:
        self.advanced: list[dict] = []
        self.logged: list[str] = []
        self.total = None

    def start(self, total, description, unit="it"):
        self.total = total

    def advance(self, amount=1, **fields):
        self.advanced.append(fields)

    def finish(self):
        pass

    def log(self, message):
        self.logged.append(message)


def test_llama_cpp_log_becomes_progress_and_is_silent_unless_verbose(tmp_path, f16_gguf, capfd):
    quiet = RecordingProgress()
    quantize_gguf(f16_gguf, tmp_path / "a.gguf", QuantizeOptions(type="Q8_0"), progress=quiet)
    assert quiet.total == 21 and len(quiet.advanced) == 21
    assert {"token_embd.weight", "blk.1.ffn_down.weight"} <= {fields["tensor"] for fields in quiet.advanced}
    assert quiet.logged == []
    assert "llama_model_quantize" not in capfd.readouterr().err
    loud = RecordingProgress()
    quantize_gguf(f16_gguf, tmp_path / "b.gguf", QuantizeOptions(type="Q8_0"), verbose=True, progress=loud)
    assert any("quant size" in line for line in loud.logged)


def test_requantizing_needs_allow_requantize(tmp_path, f16_gguf):
    q8 = quantize_gguf(f16_gguf, tmp_path / "q8.gguf", QuantizeOptions(type="Q8_0")).output
    with pytest.raises(UsageError, match="already quantized.*--allow-requantize"):
        quantize_gguf(q8, tmp_path / "q4.gguf", QuantizeOptions(type="Q4_0"))
    assert not (tmp_path / "q4.gguf").exists()
    assert quantize_gguf(q8, tmp_path / "q4.gguf", QuantizeOptions(type="Q4_0", allow_requantize=True)).output.exists()


def test_non_gguf_and_truncated_inputs_are_usage_errors(tmp_path, f16_gguf):
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(UsageError, match="not a GGUF file"):
        read_gguf_summary(not_gguf)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(f16_gguf.read_bytes()[: f16_gguf.stat().st_size // 2])
    with pytest.raises(UsageError, match="truncated"):
        quantize_gguf(truncated, tmp_path / "out.gguf", QuantizeOptions(type="Q8_0"))
    assert list(tmp_path.glob("*out.gguf*")) == []


def _write_imatrix(path: Path, columns: dict[str, int]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    for name, ncols in columns.items():
        writer.add_tensor(f"{name}.in_sum2", np.full((1, ncols), 6.0, dtype=np.float32))
        writer.add_tensor(f"{name}.counts", np.array([[3.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_imatrix_is_loaded_and_passed_to_llama_cpp(tmp_path, f16_gguf):
    names = {f"blk.{i}.{t}.weight": 64 for i in range(2) for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")}
    names.update({f"blk.{i}.ffn_down.weight": 128 for i in range(2)})
    _write_imatrix(tmp_path / "imatrix.gguf", names)
    entries = load_imatrix(tmp_path / "imatrix.gguf")
    assert set(entries) == set(names)
    assert np.allclose(entries["blk.0.ffn_down.weight"], 2.0) and entries["blk.0.ffn_down.weight"].size == 128
    result = quantize_gguf(f16_gguf, tmp_path / "iq.gguf", QuantizeOptions(type="IQ4_NL", imatrix=tmp_path / "imatrix.gguf"))
    assert result.imatrix_entries == len(names)
    assert result.output.exists()


def test_imatrix_must_be_a_gguf_imatrix(tmp_path):
    (tmp_path / "imatrix.dat").write_bytes(b"\x00" * 64)
    with pytest.raises(UsageError, match="not a GGUF imatrix"):
        load_imatrix(tmp_path / "imatrix.dat")


def test_vocabulary_not_divisible_by_256_gets_real_k_quants(tmp_path, spm_tokenizer_dir):
    """Only the row length (hidden size) must divide by 256; a 1,000-token vocabulary is fine, as 49,953 is."""
    from cnllm.core.gguf.convert import convert_to_gguf
    from cnllm.core.tiny import build_tiny_llama

    model = build_tiny_llama(tmp_path / "model", spm_tokenizer_dir, hidden_size=256, intermediate_size=512, layers=1)
    f16 = convert_to_gguf(model, tmp_path / "f16.gguf", ConvertOptions(outtype="f16")).output
    result = quantize_gguf(f16, tmp_path / "q4_k_m.gguf", QuantizeOptions(type="Q4_K_M"))
    tensors = gguf_tensors(result.output)
    assert tensors["token_embd.weight"][1] == (1000, 256)
    assert tensors["token_embd.weight"][0] in ("Q4_K", "Q6_K")
    assert tensors["output.weight"][0] == "Q6_K"
    assert tensors["blk.0.ffn_gate.weight"][0] == "Q4_K"
    assert result.fallbacks == 0
