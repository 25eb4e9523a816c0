"""Robustness sweep across every command (issue 9): bad inputs, existing or unwritable outputs, killed runs.

Each table row runs one command in-process on an input that is missing, of the wrong type or truncated,
or with an output that exists or cannot be written, and checks what a user (or a script) sees: the
documented exit code (2 usage error, 1 failure), exactly one ``error:`` line on stderr that names the
file or option, no traceback, nothing on stdout (or one valid JSON document with ``--json``), and
nothing under the final output name. The interruption tests SIGKILL a real ``python -m cnllm``
subprocess while it writes, check that no partial output sits under the final name, and run the
same command again.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from cnllm.core.atomic import TEMP_MARK
from cnllm.core.gguf.convert import ConvertOptions
from cnllm.core.tiny import asset
from tests.lora_fixtures import build_adapter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parent.parent


# --- inputs: good ones, and broken copies of them -----------------------------------------------------


def _random_bytes(path: Path, size: int = 4096) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(path.name).randbytes(size))
    return path


def _truncate(path: Path) -> Path:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    return path


def _largest(folder: Path, pattern: str) -> Path:
    return max(folder.glob(pattern), key=lambda p: p.stat().st_size)


def _edit_safetensors_header(path: Path, change) -> Path:
    """Rewrite the JSON header of a safetensors file through ``change(header)``; the data stays as it was."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])
    return path


def _first_tensor(header: dict) -> dict:
    return header[next(name for name in header if name != "__metadata__")]


def _busiest_shard(folder: Path) -> Path:
    """The safetensors shard of ``folder`` that holds the most tensors."""
    from cnllm.core.tensors import read_safetensors_header

    return max(sorted(folder.glob("*.safetensors")), key=lambda path: len(read_safetensors_header(path)))


def _second_tensor_over_the_first(header: dict) -> None:
    """Point the second tensor (in file order) at the first one's bytes, when they are the same size: the data
    of both then reads as the first's, and the second's own bytes lie unreferenced."""
    entries = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (start, end), _ = entries[0]
    name = next(k for (first, last), k in entries[1:] if last - first == end - start)
    header[name]["data_offsets"] = [start, end]


def _edit_adapter_config(adapter: Path, **values) -> Path:
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **values}))  # NaN is written as JSON's NaN, as Python reads it
    return adapter


DEEP_JSON = "[" * 100_000 + "]" * 100_000  # Python's parser recurses once a level, tokenizers' stops at 128


def _patch_gguf(source: Path, target: Path, key: str, value: int) -> Path:
    """A copy of a GGUF with one integer metadata value overwritten in place (the header keeps its layout)."""
    import gguf

    shutil.copy2(source, target)
    reader = gguf.GGUFReader(target, "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value
    del reader
    return target


def hostile_inputs(root: Path, model: Path, adapter: Path, gguf: Path) -> dict[str, Path]:
    """Inputs built to exhaust memory or time, or to reach an unguarded code path (issue 26)."""
    found: dict[str, Path] = {}
    for name, key, value in (
        ("gguf_many_blocks", "llama.block_count", 100_000),
        ("gguf_no_heads", "llama.attention.head_count", 0),
        ("gguf_bos_past_vocab", "tokenizer.ggml.bos_token_id", 999_999),
        ("gguf_unknown_file_type", "general.file_type", 999),
        ("gguf_huge_context", "llama.context_length", 4_000_000_000),
    ):
        found[name] = _patch_gguf(gguf, root / f"{name}.gguf", key, value)
    found["deep_header_model"] = shutil.copytree(model, root / "deep-header-model")
    shard = _largest(found["deep_header_model"], "*.safetensors")
    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = b'{"deep": ' + DEEP_JSON.encode() + b", " + data[9 : 8 + length]
    shard.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length :])
    found["deep_adapter"] = shutil.copytree(adapter, root / "deep-adapter")
    (found["deep_adapter"] / "adapter_config.json").write_text('{"r": ' + DEEP_JSON + "}")
    found["list_adapter"] = shutil.copytree(adapter, root / "list-adapter")
    (found["list_adapter"] / "adapter_config.json").write_text("[1, 2]\n")
    found["deep_tokenizer_model"] = shutil.copytree(model, root / "deep-tokenizer-model")
    (found["deep_tokenizer_model"] / "tokenizer.json").write_text('{"model": ' + DEEP_JSON + "}")
    found["deep_sft"] = root / "deep-sft.json"
    found["deep_sft"].write_text('[{"instruction": "hi", "output": ' + DEEP_JSON + "}]\n")
    found["deep_pref"] = root / "deep-pref.jsonl"
    found["deep_pref"].write_text('{"prompt": "hi", "chosen": "a", "rejected": ' + DEEP_JSON + "}\n")
    found["longbench_deep"] = root / "longbench-deep"
    found["longbench_deep"].mkdir()
    (found["longbench_deep"] / "multifieldqa_zh.jsonl").write_text('{"input": "x", "answers": ' + DEEP_JSON + "}\n")
    found["longbench_latin1"] = root / "longbench-latin1"
    found["longbench_latin1"].mkdir()
    (found["longbench_latin1"] / "multifieldqa_zh.jsonl").write_bytes('{"input": "café", "answers": ["x"]}\n'.encode("latin-1"))
    # ~400 bytes that expand to 9^9 strings: PyYAML builds them shared, but the recipe's name is str() of them.
    levels = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]', *(f"&a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9))]
    found["alias_bomb_recipe"] = root / "alias-bomb.yaml"
    found["alias_bomb_recipe"].write_text(f"name: [{', '.join(levels)}]\nbase: {{model: {model}}}\nconvert: {{outtype: f16}}\n")
    found["deep_recipe"] = root / "deep-recipe.yaml"
    found["deep_recipe"].write_text(f"name: deep\nbase: {{model: {model}}}\nconvert: {DEEP_JSON}\n")
    found["list_model_recipe"] = root / "list-model-recipe.yaml"
    found["list_model_recipe"].write_text("name: listed\nbase: {model: [1, 2]}\nconvert: {}\n")
    found["huge_vocab_recipe"] = root / "huge-vocab-recipe.yaml"
    found["huge_vocab_recipe"].write_text(f"name: huge\nbase: {{model: {model}}}\nvocab: {{corpus: [{model / 'config.json'}], vocab_size: {10**32}}}\n")
    found["huge_rank_recipe"] = root / "huge-rank-recipe.yaml"
    found["huge_rank_recipe"].write_text(f"name: huge\nbase: {{model: {model}}}\npt: {{data: [{model / 'config.json'}], lora_rank: {10**11}}}\n")
    found["huge_file"] = root / "huge.bin"  # sparse: 1 GiB to stat, nothing on disk
    with open(found["huge_file"], "wb") as handle:
        handle.truncate(1 << 30)
    return found


class PickleThatRuns:
    """An object whose unpickling would run code: what a malicious ``adapter_model.bin`` carries."""

    def __reduce__(self):
        return (print, ("the pickle ran",))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_llama_dir, spm_tokenizer_dir) -> SimpleNamespace:
    """Good inputs (the tiny model, an adapter, a GGUF, a diff, a recipe) and broken variants of each."""
    from cnllm.core.diff import make_diff
    from cnllm.core.gguf.convert import convert_to_gguf
    from cnllm.core.hashing import create_manifest
    from cnllm.core.merge import MergeOptions, merge_lora

    root = tmp_path_factory.mktemp("robustness-inputs")
    adapter = build_adapter(tiny_llama_dir, root / "adapter", r=2, alpha=4)
    gguf = convert_to_gguf(tiny_llama_dir, root / "tiny-f16.gguf", ConvertOptions(outtype="f16")).output
    tuned = merge_lora(tiny_llama_dir, [adapter], root / "tuned").output
    meta = merge_lora(tiny_llama_dir, [adapter], root / "meta", MergeOptions(format="pth")).output
    diff = make_diff(tiny_llama_dir, tuned, root / "diff").output

    truncated_model = shutil.copytree(tiny_llama_dir, root / "truncated-model")
    _truncate(_largest(truncated_model, "*.safetensors"))
    bad_config_model = shutil.copytree(tiny_llama_dir, root / "bad-config-model")
    _random_bytes(bad_config_model / "config.json")
    truncated_adapter = shutil.copytree(adapter, root / "truncated-adapter")
    _truncate(truncated_adapter / "adapter_model.safetensors")
    random_adapter = root / "random-adapter"
    _random_bytes(random_adapter / "adapter_config.json")
    _random_bytes(random_adapter / "adapter_model.safetensors")
    truncated_diff = shutil.copytree(diff, root / "truncated-diff")
    _truncate(_largest(truncated_diff, "*.safetensors"))
    truncated_gguf = _truncate(Path(shutil.copy2(gguf, root / "truncated.gguf")))
    truncated_spm = _truncate(Path(shutil.copy2(spm_tokenizer_dir / "tokenizer.model", root / "truncated-spm.model")))

    # Malformed in ways a loader must not trip over (issue 13): header entries, config types, tokenizer, pickles, names.
    no_offsets_model = shutil.copytree(tiny_llama_dir, root / "no-offsets-model")
    _edit_safetensors_header(_largest(no_offsets_model, "*.safetensors"), lambda h: _first_tensor(h).pop("data_offsets"))
    text_offsets_model = shutil.copytree(tiny_llama_dir, root / "text-offsets-model")
    _edit_safetensors_header(_largest(text_offsets_model, "*.safetensors"), lambda h: _first_tensor(h).update(data_offsets="0-64"))
    # Headers safetensors itself refuses (issue 26): two tensors on the same bytes, F32 data labelled F16.
    overlapping_model = shutil.copytree(tiny_llama_dir, root / "overlapping-model")
    _edit_safetensors_header(_busiest_shard(overlapping_model), _second_tensor_over_the_first)
    mislabelled_model = shutil.copytree(tiny_llama_dir, root / "mislabelled-model")
    _edit_safetensors_header(_largest(mislabelled_model, "*.safetensors"), lambda h: _first_tensor(h).update(dtype="F16"))
    nan_alpha_adapter = _edit_adapter_config(shutil.copytree(adapter, root / "nan-alpha-adapter"), lora_alpha=float("nan"))
    zero_rank_adapter = _edit_adapter_config(shutil.copytree(adapter, root / "zero-rank-adapter"), r=0)
    list_config_model = shutil.copytree(tiny_llama_dir, root / "list-config-model")
    (list_config_model / "config.json").write_text("[1, 2, 3]\n")
    typed_config_model = shutil.copytree(tiny_llama_dir, root / "typed-config-model")
    config = json.loads((typed_config_model / "config.json").read_text())
    (typed_config_model / "config.json").write_text(json.dumps({**config, "vocab_size": "many", "hidden_size": 64.5}))
    garbage_spm_model = shutil.copytree(tiny_llama_dir, root / "garbage-spm-model")
    _random_bytes(garbage_spm_model / "tokenizer.model")
    pickled_adapter = shutil.copytree(adapter, root / "pickled-adapter")
    (pickled_adapter / "adapter_model.safetensors").unlink()
    import torch

    torch.save({"base_model.model.lm_head.weight": PickleThatRuns()}, pickled_adapter / "adapter_model.bin")
    latin1_names = root / "latin1-names"
    latin1_names.mkdir()
    (latin1_names / os.fsdecode(b"caf\xe9.bin")).write_bytes(b"bytes\n")

    notes = root / "notes.txt"
    notes.write_text("These are a user's notes, not a model.\n", encoding="utf-8")
    text = root / "sample.txt"
    text.write_text(asset("en.txt").read_text(encoding="utf-8")[:1500], encoding="utf-8")
    release = root / "release"
    release.mkdir()
    (release / "weights.bin").write_bytes(b"\x01" * 1024)
    manifest = create_manifest([release], manifest=release / "SHA256SUMS").manifest
    truncated_release = shutil.copytree(release, root / "truncated-release")
    _truncate(truncated_release / "weights.bin")

    # Text cut in the middle of a character, JSON and CSV cut mid-record, YAML cut mid-mapping.
    truncated_zh = root / "truncated-zh.txt"
    truncated_zh.write_bytes(asset("zh.txt").read_text(encoding="utf-8")[:600].encode("utf-8") + "中".encode()[:2])
    truncated_alpaca = _truncate(Path(shutil.copy2(asset("alpaca_zh.json"), root / "truncated-alpaca.json")))
    truncated_exam = shutil.copytree(asset("ceval-mini"), root / "truncated-exam")
    _truncate(_largest(truncated_exam / "val", "*.csv"))
    truncated_yaml = root / "truncated-recipe-text.yaml"
    truncated_yaml.write_text(f"name: robust\nbase: {{model: {tiny_llama_dir}\n")

    nan_config = root / "nan-config.yaml"
    nan_config.write_text("lora-alpha: .nan\n")
    nan_recipe = root / "nan-recipe.yaml"
    nan_recipe.write_text(f"name: robust\nbase: {{model: {tiny_llama_dir}}}\nalign: {{data: [{asset('pref_zh.jsonl')}], beta: .nan}}\n")

    recipe = root / "recipe.yaml"
    recipe.write_text(f"name: robust\nbase: {{model: {tiny_llama_dir}}}\nconvert: {{outtype: f16}}\nchecksum: {{}}\n")
    truncated_recipe = root / "truncated-recipe.yaml"
    truncated_recipe.write_text(f"name: robust\nbase: {{model: {truncated_model}}}\nconvert: {{outtype: f16}}\n")
    missing_base_recipe = root / "missing-base-recipe.yaml"
    missing_base_recipe.write_text(f"name: robust\nbase: {{model: {root / 'nope-model'}}}\nconvert: {{}}\n")
    not_a_mapping = root / "list-recipe.yaml"
    not_a_mapping.write_text("- just\n- a list\n")
    return SimpleNamespace(
        model=tiny_llama_dir,
        spm=spm_tokenizer_dir / "tokenizer.model",
        adapter=adapter,
        gguf=gguf,
        meta=meta,
        release=release,
        pref=asset("pref_zh.jsonl"),
        nan_config=nan_config,
        nan_recipe=nan_recipe,
        overlapping_model=overlapping_model,
        mislabelled_model=mislabelled_model,
        nan_alpha_adapter=nan_alpha_adapter,
        zero_rank_adapter=zero_rank_adapter,
        diff=diff,
        text=text,
        alpaca=asset("alpaca_zh.json"),
        exam=asset("ceval-mini"),
        manifest=manifest,
        recipe=recipe,
        truncated_model=truncated_model,
        bad_config_model=bad_config_model,
        truncated_adapter=truncated_adapter,
        random_adapter=random_adapter,
        truncated_diff=truncated_diff,
        truncated_gguf=truncated_gguf,
        truncated_spm=truncated_spm,
        no_offsets_model=no_offsets_model,
        text_offsets_model=text_offsets_model,
        list_config_model=list_config_model,
        typed_config_model=typed_config_model,
        garbage_spm_model=garbage_spm_model,
        pickled_adapter=pickled_adapter,
        latin1_names=latin1_names,
        truncated_manifest=truncated_release / "SHA256SUMS",
        truncated_recipe=truncated_recipe,
        truncated_zh=truncated_zh,
        truncated_alpaca=truncated_alpaca,
        truncated_exam=truncated_exam,
        truncated_yaml=truncated_yaml,
        missing_base_recipe=missing_base_recipe,
        list_recipe=not_a_mapping,
        notes=notes,
        random=_random_bytes(root / "random.bin"),
        random_gguf=_random_bytes(root / "random.gguf"),
        random_model=_random_bytes(root / "random.model"),
        random_yaml=_random_bytes(root / "random.yaml"),
        random_json=_random_bytes(root / "random.json"),
        empty_dir=Path(tmp_path_factory.mktemp("empty-dir")),
        **hostile_inputs(root, tiny_llama_dir, adapter, gguf),
    )


