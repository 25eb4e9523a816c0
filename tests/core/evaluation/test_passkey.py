"""Passkey retrieval: prompts built to length with the key at its depth, deterministic keys, answer checking,
and the command end to end on both backends."""

from __future__ import annotations

import json

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.evaluation.passkey import TEXTS, PasskeyOptions, answer_is_right, build_prompt, fit_prompt, passkey


def words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("language", ["en", "zh"])
def test_prompt_fills_the_budget_with_the_key_at_its_depth(language):
    texts = TEXTS[language]
    count = words if language == "en" else len
    for depth in (0.0, 0.5, 1.0):
        prompt = fit_prompt(count, texts, "12345", depth, 600)
        assert 550 < count(prompt.text) <= 600
        assert prompt.text.startswith(texts.intro) and prompt.text.endswith(texts.question)
        assert prompt.key_unit == round(depth * prompt.filler_units)
        key_at = prompt.text.index(texts.key.format(key="12345"))
        assert key_at == len(texts.intro) + prompt.key_unit * len(texts.filler)


def test_build_prompt_is_deterministic_text():
    prompt = build_prompt(TEXTS["en"], "55555", 0.5, 2)
    assert prompt.text == TEXTS["en"].intro + TEXTS["en"].filler + TEXTS["en"].key.format(key="55555") + TEXTS["en"].filler + TEXTS["en"].question


def test_keys_are_reproducible_five_digit_numbers():
    keys = {passkey(0, 4096, d, t) for d in (0.0, 0.5) for t in range(5)}
    assert len(keys) == 10 and all(len(k) == 5 and k.isdigit() for k in keys)
    assert passkey(0, 4096, 0.5, 3) == passkey(0, 4096, 0.5, 3) != passkey(1, 4096, 0.5, 3)


def test_answer_checking():
    assert answer_is_right(" 71432. Remember it.", "71432")
    assert answer_is_right("是71432。", "71432")
    assert not answer_is_right(" 7143", "71432")
    assert not answer_is_right(" 12 then 71432", "71432")
    assert not answer_is_right(" the sky is blue", "71432")


@pytest.mark.parametrize("bad", [{"lengths": ()}, {"lengths": (32,)}, {"depths": (1.5,)}, {"trials": 0}, {"language": "fr"}])
def test_bad_options(bad):
    with pytest.raises(UsageError):
        PasskeyOptions(**bad).validate()


@pytest.mark.parametrize("fixture", ["short_context_gguf", "short_context_dir"])
def test_passkey_command_end_to_end(cli, tmp_path, request, fixture):
    model = request.getfixturevalue(fixture)
    report, plot = tmp_path / "passkey.json", tmp_path / "passkey.png"
    result = cli("eval", "passkey", model, "--length", "256", "--length", "192", "--depth", "0", "--depth", "1", "--trials", "2",
                 "--rope-scaling", "ntk-auto", "--plot", plot, "-o", report, "--json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["settings"]["lengths"] == [192, 256] and document["model"]["trained_context"] == 64
    assert len(document["cells"]) == 4 and all(c["trials"] == 2 for c in document["cells"])
    for cell in document["cells"]:
        assert all(cell["length"] - 32 < n <= cell["length"] - 12 for n in cell["prompt_tokens"])
        assert all(a["correct"] == answer_is_right(a["answer"], a["key"]) for a in cell["answers"])
    assert json.loads(report.read_text(encoding="utf-8")) == document
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = cli("eval", "passkey", model, "--length", "192", "--depth", "0.5", "--trials", "1")
    assert table.exit_code == 0 and "passkey accuracy" in table.stdout
    assert "trained context of 64" in table.stderr
