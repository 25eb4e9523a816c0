"""``cnllm gguf-to-hf``: HF → GGUF (f32) → HF gives identical tensors; tokenizer, template, record, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf
from cnllm.core.tensors import iter_tensors
from tests.core.gguf.util import copy_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
TEMPLATE = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ m['content'] }}<|eot_id|>{% endfor %}"


@pytest.fixture(params=["spm", "bpe-with-template", "tied", "mistral", "qwen2"])
def model(request, tmp_path, tiny_llama_dir, tiny_llama3_dir, tiny_tied_llama_dir):
    if request.param == "spm":
        return tiny_llama_dir
    if request.param == "tied":
        return tiny_tied_llama_dir
    if request.param in ("mistral", "qwen2"):  # qwen2: biases, tied, Qwen2-style BPE with ChatML
        return request.getfixturevalue(f"tiny_{request.param}_dir")
    model = copy_model(tiny_llama3_dir, tmp_path / "llama3")
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return model


def test_round_trip_gives_identical_tensors(cli, tmp_path, model):
    from transformers import AutoTokenizer

    from cnllm.core.architectures import find_architecture
    from tests.lora_fixtures import model_logits

    gguf = convert_to_gguf(model, tmp_path / "m.gguf", ConvertOptions(outtype="f32")).output
    out = tmp_path / "back"
    result = cli("gguf-to-hf", gguf, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    expected, actual = dict(iter_tensors(model)), dict(iter_tensors(out))
    assert expected.keys() == actual.keys() and all(torch.equal(expected[n], actual[n]) for n in expected)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is document["tied_embeddings"] is ("lm_head.weight" not in expected)
    assert "quantization_config" not in config
    # the GGUF architecture comes back (llama.cpp has no Mistral of its own: a Mistral GGUF returns as LLaMA)
    assert find_architecture(config).gguf_arch == find_architecture(json.loads((model / "config.json").read_text())).gguf_arch
    assert torch.allclose(model_logits(out), model_logits(model), atol=1e-4)
    text = "Hello 中文 world, 1234!"
    assert AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == AutoTokenizer.from_pretrained(str(model))(text)["input_ids"]
    template = AutoTokenizer.from_pretrained(str(model)).chat_template  # TEMPLATE for llama3, ChatML for qwen2
    assert document["chat_template"] is (template is not None) is (model.name == "llama3" or model.name.startswith("tiny-qwen2"))
    if document["chat_template"]:
        assert AutoTokenizer.from_pretrained(str(out)).chat_template == template
    record = json.loads((out / "cnllm-gguf-to-hf.json").read_text())
    assert record["results"]["parameters"] == document["parameters"] and record["inputs"][0]["path"].endswith("m.gguf")
    assert cli("checksum", "verify", out / "SHA256SUMS").exit_code == 0
    assert document["sentencepiece_model"] is (model / "tokenizer.model").exists() is (out / "tokenizer.model").exists()


def test_sentencepiece_gguf_gets_its_tokenizer_model_back_and_converts_again(cli, tmp_path, tiny_llama_dir):
    """The rebuilt tokenizer.model has the original's pieces, scores and types (special tokens come back as the
    converter wrote them: control, score -1000, and unk unknown), tokenizes alike, and convert-gguf takes the output
    again, writing the same vocabulary as the first conversion."""
    import sentencepiece

    from cnllm.core.tokenizers.spm import load_proto
    from tests.core.gguf.util import gguf_fields

    first = convert_to_gguf(tiny_llama_dir, tmp_path / "m.gguf", ConvertOptions(outtype="f32")).output
    assert cli("gguf-to-hf", first, "-o", tmp_path / "back").exit_code == 0
    original, rebuilt = load_proto(tiny_llama_dir / "tokenizer.model"), load_proto(tmp_path / "back" / "tokenizer.model")
    special = {0, 1, 2}
    assert [p.piece for p in rebuilt.pieces] == [p.piece for p in original.pieces]
    assert [(p.score, p.type) for i, p in enumerate(rebuilt.pieces) if i not in special] == [
        (p.score, p.type) for i, p in enumerate(original.pieces) if i not in special
    ]
    assert [p.type for p in rebuilt.pieces[:3]] == [p.type for p in original.pieces[:3]] == [2, 3, 3]
    text = "Hello  中文 world,\n 1234! 𝄞"
    encode = lambda path: sentencepiece.SentencePieceProcessor(model_file=str(path)).encode(text)  # noqa: E731
    assert encode(tmp_path / "back" / "tokenizer.model") == encode(tiny_llama_dir / "tokenizer.model")
    again = convert_to_gguf(tmp_path / "back", tmp_path / "again.gguf", ConvertOptions(outtype="f32")).output
    before, after = gguf_fields(first), gguf_fields(again)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.bos_token_id"):
        assert after[key] == before[key], key
    # <unk> may come back unknown rather than control (both special to llama.cpp); every other type is the same.
    assert after["tokenizer.ggml.token_type"][1:] == before["tokenizer.ggml.token_type"][1:]
    pytest.importorskip("llama_cpp")
    from cnllm.core.llama_loader import open_llama

    tokenize = lambda path: open_llama(path, vocab_only=True, verbose=False).tokenize(text.encode())  # noqa: E731
    assert tokenize(again) == tokenize(first)


def test_errors_are_one_line_and_write_nothing(cli, tmp_path, tiny_gguf):
    def fails(path, match):
        result = cli("gguf-to-hf", path, "-o", tmp_path / "out")
        assert result.exit_code == 2 and match in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "out").exists()

    (tmp_path / "notes.gguf").write_text("not a model")
    fails(tmp_path / "notes.gguf", "is not a GGUF file")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    fails(truncated, "is truncated")
    fails(tmp_path / "missing.gguf", "does not exist")


def test_unsupported_architecture_is_refused(cli, tmp_path, tiny_gguf):
    import gguf

    reader = gguf.GGUFReader(tiny_gguf)
    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(other, "gpt2")
    writer.add_tensor("token_embd.weight", reader.tensors[0].data.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = cli("gguf-to-hf", other, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "is a gpt2 model; gguf-to-hf converts llama, qwen2 GGUFs" in result.stderr


def test_existing_output_needs_force(cli, tmp_path, tiny_gguf):
    out = tmp_path / "out"
    out.mkdir()
    assert cli("gguf-to-hf", tiny_gguf, "-o", out).exit_code == 2
    assert cli("gguf-to-hf", tiny_gguf, "-o", out, "--force", "--dtype", "bf16").exit_code == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    shutil.rmtree(out)


def test_a_vocabulary_sentencepiece_refuses_is_said_and_skipped(tmp_path):
    import gguf

    from cnllm.core.gguf.to_hf import sentencepiece_model
    from cnllm.core.progress import NullProgress

    path = tmp_path / "dup.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "▁a", "▁a"])  # a piece twice
    writer.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0])
    writer.add_token_types([2, 3, 3, 1, 1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()

    class Said(NullProgress):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def log(self, message: str) -> None:
            self.lines.append(message)

    said = Said()
    assert sentencepiece_model(path, said) is None
    assert len(said.lines) == 1 and "no tokenizer.model written" in said.lines[0]