# --- the table ---------------------------------------------------------------------------------------

# What each command needs besides the input under test; ``{x}`` names a field of ``inputs``, ``{tmp}`` the test's folder.
TRAIN_QUICK = ["--max-steps", "1", "--lora-rank", "2", "--validation-split", "0", "--no-eval-before"]
PT_QUICK = [*TRAIN_QUICK, "--block-size", "32", "--cache-dir", "{tmp}/cache"]
SFT_QUICK = [*TRAIN_QUICK, "--max-seq-length", "256"]
ALIGN_QUICK = [*TRAIN_QUICK, "--cache-dir", "{tmp}/cache"]


@dataclass(frozen=True)
class Case:
    """One bad invocation: its arguments, the exit code, the text the error line must contain, the output it must not create."""

    args: Sequence[str]
    code: int
    needle: str
    output: str | None = None  # the final output name (a template like args), absent afterwards unless ``existing``
    existing: str | None = None  # "file" or "dir": create the output first; it must be left untouched
    json: bool = False


def fill(template: str, inputs: SimpleNamespace, tmp: Path) -> str:
    return template.format(tmp=tmp, **vars(inputs))


CASES: dict[str, dict[str, Case]] = {
    "vocab-train": {
        "missing-corpus": Case(["vocab", "train", "{tmp}/nope.txt", "-o", "{tmp}/zh.model"], 2, "nope.txt", output="{tmp}/zh.model"),
        "missing-corpus-json": Case(["vocab", "train", "{tmp}/nope.txt", "-o", "{tmp}/zh.model", "--json"], 2, "nope.txt", output="{tmp}/zh.model", json=True),
        "random-bytes-corpus": Case(["vocab", "train", "{random}", "-o", "{tmp}/zh.model", "--vocab-size", "400"], 2, "random.bin", output="{tmp}/zh.model"),
        "output-exists": Case(["vocab", "train", "{text}", "-o", "{tmp}/zh.model", "--vocab-size", "400"], 2, "already exists", output="{tmp}/zh.model", existing="file"),
        "parent-is-a-file": Case(["vocab", "train", "{text}", "-o", "{tmp}/blocker/zh.model", "--vocab-size", "400"], 2, "blocker", output="{tmp}/blocker/zh.model"),
    },
    "vocab-merge": {
        "missing-base": Case(["vocab", "merge", "--base", "{tmp}/nope.model", "--add", "{spm}", "-o", "{tmp}/merged"], 2, "nope.model", output="{tmp}/merged"),
        "missing-base-json": Case(["vocab", "merge", "--base", "{tmp}/nope.model", "--add", "{spm}", "-o", "{tmp}/merged", "--json"], 2, "nope.model", output="{tmp}/merged", json=True),
        "random-bytes-base": Case(["vocab", "merge", "--base", "{random_model}", "--add", "{spm}", "-o", "{tmp}/merged"], 2, "random.model", output="{tmp}/merged"),
        "text-file-base": Case(["vocab", "merge", "--base", "{notes}", "--add", "{spm}", "-o", "{tmp}/merged"], 2, "notes.txt", output="{tmp}/merged"),
        "truncated-base": Case(["vocab", "merge", "--base", "{truncated_spm}", "--add", "{spm}", "-o", "{tmp}/merged"], 2, "truncated-spm.model", output="{tmp}/merged"),
        "missing-add": Case(["vocab", "merge", "--base", "{spm}", "--add", "{tmp}/nope.model", "-o", "{tmp}/merged"], 2, "nope.model", output="{tmp}/merged"),
        "random-bytes-add": Case(["vocab", "merge", "--base", "{spm}", "--add", "{random_model}", "-o", "{tmp}/merged"], 2, "random.model", output="{tmp}/merged"),
        "truncated-add": Case(["vocab", "merge", "--base", "{spm}", "--add", "{truncated_spm}", "-o", "{tmp}/merged"], 2, "truncated-spm.model", output="{tmp}/merged"),
        "force-with-truncated-add-keeps-existing": Case(["vocab", "merge", "--base", "{spm}", "--add", "{truncated_spm}", "-o", "{tmp}/merged", "--force"], 2, "truncated-spm.model", output="{tmp}/merged", existing="dir"),
        "output-exists": Case(["vocab", "merge", "--base", "{spm}", "--add", "{spm}", "-o", "{tmp}/merged"], 2, "already exists", output="{tmp}/merged", existing="dir"),
        "parent-is-a-file": Case(["vocab", "merge", "--base", "{spm}", "--add", "{spm}", "-o", "{tmp}/blocker/merged"], 2, "blocker", output="{tmp}/blocker/merged"),
    },
    "vocab-inspect": {
        "missing": Case(["vocab", "inspect", "{tmp}/nope.model"], 2, "nope.model"),
        "missing-json": Case(["vocab", "inspect", "{tmp}/nope.model", "--json"], 2, "nope.model", json=True),
        "random-bytes": Case(["vocab", "inspect", "{random_model}"], 2, "random.model"),
        "text-file": Case(["vocab", "inspect", "{notes}"], 2, "notes.txt"),
        "truncated": Case(["vocab", "inspect", "{truncated_spm}"], 2, "truncated-spm.model"),
        "missing-text": Case(["vocab", "inspect", "{spm}", "--text", "{tmp}/nope.txt"], 2, "nope.txt"),
    },
    "pt": {
        "missing-model": Case(["pt", "-m", "{tmp}/nope-model", "-d", "{text}", "-o", "{tmp}/out", *PT_QUICK], 2, "nope-model", output="{tmp}/out"),
        "missing-model-json": Case(["pt", "-m", "{tmp}/nope-model", "-d", "{text}", "-o", "{tmp}/out", "--json", *PT_QUICK], 2, "nope-model", output="{tmp}/out", json=True),
        "text-file-model": Case(["pt", "-m", "{notes}", "-d", "{text}", "-o", "{tmp}/out", *PT_QUICK], 2, "notes.txt", output="{tmp}/out"),
        "truncated-model": Case(["pt", "-m", "{truncated_model}", "-d", "{text}", "-o", "{tmp}/out", *PT_QUICK], 2, "truncated-model", output="{tmp}/out"),
        "random-bytes-data": Case(["pt", "-m", "{model}", "-d", "{random}", "-o", "{tmp}/out", *PT_QUICK], 2, "random.bin", output="{tmp}/out"),
        "truncated-data": Case(["pt", "-m", "{model}", "-d", "{truncated_zh}", "-o", "{tmp}/out", *PT_QUICK], 2, "truncated-zh.txt", output="{tmp}/out"),
        "output-exists": Case(["pt", "-m", "{model}", "-d", "{text}", "-o", "{tmp}/out", *PT_QUICK], 2, "already exists", output="{tmp}/out", existing="dir"),
        "parent-is-a-file": Case(["pt", "-m", "{model}", "-d", "{text}", "-o", "{tmp}/blocker/out", *PT_QUICK], 2, "blocker", output="{tmp}/blocker/out"),
        "negative-max-steps": Case(["pt", "-m", "{model}", "-d", "{text}", "-o", "{tmp}/out", *PT_QUICK, "--max-steps", "-5"], 2, "--max-steps", output="{tmp}/out"),
        "negative-epochs": Case(["pt", "-m", "{model}", "-d", "{text}", "-o", "{tmp}/out", *PT_QUICK, "--epochs", "-1"], 2, "--epochs", output="{tmp}/out"),
        "nan-learning-rate": Case(["pt", "-m", "{model}", "-d", "{text}", "-o", "{tmp}/out", *PT_QUICK, "--learning-rate", "nan"], 2, "--learning-rate", output="{tmp}/out"),
        "nan-rope-factor": Case(["pt", "-m", "{model}", "-d", "{text}", "-o", "{tmp}/out", *PT_QUICK, "--rope-scaling", "linear", "--rope-factor", "nan"], 2, "--rope-factor must be a finite number", output="{tmp}/out"),
        "nan-in-config-file": Case(["pt", "-m", "{model}", "-d", "{text}", "-o", "{tmp}/out", *PT_QUICK, "-c", "{nan_config}"], 2, "lora-alpha must be a finite number", output="{tmp}/out"),
    },
    "sft": {
        "missing-model": Case(["sft", "-m", "{tmp}/nope-model", "-d", "{alpaca}", "-o", "{tmp}/out", *SFT_QUICK], 2, "nope-model", output="{tmp}/out"),
        "missing-model-json": Case(["sft", "-m", "{tmp}/nope-model", "-d", "{alpaca}", "-o", "{tmp}/out", "--json", *SFT_QUICK], 2, "nope-model", output="{tmp}/out", json=True),
        "truncated-model": Case(["sft", "-m", "{truncated_model}", "-d", "{alpaca}", "-o", "{tmp}/out", *SFT_QUICK], 2, "truncated-model", output="{tmp}/out"),
        "missing-data": Case(["sft", "-m", "{model}", "-d", "{tmp}/nope.json", "-o", "{tmp}/out", *SFT_QUICK], 2, "nope.json", output="{tmp}/out"),
        "random-bytes-data": Case(["sft", "-m", "{model}", "-d", "{random_json}", "-o", "{tmp}/out", *SFT_QUICK], 2, "random.json", output="{tmp}/out"),
        "text-file-data": Case(["sft", "-m", "{model}", "-d", "{notes}", "-o", "{tmp}/out", *SFT_QUICK], 2, "notes.txt", output="{tmp}/out"),
        "truncated-data": Case(["sft", "-m", "{model}", "-d", "{truncated_alpaca}", "-o", "{tmp}/out", *SFT_QUICK], 2, "truncated-alpaca.json", output="{tmp}/out"),
        "output-exists": Case(["sft", "-m", "{model}", "-d", "{alpaca}", "-o", "{tmp}/out", *SFT_QUICK], 2, "already exists", output="{tmp}/out", existing="dir"),
        "parent-is-a-file": Case(["sft", "-m", "{model}", "-d", "{alpaca}", "-o", "{tmp}/blocker/out", *SFT_QUICK], 2, "blocker", output="{tmp}/blocker/out"),
        "zero-epochs": Case(["sft", "-m", "{model}", "-d", "{alpaca}", "-o", "{tmp}/out", *SFT_QUICK, "--epochs", "0"], 2, "--epochs", output="{tmp}/out"),
        "zero-max-steps": Case(["sft", "-m", "{model}", "-d", "{alpaca}", "-o", "{tmp}/out", *SFT_QUICK, "--max-steps", "0"], 2, "--max-steps", output="{tmp}/out"),
        "infinite-max-grad-norm": Case(["sft", "-m", "{model}", "-d", "{alpaca}", "-o", "{tmp}/out", *SFT_QUICK, "--max-grad-norm", "inf"], 2, "--max-grad-norm", output="{tmp}/out"),
    },
    "align": {
        "nan-beta": Case(["align", "-m", "{model}", "-d", "{pref}", "-o", "{tmp}/out", *ALIGN_QUICK, "--beta", "nan"], 2, "--beta must be a finite number", output="{tmp}/out"),
        "infinite-beta": Case(["align", "-m", "{model}", "-d", "{pref}", "-o", "{tmp}/out", *ALIGN_QUICK, "--beta", "inf"], 2, "--beta must be a finite number", output="{tmp}/out"),
    },
    "merge-lora": {
        "missing-base": Case(["merge-lora", "--base", "{tmp}/nope-model", "--lora", "{adapter}", "-o", "{tmp}/merged"], 2, "nope-model", output="{tmp}/merged"),
        "missing-base-json": Case(["merge-lora", "--base", "{tmp}/nope-model", "--lora", "{adapter}", "-o", "{tmp}/merged", "--json"], 2, "nope-model", output="{tmp}/merged", json=True),
        "text-file-base": Case(["merge-lora", "--base", "{notes}", "--lora", "{adapter}", "-o", "{tmp}/merged"], 2, "notes.txt", output="{tmp}/merged"),
        "truncated-base": Case(["merge-lora", "--base", "{truncated_model}", "--lora", "{adapter}", "-o", "{tmp}/merged"], 2, "truncated-model", output="{tmp}/merged"),
        "random-bytes-config-base": Case(["merge-lora", "--base", "{bad_config_model}", "--lora", "{adapter}", "-o", "{tmp}/merged"], 2, "config.json", output="{tmp}/merged"),
        "missing-lora": Case(["merge-lora", "--base", "{model}", "--lora", "{tmp}/nope-lora", "-o", "{tmp}/merged"], 2, "nope-lora", output="{tmp}/merged"),
        "random-bytes-lora": Case(["merge-lora", "--base", "{model}", "--lora", "{random_adapter}", "-o", "{tmp}/merged"], 2, "random-adapter", output="{tmp}/merged"),
        "truncated-lora": Case(["merge-lora", "--base", "{model}", "--lora", "{truncated_adapter}", "-o", "{tmp}/merged"], 2, "truncated-adapter", output="{tmp}/merged"),
        "force-with-truncated-lora-keeps-existing": Case(["merge-lora", "--base", "{model}", "--lora", "{truncated_adapter}", "-o", "{tmp}/merged", "--force"], 2, "truncated-adapter", output="{tmp}/merged", existing="dir"),
        "output-exists": Case(["merge-lora", "--base", "{model}", "--lora", "{adapter}", "-o", "{tmp}/merged"], 2, "already exists", output="{tmp}/merged", existing="dir"),
        "parent-is-a-file": Case(["merge-lora", "--base", "{model}", "--lora", "{adapter}", "-o", "{tmp}/blocker/merged"], 2, "blocker", output="{tmp}/blocker/merged"),
        "safetensors-entry-without-data-offsets": Case(["merge-lora", "--base", "{no_offsets_model}", "--lora", "{adapter}", "-o", "{tmp}/merged"], 2, "data_offsets", output="{tmp}/merged"),
        "safetensors-offsets-as-text": Case(["merge-lora", "--base", "{text_offsets_model}", "--lora", "{adapter}", "-o", "{tmp}/merged"], 2, "data_offsets", output="{tmp}/merged"),
        "config-is-a-list": Case(["merge-lora", "--base", "{list_config_model}", "--lora", "{adapter}", "-o", "{tmp}/merged"], 2, "config.json", output="{tmp}/merged"),
        "config-of-wrong-types": Case(["merge-lora", "--base", "{typed_config_model}", "--lora", "{adapter}", "-o", "{tmp}/merged"], 2, "vocab_size", output="{tmp}/merged"),
        "nan-lora-alpha": Case(["merge-lora", "--base", "{model}", "--lora", "{nan_alpha_adapter}", "-o", "{tmp}/merged"], 2, "lora_alpha must be a positive finite number, got nan", output="{tmp}/merged"),
        "zero-rank": Case(["merge-lora", "--base", "{model}", "--lora", "{zero_rank_adapter}", "-o", "{tmp}/merged"], 2, "r must be a positive integer, got 0", output="{tmp}/merged"),
        "safetensors-overlapping-offsets": Case(["merge-lora", "--base", "{overlapping_model}", "--lora", "{adapter}", "-o", "{tmp}/merged"], 2, "overlap", output="{tmp}/merged"),
        "safetensors-f32-data-labelled-f16": Case(["merge-lora", "--base", "{mislabelled_model}", "--lora", "{adapter}", "-o", "{tmp}/merged"], 2, "the dtype or shape is wrong", output="{tmp}/merged"),
        "infinite-tolerance": Case(["merge-lora", "--base", "{model}", "--lora", "{adapter}", "-o", "{tmp}/merged", "--verify", "--tolerance", "inf"], 2, "--tolerance must be a finite number", output="{tmp}/merged"),
    },
    "diff-recover": {
        "missing-base": Case(["diff-recover", "--base", "{tmp}/nope-model", "--diff", "{diff}", "-o", "{tmp}/recovered"], 2, "nope-model", output="{tmp}/recovered"),
        "missing-base-json": Case(["diff-recover", "--base", "{tmp}/nope-model", "--diff", "{diff}", "-o", "{tmp}/recovered", "--json"], 2, "nope-model", output="{tmp}/recovered", json=True),
        "missing-diff": Case(["diff-recover", "--base", "{model}", "--diff", "{tmp}/nope-diff", "-o", "{tmp}/recovered"], 2, "nope-diff", output="{tmp}/recovered"),
        "text-file-diff": Case(["diff-recover", "--base", "{model}", "--diff", "{notes}", "-o", "{tmp}/recovered"], 2, "notes.txt", output="{tmp}/recovered"),
        "truncated-diff": Case(["diff-recover", "--base", "{model}", "--diff", "{truncated_diff}", "-o", "{tmp}/recovered"], 2, "truncated-diff", output="{tmp}/recovered"),
        "truncated-base": Case(["diff-recover", "--base", "{truncated_model}", "--diff", "{diff}", "-o", "{tmp}/recovered"], 2, "truncated-model", output="{tmp}/recovered"),
        "truncated-tuned": Case(["diff-recover", "--make-diff", "--base", "{model}", "--tuned", "{truncated_model}", "-o", "{tmp}/recovered"], 2, "truncated-model", output="{tmp}/recovered"),
        "force-with-truncated-diff-keeps-existing": Case(["diff-recover", "--base", "{model}", "--diff", "{truncated_diff}", "-o", "{tmp}/recovered", "--force"], 2, "truncated-diff", output="{tmp}/recovered", existing="dir"),
        "output-exists": Case(["diff-recover", "--base", "{model}", "--diff", "{diff}", "-o", "{tmp}/recovered"], 2, "already exists", output="{tmp}/recovered", existing="dir"),
        "parent-is-a-file": Case(["diff-recover", "--base", "{model}", "--diff", "{diff}", "-o", "{tmp}/blocker/recovered"], 2, "blocker", output="{tmp}/blocker/recovered"),
    },
    "convert-meta": {
        "missing": Case(["convert-meta", "{tmp}/nope-model", "-o", "{tmp}/out"], 2, "nope-model does not exist", output="{tmp}/out"),
        "missing-json": Case(["convert-meta", "{tmp}/nope-model", "-o", "{tmp}/out", "--json"], 2, "nope-model", output="{tmp}/out", json=True),
        "text-file": Case(["convert-meta", "{notes}", "-o", "{tmp}/out"], 2, "notes.txt", output="{tmp}/out"),
        "empty-dir": Case(["convert-meta", "{empty_dir}", "-o", "{tmp}/out"], 2, "is empty", output="{tmp}/out"),
        "parent-is-a-file": Case(["convert-meta", "{empty_dir}", "-o", "{tmp}/blocker/out"], 2, "blocker", output="{tmp}/blocker/out"),
    },
    "convert-gguf": {
        "missing": Case(["convert-gguf", "{tmp}/nope-model", "-o", "{tmp}/out.gguf"], 2, "nope-model", output="{tmp}/out.gguf"),
        "missing-json": Case(["convert-gguf", "{tmp}/nope-model", "-o", "{tmp}/out.gguf", "--json"], 2, "nope-model", output="{tmp}/out.gguf", json=True),
        "text-file": Case(["convert-gguf", "{notes}", "-o", "{tmp}/out.gguf"], 2, "notes.txt", output="{tmp}/out.gguf"),
        "empty-dir": Case(["convert-gguf", "{empty_dir}", "-o", "{tmp}/out.gguf"], 2, "config.json", output="{tmp}/out.gguf"),
        "random-bytes-config": Case(["convert-gguf", "{bad_config_model}", "-o", "{tmp}/out.gguf"], 2, "config.json", output="{tmp}/out.gguf"),
        "truncated-weights": Case(["convert-gguf", "{truncated_model}", "-o", "{tmp}/out.gguf"], 2, "truncated-model", output="{tmp}/out.gguf"),
        "force-with-truncated-weights-keeps-existing": Case(["convert-gguf", "{truncated_model}", "-o", "{tmp}/out.gguf", "--force"], 2, "truncated-model", output="{tmp}/out.gguf", existing="file"),
        "output-exists": Case(["convert-gguf", "{model}", "-o", "{tmp}/out.gguf"], 2, "already exists", output="{tmp}/out.gguf", existing="file"),
        "parent-is-a-file": Case(["convert-gguf", "{model}", "-o", "{tmp}/blocker/out.gguf"], 2, "blocker", output="{tmp}/blocker/out.gguf"),
        "safetensors-entry-without-data-offsets": Case(["convert-gguf", "{no_offsets_model}", "-o", "{tmp}/out.gguf"], 2, "data_offsets", output="{tmp}/out.gguf"),
        "config-is-a-list": Case(["convert-gguf", "{list_config_model}", "-o", "{tmp}/out.gguf"], 2, "config.json", output="{tmp}/out.gguf"),
        "config-of-wrong-types": Case(["convert-gguf", "{typed_config_model}", "-o", "{tmp}/out.gguf"], 2, "vocab_size", output="{tmp}/out.gguf"),
        "garbage-tokenizer-model": Case(["convert-gguf", "{garbage_spm_model}", "-o", "{tmp}/out.gguf"], 2, "tokenizer.model", output="{tmp}/out.gguf"),
        "safetensors-overlapping-offsets": Case(["convert-gguf", "{overlapping_model}", "-o", "{tmp}/out.gguf"], 2, "overlap", output="{tmp}/out.gguf"),
        "safetensors-f32-data-labelled-f16": Case(["convert-gguf", "{mislabelled_model}", "-o", "{tmp}/out.gguf"], 2, "the dtype or shape is wrong", output="{tmp}/out.gguf"),
    },
    "quantize": {
        "missing": Case(["quantize", "{tmp}/nope.gguf", "-o", "{tmp}/q8.gguf", "--type", "Q8_0"], 2, "nope.gguf", output="{tmp}/q8.gguf"),
        "missing-json": Case(["quantize", "{tmp}/nope.gguf", "-o", "{tmp}/q8.gguf", "--type", "Q8_0", "--json"], 2, "nope.gguf", output="{tmp}/q8.gguf", json=True),
        "random-bytes": Case(["quantize", "{random_gguf}", "-o", "{tmp}/q8.gguf", "--type", "Q8_0"], 2, "random.gguf", output="{tmp}/q8.gguf"),
        "text-file": Case(["quantize", "{notes}", "-o", "{tmp}/q8.gguf", "--type", "Q8_0"], 2, "notes.txt", output="{tmp}/q8.gguf"),
        "model-dir-not-gguf": Case(["quantize", "{model}", "-o", "{tmp}/q8.gguf", "--type", "Q8_0"], 2, "tiny-llama", output="{tmp}/q8.gguf"),
        "truncated": Case(["quantize", "{truncated_gguf}", "-o", "{tmp}/q8.gguf", "--type", "Q8_0"], 2, "truncated.gguf", output="{tmp}/q8.gguf"),
        "force-with-truncated-input-keeps-existing": Case(["quantize", "{truncated_gguf}", "-o", "{tmp}/q8.gguf", "--type", "Q8_0", "--force"], 2, "truncated.gguf", output="{tmp}/q8.gguf", existing="file"),
        "output-exists": Case(["quantize", "{gguf}", "-o", "{tmp}/q8.gguf", "--type", "Q8_0"], 2, "already exists", output="{tmp}/q8.gguf", existing="file"),
        "parent-is-a-file": Case(["quantize", "{gguf}", "-o", "{tmp}/blocker/q8.gguf", "--type", "Q8_0"], 2, "blocker", output="{tmp}/blocker/q8.gguf"),
    },
    "chat": {
        "missing": Case(["chat", "{tmp}/nope.gguf", "-p", "hi", "-n", "2"], 2, "nope.gguf"),
        "missing-json": Case(["chat", "{tmp}/nope.gguf", "-p", "hi", "-n", "2", "--json"], 2, "nope.gguf", json=True),
        "random-bytes-gguf": Case(["chat", "{random_gguf}", "-p", "hi", "-n", "2"], 2, "random.gguf"),
        "text-file": Case(["chat", "{notes}", "-p", "hi", "-n", "2"], 2, "notes.txt"),
        "truncated-gguf": Case(["chat", "{truncated_gguf}", "-p", "hi", "-n", "2"], 2, "truncated.gguf"),
        "truncated-model-dir": Case(["chat", "{truncated_model}", "-p", "hi", "-n", "2"], 2, "truncated-model"),
        "random-bytes-config": Case(["chat", "{bad_config_model}", "-p", "hi", "-n", "2"], 2, "config.json"),
        "missing-lora": Case(["chat", "{model}", "--lora", "{tmp}/nope-lora", "-p", "hi", "-n", "2"], 2, "nope-lora"),
        "pickled-lora": Case(["chat", "{model}", "--lora", "{pickled_adapter}", "-p", "hi", "-n", "2"], 2, "refusing to execute its pickle"),
        "garbage-tokenizer-model": Case(["chat", "{garbage_spm_model}", "-p", "hi", "-n", "2"], 2, "tokenizer.model"),
        "config-is-a-list": Case(["chat", "{list_config_model}", "-p", "hi", "-n", "2"], 2, "config.json"),
        "safetensors-offsets-as-text": Case(["chat", "{text_offsets_model}", "-p", "hi", "-n", "2"], 2, "data_offsets"),
        "nan-temperature": Case(["chat", "{model}", "-p", "hi", "-n", "2", "--temperature", "nan"], 2, "temperature must be a finite number"),
        "infinite-repetition-penalty": Case(["chat", "{model}", "-p", "hi", "-n", "2", "--repetition-penalty", "inf"], 2, "--repetition-penalty must be a finite number"),
        "nan-rope-factor": Case(["chat", "{model}", "-p", "hi", "-n", "2", "--rope-scaling", "linear", "--rope-factor", "nan"], 2, "--rope-factor must be a finite number"),
    },
    "eval-ppl": {
        "missing-model": Case(["eval", "ppl", "{tmp}/nope-model", "-d", "{text}", "-o", "{tmp}/ppl.json"], 2, "nope-model", output="{tmp}/ppl.json"),
        "missing-model-json": Case(["eval", "ppl", "{tmp}/nope-model", "-d", "{text}", "--json"], 2, "nope-model", json=True),
        "random-bytes-gguf": Case(["eval", "ppl", "{random_gguf}", "-d", "{text}", "-o", "{tmp}/ppl.json"], 2, "random.gguf", output="{tmp}/ppl.json"),
        "truncated-gguf": Case(["eval", "ppl", "{truncated_gguf}", "-d", "{text}", "-o", "{tmp}/ppl.json"], 2, "truncated.gguf", output="{tmp}/ppl.json"),
        "truncated-model-dir": Case(["eval", "ppl", "{truncated_model}", "-d", "{text}", "-o", "{tmp}/ppl.json"], 2, "truncated-model", output="{tmp}/ppl.json"),
        "missing-data": Case(["eval", "ppl", "{model}", "-d", "{tmp}/nope.txt", "-o", "{tmp}/ppl.json"], 2, "nope.txt", output="{tmp}/ppl.json"),
        "random-bytes-data": Case(["eval", "ppl", "{model}", "-d", "{random}", "-o", "{tmp}/ppl.json"], 2, "random.bin", output="{tmp}/ppl.json"),
        "truncated-data": Case(["eval", "ppl", "{model}", "-d", "{truncated_zh}", "-o", "{tmp}/ppl.json"], 2, "truncated-zh.txt", output="{tmp}/ppl.json"),
        "output-exists": Case(["eval", "ppl", "{model}", "-d", "{text}", "--ctx", "32", "-o", "{tmp}/ppl.json"], 2, "already exists", output="{tmp}/ppl.json", existing="file"),
        "parent-is-a-file": Case(["eval", "ppl", "{model}", "-d", "{text}", "--ctx", "32", "-o", "{tmp}/blocker/ppl.json"], 2, "blocker", output="{tmp}/blocker/ppl.json"),
    },
    "eval-mc": {
        "missing-model": Case(["eval", "mc", "{tmp}/nope-model", "-d", "{exam}", "-o", "{tmp}/mc"], 2, "nope-model", output="{tmp}/mc"),
        "missing-model-json": Case(["eval", "mc", "{tmp}/nope-model", "-d", "{exam}", "--json"], 2, "nope-model", json=True),
        "random-bytes-gguf": Case(["eval", "mc", "{random_gguf}", "-d", "{exam}", "-o", "{tmp}/mc"], 2, "random.gguf", output="{tmp}/mc"),
        "missing-data": Case(["eval", "mc", "{model}", "-d", "{tmp}/nope-exam", "-o", "{tmp}/mc"], 2, "nope-exam", output="{tmp}/mc"),
        "file-as-data": Case(["eval", "mc", "{model}", "-d", "{random}", "-o", "{tmp}/mc"], 2, "random.bin", output="{tmp}/mc"),
        "truncated-data": Case(["eval", "mc", "{model}", "-d", "{truncated_exam}", "--shots", "0", "-o", "{tmp}/mc"], 2, "truncated-exam", output="{tmp}/mc"),
        "output-exists": Case(["eval", "mc", "{model}", "-d", "{exam}", "--shots", "0", "-o", "{tmp}/mc"], 2, "already exists", output="{tmp}/mc", existing="dir"),
        "parent-is-a-file": Case(["eval", "mc", "{model}", "-d", "{exam}", "--shots", "0", "-o", "{tmp}/blocker/mc"], 2, "blocker", output="{tmp}/blocker/mc"),
    },
    "checksum-create": {
        "missing": Case(["checksum", "create", "{tmp}/nope-dir", "-o", "{tmp}/SUMS"], 2, "nope-dir", output="{tmp}/SUMS"),
        "missing-json": Case(["checksum", "create", "{tmp}/nope-dir", "-o", "{tmp}/SUMS", "--json"], 2, "nope-dir", output="{tmp}/SUMS", json=True),
        "output-exists": Case(["checksum", "create", "{notes}", "-o", "{tmp}/SUMS"], 2, "already exists", output="{tmp}/SUMS", existing="file"),
        "parent-is-a-file": Case(["checksum", "create", "{notes}", "-o", "{tmp}/blocker/SUMS"], 2, "blocker", output="{tmp}/blocker/SUMS"),
        "non-utf8-file-name": Case(["checksum", "create", "{latin1_names}", "-o", "{tmp}/SUMS"], 2, "not valid UTF-8", output="{tmp}/SUMS"),
        "non-utf8-file-name-to-stdout": Case(["checksum", "create", "{latin1_names}"], 2, "not valid UTF-8"),
    },
    "checksum-verify": {
        "missing": Case(["checksum", "verify", "{tmp}/nope.sha256"], 2, "nope.sha256"),
        "missing-json": Case(["checksum", "verify", "{tmp}/nope.sha256", "--json"], 2, "nope.sha256", json=True),
        "random-bytes": Case(["checksum", "verify", "{random}"], 2, "random.bin"),
        "text-file": Case(["checksum", "verify", "{notes}"], 2, "notes.txt"),
        "root-is-a-file": Case(["checksum", "verify", "{manifest}", "--root", "{notes}"], 2, "notes.txt"),
    },
    "pipeline": {
        "missing-recipe": Case(["pipeline", "{tmp}/nope.yaml", "-o", "{tmp}/work"], 2, "nope.yaml", output="{tmp}/work"),
        "missing-recipe-json": Case(["pipeline", "{tmp}/nope.yaml", "-o", "{tmp}/work", "--json"], 2, "nope.yaml", output="{tmp}/work", json=True),
        "random-bytes-recipe": Case(["pipeline", "{random_yaml}", "-o", "{tmp}/work"], 2, "random.yaml", output="{tmp}/work"),
        "list-recipe": Case(["pipeline", "{list_recipe}", "-o", "{tmp}/work"], 2, "mapping", output="{tmp}/work"),
        "truncated-recipe": Case(["pipeline", "{truncated_yaml}", "-o", "{tmp}/work"], 2, "truncated-recipe-text.yaml", output="{tmp}/work"),
        "missing-base-model": Case(["pipeline", "{missing_base_recipe}", "-o", "{tmp}/work"], 2, "nope-model", output="{tmp}/work"),
        "workdir-parent-is-a-file": Case(["pipeline", "{recipe}", "-o", "{tmp}/blocker/work"], 2, "blocker", output="{tmp}/blocker/work"),
        "nan-in-recipe": Case(["pipeline", "{nan_recipe}", "-o", "{tmp}/work", "--dry-run"], 2, "recipe step align: beta must be a finite number, got nan", output="{tmp}/work"),
    },
    "serve": {
        "missing": Case(["serve", "{tmp}/nope.gguf", "--port", "0"], 2, "nope.gguf"),
        "random-bytes-gguf": Case(["serve", "{random_gguf}", "--port", "0"], 2, "random.gguf"),
        "text-file": Case(["serve", "{notes}", "--port", "0"], 2, "notes.txt"),
        "truncated-gguf": Case(["serve", "{truncated_gguf}", "--port", "0"], 2, "truncated.gguf"),
        "truncated-model-dir": Case(["serve", "{truncated_model}", "--port", "0"], 2, "truncated-model"),
    },
}


