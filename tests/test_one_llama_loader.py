"""Every llama.cpp model cnllm, its tests and its benchmarks load goes through cnllm/core/llama_loader.py, the one
place that decides llama.cpp's weight repacking (off on CPUs with AMX, where llama.cpp's AMX path crashes)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOADER = REPO / "cnllm" / "core" / "llama_loader.py"
# Calls that build a llama.cpp model (or its load parameters) without the repacking decision.
MODEL_LOADS = {"Llama", "llama_model_default_params", "llama_model_load_from_file", "llama_load_model_from_file"}


def direct_loads(path: Path, root: Path = REPO) -> list[str]:
    """``file:line: call`` for each call in ``path`` that loads a model without the loader's decision."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        if name not in MODEL_LOADS:
            continue
        # llama_model_load_from_file is fine with the loader's parameters: llama_loader.model_params(…)
        if name in ("llama_model_load_from_file", "llama_load_model_from_file") and any(
            isinstance(a, ast.Call) and getattr(a.func, "id", getattr(a.func, "attr", None)) == "model_params" for a in node.args
        ):
            continue
        found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_no_llama_cpp_model_is_opened_outside_the_loader():
    files = [p for folder in ("cnllm", "tests", "bench", "examples") for p in (REPO / folder).rglob("*.py")]
    assert LOADER in files
    found = [hit for path in files if path != LOADER for hit in direct_loads(path)]
    assert not found, "open llama.cpp models with cnllm.core.llama_loader.open_llama (or model_params()):\n" + "\n".join(found)


def test_the_check_sees_a_direct_load(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import llama_cpp\nfrom llama_cpp import Llama\nfrom cnllm.core.llama_loader import model_params, open_llama\n"
        "a = llama_cpp.Llama('m.gguf')\nb = Llama(model_path='m.gguf')\n"
        "c = llama_cpp.llama_model_load_from_file(b'm', llama_cpp.llama_model_default_params())\n"
        "d = open_llama('m.gguf')\ne = llama_cpp.llama_model_load_from_file(b'm', model_params())\n"
    )
    found = direct_loads(sample, tmp_path)
    assert [line.split(":")[1] for line in found] == ["4", "5", "6", "6"]
