"""The package's import graph, read from the source (no import): the module-level imports between vlpeft's modules
have no cycle, and the numerical core (``vlpeft.functional``) imports neither transformers nor peft.

Only what runs when a module is imported counts: statements at module level, in module-level ``try`` blocks and in
``if`` blocks other than ``if TYPE_CHECKING:``; imports inside functions (the lazy ones, each with a
``# lazy: <reason>`` comment) are left out. ``from vlpeft.x import name`` is an edge to ``vlpeft.x`` and, when
``vlpeft.x.name`` is a module, to it; ``import vlpeft.x.y`` is an edge to ``vlpeft.x.y``. Importing
``vlpeft.x.y`` runs the ``__init__`` of ``vlpeft.x`` first, so that package is an edge too. The importer's own
packages are imported before it anyway: an edge to one of them is left out, except where the import reads a
name its ``__init__`` defines (``from vlpeft import AdapterConfig``, not ``from vlpeft.pkg import sibling``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vlpeft

ROOT = Path(vlpeft.__file__).parent
PACKAGE = "vlpeft"


def _modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(root).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level(body: list[ast.stmt]):
    """The statements run when the module is imported (``if TYPE_CHECKING:`` blocks left out)."""
    for node in body:
        if isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _top_level(block)
        else:
            yield node


def _imported(name: str, path: Path, tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every module-level vlpeft import; relative imports resolved; ``import a.b`` -> names []."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in _top_level(tree.body):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((module, [alias.name for alias in node.names]))
    return [(m, n) for m, n in found if m == PACKAGE or m.startswith(PACKAGE + ".")]


def _within(name: str, package: str) -> bool:
    """Whether module ``name`` is ``package`` or inside it."""
    return name == package or name.startswith(package + ".")


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the vlpeft modules its module-level imports import."""
    graph = {}
    for name, path in modules.items():
        edges = set()
        for module, names in _imported(name, path, ast.parse(path.read_text(), filename=str(path))):
            submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            edges.update(submodules)
            if not (_within(name, module) and names and len(submodules) == len(names)):
                edges.add(module)
            parts = module.split(".")
            edges.update(package for package in (".".join(parts[:i]) for i in range(2, len(parts)))
                         if package in modules and not _within(name, package))  # not namespace packages
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its modules, the first repeated at the end), or ``None``."""
    state: dict[str, str] = {}
    for start in sorted(graph):
        if start in state:
            continue
        state[start] = "open"
        trail, stack = [start], [iter(sorted(graph[start]))]
        while stack:
            target = next(stack[-1], None)
            if target is None:
                state[trail.pop()] = "done"
                stack.pop()
            elif state.get(target) == "open":
                return [*trail[trail.index(target):], target]
            elif target not in state and target in graph:
                state[target] = "open"
                trail.append(target)
                stack.append(iter(sorted(graph[target])))
    return None


MODULES = _modules()


def test_every_import_target_is_a_vlpeft_module():
    unknown = {(name, target) for name, edges in import_graph(MODULES).items() for target in edges
               if target not in MODULES}
    assert not unknown, f"imports of modules that do not exist: {sorted(unknown)}"


def test_module_level_imports_have_no_cycle():
    graph = import_graph(MODULES)
    # The graph is read: the CLI imports the training configuration, the training run its task binding.
    assert "vlpeft.training.config" in graph["vlpeft.cli"]
    assert "vlpeft.training.task_binding" in graph["vlpeft.training.run"]
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("source, cycle", [
    ({"a": "from vlpeft.b import f\n", "b": "from vlpeft import a\n"}, ["vlpeft.a", "vlpeft.b", "vlpeft.a"]),
    ({"a": "from .b import f\n", "b": "import vlpeft.c\n", "c": "from vlpeft.a import g\n"},
     ["vlpeft.a", "vlpeft.b", "vlpeft.c", "vlpeft.a"]),
    ({"a": "try:\n    from vlpeft.b import f\nexcept ImportError:\n    pass\n", "b": "from vlpeft.a import g\n"},
     ["vlpeft.a", "vlpeft.b", "vlpeft.a"]),
    ({"p/__init__.py": "from vlpeft.p.m import f\n", "p/m": "from vlpeft.p import g\n"},
     ["vlpeft.p", "vlpeft.p.m", "vlpeft.p"]),
    ({"p/__init__.py": "from vlpeft.p.m import f\n", "p/m": "from vlpeft.q.r import g\n",  # through q's __init__
      "q/__init__.py": "from vlpeft.p import h\n", "q/r": ""}, ["vlpeft.p", "vlpeft.p.m", "vlpeft.q", "vlpeft.p"]),
])
def test_a_cycle_is_found(tmp_path, source, cycle):
    for name, text in source.items():
        path = tmp_path / (name if name.endswith(".py") else f"{name}.py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert find_cycle(import_graph(_modules(tmp_path))) == cycle


@pytest.mark.parametrize("source", [
    {"a": "def f():\n    from vlpeft.b import g\n", "b": "from vlpeft.a import f\n"},  # lazy import
    {"a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vlpeft.b import g\n",
     "b": "from vlpeft.a import f\n"},
    {"p/__init__.py": "from vlpeft.p.m import f\n", "p/m": "from vlpeft.p import n\n", "p/n": ""},  # submodule
])
def test_no_cycle_is_reported_where_none_runs(tmp_path, source):
    for name, text in source.items():
        path = tmp_path / (name if name.endswith(".py") else f"{name}.py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert find_cycle(import_graph(_modules(tmp_path))) is None


def test_functional_imports_neither_transformers_nor_peft():
    """Every import of vlpeft.functional, those inside functions included."""
    for name, path in MODULES.items():
        if not (name == "vlpeft.functional" or name.startswith("vlpeft.functional.")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in ("transformers", "peft"), f"{name} imports {module}"
