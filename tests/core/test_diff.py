"""Weight diffs: make/recover round trips bit for bit, extra vocabulary rows, checks, and bad input."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from cnllm.core import diff
from cnllm.core.diff import MakeDiffOptions, RecoverOptions
from cnllm.core.errors import CheckFailed, CnllmError, OutputExistsError, UsageError
from cnllm.core.merge import MergeOptions, merge_lora
from cnllm.core.provenance import read_record
from cnllm.core.tensors import iter_tensors
from tests.lora_fixtures import build_adapter, extend_tokenizer, load_fp32

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_llama_dir, spm_tokenizer_dir):
    """Tuned models to publish as diffs: same vocabulary, and one extended to 1,100 tokens."""
    root = tmp_path_factory.mktemp("tuned")
    tokenizer = extend_tokenizer(spm_tokenizer_dir, root / "tokenizer", 100)
    plain = build_adapter(tiny_llama_dir, root / "plain-adapter")
    extended = build_adapter(
        tiny_llama_dir, root / "extended-adapter", vocab=1100, targets=("q_proj",), modules_to_save=("embed_tokens", "lm_head"), tokenizer_dir=tokenizer
    )
    return {
        "plain": merge_lora(tiny_llama_dir, [plain], root / "plain").output,
        "extended": merge_lora(tiny_llama_dir, [extended], root / "extended").output,
        "fp16": merge_lora(tiny_llama_dir, [plain], root / "fp16", MergeOptions(dtype="float16")).output,
    }


def _bits(tensor):
    return tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32)


def _assert_bit_identical(a: Path, b: Path, dtype=None):
    left, right = dict(iter_tensors(a)), dict(iter_tensors(b))
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype
        assert torch.equal(_bits(left[name]), _bits(right[name])), name


@pytest.mark.parametrize("which", ["plain", "extended"])
def test_recover_of_make_is_bit_identical(tmp_path, tiny_llama_dir, tuned, which):
    made = diff.make_diff(tiny_llama_dir, tuned[which], tmp_path / "diff")
    recovered = diff.recover(tiny_llama_dir, tmp_path / "diff", tmp_path / "recovered", RecoverOptions(max_shard_size="100KB"))
    _assert_bit_identical(tuned[which], tmp_path / "recovered")
    assert made.dtype == recovered.dtype == "float32"
    expected_extended = ["lm_head.weight", "model.embed_tokens.weight"] if which == "extended" else []
    assert sorted(made.extended) == sorted(recovered.extended) == expected_extended
    assert json.loads((tmp_path / "recovered" / "config.json").read_text())["vocab_size"] == (1100 if which == "extended" else 1000)
    assert (tmp_path / "recovered" / "tokenizer.json").read_bytes() == (tuned[which] / "tokenizer.json").read_bytes()
    assert len(list((tmp_path / "recovered").glob("model-*-of-*.safetensors"))) > 1
    load_fp32(tmp_path / "recovered")
    assert read_record(tmp_path / "recovered", "diff-recover")["results"]["extended_rows"] == recovered.extended
    assert made.signed_zeros == 0 and read_record(tmp_path / "diff", "make-diff")["results"]["bit_identical_recovery"] is True


def test_round_trip_in_small_row_blocks(tmp_path, tiny_llama_dir, tuned, monkeypatch):
    """Tensors are processed a block of rows at a time; blocks straddling the raw vocabulary's end included."""
    monkeypatch.setattr(diff, "BLOCK_BYTES", 7 * 64 * 4)
    diff.make_diff(tiny_llama_dir, tuned["extended"], tmp_path / "diff")
    result = diff.recover(tiny_llama_dir, tmp_path / "diff", tmp_path / "recovered", RecoverOptions(reference=tuned["extended"]))
    _assert_bit_identical(tuned["extended"], tmp_path / "recovered")
    assert result.reference_check.passed and result.reference_check.max_abs_diff == 0.0


