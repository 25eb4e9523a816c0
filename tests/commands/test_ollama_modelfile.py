"""``--modelfile`` on convert-gguf and quantize: the Ollama template renders what cnllm's template renders."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from cnllm.core.gguf.ollama import go_template, identify_template, modelfile_text
from cnllm.core.templates import TEMPLATES
from tests.core.gguf.gotemplate import render as render_go

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CONVERSATIONS = [
    [{"role": "user", "content": "用一句话介绍北京"}],
    [{"role": "system", "content": "你是一个翻译。"}, {"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
        {"role": "user", "content": "Q3\n多行"},
    ],
]
CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def ollama_render(modelfile: str, conversation: list[dict]) -> str:
    """What Ollama sends to llama.cpp: the Modelfile's SYSTEM becomes the first message when the request has none."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', modelfile, re.S | re.M)
    messages = list(conversation)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system.group(1)})
    return render_go(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one-turn", "system", "multi-turn", "system-multi-turn"])
def test_modelfile_renders_like_the_builtin(name, conversation):
    modelfile = modelfile_text("model.gguf", name, eos_token="</s>", system=None)
    assert ollama_render(modelfile, conversation) == TEMPLATES[name].render(conversation, eos_token="</s>")
    if conversation[0]["role"] == "system":  # the bare Go template, without Ollama's SYSTEM injection
        data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in conversation]}
        assert render_go(go_template(name, "</s>"), data) == TEMPLATES[name].render(conversation, eos_token="</s>")


def test_identify_template_from_jinja():
    assert identify_template(CHATML_JINJA) == "chatml"
    assert identify_template("{% for m in messages %}{{ m['content'] }}{% endfor %}") is None


def test_convert_gguf_writes_a_modelfile_whose_template_matches(cli, tmp_path, tiny_llama_dir):
    out = tmp_path / "alpaca.gguf"
    result = cli("convert-gguf", tiny_llama_dir, "-o", out, "--outtype", "f16", "--modelfile", "--template", "alpaca", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    modelfile_path = tmp_path / "alpaca.Modelfile"
    assert document["modelfile"]["path"] == str(modelfile_path) and document["modelfile"]["template"] == "alpaca"
    modelfile = modelfile_path.read_text(encoding="utf-8")
    assert modelfile.startswith("FROM ./alpaca.gguf\n")
    assert 'PARAMETER stop "### Instruction:"' in modelfile and 'PARAMETER stop "</s>"' in modelfile
    for conversation in CONVERSATIONS:
        assert ollama_render(modelfile, conversation) == TEMPLATES["alpaca"].render(conversation, eos_token="</s>")


def test_auto_translates_the_models_own_template_and_system_prompt(cli, tmp_path, tiny_llama_dir):
    model = tmp_path / "chatml-model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML_JINJA}))
    out = tmp_path / "m.gguf"
    result = cli("convert-gguf", model, "-o", out, "--modelfile", "--system", "你是一个乐于助人的助手。")
    assert result.exit_code == 0, result.stderr
    assert "(chatml template)" in result.stdout
    modelfile = (tmp_path / "m.Modelfile").read_text(encoding="utf-8")
    assert 'SYSTEM """你是一个乐于助人的助手。"""' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    conversation = CONVERSATIONS[2]
    assert ollama_render(modelfile, conversation) == TEMPLATES["chatml"].render(conversation, system="你是一个乐于助人的助手。")


def test_untranslatable_template_is_refused_before_any_work(cli, tmp_path, tiny_llama_dir):
    model = tmp_path / "odd-model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    result = cli("convert-gguf", model, "-o", tmp_path / "m.gguf", "--modelfile")
    assert result.exit_code == 2 and "--template" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m.gguf").exists()


def test_quantize_modelfile_uses_the_gguf_eos_and_checks_options(cli, tmp_path, tiny_llama_dir):
    f16 = tmp_path / "f16.gguf"
    assert cli("convert-gguf", tiny_llama_dir, "-o", f16, "--outtype", "f16").exit_code == 0
    no_template = cli("quantize", f16, "-o", tmp_path / "q8.gguf", "--type", "Q8_0", "--modelfile")
    assert no_template.exit_code == 2 and "no chat template" in no_template.stderr and not (tmp_path / "q8.gguf").exists()
    stray = cli("quantize", f16, "-o", tmp_path / "q8.gguf", "--type", "Q8_0", "--template", "llama2")
    assert stray.exit_code == 2 and "add --modelfile" in stray.stderr
    result = cli("quantize", f16, "-o", tmp_path / "q8.gguf", "--type", "Q8_0", "--modelfile", "--template", "llama2")
    assert result.exit_code == 0, result.stderr
    modelfile = (tmp_path / "q8.Modelfile").read_text(encoding="utf-8")
    assert modelfile.startswith("FROM ./q8.gguf\n") and 'SYSTEM """You are a helpful assistant.' in modelfile
    for conversation in CONVERSATIONS:
        assert ollama_render(modelfile, conversation) == TEMPLATES["llama2"].render(conversation, eos_token="</s>")
    again = cli("quantize", f16, "-o", tmp_path / "q8.gguf", "--type", "Q8_0", "--modelfile", "--template", "llama2")
    assert again.exit_code == 2 and "already exists" in again.stderr
