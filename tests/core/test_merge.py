"""Streaming LoRA merge against PEFT itself: logits, vocabularies, scaling variants, Meta layout, bad input."""

from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import pytest
import torch

from cnllm.core import merge
from cnllm.core.errors import CnllmError, OutputExistsError, UsageError
from cnllm.core.hashing import verify_manifest
from cnllm.core.merge import MergeOptions
from cnllm.core.provenance import read_record
from cnllm.core.tensors import iter_tensors
from tests.lora_fixtures import build_adapter, extend_tokenizer, load_fp32, model_logits, peft_logits

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama_dir, spm_tokenizer_dir):
    """A plain adapter, an extended-vocabulary one (LLaMA-Plus style) and a second-stage one on top of it."""
    root = tmp_path_factory.mktemp("adapters")
    extended_tokenizer = extend_tokenizer(spm_tokenizer_dir, root / "tokenizer-1100", 100)
    return {
        "plain": build_adapter(tiny_llama_dir, root / "plain"),
        "extended": build_adapter(
            tiny_llama_dir, root / "extended", vocab=1100, targets=("q_proj", "v_proj"),
            modules_to_save=("embed_tokens", "lm_head"), tokenizer_dir=extended_tokenizer, seed=2,
        ),
        "second": build_adapter(
            _resized(tiny_llama_dir, root / "resized", 1100), root / "second", targets=("k_proj", "o_proj", "down_proj"), seed=3,
        ),
        "tokenizer_1100": extended_tokenizer,
    }


def _resized(model_dir: Path, out: Path, rows: int) -> Path:
    model = load_fp32(model_dir)
    model.resize_token_embeddings(rows, mean_resizing=False)
    model.save_pretrained(str(out))
    return out


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


def test_merge_matches_peft_logits_and_proves_itself(tmp_path, tiny_llama_dir, adapters):
    out = tmp_path / "merged"
    result = merge.merge_lora(tiny_llama_dir, [adapters["plain"]], out, MergeOptions(max_shard_size="150KB"))
    assert result.updated == 14 and result.replaced == 0
    assert _max_diff(model_logits(out), peft_logits(tiny_llama_dir, [adapters["plain"]])) < 1e-3
    assert _max_diff(model_logits(out), model_logits(tiny_llama_dir)) > 1e-2, "the adapter must change the model"
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    assert verify_manifest(out / "SHA256SUMS").passed
    record = read_record(out, "merge")
    assert record["options"]["adapter_order"] == [str(adapters["plain"])]
    assert record["options"]["dtype"] is None and record["results"]["dtype"] == "float32"  # the base's, none asked for
    assert all(f["sha256"] for item in record["inputs"] for f in item["files"])