def test_extra_rows_are_carried_as_is(tmp_path, tiny_llama_dir, tuned):
    diff.make_diff(tiny_llama_dir, tuned["extended"], tmp_path / "diff")
    delta = dict(iter_tensors(tmp_path / "diff"))["model.embed_tokens.weight"]
    original = dict(iter_tensors(tuned["extended"]))["model.embed_tokens.weight"]
    assert torch.equal(delta[1000:], original[1000:])
    assert not torch.equal(delta[:1000], original[:1000])


def test_fp16_model_round_trips_through_an_fp32_diff(tmp_path, tiny_llama_dir, tuned):
    diff.make_diff(tiny_llama_dir, tuned["fp16"], tmp_path / "diff")
    assert {t.dtype for _, t in iter_tensors(tmp_path / "diff")} == {torch.float32}
    result = diff.recover(tiny_llama_dir, tmp_path / "diff", tmp_path / "recovered", RecoverOptions(dtype="float16"))
    assert result.dtype == "float16"
    _assert_bit_identical(tuned["fp16"], tmp_path / "recovered")


def test_make_diff_refuses_a_diff_that_cannot_recover_exactly(tmp_path, tiny_llama_dir, tuned):
    with pytest.raises(CheckFailed, match="cannot be recovered bit for bit from a torch.float16 difference"):
        diff.make_diff(tiny_llama_dir, tuned["plain"], tmp_path / "diff", MakeDiffOptions(dtype="float16"))
    assert not (tmp_path / "diff").exists()


def test_reference_and_manifest_checks(tmp_path, tiny_llama_dir, tuned):
    diff.make_diff(tiny_llama_dir, tuned["plain"], tmp_path / "diff")
    first = diff.recover(tiny_llama_dir, tmp_path / "diff", tmp_path / "first", RecoverOptions(reference=tuned["plain"]))
    assert first.reference_check.passed and first.reference_check.max_abs_diff == 0.0 and not first.problems()
    published = tmp_path / "SHA256.md"
    rows = [line.split() for line in (tmp_path / "first" / "SHA256SUMS").read_text().splitlines() if ".safetensors" in line]
    published.write_text("| file | sha256 |\n| --- | --- |\n" + "".join(f"| {name} | {digest} |\n" for digest, name in rows))
    second = diff.recover(tiny_llama_dir, tmp_path / "diff", tmp_path / "second", RecoverOptions(manifest=published))
    assert second.manifest_check.passed and [c.path for c in second.manifest_check.checks] == [name for _, name in rows]

    published.write_text(published.read_text().replace(rows[0][0], "0" * 64))
    third = diff.recover(tiny_llama_dir, tmp_path / "diff", tmp_path / "third", RecoverOptions(manifest=published, reference=tiny_llama_dir))
    problems = third.problems()
    assert len(problems) == 2 and "do not match" in problems[0] and "differ from" in problems[1]
    assert (tmp_path / "third" / "config.json").exists(), "a failed check keeps the complete output"