# Issue 26: inputs built to exhaust memory or time, or to reach a path no check guarded ("unexpected …").
# A GGUF header llama.cpp would trust (SIGABRT, a division by zero, an index past the vocabulary) is refused by
# every command that opens one, before llama.cpp or gguf-py sees it.
GGUF_HEADERS = {
    "many-blocks": ("gguf_many_blocks", "llama.block_count says 100,000 layers but the file holds tensors for 2"),
    "no-heads": ("gguf_no_heads", "llama.attention.head_count must be at least 1, not 0"),
    "bos-past-vocab": ("gguf_bos_past_vocab", "bos_token_id 999,999 is not in its vocabulary of 1,000 tokens"),
    "unknown-file-type": ("gguf_unknown_file_type", "general.file_type 999 is not a llama.cpp file type"),
    "huge-context": ("gguf_huge_context", "llama.context_length 4,000,000,000 is not a context length"),
}
GGUF_COMMANDS = {  # command → (its arguments around the GGUF, its output)
    "chat": (["chat", "{gguf}", "-p", "hi", "-n", "2"], None),
    "eval-ppl": (["eval", "ppl", "{gguf}", "-d", "{text}", "-o", "{tmp}/ppl.json"], "{tmp}/ppl.json"),
    "serve": (["serve", "{gguf}", "--port", "0"], None),
    "quantize": (["quantize", "{gguf}", "-o", "{tmp}/q8.gguf", "--type", "Q8_0"], "{tmp}/q8.gguf"),
    "gguf-to-hf": (["gguf-to-hf", "{gguf}", "-o", "{tmp}/hf"], "{tmp}/hf"),
}
for _command, (_template, _output) in GGUF_COMMANDS.items():
    for _name, (_field, _needle) in GGUF_HEADERS.items():
        _args = [a.replace("{gguf}", "{%s}" % _field) for a in _template]
        CASES.setdefault(_command, {})[f"gguf-{_name}"] = Case(_args, 2, _needle, output=_output)
