"""The whole chain on the real SmolLM2-135M-Instruct: a trained LLaMA checkpoint with tied embeddings.

vocab merge → pt (a few steps) → merge-lora --verify → sft (a few steps, chatml) → merge → convert-gguf
(byte-identical to llama.cpp's reference converter on the base model) → quantize → eval ppl (f32 GGUF
vs Hugging Face within 0.5 %, Q8_0 within 1 % of f32, Q4_K_M reported) → chat and serve through the
model's own template. Not in the default run: ``make test-real`` (about 10-20 minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnllm.core.tensors import tensor_infos
from cnllm.core.tiny import asset
from tests.conftest import run_reference_converter
from tests.real.conftest import cnllm, cnllm_json

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]
TRAIN = ["--max-steps", "2", "--batch-size", "2", "--lora-rank", "8", "--lora-alpha", "16", "--logging-steps", "1"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smollm2-chain")


@pytest.fixture(scope="module")
def heldout(work) -> Path:
    """A short held-out Chinese text (a few hundred tokens: every model is scored on the same windows)."""
    path = work / "heldout.txt"
    path.write_text(asset("zh_heldout.txt").read_text(encoding="utf-8")[:700], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(work, smollm2_hf) -> Path:
    cnllm("vocab", "train", asset("zh.txt"), "--vocab-size", "2500", "-o", work / "zh.model")
    document = cnllm_json("vocab", "merge", "--base", smollm2_hf, "--add", work / "zh.model", "-o", work / "tokenizer")
    assert document["base_size"] == 49152 < document["final_size"], document
    return work / "tokenizer"


@pytest.fixture(scope="module")
def merged_pt(work, smollm2_hf, tokenizer) -> Path:
    cnllm("pt", "-m", smollm2_hf, "--tokenizer", tokenizer, "-d", asset("zh.txt"), "-o", work / "pt", "--block-size", "128", *TRAIN)
    document = cnllm_json("merge-lora", "--base", smollm2_hf, "--lora", work / "pt", "-o", work / "merged-pt", "--verify")
    assert document["verify"]["passed"], document["verify"]
    return work / "merged-pt"


@pytest.fixture(scope="module")
def merged_sft(work, merged_pt) -> Path:
    cnllm("sft", "-m", merged_pt, "-d", asset("alpaca_zh.json"), "--template", "chatml", "-o", work / "sft", "--max-seq-length", "128", *TRAIN)
    document = cnllm_json("merge-lora", "--base", merged_pt, "--lora", work / "sft", "-o", work / "merged-sft", "--verify")
    assert document["verify"]["passed"], document["verify"]
    return work / "merged-sft"


def test_pt_on_tied_embeddings_unties_them_in_the_merge(merged_pt, tokenizer):
    config = json.loads((merged_pt / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "lm_head.weight" in tensor_infos(merged_pt)
    assert config["vocab_size"] >= len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])


def test_sft_template_travels_into_the_gguf_and_chat_uses_it(work, merged_sft):
    assert "<|im_start|>" in (merged_sft / "chat_template.jinja").read_text()
    gguf = work / "sft-f16.gguf"
    cnllm("convert-gguf", merged_sft, "-o", gguf, "--outtype", "f16")
    answer = cnllm_json("chat", gguf, "-p", "用一句话介绍北京", "-n", "16", "-t", "0")
    assert answer["template"] == "auto" and answer["answer"].strip() and answer["prompt_tokens"] > 10


def test_convert_gguf_is_byte_identical_to_the_reference(work, smollm2_hf, llamacpp_reference):
    ours, theirs = work / "ours-f16.gguf", work / "reference-f16.gguf"
    cnllm("convert-gguf", smollm2_hf, "-o", ours, "--outtype", "f16")
    run_reference_converter(llamacpp_reference, smollm2_hf, theirs)
    assert ours.read_bytes() == theirs.read_bytes()


def test_quantized_perplexity_tracks_hugging_face(work, smollm2_hf, heldout):
    f32 = work / "base-f32.gguf"
    cnllm("convert-gguf", smollm2_hf, "-o", f32, "--outtype", "f32")
    ppl = {"hf": cnllm_json("eval", "ppl", smollm2_hf, "--data", heldout, "--ctx", "128")["total"]["ppl"],
           "f32": cnllm_json("eval", "ppl", f32, "--data", heldout, "--ctx", "128")["total"]["ppl"]}
    for qtype in ("Q8_0", "Q4_K_M"):
        quantized = work / f"base-{qtype}.gguf"
        cnllm("quantize", f32, "-o", quantized, "--type", qtype)
        ppl[qtype] = cnllm_json("eval", "ppl", quantized, "--data", heldout, "--ctx", "128")["total"]["ppl"]
    print(json.dumps(ppl))
    assert abs(ppl["f32"] / ppl["hf"] - 1) < 0.005, ppl
    assert abs(ppl["Q8_0"] / ppl["f32"] - 1) < 0.01, ppl
    assert ppl["Q4_K_M"] > 0


def test_chat_and_serve_answer_through_the_models_own_template(work, smollm2_gguf):
    # the GGUF's ChatML template with its default system prompt wraps the 7-token question
    answer = cnllm_json("chat", smollm2_gguf, "-p", "What is the capital of France?", "-n", "12", "-t", "0")
    assert answer["template"] == "auto" and answer["answer"].strip() and answer["prompt_tokens"] > 30, answer
    process = subprocess.Popen([sys.executable, "-m", "cnllm", "serve", str(smollm2_gguf), "--port", "0", "--model-name", "smol"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        import openai

        line, deadline = b"", time.monotonic() + 300
        while b"serving" not in line and time.monotonic() < deadline and process.poll() is None:
            line = process.stderr.readline()
        url = re.search(rb"http://127\.0\.0\.1:(\d+)/v1", line)
        assert url, line
        client = openai.OpenAI(base_url=url.group(0).decode(), api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                               max_tokens=12, temperature=0)
        assert reply.choices[0].message.content.strip() and reply.usage.prompt_tokens == answer["prompt_tokens"]
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
