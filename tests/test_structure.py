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


# The layers, bottom up (docs/ARCHITECTURE.md). A module may import its own layer and the layers its rule allows.
LAYER_RULES = {
    "rewards": {"rewards", "registries"},  # a reward is a function of text and a record: no torch, no model
    "envs": {"envs", "rewards", "registries"},  # tasks use rewards and the env registry, never a policy
    "models": {"models", "registries"},
    "samplers": {"samplers", "models", "core", "registries"},  # decode with a policy's forward
    "core": {"core", "models", "samplers", "registries"},  # policy, buffer, estimators: no algorithm, no loop
    "algorithms": {"algorithms", "core", "models", "samplers", "registries"},  # never a concrete env
    "train": {"train", "algorithms", "core", "models", "samplers", "envs", "rewards", "registries", "top"},
}


def layer(module: str) -> str:
    """The layer of a dare_gym module: its subpackage (``core``, ``train``, ...); the env registry, spaces and
    vector env belong to ``envs``; the package's own ``__init__``/``__main__`` are ``top``."""
    parts = module.split(".")
    if module == "dare_gym.registries":
        return "registries"
    if len(parts) == 1 or parts[1] == "__main__":
        return "top"
    return "envs" if parts[1] in ("registry", "spaces", "vector") else parts[1]


def test_every_module_belongs_to_a_known_layer():
    known = set(LAYER_RULES) | {"tools", "top", "registries"}
    assert {layer(module) for module in import_graph()} <= known


def test_each_layer_imports_only_the_layers_below_it():
    graph = import_graph()
    broken = sorted((module, dep) for module, deps in graph.items() for dep in deps
                    if layer(module) in LAYER_RULES and layer(dep) not in LAYER_RULES[layer(module)])
    assert not broken, f"imports across the layer rules: {broken}"


def test_the_tools_sit_on_top():
    graph = import_graph()
    importers = sorted(module for module, deps in graph.items() for dep in deps
                       if layer(dep) == "tools" and layer(module) not in ("tools", "top"))
    assert not importers, f"modules below the tools import them: {importers}"
    assert layer("dare_gym.train.trainer") == "train" and layer("dare_gym.registry") == "envs"