CASES["merge-lora"].update({
    "deeply-nested-safetensors-header": Case(["merge-lora", "--base", "{deep_header_model}", "--lora", "{adapter}", "-o", "{tmp}/merged"], 2, "header is nested too deeply", output="{tmp}/merged"),
    "deeply-nested-adapter-config": Case(["merge-lora", "--base", "{model}", "--lora", "{deep_adapter}", "-o", "{tmp}/merged"], 2, "adapter_config.json is nested too deeply", output="{tmp}/merged"),
    "adapter-config-is-a-list": Case(["merge-lora", "--base", "{model}", "--lora", "{list_adapter}", "-o", "{tmp}/merged"], 2, "adapter_config.json is not a JSON object", output="{tmp}/merged"),
})
CASES["pt"].update({
    "peft-path-config-is-a-list": Case(["pt", "-m", "{model}", "-d", "{text}", "--peft-path", "{list_adapter}", "-o", "{tmp}/out", *PT_QUICK], 2,
                                       "adapter_config.json is not a JSON object", output="{tmp}/out"),
})
CASES["chat"].update({
    "adapter-config-is-a-list": Case(["chat", "{model}", "--lora", "{list_adapter}", "-p", "hi", "-n", "2"], 2, "adapter_config.json is not a JSON object"),
    "deeply-nested-tokenizer-json": Case(["chat", "{deep_tokenizer_model}", "-p", "hi", "-n", "2"], 2, "tokenizer.json is not a valid tokenizer file"),
    "rope-factor-beyond-any-context": Case(["chat", "{gguf}", "--rope-scaling", "linear", "--rope-factor", "100000", "-p", "hi", "-n", "2"], 2,
                                           "--rope-factor (51200000) is beyond the largest context window"),
    "n-ctx-beyond-any-context": Case(["chat", "{gguf}", "--n-ctx", "100000000", "-p", "hi", "-n", "2"], 2, "--n-ctx"),
})
CASES["convert-gguf"]["deeply-nested-tokenizer-json"] = Case(["convert-gguf", "{deep_tokenizer_model}", "-o", "{tmp}/out.gguf"], 2, "tokenizer.json", output="{tmp}/out.gguf")
CASES["sft"]["deeply-nested-data"] = Case(["sft", "-m", "{model}", "-d", "{deep_sft}", "-o", "{tmp}/out", *SFT_QUICK], 2, "nested too deeply", output="{tmp}/out")
CASES["eval-pref"] = {"deeply-nested-data": Case(["eval", "pref", "{model}", "-d", "{deep_pref}"], 2, "deep-pref.jsonl:1: invalid JSON (nested too deeply)")}
CASES["eval-longbench"] = {
    "deeply-nested-record": Case(["eval", "longbench", "{gguf}", "-d", "{longbench_deep}"], 2, "multifieldqa_zh.jsonl:1: not a LongBench record (nested too deeply)"),
    "not-utf8": Case(["eval", "longbench", "{gguf}", "-d", "{longbench_latin1}"], 2, "multifieldqa_zh.jsonl:1: not UTF-8 text"),
}
CASES["eval-passkey"] = {
    "length-beyond-any-context": Case(["eval", "passkey", "{gguf}", "--length", "1000000000"], 2, "--length 1000000000 is beyond the largest context window"),
    "nan-depth": Case(["eval", "passkey", "{gguf}", "--depth", "nan"], 2, "got nan"),
}
CASES["vocab-train"]["vocab-size-beyond-any-integer"] = Case(["vocab", "train", "{text}", "-o", "{tmp}/zh.model", "--vocab-size", "99999999999999999999"], 2, "--vocab-size", output="{tmp}/zh.model")
CASES["pt"]["lora-rank-too-large"] = Case(["pt", "-m", "{model}", "-d", "{text}", "-o", "{tmp}/out", *PT_QUICK, "--lora-rank", "100000000000"], 2, "--lora-rank", output="{tmp}/out")
CASES["pipeline"].update({
    "alias-bomb": Case(["pipeline", "{alias_bomb_recipe}", "-o", "{tmp}/work", "--dry-run"], 2, "aliases expand to more than 100,000 values", output="{tmp}/work"),
    "deeply-nested-recipe": Case(["pipeline", "{deep_recipe}", "-o", "{tmp}/work", "--dry-run"], 2, "nested too deeply", output="{tmp}/work"),
    "base-model-is-a-list": Case(["pipeline", "{list_model_recipe}", "-o", "{tmp}/work", "--dry-run"], 2, "base.model must be a path (text), not [1, 2]", output="{tmp}/work"),
    "vocab-size-too-large-dry-run": Case(["pipeline", "{huge_vocab_recipe}", "-o", "{tmp}/work", "--dry-run"], 2, "vocab_size must be between 8 and", output="{tmp}/work"),
    "lora-rank-too-large-dry-run": Case(["pipeline", "{huge_rank_recipe}", "-o", "{tmp}/work", "--dry-run"], 2, "lora_rank must be at most 65536", output="{tmp}/work"),
})
CASES["checksum-verify"].update({
    "device-as-manifest": Case(["checksum", "verify", "/dev/zero"], 2, "/dev/zero is a character device, not a regular file"),
    "huge-file-as-manifest": Case(["checksum", "verify", "{huge_file}"], 2, "larger than 64 MiB"),
    "model-file-as-manifest": Case(["checksum", "verify", "{gguf}"], 2, "is not UTF-8 text"),
})


