"""Shared fixtures: tiny tokenizers and LLaMA checkpoints built in code (see tests/assets/README.md).

Everything here runs offline on a CPU in seconds. Fixtures that need the reference files in
``../shared/fixtures`` skip cleanly when that folder is absent (a user's clone).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CNLLM_SHARED_DIR", REPO.parent / "shared"))
TEST_CACHE = Path(os.environ.get("CNLLM_TEST_CACHE", Path.home() / ".cache" / "cnllm-test"))  # what tests fetch, kept between runs


def _amx_here() -> bool:
    from cnllm.core.cpu import cpu_info

    return bool(cpu_info().amx)


# Tests that force llama.cpp's weight repacking on: on a CPU with AMX that is the crash cnllm avoids (docs/cpu.md).
forces_repack_on = pytest.mark.skipif(_amx_here(), reason="repacking forced on crashes llama.cpp on CPUs with AMX (llama.cpp issue 20824)")


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """Run ``cnllm ARGS...`` in-process; returns exit code, stdout and stderr."""
    from cnllm.cli.app import main

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        else:  # pragma: no cover - main always exits
            code = 0
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def assets() -> Path:
    from cnllm.core.tiny import ASSETS

    return ASSETS


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory) -> Path:
    """LLaMA-style SentencePiece tokenizer (1,000 pieces) trained on cnllm/assets/en.txt: tokenizer.model + HF files."""
    from cnllm.core.tiny import build_spm_tokenizer

    return build_spm_tokenizer(tmp_path_factory.mktemp("spm-tokenizer"))


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    """Llama-3-style byte-level BPE tokenizer (1,024 + 5 special ids) trained on cnllm/assets/en.txt."""
    from cnllm.core.tiny import build_bpe_tokenizer

    return build_bpe_tokenizer(tmp_path_factory.mktemp("bpe-tokenizer"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, spm_tokenizer_dir) -> Path:
    """Random LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 KV heads) in sharded safetensors + SPM tokenizer."""
    from cnllm.core.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), spm_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_tied_llama_dir(tmp_path_factory, spm_tokenizer_dir) -> Path:
    """The tiny model with tied input/output embeddings (no lm_head.weight stored), like SmolLM2 or Llama-3.2-1B."""
    from cnllm.core.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-tied-llama"), spm_tokenizer_dir, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory, bpe_tokenizer_dir) -> Path:
    """The same tiny model with the Llama-3-style BPE tokenizer."""
    from cnllm.core.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama3"), bpe_tokenizer_dir)


@pytest.fixture(scope="session")
def qwen2_bpe_tokenizer_dir(tmp_path_factory) -> Path:
    """Qwen2-style byte-level BPE tokenizer (single-digit split, no BOS, <|im_end|> as EOS) trained on cnllm/assets/en.txt."""
    from cnllm.core.tiny import build_bpe_tokenizer

    return build_bpe_tokenizer(tmp_path_factory.mktemp("qwen2-tokenizer"), style="qwen2")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory, spm_tokenizer_dir) -> Path:
    """The tiny model as a MistralForCausalLM (LLaMA with a sliding window) with the SPM tokenizer."""
    from cnllm.core.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-mistral"), spm_tokenizer_dir, architecture="mistral")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, qwen2_bpe_tokenizer_dir) -> Path:
    """The tiny model as a Qwen2ForCausalLM: q/k/v biases, tied embeddings (as Qwen2-0.5B), Qwen2-style BPE, ChatML."""
    from cnllm.core.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-qwen2"), qwen2_bpe_tokenizer_dir, architecture="qwen2", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """``../shared/fixtures`` (reference tokenizers, corpus); skips when absent."""
    path = SHARED / "fixtures"
    if not path.is_dir():
        pytest.skip(f"reference fixtures not available ({path})")
    return path


def read_vectors(folder: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp tokenizer test vectors: inputs split by the separator line, one line of ids each."""
    inputs = (folder / "vectors.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (folder / "vectors.out").read_text(encoding="utf-8").split("\n")
    if inputs and inputs[-1] == "":
        inputs.pop()
    outputs = outputs[: len(inputs)]
    return [(text, [int(t) for t in ids.split()]) for text, ids in zip(inputs, outputs)]


SHORT_CONTEXT = 64  # the trained context of short_context_dir: long-context tests run at 128+ tokens


@pytest.fixture(scope="session")
def short_context_dir(tmp_path_factory, spm_tokenizer_dir) -> Path:
    """The tiny model trained for 64 positions, its query/key weights scaled up ×20 so attention (and so RoPE
    scaling) moves the logits well beyond backend round-off."""
    from safetensors.torch import load_file, save_file

    from cnllm.core.tiny import build_tiny_llama

    out = build_tiny_llama(tmp_path_factory.mktemp("short-context"), spm_tokenizer_dir, max_position_embeddings=SHORT_CONTEXT)
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        tensors = {k: v * 20 if ("q_proj" in k or "k_proj" in k) else v for k, v in tensors.items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def short_context_gguf(tmp_path_factory, short_context_dir) -> Path:
    """short_context_dir as an f32 GGUF."""
    from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf

    return convert_to_gguf(short_context_dir, tmp_path_factory.mktemp("short-gguf") / "short.gguf", ConvertOptions(outtype="f32")).output


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny model as an f32 GGUF, written by cnllm's own converter (skips where that core is absent)."""
    try:
        from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf
    except ImportError:
        pytest.skip("cnllm.core.gguf.convert is not available; GGUF backend tests need it to build a test GGUF")
    return convert_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", ConvertOptions(outtype="f32")).output


@pytest.fixture(scope="session")
def tiny_generator(tiny_llama_dir):
    """The tiny model loaded once (transformers), for generation, chat and the server."""
    from cnllm.core.backends import load_model

    generator = load_model(tiny_llama_dir)
    yield generator
    generator.close()


@pytest.fixture(scope="session")
def tiny_q4_0_gguf(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny model in Q4_0, a type llama.cpp repacks on AVX2, AVX-512 and NEON (and moves to AMX where it has it):
    where --repack and --no-repack load different kernels."""
    from cnllm.core.gguf.convert import ConvertOptions, convert_to_gguf
    from cnllm.core.gguf.quantize import QuantizeOptions, quantize_gguf

    folder = tmp_path_factory.mktemp("tiny-q4_0")
    f32 = convert_to_gguf(tiny_llama_dir, folder / "tiny-f32.gguf", ConvertOptions(outtype="f32")).output
    return quantize_gguf(f32, folder / "tiny-q4_0.gguf", QuantizeOptions(type="Q4_0", threads=1)).output


@pytest.fixture(scope="session")
def llamacpp_reference() -> Path:
    """llama.cpp's reference ``convert_hf_to_gguf.py`` (``$CNLLM_LLAMACPP_REF``, else fetched once by
    ``../shared/tools/get-llamacpp-ref.sh`` from the llama-cpp-python sdist into ``$CNLLM_TEST_CACHE``); skips when neither is there."""
    import subprocess
    import sys

    given = os.environ.get("CNLLM_LLAMACPP_REF")
    if given:
        return Path(given)
    folder = TEST_CACHE / "llamacpp-ref"
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    tool = SHARED / "tools" / "get-llamacpp-ref.sh"
    if not tool.is_file():
        pytest.skip("llama.cpp's reference converter is not available (set CNLLM_LLAMACPP_REF to a folder holding convert_hf_to_gguf.py)")
    import shutil

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    fetched = folder.with_name(f"{folder.name}.{os.getpid()}")  # test workers may fetch at once: each its own, then one rename
    result = subprocess.run(["bash", str(tool), str(fetched)], capture_output=True, text=True, env=env, timeout=1800)
    if result.returncode != 0 or not (fetched / "convert_hf_to_gguf.py").is_file():
        shutil.rmtree(fetched, ignore_errors=True)
        pytest.skip(f"could not fetch llama.cpp's reference converter: {result.stderr.strip()[-300:]}")
    try:
        fetched.rename(folder)
    except OSError:  # another worker's copy is in place
        shutil.rmtree(fetched, ignore_errors=True)
    return folder


def run_reference_converter(reference: Path, model: Path, output: Path, outtype: str = "f16") -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` on ``model``, with its own gguf-py."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(reference / "gguf-py")}
    subprocess.run([sys.executable, str(reference / "convert_hf_to_gguf.py"), str(model), "--outfile", str(output), "--outtype", outtype],
                   check=True, capture_output=True, env=env, timeout=1800)
    return output
