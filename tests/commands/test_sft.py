"""``cnllm sft`` end to end on the tiny model: eval loss goes down, masks, continuing a pt adapter, bad input."""

from __future__ import annotations

import json

import pytest

from cnllm.core.tiny import asset
from tests.core.training.conftest import one_torch_thread  # noqa: F401  (fixture)

TINY_RUN = ["--batch-size", "4", "--lora-rank", "8", "--lora-alpha", "16", "--lora-dropout", "0", "--logging-steps", "5", "--max-seq-length", "192"]


def test_sft_lowers_eval_loss_on_the_bundled_instructions(cli, tmp_path, tiny_llama_dir):
    out = tmp_path / "sft"
    result = cli("sft", "-m", tiny_llama_dir, "-d", asset("alpaca_zh.json"), "--template", "alpaca", "-o", out, *TINY_RUN,
                 "--max-steps", "15", "--save-steps", "15", "--learning-rate", "3e-3", "--validation-split", "0.1", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["eval_loss"] < report["eval_loss_before"]
    assert report["data"]["eval_samples"] >= 6 and report["data"]["truncated"] > 0
    assert "were truncated" in result.stderr
    assert report["data"]["adapter"]["tensors"] == 2 * 7 * 2 and report["data"]["adapter"]["bytes"] > 50_000
    assert "template: alpaca" in (out / "train-config.yaml").read_text()


def test_sft_continues_a_pt_adapter_with_its_tokenizer(cli, tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tokenizer.add_tokens(["中国", "天气", "语言"])
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    pt = cli("pt", "-m", tiny_llama_dir, "--tokenizer", tmp_path / "tok", "-d", asset("zh.txt"), "-o", tmp_path / "pt", "--block-size", "64",
             "--max-steps", "2", "--save-steps", "100", "--lora-rank", "4", "--validation-split", "0", "--cache-dir", tmp_path / "cache")
    assert pt.exit_code == 0, pt.stderr
    sft = cli("sft", "-m", tiny_llama_dir, "--peft-path", tmp_path / "pt", "-d", asset("alpaca_zh.json"), "-o", tmp_path / "sft",
              "--max-steps", "2", "--save-steps", "100", "--max-seq-length", "128", "--validation-split", "0", "--json")
    assert sft.exit_code == 0, sft.stderr
    report = json.loads(sft.stdout)
    assert report["vocab"]["tokenizer"] == 1003 and report["vocab"]["embedding_rows"] == 1024
    from safetensors import safe_open

    with safe_open(str(tmp_path / "sft" / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert "base_model.model.model.embed_tokens.weight" in names and sum("lora_A" in n for n in names) == 14


def test_llama3_conversations_with_auto_detected_shapes(cli, tmp_path, tiny_llama3_dir):
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(12)]
    rows += [{"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi! How can I help?"}]}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = cli("sft", "-m", tiny_llama3_dir, "-d", data, "--template", "llama3", "--system", "Be brief.", "-o", tmp_path / "out",
                 "--max-steps", "3", "--save-steps", "100", "--lora-rank", "4", "--packing", "--max-seq-length", "128", "--validation-split", "0", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["data"]["records"] == 13 and report["data"]["train_samples"] < 13


def test_malformed_record_names_file_and_line_and_skip_invalid_counts(cli, tmp_path, tiny_llama_dir):
    data = tmp_path / "bad.jsonl"
    good = {"instruction": "说你好", "output": "你好"}
    data.write_text("\n".join([json.dumps(good, ensure_ascii=False)] * 3 + ['{"instruction": "缺少回答"}', json.dumps(good, ensure_ascii=False)]) + "\n")
    out = tmp_path / "out"
    failed = cli("sft", "-m", tiny_llama_dir, "-d", data, "-o", out)
    assert failed.exit_code == 2
    assert f"{data}:4: 'output' is missing or empty (pass --skip-invalid to skip such records)" in " ".join(failed.stderr.split())
    assert not out.exists() and not (tmp_path / ".out.cnllm-training").exists()
    skipped = cli("sft", "-m", tiny_llama_dir, "-d", data, "-o", out, "--skip-invalid", "--max-steps", "1", "--save-steps", "100", "--lora-rank", "4", "--validation-split", "0", "--json")
    assert skipped.exit_code == 0, skipped.stderr
    assert json.loads(skipped.stdout)["data"]["skipped_invalid"] == 1
    assert "skipped 1 invalid records" in skipped.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--template", "vicuna"], "'vicuna' is not one of 'alpaca', 'llama2', 'llama3', 'chatml', 'auto'"),
        (["--template", "auto"], "the tokenizer has no chat template"),
        (["--lora-targets", "wq"], "LoRA target wq is not a linear layer"),
    ],
)
def test_bad_sft_input_is_exit_2_and_nothing_trained(cli, tmp_path, tiny_llama_dir, args, message):
    out = tmp_path / "out"
    result = cli("sft", "-m", tiny_llama_dir, "-d", asset("alpaca_zh.json"), "-o", out, *args)
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / ".out.cnllm-training").exists()


def test_the_sft_template_travels_through_merge_and_gguf_to_chat(cli, tmp_path, tiny_llama_dir):
    """sft records its template in the adapter's tokenizer; merge-lora and convert-gguf carry it; chat's
    --template auto then renders with it, without being told."""
    from transformers import AutoTokenizer

    from cnllm.core.llama_loader import open_llama
    from cnllm.core.templates import TEMPLATES

    sft = cli("sft", "-m", tiny_llama_dir, "-d", asset("alpaca_zh.json"), "--template", "llama2", "--system", "简短回答。", "-o", tmp_path / "sft",
              "--max-steps", "1", "--save-steps", "100", "--max-seq-length", "96", "--lora-rank", "4", "--validation-split", "0")
    assert sft.exit_code == 0, sft.stderr
    recorded = TEMPLATES["llama2"].jinja(default_system="简短回答。")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "sft")).chat_template == recorded
    merged = cli("merge-lora", "--base", tiny_llama_dir, "--lora", tmp_path / "sft", "-o", tmp_path / "merged")
    assert merged.exit_code == 0, merged.stderr
    assert AutoTokenizer.from_pretrained(str(tmp_path / "merged")).chat_template == recorded
    converted = cli("convert-gguf", tmp_path / "merged", "-o", tmp_path / "model.gguf", "--outtype", "f32")
    assert converted.exit_code == 0, converted.stderr
    llama = open_llama(tmp_path / "model.gguf", vocab_only=True, verbose=False)
    try:
        assert llama.metadata["tokenizer.chat_template"] == recorded
    finally:
        llama.close()
    for model in (tmp_path / "merged", tmp_path / "model.gguf"):
        chat = cli("chat", model, "-p", "你好", "-t", "0", "-n", "2", "--json")
        assert chat.exit_code == 0, chat.stderr
        document = json.loads(chat.stdout)
        assert document["template"] == "auto" and "no chat template" not in chat.stderr
        llama2 = json.loads(cli("chat", model, "-p", "你好", "-t", "0", "-n", "2", "--json", "--template", "llama2", "--system", "简短回答。").stdout)
        assert document["prompt_tokens"] == llama2["prompt_tokens"]