def _to_read_only(text: str) -> str:
    return text.replace("{tmp}/blocker/", "{tmp}/readonly/")


def _read_only_twins() -> None:
    """For every output under a file (``blocker``), the same output under a read-only folder (non-root users only)."""
    for cases in CASES.values():
        for name, case in list(cases.items()):
            if name.endswith("parent-is-a-file"):
                twin = name.replace("parent-is-a-file", "parent-is-read-only")
                cases[twin] = Case([_to_read_only(a) for a in case.args], 2, "readonly", output=_to_read_only(case.output))


_read_only_twins()

# Cases that expose a known, not yet fixed bug: case id → reason, run as strict xfails. Empty: every
# bug the sweep found (chat/serve on truncated shards, pipeline and pt/sft on unwritable outputs) is fixed.
KNOWN_BUGS: dict[str, str] = {}


def _table() -> list:
    params = []
    for command, cases in CASES.items():
        for name in cases:
            case_id = f"{command}-{name}"
            marks = [pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[case_id])] if case_id in KNOWN_BUGS else []
            params.append(pytest.param(command, name, id=case_id, marks=marks))
    return params


def _leftovers(output: Path) -> list[Path]:
    parent = output.parent
    if not parent.is_dir():
        return []
    return sorted(parent.glob(f".{output.name}{TEMP_MARK}*"))


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_clean_failure(result, case: Case, *, needle: str, output: Path | None, before: dict | None) -> None:
    """The exit code, one ``error:`` line naming the culprit, no traceback, clean stdout, no output under the final name."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exit_code == case.code, f"exit {result.exit_code}, expected {case.code}; stderr: {result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, f"expected exactly one error line on stderr, got: {result.stderr!r}"
    assert needle in errors[0], f"the error line does not name {needle!r}: {errors[0]!r}"
    if case.json and result.stdout.strip():
        json.loads(result.stdout)
    else:
        assert result.stdout == "", result.stdout
    if output is not None:
        if before is None:
            assert not output.exists(), f"{output} was created"
        else:
            assert _snapshot(output) == before, f"the existing {output} was changed"
        assert _leftovers(output) == [], f"temporary files left beside {output}"


def _read_only_folder_or_skip(folder: Path) -> None:
    """A folder with mode 0555; skips when this process writes into it anyway (root with CAP_DAC_OVERRIDE).

    Root can still run these cases without that capability:
    ``setpriv --bounding-set=-dac_override,-dac_read_search .venv/bin/pytest tests/test_robustness.py``.
    """
    folder.mkdir(mode=0o555)
    probe = folder / "probe"
    try:
        probe.write_text("")
    except PermissionError:
        return
    probe.unlink()
    pytest.skip("this process writes into read-only folders (root); the parent-is-a-file twin covers unwritable outputs")


@pytest.mark.parametrize(("command", "name"), _table())
def test_bad_invocation_fails_cleanly(cli, inputs, tmp_path, command, name):
    case = CASES[command][name]
    args = [fill(a, inputs, tmp_path) for a in case.args]
    if name.endswith("parent-is-read-only"):
        _read_only_folder_or_skip(tmp_path / "readonly")
    (tmp_path / "blocker").write_text("a file where the output's parent folder should be\n")
    output = Path(fill(case.output, inputs, tmp_path)) if case.output else None
    before = None
    if case.existing == "file":
        output.write_text("the user's earlier output\n")
        before = _snapshot(output)
    elif case.existing == "dir":
        output.mkdir()
        (output / "keep.txt").write_text("the user's earlier output\n")
        before = _snapshot(output)
    entries = sorted(tmp_path.rglob("*"))
    sources = {arg: _snapshot(Path(arg)) for arg in args if not arg.startswith(str(tmp_path)) and os.path.isabs(arg) and os.path.exists(arg)}
    result = cli(*args)
    assert_clean_failure(result, case, needle=fill(case.needle, inputs, tmp_path), output=output, before=before)
    assert sorted(tmp_path.rglob("*")) == entries, "the failed command left files behind"
    assert {arg: _snapshot(Path(arg)) for arg in sources} == sources, "an input was changed"


def test_vocab_train_skips_a_line_cut_mid_character_and_says_so(cli, inputs, tmp_path):
    """A corpus file cut mid-character (an interrupted download) loses its last line, with a warning, not the run."""
    out = tmp_path / "zh.model"
    result = cli("vocab", "train", inputs.truncated_zh, "-o", out, "--vocab-size", "800", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["corpus"]["invalid_utf8_lines"] == 1
    assert "skipped 1 lines that are not valid UTF-8" in result.stderr and out.exists()


# --- failures found by a check, not by argument validation ----------------------------------------------


@pytest.mark.parametrize("json_", [False, True], ids=["table", "json"])
def test_checksum_verify_truncated_file_exits_1_and_names_it(cli, inputs, json_):
    result = cli("checksum", "verify", inputs.truncated_manifest, *(["--json"] if json_ else []))
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    if json_:
        document = json.loads(result.stdout)
        assert not document["passed"] and [f["status"] for f in document["files"]] == ["FAILED"]
        assert document["files"][0]["path"] == "weights.bin"
    else:
        assert "FAILED" in result.stdout and "weights.bin" in result.stdout


@pytest.mark.parametrize("json_", [False, True], ids=["table", "json"])
def test_pipeline_failed_step_exits_1_names_the_file_and_writes_no_step_folder(cli, inputs, tmp_path, json_):
    from cnllm.core.pipeline import load_recipe, step_folder

    work = tmp_path / "work"
    result = cli("pipeline", inputs.truncated_recipe, "-o", work, *(["--json"] if json_ else []))
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.stderr
    folder = step_folder(load_recipe(inputs.truncated_recipe, workdir=work), "convert")
    assert not folder.exists() and _leftovers(folder) == []
    if json_:
        steps = json.loads(result.stdout)["steps"]
        assert [s["status"] for s in steps] == ["failed"] and "truncated-model" in steps[0]["error"]
    else:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "step convert failed" in errors[0] and "truncated-model" in errors[0], result.stderr


# --- SIGKILL in the middle of a write, then the same command again ---------------------------------------

# ``python -m cnllm`` with one test-side change: renaming the temporary output into its final name (argv[1])
# waits, so the kill lands before the command can finish however fast the tiny model is. Production code has
# no hook; the kill itself comes as soon as the temporary sibling appears, usually while it is being written.
KILLABLE_CNLLM = """
import os, sys, time
final = os.path.abspath(sys.argv[1])
_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.abspath(os.fspath(dst)) == final:
        time.sleep(3600)
    return _replace(src, dst, *args, **kwargs)