def test_extended_vocabulary_replaces_embeddings_and_takes_the_adapter_tokenizer(tmp_path, tiny_llama_dir, adapters):
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    result = merge.merge_lora(tiny_llama_dir, [adapters["extended"]], out)
    assert result.replaced == 2 and result.tokenizer_from == adapters["extended"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 1100
    assert len(AutoTokenizer.from_pretrained(str(out))) == 1100
    merged = load_fp32(out)
    assert merged.get_input_embeddings().weight.shape[0] == 1100 == merged.get_output_embeddings().weight.shape[0]
    ids = [1, 5, 1050, 1099, 40, 1001]
    assert _max_diff(model_logits(out, ids), peft_logits(tiny_llama_dir, [adapters["extended"]], ids)) < 1e-3


def test_two_adapters_apply_in_order_like_peft(tmp_path, tiny_llama_dir, adapters):
    out = tmp_path / "merged"
    order = [adapters["extended"], adapters["second"]]
    result = merge.merge_lora(tiny_llama_dir, order, out, MergeOptions(verify=True))
    ids = [1, 1099, 17, 1042, 300]
    assert _max_diff(model_logits(out, ids), peft_logits(tiny_llama_dir, order, ids)) < 1e-3
    assert result.verify is not None and result.verify.passed and result.verify.max_abs_diff < 1e-3
    assert result.tokenizer_from == adapters["extended"], "the last adapter has no tokenizer: the one before provides it"
    assert read_record(out, "merge")["options"]["adapter_order"] == [str(a) for a in order]


@pytest.mark.parametrize(
    "options",
    [
        {"use_rslora": True, "r": 8, "alpha": 16},
        {"rank_pattern": {"q_proj": 8}, "alpha_pattern": {"v_proj": 32}},
        {"safe": False},
    ],
    ids=["rslora", "rank-alpha-patterns", "bin-adapter"],
)
def test_lora_variants_match_peft(tmp_path, tiny_llama_dir, options):
    adapter = build_adapter(tiny_llama_dir, tmp_path / "adapter", seed=4, **options)
    out = tmp_path / "merged"
    merge.merge_lora(tiny_llama_dir, [adapter], out)
    assert _max_diff(model_logits(out), peft_logits(tiny_llama_dir, [adapter])) < 1e-3


def test_fan_in_fan_out_is_ignored_for_linear_layers_as_peft_does(tmp_path, tiny_llama_dir):
    adapter = build_adapter(tiny_llama_dir, tmp_path / "adapter", targets=("q_proj", "down_proj"))
    config_path = adapter / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "fan_in_fan_out": True}))
    result = merge.merge_lora(tiny_llama_dir, [adapter], tmp_path / "merged")
    assert any("fan_in_fan_out ignored" in note for note in result.notes)
    assert _max_diff(model_logits(tmp_path / "merged"), peft_logits(tiny_llama_dir, [adapter])) < 1e-3


