"""The package's module structure: no two modules import each other (imports inside functions included), so
that each can be read, tested and replaced on its own (policy ↔ lora and cli ↔ compare once did)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dare_gym": "dare_gym", "envs": "dare_gym.envs", "rewards": "dare_gym.rewards",
            "algorithms": "dare_gym.algorithms"}  # source folder -> installed package name


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[relative.parts[0]], *relative.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every dare_gym module (or module attribute) the file imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dare_gym"):
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("dare_gym")}
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")]
    graph = {module_name(p): imported_modules(p) for p in files}
    return {module: {d for d in deps if d in graph and d != module} for module, deps in graph.items()}


def test_the_import_graph_is_read_from_the_sources():
    graph = import_graph()
    assert "dare_gym.core.policy" in graph["dare_gym.core.loading"] and "dare_gym.core.lora" in graph["dare_gym.core.loading"]
    assert "dare_gym.tools.compare" in graph["dare_gym.tools.cli"]  # a lazy import inside a function counts


def test_no_two_modules_import_each_other():
    graph = import_graph()
    mutual = [(a, b) for a, b in itertools.combinations(sorted(graph), 2) if b in graph[a] and a in graph[b]]
    assert not mutual, f"modules importing each other: {mutual}"