os.replace = replace
from cnllm.cli.app import main
main(sys.argv[2:])
"""


def kill_while_writing(
    args: Sequence[object], final: Path, *, wait_for: str | None = None, timeout: float = 180, sig: int = signal.SIGKILL
) -> tuple[Path, int, str]:
    """Start ``cnllm ARGS`` in a subprocess; send ``sig`` once ``wait_for`` (a glob beside ``final``; default: the
    temporary sibling of ``final``) appears; return what appeared, the exit status and stderr."""
    pattern = wait_for or f".{final.name}{TEMP_MARK}*"
    process = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_CNLLM, str(final), *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + timeout
    try:
        while not (found := sorted(final.parent.glob(pattern)) if final.parent.is_dir() else []):
            if process.poll() is not None:
                _, stderr = process.communicate()
                raise AssertionError(f"cnllm exited ({process.returncode}) before writing {final}: {stderr.decode()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern} appeared beside {final} within {timeout}s")
            time.sleep(0.002)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=60)
    return found[0], process.returncode, stderr.decode()


def _gguf_tensor_count(path: Path) -> int:
    from gguf import GGUFReader

    return len(GGUFReader(path).tensors)


TINY_GGUF_TENSORS = 2 + 9 * 2 + 1  # token embeddings, output norm, 9 tensors in each of 2 layers, output


def _manifest_passes(cli, folder: Path) -> bool:
    return cli("checksum", "verify", folder / "SHA256SUMS").exit_code == 0


# Commands that write one output: args, the output's name, and a check that the re-run's output is whole.
KILLED = {
    "merge-lora": (["merge-lora", "--base", "{model}", "--lora", "{adapter}", "-o", "{tmp}/merged"], "merged", _manifest_passes),
    "diff-recover": (["diff-recover", "--base", "{model}", "--diff", "{diff}", "-o", "{tmp}/recovered"], "recovered", _manifest_passes),
    "convert-gguf": (
        ["convert-gguf", "{model}", "-o", "{tmp}/model.gguf", "--outtype", "f16"],
        "model.gguf",
        lambda cli, out: _gguf_tensor_count(out) == TINY_GGUF_TENSORS,
    ),
    "quantize": (
        ["quantize", "{gguf}", "-o", "{tmp}/q8.gguf", "--type", "Q8_0"],
        "q8.gguf",
        lambda cli, out: _gguf_tensor_count(out) == TINY_GGUF_TENSORS,
    ),
    "vocab-train": (
        ["vocab", "train", "{text}", "-o", "{tmp}/zh.model", "--vocab-size", "400"],
        "zh.model",
        lambda cli, out: cli("vocab", "inspect", out, "--json").exit_code == 0,
    ),
    "checksum-create": (
        ["checksum", "create", "{model}", "-o", "{tmp}/SHA256SUMS"],
        "SHA256SUMS",
        lambda cli, out: cli("checksum", "verify", out, "--allow-outside").exit_code == 0,
    ),
    "vocab-merge": (
        ["vocab", "merge", "--base", "{spm}", "--add", "{spm}", "-o", "{tmp}/merged-tokenizer"],
        "merged-tokenizer",
        lambda cli, out: cli("vocab", "inspect", out, "--json").exit_code == 0,
    ),
}


@pytest.mark.parametrize("command", list(KILLED))
def test_killed_mid_write_leaves_no_output_and_the_rerun_succeeds(cli, inputs, tmp_path, command):
    template, name, is_whole = KILLED[command]
    args = [fill(a, inputs, tmp_path) for a in template]
    out = tmp_path / name
    partial, code, _ = kill_while_writing(args, out)
    assert code == -signal.SIGKILL and partial.exists() and not out.exists()
    rerun = cli(*args)
    assert rerun.exit_code == 0, rerun.stderr
    assert is_whole(cli, out)


def test_pipeline_killed_mid_step_keeps_earlier_steps_and_reruns(cli, inputs, tmp_path):
    """Killed in the quantize step: convert's folder stays valid (skipped on the re-run), quantize's never appears."""
    from cnllm.core.pipeline import load_recipe, step_folder

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: robust\nbase: {{model: {inputs.model}}}\nconvert: {{outtype: f16}}\nquantize: {{types: [Q8_0]}}\nchecksum: {{}}\n")
    work = tmp_path / "work"
    loaded = load_recipe(recipe, workdir=work)
    convert, quantize = step_folder(loaded, "convert"), step_folder(loaded, "quantize")
    partial, code, _ = kill_while_writing(["pipeline", recipe, "-o", work], quantize)
    assert code == -signal.SIGKILL and partial.exists() and (convert / "cnllm-step.json").exists() and not quantize.exists()
    rerun = cli("pipeline", recipe, "-o", work, "--json")
    assert rerun.exit_code == 0, rerun.stderr
    statuses = {s["step"]: s["status"] for s in json.loads(rerun.stdout)["steps"]}
    assert statuses == {"convert": "skipped", "quantize": "ran", "checksum": "ran"}
    manifest = step_folder(loaded, "checksum") / "SHA256SUMS"  # the final model is the base, outside the working folder
    assert cli("checksum", "verify", manifest, "--root", work, "--allow-outside").exit_code == 0


@pytest.mark.slow
def test_pt_killed_after_a_checkpoint_asks_for_resume_then_resumes(cli, inputs, tmp_path):
    """Training keeps checkpoints in ``.NAME.cnllm-training``: the plain re-run refuses (exit 2) and --resume finishes."""
    out = tmp_path / "pt-out"
    args = ["pt", "-m", inputs.model, "-d", inputs.text, "-o", out, *[fill(a, inputs, tmp_path) for a in PT_QUICK]]
    args[args.index("--max-steps") + 1] = "3"
    args += ["--save-steps", "1"]
    _, code, _ = kill_while_writing(args, out, wait_for=".pt-out.cnllm-training/checkpoint-*/trainer_state.json")
    assert code == -signal.SIGKILL
    assert not out.exists()
    again = cli(*args)
    assert again.exit_code == 2 and "--resume" in again.stderr and again.stdout == ""
    assert not out.exists()
    resumed = cli(*args, "--resume", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    document = json.loads(resumed.stdout)
    assert document["steps"] == 3 and document["resumed_from"]


# --- SIGTERM (a timeout, docker stop, Slurm) cleans up like Ctrl-C -------------------------------------------

TERMINATED = {name: KILLED[name] for name in ("merge-lora", "quantize", "checksum-create")}  # atomic_dir, atomic_path, atomic_file


@pytest.mark.parametrize("command", list(TERMINATED))
def test_sigterm_mid_write_exits_143_and_removes_temporaries(inputs, tmp_path, command):
    template, name, _ = TERMINATED[command]
    out = tmp_path / name
    partial, code, stderr = kill_while_writing([fill(a, inputs, tmp_path) for a in template], out, sig=signal.SIGTERM)
    assert code == 143, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "error: terminated", stderr
    assert not partial.exists() and not out.exists() and _leftovers(out) == []


@pytest.fixture(scope="module")
def slow_to_quantize_gguf(tmp_path_factory, spm_tokenizer_dir) -> Path:
    """An f32 GGUF big enough (17M parameters) that llama.cpp's quantizer is still writing when a signal comes."""
    from cnllm.core.gguf.convert import convert_to_gguf
    from cnllm.core.tiny import build_tiny_llama

    root = tmp_path_factory.mktemp("slow-to-quantize")
    model = build_tiny_llama(root / "model", spm_tokenizer_dir, hidden_size=512, layers=4, heads=8, kv_heads=8, intermediate_size=2048, max_shard_size="1GB")
    return convert_to_gguf(model, root / "model-f32.gguf", ConvertOptions(outtype="f32")).output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_quantize_interrupted_while_llama_cpp_writes_leaves_no_temporary(slow_to_quantize_gguf, tmp_path, sig):
    """llama.cpp cannot be stopped, so it quantizes in a child process that the signal ends (issue 26): the temporary
    output goes at once, and nothing writes it again afterwards."""
    out = tmp_path / "q4.gguf"
    process = subprocess.Popen(
        [sys.executable, "-m", "cnllm", "quantize", str(slow_to_quantize_gguf), "-o", str(out), "--type", "Q4_K_M", "--threads", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal, not a background job
    )
    def written() -> int:
        return max([p.stat().st_size for p in _leftovers(out) if p.exists()], default=0)

    deadline = time.monotonic() + 120
    try:
        while not written():  # llama.cpp has begun writing
            assert process.poll() is None, process.communicate()[1].decode()
            assert time.monotonic() < deadline, "the quantizer never started writing"
            time.sleep(0.005)
        process.send_signal(sig)
        at_signal = most = written()
        while process.poll() is None and time.monotonic() < deadline:
            most = max(most, written())
            time.sleep(0.005)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], stderr.decode()
    assert "Traceback" not in stderr.decode()
    # Q4_K_M makes ~10 MiB of it; a quantizer that ran on to the end before the cleanup would have written them all.
    assert most - at_signal < 4 << 20, f"{most - at_signal} bytes were written after the signal"
    time.sleep(1.5)  # a quantizer left running would go on writing its file
    assert _leftovers(out) == [] and not out.exists()


