"""``cnllm convert-meta``: Meta consolidated.NN.pth → Hugging Face, exact round trip with merge-lora's Meta export."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from cnllm.core.provenance import read_record
from tests.lora_fixtures import build_adapter, model_logits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama_dir):
    return build_adapter(tiny_llama_dir, tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_llama_dir, adapter):
    """The same merge written as a Hugging Face folder and as Meta's layout in two model-parallel parts."""
    from cnllm.core.merge import MergeOptions, merge_lora

    root = tmp_path_factory.mktemp("exports")
    merge_lora(tiny_llama_dir, [adapter], root / "hf")
    merge_lora(tiny_llama_dir, [adapter], root / "meta", MergeOptions(format="pth", shards=2))
    return root / "hf", root / "meta"


def tensors(model: Path) -> dict:
    from cnllm.core.tensors import stream_tensors

    return dict(stream_tensors(model))


def assert_same_tensors(left: Path, right: Path) -> None:
    import torch

    a, b = tensors(left), tensors(right)
    assert set(a) == set(b)
    assert all(torch.equal(a[name], b[name]) for name in a), [name for name in a if not torch.equal(a[name], b[name])]


def test_round_trip_with_merge_lora_pth_export_is_exact(cli, tmp_path, exports):
    import torch

    hf, meta = exports
    out = tmp_path / "back"
    result = cli("convert-meta", meta, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["shards"] == 2 and document["tensors"] == 21 and document["tokenizer"]["kind"] == "huggingface"
    assert document["config"]["num_key_value_heads"] == 2 and document["config"]["num_attention_heads"] == 4  # GQA
    assert_same_tensors(hf, out)
    assert torch.equal(model_logits(hf), model_logits(out))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["intermediate_size"] == 128 and config["bos_token_id"] == 1
    assert read_record(out, "convert-meta")["results"]["generation"] == "LLaMA-2"
    assert cli("checksum", "verify", out / "SHA256SUMS").exit_code == 0


def test_human_output_dtype_and_existing_output(cli, tmp_path, exports):
    _, meta = exports
    out = tmp_path / "fp16"
    result = cli("convert-meta", meta, "-o", out, "--dtype", "half")
    assert result.exit_code == 0, result.stderr
    assert "converted LLaMA-2 checkpoint (2 part(s), 21 tensors)" in result.stdout and "(half," in result.stdout
    assert "2 layers, hidden 64, 4 heads (2 key/value), ffn 128" in result.stdout
    assert {str(t.dtype) for t in tensors(out).values()} == {"torch.float16"}
    again = cli("convert-meta", meta, "-o", out)
    assert again.exit_code == 2 and "--force" in again.stderr


def test_llama1_layout_sentencepiece_in_parent_and_rope_freqs(cli, tmp_path, exports, spm_tokenizer_dir):
    """LLaMA-1: 7B/ beside tokenizer.model, rope.freqs in the checkpoint, vocab_size -1 in params.json."""
    import torch
    from transformers import AutoTokenizer

    hf, meta = exports
    folder = tmp_path / "LLaMA" / "7B"
    folder.mkdir(parents=True)
    for number in range(2):
        state = torch.load(meta / f"consolidated.{number:02d}.pth", weights_only=True)
        state["rope.freqs"] = torch.ones(8)
        torch.save(state, folder / f"consolidated.{number:02d}.pth")
    params = json.loads((meta / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "vocab_size": -1, "norm_eps": 1e-6}))
    shutil.copy2(spm_tokenizer_dir / "tokenizer.model", folder.parent / "tokenizer.model")
    out = tmp_path / "hf"
    result = cli("convert-meta", folder, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["generation"] == "LLaMA-1" and document["config"]["max_position_embeddings"] == 2048
    assert document["tokenizer"]["kind"] == "sentencepiece" and document["tokenizer"]["tokens"] == 1000
    assert_same_tensors(hf, out)
    text = "The quick brown fox, 1234 jumps!"
    assert AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == AutoTokenizer.from_pretrained(str(spm_tokenizer_dir))(text)["input_ids"]


def tiktoken_file(tokenizer_dir: Path, target: Path) -> Path:
    """Write a byte-level BPE tokenizer.json's ranks as tiktoken's ``base64 rank`` lines (specials left out)."""
    from tokenizers import Tokenizer, pre_tokenizers

    from cnllm.core.tokenizers.tiktoken import _byte_chars

    to_byte = {char: byte for byte, char in _byte_chars().items()}
    assert set(to_byte.values()) == set(range(256)) and set(to_byte) == set(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    lines = [f"{base64.b64encode(bytes(to_byte[c] for c in token)).decode()} {rank}" for token, rank in sorted(vocab.items(), key=lambda x: x[1])]
    target.write_text("\n".join(lines) + "\n")
    return target


def test_llama3_parts_split_the_embedding_by_rows(cli, tmp_path, exports):
    """Llama-3's model-parallel parts split tok_embeddings by rows, LLaMA-1/2's by columns: the shapes tell."""
    import torch

    hf, meta = exports
    folder = tmp_path / "Meta-Llama-3-tiny"
    shutil.copytree(meta, folder)
    parts = [torch.load(folder / f"consolidated.{n:02d}.pth", weights_only=True) for n in range(2)]
    embedding = torch.cat([p["tok_embeddings.weight"] for p in parts], dim=1)
    for number, part in enumerate(parts):
        part["tok_embeddings.weight"] = embedding.chunk(2, dim=0)[number].clone()
        torch.save(part, folder / f"consolidated.{number:02d}.pth")
    result = cli("convert-meta", folder, "-o", tmp_path / "hf")
    assert result.exit_code == 0, result.stderr
    assert_same_tensors(hf, tmp_path / "hf")


def test_llama3_tiktoken_tokenizer(cli, tmp_path, tiny_llama3_dir, bpe_tokenizer_dir, assets):
    """A tiktoken tokenizer.model (Llama-3) becomes a tokenizer.json that encodes alike; rope_theta is carried."""
    from tokenizers import Tokenizer

    from cnllm.core.merge import write_meta_checkpoint

    folder = tmp_path / "Meta-Llama-3-tiny"
    folder.mkdir()
    write_meta_checkpoint(tiny_llama3_dir, folder)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "rope_theta": 500000.0}))
    tiktoken_file(bpe_tokenizer_dir, folder / "tokenizer.model")
    out = tmp_path / "hf"
    result = cli("convert-meta", folder, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["tokenizer"]["kind"] == "tiktoken" and document["config"]["rope_theta"] == 500000.0
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(out)).rope_parameters["rope_theta"] == 500000.0
    assert_same_tensors(tiny_llama3_dir, out)
    original = Tokenizer.from_file(str(bpe_tokenizer_dir / "tokenizer.json"))
    converted = Tokenizer.from_file(str(out / "tokenizer.json"))
    for line in (assets / "en.txt").read_text(encoding="utf-8").splitlines()[:200] + ["Hello  world\n\n 12345 ünïcödé 中文"]:
        assert converted.encode(line, add_special_tokens=False).ids == original.encode(line, add_special_tokens=False).ids, line
    assert converted.token_to_id("<|begin_of_text|>") == 1024 and converted.encode("hi").ids[0] == 1024


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "consolidated.01.pth").rename(d / "consolidated.02.pth"), "consolidated.01.pth missing"),
        (lambda d: (d / "params.json").unlink(), "no params.json"),
        (lambda d: (d / "params.json").write_text(json.dumps({**json.loads((d / "params.json").read_text()), "n_kv_heads": 4})), "key/value heads"),
        (lambda d: (d / "params.json").write_text(json.dumps({**json.loads((d / "params.json").read_text()), "n_layers": 3})), "says 3 layers"),
        (lambda d: (d / "consolidated.00.pth").write_bytes(b"not a checkpoint"), "consolidated.00.pth"),
    ],
)
def test_bad_checkpoints_are_one_line_usage_errors(cli, tmp_path, exports, damage, message):
    _, meta = exports
    folder = tmp_path / "meta"
    shutil.copytree(meta, folder)
    damage(folder)
    result = cli("convert-meta", folder, "-o", tmp_path / "out")
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