def test_fan_in_fan_out_conv1d_layers(tmp_path):
    """GPT-2 stores attention/MLP weights as Conv1D (in×out); PEFT's fan_in_fan_out transposes B·A for them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=64)).save_pretrained(str(base))
    adapter = build_adapter(base, tmp_path / "adapter", targets=("c_attn", "c_proj"), fan_in_fan_out=True)
    out = tmp_path / "merged"
    merge.merge_lora(base, [adapter], out)
    ids = [1, 2, 3, 200, 17]
    assert _max_diff(model_logits(out, ids), peft_logits(base, [adapter], ids)) < 1e-3


def test_two_adapters_in_small_row_blocks(tmp_path, tiny_llama_dir, adapters, monkeypatch):
    """Merged tensors are produced a block of rows at a time: the result does not depend on the block size."""
    order = [adapters["extended"], adapters["second"]]
    merge.merge_lora(tiny_llama_dir, order, tmp_path / "whole")
    monkeypatch.setattr(merge, "BLOCK_BYTES", 5 * 64 * 4)
    merge.merge_lora(tiny_llama_dir, order, tmp_path / "blocks")
    whole, blocks = dict(iter_tensors(tmp_path / "whole")), dict(iter_tensors(tmp_path / "blocks"))
    assert whole.keys() == blocks.keys()
    # the BLAS kernel may round a row block's B·A differently in the last bit
    assert all(torch.allclose(whole[n], blocks[n], rtol=0, atol=1e-7) for n in whole)
    assert torch.equal(whole["model.embed_tokens.weight"], blocks["model.embed_tokens.weight"])


def test_fp16_output(tmp_path, tiny_llama_dir, adapters):
    out = tmp_path / "merged"
    result = merge.merge_lora(tiny_llama_dir, [adapters["plain"]], out, MergeOptions(dtype="float16", verify=True))
    assert {t.dtype for _, t in iter_tensors(out)} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert result.verify.passed and result.verify.tolerance == merge.VERIFY_TOLERANCE["float16"]


def _meta_rope(x, positions, theta):
    """Meta's reference rotary embedding (llama/model.py): consecutive pairs rotated as complex numbers."""
    dim = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
    cis = torch.polar(torch.ones(len(positions), dim // 2), torch.outer(positions.float(), freqs))
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * cis[:, None, :]).flatten(-2)


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_pth_layout_attends_like_hf(tmp_path, tiny_llama_dir, adapters, shards):
    """Un-permuted q/k (4 heads, 2 KV heads) under Meta's rotary give the same attention scores as HF's under its own."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf_out, pth_out = tmp_path / "hf", tmp_path / "pth"
    merge.merge_lora(tiny_llama_dir, [adapters["plain"]], hf_out)
    merge.merge_lora(tiny_llama_dir, [adapters["plain"]], pth_out, MergeOptions(format="pth", shards=shards))
    params = json.loads((pth_out / "params.json").read_text())
    config = json.loads((hf_out / "config.json").read_text())
    assert (params["n_heads"], params["n_kv_heads"], params["dim"]) == (4, 2, 64)
    hidden = int(params.get("ffn_dim_multiplier", 1) * int(2 * 4 * params["dim"] / 3))
    hidden = params["multiple_of"] * ((hidden + params["multiple_of"] - 1) // params["multiple_of"])
    assert hidden == config["intermediate_size"]
    parts = [torch.load(pth_out / f"consolidated.{i:02d}.pth", weights_only=True) for i in range(shards)]
    assert sorted(p.name for p in pth_out.glob("consolidated.*.pth")) == [f"consolidated.{i:02d}.pth" for i in range(shards)]
    meta = {}
    for name in parts[0]:
        dim = merge.META_SPLIT_DIM.get(name.split(".")[-2])
        meta[name] = parts[0][name] if dim is None else torch.cat([p[name] for p in parts], dim=dim)
        assert all(torch.equal(p[name], parts[0][name]) for p in parts) or dim is not None, "norms are replicated"
    hf = dict(iter_tensors(hf_out))
    assert torch.equal(meta["tok_embeddings.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(meta["layers.1.feed_forward.w2.weight"], hf["model.layers.1.mlp.down_proj.weight"])

    from transformers import LlamaConfig

    llama_config = LlamaConfig.from_pretrained(str(hf_out))
    head_dim, positions = 16, torch.arange(6)
    x = torch.randn(6, 64)
    cos, sin = LlamaRotaryEmbedding(llama_config)(x, positions[None])
    for layer in range(2):
        q_hf = (x @ hf[f"model.layers.{layer}.self_attn.q_proj.weight"].T).view(6, 4, head_dim).transpose(0, 1)[None]
        k_hf = (x @ hf[f"model.layers.{layer}.self_attn.k_proj.weight"].T).view(6, 2, head_dim).transpose(0, 1)[None]
        q_hf, k_hf = apply_rotary_pos_emb(q_hf, k_hf, cos, sin)
        q_meta = _meta_rope((x @ meta[f"layers.{layer}.attention.wq.weight"].T).view(6, 4, head_dim), positions, params["rope_theta"])
        k_meta = _meta_rope((x @ meta[f"layers.{layer}.attention.wk.weight"].T).view(6, 2, head_dim), positions, params["rope_theta"])
        for head in range(4):
            scores_hf = q_hf[0, head] @ k_hf[0, head // 2].T
            scores_meta = q_meta[:, head] @ k_meta[:, head // 2].T
            assert torch.allclose(scores_hf, scores_meta, atol=1e-5)
    assert verify_manifest(pth_out / "SHA256SUMS").passed
    assert not (pth_out / ".merged-hf").exists()


# --- bad input --------------------------------------------------------------------------------------


def test_adapter_for_a_different_model_size(tmp_path, spm_tokenizer_dir, tiny_llama_dir):
    from cnllm.core.tiny import build_tiny_llama

    wider = build_tiny_llama(tmp_path / "wider", spm_tokenizer_dir, hidden_size=32, heads=2, kv_heads=1)
    adapter = build_adapter(wider, tmp_path / "adapter", targets=("q_proj",))
    with pytest.raises(UsageError, match=r"q_proj.weight is 64×64 in the base, the adapter's update is 32×32"):
        merge.merge_lora(tiny_llama_dir, [adapter], tmp_path / "out")
    deeper = build_tiny_llama(tmp_path / "deeper", spm_tokenizer_dir, layers=3)
    adapter = build_adapter(deeper, tmp_path / "adapter3", targets=("q_proj",))
    with pytest.raises(UsageError, match=r"model.layers.2.self_attn.q_proj, which the base lacks \(the base has 2 layers\)"):
        merge.merge_lora(tiny_llama_dir, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_llama_tokenizer_with_extended_adapter_is_refused_with_three_sizes(tmp_path, tiny_llama_dir, adapters):
    adapter = tmp_path / "no-tokenizer"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_bytes((adapters["extended"] / name).read_bytes())
    with pytest.raises(UsageError, match=r"has 1000 tokens, config.vocab_size is 1000, the merged embedding has 1100 rows"):
        merge.merge_lora(tiny_llama_dir, [adapter], tmp_path / "out")


def test_missing_config_truncated_and_corrupt_adapters(tmp_path, tiny_llama_dir, adapters):
    def copy(name: str) -> Path:
        target = tmp_path / name
        target.mkdir()
        for item in adapters["plain"].iterdir():
            (target / item.name).write_bytes(item.read_bytes())
        return target

    missing = copy("missing")
    (missing / "adapter_config.json").unlink()
    with pytest.raises(UsageError, match="no adapter_config.json"):
        merge.merge_lora(tiny_llama_dir, [missing], tmp_path / "out")
    truncated = copy("truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="is truncated"):
        merge.merge_lora(tiny_llama_dir, [truncated], tmp_path / "out")
    corrupt = copy("corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + data[20:])
    with pytest.raises(UsageError, match="is corrupted"):
        merge.merge_lora(tiny_llama_dir, [corrupt], tmp_path / "out")
    assert not (tmp_path / "out").exists()


class NotATensor:
    """A pickled object: loading it would run code, so it must be refused."""


def test_pickle_that_is_not_plain_tensors_is_refused(tmp_path, tiny_llama_dir, adapters):
    adapter = tmp_path / "pickled"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes((adapters["plain"] / "adapter_config.json").read_bytes())
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": NotATensor()}, adapter / "adapter_model.bin")
    with pytest.raises(UsageError, match="refusing to execute its pickle"):
        merge.merge_lora(tiny_llama_dir, [adapter], tmp_path / "out")


def test_truncated_base_shard(tmp_path, tiny_llama_dir, adapters):
    base = tmp_path / "base"
    base.mkdir()
    for item in tiny_llama_dir.iterdir():
        (base / item.name).write_bytes(item.read_bytes())
    shard = sorted(base.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UsageError, match=f"{shard.name} is truncated"):
        merge.merge_lora(base, [adapters["plain"]], tmp_path / "out")


def test_output_exists_and_disk_full_leave_nothing(tmp_path, tiny_llama_dir, adapters, monkeypatch):
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(OutputExistsError):
        merge.merge_lora(tiny_llama_dir, [adapters["plain"]], existing)

    from cnllm.core import tensors

    calls = {"n": 0}
    original = tensors.StreamingShardWriter.add_rows

    def failing_write(self, name, first, block):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, name, first, block)

    monkeypatch.setattr(tensors.StreamingShardWriter, "add_rows", failing_write)
    with pytest.raises(CnllmError, match="no space left on .*needed ~") as info:
        merge.merge_lora(tiny_llama_dir, [adapters["plain"]], tmp_path / "out")
    assert info.value.__cause__.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"], "no partial or temporary output may remain"


def test_pickled_base_shards(tmp_path, tiny_llama_dir, adapters):
    """A base in sharded pytorch_model-*.bin files (loaded with weights_only) merges like the safetensors one."""
    from safetensors.torch import load_file

    base = tmp_path / "bin-base"
    base.mkdir()
    (base / "config.json").write_bytes((tiny_llama_dir / "config.json").read_bytes())
    shards = sorted(tiny_llama_dir.glob("model-*.safetensors"))
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = f"pytorch_model-{number:05d}-of-{len(shards):05d}.bin"
        state = load_file(str(shard))
        torch.save(state, base / name)
        weight_map.update({tensor: name for tensor in state})
    (base / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    merge.merge_lora(base, [adapters["plain"]], tmp_path / "merged")
    assert _max_diff(model_logits(tmp_path / "merged"), peft_logits(tiny_llama_dir, [adapters["plain"]])) < 1e-3
