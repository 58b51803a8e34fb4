"""Layering of the numerical core, read from the source (no import): vlpeft.functional imports neither transformers
nor peft nor other vlpeft packages, no module imports another's private (``_name``) names, and the module-level
imports between its modules have no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import vlpeft.functional

ROOT = Path(vlpeft.functional.__file__).parent
PACKAGE = "vlpeft.functional"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join((PACKAGE, *parts[:-1])) if parts[-1] == "__init__" else ".".join((PACKAGE, *parts))
        found[name] = path
    return found


MODULES = _modules()


def _imports(tree: ast.AST, *, top_level: bool) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import (``top_level``: only those run at import time, not in functions)."""
    nodes = list(tree.body) if top_level else list(ast.walk(tree))
    found = []
    for node in nodes:
        if top_level and isinstance(node, ast.Try):  # guarded optional imports run at import time too
            nodes.extend(node.body)
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def test_no_transformers_peft_or_other_vlpeft_packages():
    for name, path in MODULES.items():
        for module, _ in _imports(ast.parse(path.read_text()), top_level=False):
            root = module.split(".")[0]
            assert root not in ("transformers", "peft"), f"{name} imports {module}"
            if root == "vlpeft":
                assert module == PACKAGE or module.startswith(PACKAGE + "."), f"{name} imports {module}"


def test_no_private_names_imported_across_modules():
    for name, path in MODULES.items():
        for module, names in _imports(ast.parse(path.read_text()), top_level=False):
            if module.startswith("vlpeft"):
                private = [n for n in names if n.startswith("_")] + [p for p in module.split(".") if p.startswith("_")]
                assert not private, f"{name} imports private {private} from {module}"


def test_module_imports_have_no_cycle():
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for module, names in _imports(ast.parse(path.read_text()), top_level=True):
            if module not in MODULES:
                continue
            submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            targets = submodules or [module]
            # A module's parent packages are imported before it anyway: that is not a dependency of its own.
            edges.update(t for t in targets if not name.startswith(t + ".") and t != name)
        graph[name] = edges
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, target]))
            if target not in state:
                visit(target, [*trail, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert graph[f"{PACKAGE}.p_laplacian.backend"]  # the graph is read (the backend imports its kernels' modules)
