from __future__ import annotations

import json
import math

import pytest

from cnllm.core.errors import UsageError
from cnllm.core.evaluation.mc import (
    McOptions,
    Question,
    Subject,
    build_prompt,
    evaluate_multiple_choice,
    load_subjects,
    write_outputs,
)
from cnllm.core.generation.base import LoadOptions
from tests.core.evaluation.exam_data import write_ceval, write_cmmlu, write_mmlu


def reference_scores(model_dir, prompts: list[str]) -> list[list[float]]:
    """Letter probabilities computed the plain way: one prompt per forward pass, no padding, straight transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    vocab = tokenizer.get_vocab()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
        scores = []
        for letter in "ABCD":
            spellings = {vocab[p] for p in (letter, "\u2581" + letter, "\u0120" + letter, " " + letter) if p in vocab}
            extended = tokenizer(prompt + letter).input_ids
            if extended[: len(ids)] == ids and len(extended) > len(ids):
                spellings.add(extended[len(ids)])
            scores.append(torch.logsumexp(logprobs[sorted(spellings)], 0).item())
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        out.append([w / sum(weights) for w in weights])
    return out


def literal_prompt(subject_name: str, shots: list[dict], question: dict) -> str:
    text = f"以下是中国关于{subject_name}考试的单项选择题，请选出其中的正确答案。\n\n"
    for shot in shots:
        text += f"{shot['question']}\nA. {shot['A']}\nB. {shot['B']}\nC. {shot['C']}\nD. {shot['D']}\n答案：{shot['answer']}\n\n"
    return text + f"{question['question']}\nA. {question['A']}\nB. {question['B']}\nC. {question['C']}\nD. {question['D']}\n答案："


def test_prompt_matches_the_chinese_llama_alpaca_scripts():
    dev = [Question("0", "1+1=？", ("1", "2", "3", "4"), "B")]
    subject = Subject("math", "高等数学", "STEM", [], dev)
    question = Question("7", "2+2=？", ("4", "5", "6", "7"), "A")
    assert build_prompt(subject, question) == (
        "以下是中国关于高等数学考试的单项选择题，请选出其中的正确答案。\n\n"
        "1+1=？\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B\n\n"
        "2+2=？\nA. 4\nB. 5\nC. 6\nD. 7\n答案："
    )


def test_ceval_layout_with_mapping(ceval_dir):
    subjects = load_subjects(ceval_dir, McOptions(split="val", shots=5))
    assert [s.key for s in subjects] == ["computer_network", "law"]
    assert subjects[0].name == "计算机网络" and subjects[0].category == "STEM"
    assert len(subjects[0].questions) == 4 and len(subjects[0].dev) == 5
    assert subjects[0].questions[1].answer == "B"
    test = load_subjects(ceval_dir, McOptions(split="test", shots=0))
    assert all(q.answer is None for s in test for q in s.questions)


def test_ceval_without_mapping_uses_the_subject_key(tmp_path):
    root = write_ceval(tmp_path / "ceval", mapping=False)
    subjects = load_subjects(root, McOptions(shots=1, subjects=("law",)))
    assert [(s.key, s.name, s.category) for s in subjects] == [("law", "law", None)]
    assert len(subjects[0].dev) == 1


def test_cmmlu_and_mmlu_layouts(tmp_path):
    cmmlu = load_subjects(write_cmmlu(tmp_path / "cmmlu"), McOptions(format="cmmlu", split="test", shots=5))
    assert [s.key for s in cmmlu] == ["computer_network", "law"]
    assert [q.id for q in cmmlu[0].questions] == ["0", "1", "2", "3"]
    assert [q.answer for q in cmmlu[0].questions] == ["A", "B", "C", "D"]
    mmlu = load_subjects(write_mmlu(tmp_path / "mmlu"), McOptions(format="mmlu", split="val", shots=2))
    assert mmlu[0].key == "astronomy" and len(mmlu[0].questions) == 4 and mmlu[0].questions[2].answer == "C"
    assert mmlu[0].questions[0].choices[1] == "用户数据报协议"


def _rewrite(path, transform):
    path.write_text(transform(path.read_text(encoding="utf-8")), encoding="utf-8")


@pytest.mark.parametrize(
    "damage, options, message",
    [
        (lambda root: (root / "val" / "law_val.csv").unlink(), McOptions(subjects=("law",)), r"law_val\.csv does not exist"),
        (lambda root: (root / "dev" / "law_dev.csv").unlink(), McOptions(), r"law_dev\.csv does not exist"),
        (lambda root: _rewrite(root / "val" / "law_val.csv", lambda t: t.replace("id,question,A,B,C,D,answer", "id,question,A,B,C,answer")),
         McOptions(), r"law_val\.csv: missing column D"),
        (lambda root: _rewrite(root / "val" / "law_val.csv", lambda t: t.replace(",B\n", ",E\n", 1)), McOptions(), r"law_val\.csv: line 3: answer 'E'"),
        (lambda root: _rewrite(root / "val" / "law_val.csv", lambda t: t.splitlines()[0] + "\n"), McOptions(), r"law_val\.csv has no questions"),
        (lambda root: _rewrite(root / "val" / "law_val.csv", lambda t: ""), McOptions(), r"law_val\.csv is empty"),
        (lambda root: None, McOptions(shots=6), r"law_dev\.csv has 5 examples"),
        (lambda root: None, McOptions(format="cmmlu", split="val"), "no 'val' split"),
        (lambda root: _rewrite(root / "subject_mapping.json", lambda t: "{\"law\": \"法学\"}"), McOptions(), "subject_mapping.json"),
    ],
)
def test_bad_data_names_the_file(tmp_path, damage, options, message):
    root = write_ceval(tmp_path / "ceval")
    damage(root)
    order = sorted(["computer_network", "law"], reverse=True)  # check the damaged subject first
    with pytest.raises(UsageError, match=message):
        load_subjects(root, McOptions(**{**options.__dict__, "subjects": options.subjects or tuple(order)}))


def test_missing_split_folder(tmp_path):
    root = write_ceval(tmp_path / "ceval")
    with pytest.raises(UsageError, match="no 'val' split"):
        load_subjects(root / "dev", McOptions())


@pytest.mark.parametrize("model_fixture, shots", [("tiny_llama_dir", 0), ("tiny_llama_dir", 2), ("tiny_llama3_dir", 2)])
def test_matches_reference_scorer_question_by_question(request, ceval_dir, model_fixture, shots):
    """SentencePiece and byte-level BPE tokenizers spell the letters differently; batches of 3 need left padding."""
    model_dir = request.getfixturevalue(model_fixture)
    options = McOptions(split="val", shots=shots, batch_size=3)
    result = evaluate_multiple_choice(model_dir, ceval_dir, options)
    prompts = []
    from tests.core.evaluation.exam_data import MAPPING, question_rows

    for subject in ("computer_network", "law"):
        shot_rows = question_rows(subject, 5, offset=100)[:shots]
        prompts += [literal_prompt(MAPPING[subject][1], shot_rows, q) for q in question_rows(subject, 4)]
    expected = reference_scores(model_dir, prompts)
    assert len(result.predictions) == len(expected) == 8
    for prediction, probabilities in zip(result.predictions, expected):
        assert [prediction.probabilities[x] for x in "ABCD"] == pytest.approx(probabilities, abs=1e-5)
        assert prediction.prediction == "ABCD"[max(range(4), key=probabilities.__getitem__)]
    correct = sum(p.prediction == p.answer for p in result.predictions)
    assert result.overall == correct / 8
    assert result.average == pytest.approx(sum(s.correct / s.questions for s in result.subjects) / 2)
    assert {c.name: c.questions for c in result.categories} == {"Humanities": 4, "STEM": 4}


def test_gguf_agrees_with_hf(tiny_llama_dir, tiny_f32_gguf, ceval_dir):
    options = McOptions(split="val", shots=1)
    hf = evaluate_multiple_choice(tiny_llama_dir, ceval_dir, options)
    gguf = evaluate_multiple_choice(tiny_f32_gguf, ceval_dir, options, LoadOptions(threads=1))
    assert gguf.model["backend"] == "llama.cpp"
    for a, b in zip(hf.predictions, gguf.predictions):
        assert a.prediction == b.prediction
        assert [a.probabilities[x] for x in "ABCD"] == pytest.approx([b.probabilities[x] for x in "ABCD"], abs=1e-3)


def test_template_wraps_the_prompt_and_is_recorded(tiny_llama_dir, ceval_dir):
    plain = evaluate_multiple_choice(tiny_llama_dir, ceval_dir, McOptions(shots=0, subjects=("law",)))
    alpaca = evaluate_multiple_choice(tiny_llama_dir, ceval_dir, McOptions(shots=0, subjects=("law",), template="alpaca"))
    assert alpaca.prompt_tokens > plain.prompt_tokens
    assert alpaca.to_dict()["settings"]["template"] == "alpaca" and plain.to_dict()["settings"]["template"] == "none"
    assert [p.probabilities for p in alpaca.predictions] != [p.probabilities for p in plain.predictions]


def test_prompt_longer_than_ctx_is_refused(tiny_llama_dir, ceval_dir):
    with pytest.raises(UsageError, match="raise --ctx or use fewer --shots"):
        evaluate_multiple_choice(tiny_llama_dir, ceval_dir, McOptions(shots=5, ctx=64))


def test_outputs_for_a_test_split(tiny_llama_dir, ceval_dir, tmp_path):
    result = evaluate_multiple_choice(tiny_llama_dir, ceval_dir, McOptions(split="test", shots=0))
    assert not result.labelled and result.average is None and result.overall is None
    out = tmp_path / "out"
    assert write_outputs(result, out) == ["results.json", "predictions.jsonl", "submission.json"]
    submission = json.loads((out / "submission.json").read_text(encoding="utf-8"))
    assert set(submission) == {"computer_network", "law"}
    assert set(submission["law"]) == {"50", "51", "52"} and set(submission["law"].values()) <= set("ABCD")
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 6
    assert set(lines[0]) == {"id", "subject", "prediction", "answer", "probabilities", "correct"}
    assert lines[0]["answer"] is None and lines[0]["correct"] is None
    assert sum(lines[0]["probabilities"].values()) == pytest.approx(1)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["settings"]["split"] == "test" and results["labelled"] is False
    assert (out / "cnllm-eval-mc.json").exists()
    with pytest.raises(UsageError, match="already exists"):
        write_outputs(result, out)
