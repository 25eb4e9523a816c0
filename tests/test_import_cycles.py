"""No import cycles among cnllm modules, counting imports inside functions too, and no import back up the house.

A cycle hidden behind a lazy import still ties two modules into one unit: neither can be read,
tested or changed alone. Shared types go down a floor; registries take their members from above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import cnllm

PACKAGE_ROOT = Path(cnllm.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module → the cnllm modules it imports anywhere in its body (``from pkg import mod`` counts as ``pkg.mod``)."""
    modules = {module_name(p): p for p in PACKAGE_ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "cnllm.core.errors" in graph["cnllm.core.generation.base"]
    assert "cnllm.core.pipeline_steps" in graph["cnllm.core.pipeline"]  # imported inside run_pipeline
    assert "cnllm.core.tokenizers.sources" in graph["cnllm.core.tokenizers.bpe"]  # from cnllm.core.tokenizers import sources


def test_find_cycles_reports_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" ↔ ".join(c) for c in cycles)


# A lower floor never imports a higher one, not even inside a function: what both need goes down a floor.
NEVER_IMPORTS = {
    "cnllm.core.tokenizers": ("cnllm.core.gguf", "cnllm.core.modelio", "cnllm.core.tiny", "cnllm.core.training", "cnllm.core.evaluation"),
    "cnllm.core.generation": ("cnllm.core.backends", "cnllm.core.evaluation", "cnllm.core.server"),
    "cnllm.core.backends": ("cnllm.core.evaluation", "cnllm.core.server"),
    "cnllm.core.training": ("cnllm.core.evaluation", "cnllm.core.pipeline"),
    "cnllm.core": ("cnllm.cli", "cnllm.commands"),
}


def test_no_import_runs_back_up_the_house():
    graph = import_graph()
    upward = [
        f"{module} → {target}"
        for module, targets in sorted(graph.items())
        for floor, above in NEVER_IMPORTS.items()
        if module == floor or module.startswith(floor + ".")
        for target in sorted(targets)
        if target.startswith(above)
    ]
    assert not upward, "imports back up the house: " + "; ".join(upward)
    assert graph["cnllm.core.files"] <= {"cnllm.core.errors"}  # the floor every module reads JSON and GGUF through