def test_shape_and_layer_mismatches_name_the_tensor(tmp_path, spm_tokenizer_dir, tiny_llama_dir, tuned):
    from cnllm.core.tiny import build_tiny_llama

    diff.make_diff(tiny_llama_dir, tuned["plain"], tmp_path / "diff")
    wider = build_tiny_llama(tmp_path / "wider", spm_tokenizer_dir, intermediate_size=96)
    with pytest.raises(UsageError, match=r"shape mismatch for model.layers.0.mlp.down_proj.weight: 64×96 in the base .*, 64×128 in the diff"):
        diff.recover(wider, tmp_path / "diff", tmp_path / "out")
    deeper = build_tiny_llama(tmp_path / "deeper", spm_tokenizer_dir, layers=3)
    with pytest.raises(UsageError, match=r"base: 30 tensors, 3 layers; diff: 21 tensors, 2 layers"):
        diff.recover(deeper, tmp_path / "diff", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_diff_existing_output_and_disk_full(tmp_path, tiny_llama_dir, tuned, monkeypatch):
    diff.make_diff(tiny_llama_dir, tuned["plain"], tmp_path / "diff")
    with pytest.raises(UsageError, match="is the input"):
        diff.recover(tiny_llama_dir, tmp_path / "diff", tmp_path / "diff")
    (tmp_path / "existing").mkdir()
    with pytest.raises(OutputExistsError):
        diff.recover(tiny_llama_dir, tmp_path / "diff", tmp_path / "existing")
    (tmp_path / "existing").rmdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in (tmp_path / "diff").iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(UsageError, match="model.safetensors is truncated"):
        diff.recover(tiny_llama_dir, broken, tmp_path / "out")

    from cnllm.core import tensors

    def no_space(self, name, first, block):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensors.StreamingShardWriter, "add_rows", no_space)
    with pytest.raises(CnllmError, match="no space left on"):
        diff.recover(tiny_llama_dir, tmp_path / "diff", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "diff"]


def test_negative_zero_is_counted_not_refused(tmp_path, tiny_llama_dir, tuned):
    """raw + (−raw) is +0.0 whatever the sign was: make-diff reports such zeros instead of claiming bit identity."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "with-negative-zero"
    model.mkdir()
    for item in tuned["plain"].iterdir():
        if item.suffix != ".safetensors":
            (model / item.name).write_bytes(item.read_bytes())
    state = load_file(str(tuned["plain"] / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.weight"][0, 0] = -0.0
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    made = diff.make_diff(tiny_llama_dir, model, tmp_path / "diff")
    assert made.signed_zeros == 1
    assert read_record(tmp_path / "diff", "make-diff")["results"]["bit_identical_recovery"] is False
    diff.recover(tiny_llama_dir, tmp_path / "diff", tmp_path / "recovered")
    value = dict(iter_tensors(tmp_path / "recovered"))["model.layers.0.self_attn.q_proj.weight"][0, 0]
    assert value == 0 and not torch.signbit(value)


def test_rope_scaling_travels_from_adapter_through_diff_to_gguf(tmp_path, tiny_llama_dir):
    """A long-context model published as a diff: the scaling a pt run trained with (written beside its adapter)
    reaches the merged config, the diff, the recovered model and the GGUF's rope keys."""
    from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf
    from cnllm.core.modelio import CONFIG_OVERRIDES_NAME
    from cnllm.core.rope import training_overrides
    from tests.core.gguf.util import gguf_fields

    adapter = build_adapter(tiny_llama_dir, tmp_path / "adapter")
    base_config = json.loads((tiny_llama_dir / "config.json").read_text())
    overrides = training_overrides("yarn", 4.0, base_config)
    (adapter / CONFIG_OVERRIDES_NAME).write_text(json.dumps(overrides))
    tuned = merge_lora(tiny_llama_dir, [adapter], tmp_path / "long").output
    diff.make_diff(tiny_llama_dir, tuned, tmp_path / "diff")
    diff.recover(tiny_llama_dir, tmp_path / "diff", tmp_path / "recovered")
    recovered = json.loads((tmp_path / "recovered" / "config.json").read_text())
    assert recovered["rope_parameters"] == overrides["rope_parameters"]
    assert recovered["max_position_embeddings"] == 4 * base_config["max_position_embeddings"]
    fields = gguf_fields(convert_to_gguf(tmp_path / "recovered", tmp_path / "long.gguf", ConvertOptions(vocab_only=True)).output)
    assert fields["llama.rope.scaling.type"] == "yarn"
    assert fields["llama.rope.scaling.factor"] == pytest.approx(4.0)
    assert fields["llama.rope.scaling.original_context_length"] == base_config["max_position_embeddings"]
    assert fields["llama.context_length"] == 4 * base_config["max_position_embeddings"]