# --- outputs never overwrite, enter or contain an input -----------------------------------------------------

# name → (the input copied to {tmp}/work/<its name>, the command with that copy as {in}, what the error says)
OVERLAPS = {
    "quantize-output-is-the-input": ("gguf", ["quantize", "{in}", "-o", "{in}", "--type", "Q8_0", "--force"], "is the input"),
    "merge-lora-output-is-the-base": ("model", ["merge-lora", "--base", "{in}", "--lora", "{adapter}", "-o", "{in}", "--force"], "is the input"),
    "merge-lora-output-is-the-adapter": ("adapter", ["merge-lora", "--base", "{model}", "--lora", "{in}", "-o", "{in}", "--force"], "is the input"),
    "merge-lora-output-contains-the-base": ("model", ["merge-lora", "--base", "{in}", "--lora", "{adapter}", "-o", "{tmp}/work", "--force"], "contains the input"),
    "convert-gguf-output-over-the-weights": ("model", ["convert-gguf", "{in}", "-o", "{in}/config.json", "--force"], "lies inside the input"),
    "convert-gguf-output-inside-the-input": ("model", ["convert-gguf", "{in}", "-o", "{in}/model.gguf"], "lies inside the input"),
    "diff-recover-output-is-the-diff": ("diff", ["diff-recover", "--base", "{model}", "--diff", "{in}", "-o", "{in}", "--force"], "is the input"),
    "vocab-merge-output-contains-the-base": ("spm", ["vocab", "merge", "--base", "{in}", "--add", "{spm}", "-o", "{tmp}/work", "--force"], "contains the input"),
    "vocab-train-output-is-the-corpus": ("text", ["vocab", "train", "{in}", "-o", "{in}", "--vocab-size", "400", "--force"], "is the input"),
    "pt-output-inside-the-model": ("model", ["pt", "-m", "{in}", "-d", "{text}", "-o", "{in}/adapter", *PT_QUICK], "lies inside the input"),
    "pipeline-workdir-inside-the-base": ("model", ["pipeline", "{tmp}/recipe.yaml", "-o", "{in}/work"], "lies inside the input"),
    "eval-ppl-output-is-the-data": ("text", ["eval", "ppl", "{model}", "-d", "{in}", "--ctx", "32", "-o", "{in}", "--force"], "is the input"),
    "gguf-to-hf-output-is-the-input-folder": ("gguf", ["gguf-to-hf", "{in}", "-o", "{tmp}/work", "--force"], "contains the input"),
    "convert-meta-output-contains-the-input": ("meta", ["convert-meta", "{in}", "-o", "{tmp}/work", "--force"], "contains the input"),
    "convert-meta-output-is-the-input": ("meta", ["convert-meta", "{in}", "-o", "{in}", "--force"], "is the input"),
    "convert-meta-output-inside-the-input": ("meta", ["convert-meta", "{in}", "-o", "{in}/hf"], "lies inside the input"),
    "checksum-create-output-over-a-listed-file": ("release", ["checksum", "create", "{in}", "-o", "{in}/weights.bin", "--force"], "is one of the files to hash"),
    "checksum-create-output-is-a-named-input": ("text", ["checksum", "create", "{in}", "-o", "{in}", "--force"], "is the input"),
}


@pytest.mark.parametrize("name", list(OVERLAPS))
def test_output_that_overlaps_an_input_is_refused_before_any_work(cli, inputs, tmp_path, name):
    source_field, template, needle = OVERLAPS[name]
    source = Path(getattr(inputs, source_field))
    work = tmp_path / "work"
    work.mkdir()
    copy = work / source.name
    (shutil.copytree if source.is_dir() else shutil.copy2)(source, copy)
    (tmp_path / "recipe.yaml").write_text(f"name: overlap\nbase: {{model: {copy}}}\nconvert: {{outtype: f16}}\n")
    before = {str(p.relative_to(tmp_path)): p.read_bytes() if p.is_file() else None for p in sorted(tmp_path.rglob("*"))}
    result = cli(*[a.replace("{in}", str(copy)).format(tmp=tmp_path, **vars(inputs)) for a in template])
    case = Case(template, 2, needle)
    assert_clean_failure(result, case, needle=needle, output=None, before=None)
    assert "inputs are never modified" in result.stderr
    after = {str(p.relative_to(tmp_path)): p.read_bytes() if p.is_file() else None for p in sorted(tmp_path.rglob("*"))}
    assert after == before, "the input (or its folder) was changed"


def test_output_that_is_a_hard_link_to_the_input_is_refused(cli, inputs, tmp_path):
    model = Path(shutil.copy2(inputs.gguf, tmp_path / "model.gguf"))
    os.link(model, tmp_path / "same.gguf")
    before = model.read_bytes()
    result = cli("quantize", model, "-o", tmp_path / "same.gguf", "--type", "Q8_0", "--force")
    assert result.exit_code == 2 and "is the input" in result.stderr, result.stderr
    assert model.read_bytes() == before


# --- permissions follow the umask -------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_outputs_get_the_permissions_the_umask_gives(cli, inputs, tmp_path, umask):
    previous = os.umask(umask)
    try:
        results = [
            cli("merge-lora", "--base", inputs.model, "--lora", inputs.adapter, "-o", tmp_path / "merged"),
            cli("quantize", inputs.gguf, "-o", tmp_path / "q8.gguf", "--type", "Q8_0"),
            cli("checksum", "create", inputs.text, "-o", tmp_path / "SUMS"),
        ]
    finally:
        os.umask(previous)
    assert [r.exit_code for r in results] == [0, 0, 0], [r.stderr for r in results]
    written = [tmp_path / "merged", *(tmp_path / "merged").rglob("*"), tmp_path / "q8.gguf", tmp_path / "SUMS"]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in written}
    expected = {name: (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask for name in modes}
    assert modes == expected
    assert modes["merged/SHA256SUMS"] == modes["merged/config.json"]


def test_adapters_and_gguf_to_hf_weights_get_the_umask_modes_not_0600(cli, inputs, tmp_path):
    """safetensors writes 0600 files; the atomic output helpers give every output the umask's modes (issue 26)."""
    previous = os.umask(0o027)
    try:
        trained = cli("pt", "-m", inputs.model, "-d", inputs.text, "-o", tmp_path / "adapter", *[fill(a, inputs, tmp_path) for a in PT_QUICK])
        converted = cli("gguf-to-hf", inputs.gguf, "-o", tmp_path / "hf")
    finally:
        os.umask(previous)
    assert (trained.exit_code, converted.exit_code) == (0, 0), trained.stderr + converted.stderr
    for folder in (tmp_path / "adapter", tmp_path / "hf"):
        modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}
        assert modes == {name: 0o750 if (tmp_path / name).is_dir() else 0o640 for name in modes}
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists() and (tmp_path / "hf" / "model.safetensors").exists()


# --- training that diverges stops, and writes nothing ----------------------------------------------------


def test_align_whose_gradients_overflow_stops_with_exit_1_and_writes_nothing(cli, inputs, tmp_path):
    """``--beta 1e308`` is finite, but its first gradients are not: the run stops before the optimizer applies them."""
    out = tmp_path / "out"
    args = ["align", "-m", inputs.model, "-d", inputs.pref, "-o", out, *[fill(a, inputs, tmp_path) for a in ALIGN_QUICK], "--beta", "1e308"]
    before = _snapshot(inputs.model)
    result = cli(*args)
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]] and "training stopped at step 1: the gradients are not finite" in errors[0]
    assert not out.exists() and _leftovers(out) == [] and not list(tmp_path.glob(".out*"))
    assert _snapshot(inputs.model) == before


@pytest.mark.parametrize("logs", [{"loss": float("nan")}, {"loss": float("inf")}, {"train_loss": float("nan")}], ids=["nan", "inf", "mean"])
def test_a_logged_loss_that_is_not_finite_stops_training(logs):
    """The logged losses are checked too (the Trainer no longer averages a NaN away: logging_nan_inf_filter is off)."""
    from cnllm.core.training.callbacks import DivergenceError, StopOnNonFinite

    with pytest.raises(DivergenceError, match="training stopped at step 7: the loss is"):
        StopOnNonFinite().on_log(SimpleNamespace(), SimpleNamespace(global_step=7), None, logs=logs)
    StopOnNonFinite().on_log(SimpleNamespace(), SimpleNamespace(global_step=7), None, logs={"loss": 2.5, "grad_norm": 1.0})


# --- a full disk says so, with the space needed and free --------------------------------------------------


def _free_space(monkeypatch, *values: int) -> None:
    """``free_bytes`` answers ``values`` in turn, then the last one for good."""
    from cnllm.core import atomic

    answers = list(values)
    monkeypatch.setattr(atomic, "free_bytes", lambda path: answers.pop(0) if len(answers) > 1 else answers[0])


def test_disk_filling_up_mid_write_says_no_space_left_with_sizes(cli, inputs, tmp_path, monkeypatch):
    """safetensors reports a short write as "N requested and M written"; the user sees the device, needed and free."""
    from cnllm.core import tensors

    def short_write(self, name, first, block):
        raise RuntimeError("1572864 requested and 405664 written")

    monkeypatch.setattr(tensors.StreamingShardWriter, "add_rows", short_write)
    _free_space(monkeypatch, 1 << 40, 4096)
    out = tmp_path / "merged"
    result = cli("merge-lora", "--base", inputs.model, "--lora", inputs.adapter, "-o", out)
    case = Case([], 1, "no space left on ")
    assert_clean_failure(result, case, needle="no space left on ", output=out, before=None)
    assert "(needed ~" in result.stderr and "free 4.0 KiB)" in result.stderr and "requested" not in result.stderr


def test_disk_too_full_for_the_output_is_refused_before_writing(cli, inputs, tmp_path, monkeypatch):
    _free_space(monkeypatch, 1000)
    out = tmp_path / "model.gguf"
    result = cli("convert-gguf", inputs.model, "-o", out, "--outtype", "f16")
    assert_clean_failure(result, Case([], 1, ""), needle="no space left on ", output=out, before=None)
    assert "(needed ~" in result.stderr and "free 1000 B)" in result.stderr


def test_enospc_outside_an_atomic_output_names_the_device_and_free_space(cli, inputs, tmp_path, monkeypatch):
    import errno

    from cnllm.core import hashing

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "SUMS"))

    monkeypatch.setattr(hashing, "create_manifest", full)
    _free_space(monkeypatch, 0)
    result = cli("checksum", "create", inputs.text, "-o", tmp_path / "SUMS")
    assert_clean_failure(result, Case([], 1, ""), needle="no space left on ", output=None, before=None)
    assert "free 0 B)" in result.stderr


# --- merge-lora and tensors the config does not describe ----------------------------------------------------


def test_merge_lora_leaves_out_a_tensor_the_config_does_not_describe_and_names_it(cli, inputs, tmp_path):
    """transformers ignores such a tensor when loading the base; copying it (48 GB in the wild) would only cost disk."""
    import torch
    from safetensors.torch import save_file

    from cnllm.core.tensors import tensor_infos

    base = shutil.copytree(inputs.model, tmp_path / "base")
    save_file({"stray.projection.weight": torch.ones(64, 64)}, str(base / "stray.safetensors"))
    index_path = base / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"]["stray.projection.weight"] = "stray.safetensors"
        index_path.write_text(json.dumps(index))
    out = tmp_path / "merged"
    result = cli("merge-lora", "--base", base, "--lora", inputs.adapter, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert "stray.projection.weight" in result.stderr and "config.json does not describe" in result.stderr
    merged = tensor_infos(out)
    assert "stray.projection.weight" not in merged and set(merged) == set(tensor_infos(inputs.model))
    assert _manifest_passes(cli, out)


# --- checksum verify: confined to its folder, regular files only, a short report ------------------------------


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checksum_verify_refuses_paths_outside_its_folder_unless_allowed(cli, tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    (release / "weights.bin").write_bytes(b"weights\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the release\n")
    manifest = release / "SHA256SUMS"
    manifest.write_text(
        f"{_digest(release / 'weights.bin')}  weights.bin\n{_digest(secret)}  ../secret.txt\n{_digest(secret)}  {secret}\n"
    )
    result = cli("checksum", "verify", manifest, "--json")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    files = {f["path"]: f for f in json.loads(result.stdout)["files"]}
    assert files["weights.bin"]["status"] == "OK"
    for name, reason in (("../secret.txt", "path leads outside"), (str(secret), "absolute path")):
        assert files[name]["status"] == "FAILED" and files[name]["actual"] is None
        assert reason in files[name]["reason"] and "--allow-outside" in files[name]["reason"]
    table = cli("checksum", "verify", manifest)
    assert table.exit_code == 1 and "path leads outside" in table.stdout and "1 OK, 2 FAILED" in table.stdout
    assert cli("checksum", "verify", manifest, "--allow-outside").exit_code == 0


def test_checksum_verify_skips_fifos_and_devices_without_hanging(tmp_path):
    """Run as a subprocess with a timeout: reading a FIFO or /dev/zero would block or never end."""
    release = tmp_path / "release"
    release.mkdir()
    (release / "weights.bin").write_bytes(b"weights\n")
    os.mkfifo(release / "pipe")
    (release / "zero").symlink_to("/dev/zero")
    manifest = release / "SHA256SUMS"
    manifest.write_text(f"{_digest(release / 'weights.bin')}  weights.bin\n{'0' * 64}  pipe\n{'0' * 64}  zero\n")
    done = subprocess.run(  # --allow-outside: the link to /dev/zero leads out of the folder, which alone would refuse it
        [sys.executable, "-m", "cnllm", "checksum", "verify", str(manifest), "--json", "--allow-outside"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 1, done.stderr
    files = {f["path"]: f for f in json.loads(done.stdout)["files"]}
    assert files["weights.bin"]["status"] == "OK"
    assert files["pipe"]["status"] == "FAILED" and "named pipe" in files["pipe"]["reason"]
    assert files["zero"]["status"] == "FAILED" and "character device" in files["zero"]["reason"]


def test_checksum_verify_prints_the_summary_and_only_the_failures_by_default(cli, tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    lines = []
    for number in range(40):
        path = release / f"part-{number:02d}.bin"
        path.write_bytes(f"part {number}\n".encode())
        lines.append(f"{_digest(path)}  {path.name}\n")
    (release / "part-07.bin").write_bytes(b"changed\n")
    manifest = release / "SHA256SUMS"
    manifest.write_text("".join(lines))
    short = cli("checksum", "verify", manifest)
    assert short.exit_code == 1
    assert "part-07.bin" in short.stdout and "part-08.bin" not in short.stdout
    assert short.stdout.strip().splitlines()[-1] == "39 OK, 1 FAILED, 0 MISSING"
    full = cli("checksum", "verify", manifest, "--all")
    assert all(f"part-{n:02d}.bin" in full.stdout for n in range(40))
    (release / "part-07.bin").write_bytes(b"part 7\n")
    passed = cli("checksum", "verify", manifest)
    assert passed.exit_code == 0 and passed.stdout.strip() == "40 OK, 0 FAILED, 0 MISSING"
    gone = tmp_path / "GONE"
    gone.write_text("".join(f"{'0' * 64}  missing-{n}.bin\n" for n in range(600)))
    many = cli("checksum", "verify", gone)
    assert many.exit_code == 1 and many.stdout.count("\n") == 601, "one plain line per failure, then the summary"
    assert many.stdout.startswith("MISSING\tmissing-0.bin\tsha256\tno such file\n")


def test_checksum_verify_refuses_a_link_that_leads_outside_its_folder(cli, tmp_path):
    """A link inside the folder to ``/etc/hostname`` (or any file elsewhere) is reported, not read, unless allowed."""
    release = tmp_path / "release"
    release.mkdir()
    (release / "weights.bin").write_bytes(b"weights\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the release\n")
    (release / "inside-link").symlink_to("weights.bin")
    (release / "outside-link").symlink_to(secret)
    manifest = release / "SHA256SUMS"
    digests = {"weights.bin": _digest(release / "weights.bin"), "inside-link": _digest(release / "weights.bin"), "outside-link": _digest(secret)}
    manifest.write_text("".join(f"{digest}  {name}\n" for name, digest in digests.items()))
    result = cli("checksum", "verify", manifest, "--json")
    assert result.exit_code == 1, result.stderr
    files = {f["path"]: f for f in json.loads(result.stdout)["files"]}
    assert files["weights.bin"]["status"] == files["inside-link"]["status"] == "OK"
    assert files["outside-link"]["status"] == "FAILED" and files["outside-link"]["actual"] is None
    assert "symbolic link leads outside" in files["outside-link"]["reason"] and "--allow-outside" in files["outside-link"]["reason"]
    assert cli("checksum", "verify", manifest, "--allow-outside").exit_code == 0


def test_checksum_verify_follows_a_hugging_face_snapshot_into_its_blobs(cli, tmp_path):
    """Every file of a hub cache snapshot links to ``../../blobs/``: that is the snapshot's own content, not outside."""
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "0123abcd").write_bytes(b"weights\n")
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / "0123abcd")
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text(f"{_digest(repo / 'blobs' / '0123abcd')}  model.safetensors\n")
    result = cli("checksum", "verify", manifest, "--root", snapshot)
    assert result.exit_code == 0, result.stdout + result.stderr


def test_tables_print_whole_values_when_stdout_is_not_a_terminal(cli, tmp_path):
    """A CI log or a pipe has no width: a long file name is printed whole on its row, not cut to ``…``."""
    name = "a-long-folder-name-" * 8 + "model-00001-of-00002.safetensors"
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text(f"{'0' * 64}  {name}\n")
    result = cli("checksum", "verify", manifest)
    assert result.exit_code == 1
    assert any(name in line and "MISSING" in line for line in result.stdout.splitlines()), result.stdout
    assert "…" not in result.stdout


# --- memory and time stay bounded on hostile inputs ---------------------------------------------------------

ADDRESS_SPACE_CAP = 2 << 30  # what a cnllm process may map; a command that read or built its input whole would need far more
CAPPED = {  # name → the command and what its one line says; each is refused before any large allocation
    "checksum-verify-dev-zero": (["checksum", "verify", "/dev/zero"], "character device"),
    "checksum-verify-a-1-gib-file": (["checksum", "verify", "{huge_file}"], "larger than 64 MiB"),
    "passkey-length-1e9": (["eval", "passkey", "{gguf}", "--length", "1000000000"], "--length 1000000000"),
    "yaml-alias-bomb": (["pipeline", "{alias_bomb_recipe}", "-o", "{tmp}/work", "--dry-run"], "aliases expand"),
    "gguf-to-hf-100000-blocks": (["gguf-to-hf", "{gguf_many_blocks}", "-o", "{tmp}/hf"], "block_count"),
    "chat-100000-blocks": (["chat", "{gguf_many_blocks}", "-p", "hi", "-n", "2"], "block_count"),
    "quantize-100000-blocks": (["quantize", "{gguf_many_blocks}", "-o", "{tmp}/q8.gguf", "--type", "Q8_0"], "block_count"),
}


def _capped_address_space() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, ADDRESS_SPACE_CAP))


@pytest.mark.parametrize("name", list(CAPPED))
def test_hostile_input_is_refused_within_bounded_memory(inputs, tmp_path, name):
    """A subprocess under an address-space cap: reading /dev/zero, expanding the aliases or trusting block_count
    would hit the cap (MemoryError, exit 1) instead of the one usage line (exit 2)."""
    template, needle = CAPPED[name]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cnllm", *[fill(a, inputs, tmp_path) for a in template]],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env, preexec_fn=_capped_address_space,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], done.stderr
    assert done.stdout == "" and time.monotonic() - started < 60


def test_download_from_an_endpoint_that_never_answers_times_out_with_a_message(tmp_path):
    """A Hub endpoint that accepts the connection and says nothing: HF_HUB_DOWNLOAD_TIMEOUT seconds, then one line."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_stay_silent() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DOWNLOAD_TIMEOUT": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_HUB_OFFLINE", None)
    try:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "cnllm", "--allow-download", "convert-gguf", "someone/silent-model", "-o", str(tmp_path / "x.gguf")],
            cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
        )
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        server.close()
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"download from {endpoint} failed: no answer within 1 s" in lines[0] and "HF_HUB_DOWNLOAD_TIMEOUT" in lines[0]
    assert elapsed < 60 and not (tmp_path / "x.gguf").exists()
