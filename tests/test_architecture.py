"""The core's structure, read from its source: it never imports the visualizer or a plugin module,
its modules import each other without cycles, one executor runs every operator, and nothing but
the model itself reaches into a model's private attributes.

Every ``import`` statement counts, those inside functions included, except those under
``if TYPE_CHECKING:`` (they never run). Relative imports are resolved; ``from package import
name`` counts as importing ``package.name`` when that is a module, else ``package``.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = "graphengine"
#: Packages the core must not import: the visualizer and the built-in plugins (which reach the
#: core through entry points, like any third-party plugin). They install as graphengine.viz and
#: graphengine.plugins, from the repository's top-level viz/ and plugins/ folders.
FORBIDDEN = ("viz", "plugins", "graphengine.viz", "graphengine.plugins")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((ROOT / CORE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _statements(node: ast.AST):
    """Every import statement under ``node`` that can run: ``if TYPE_CHECKING:`` bodies are
    skipped (their ``else`` is not)."""
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children = node.orelse
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        else:
            yield from _statements(child)


def imports(source: str, module: str, is_package: bool = False,
            known: frozenset[str] | set[str] = frozenset()) -> list[tuple[int, str]]:
    """(line, absolute module name) of each module ``source`` (the code of ``module``) imports.
    ``known``: module names that ``from package import name`` may refer to."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for statement in _statements(ast.parse(source)):
        if isinstance(statement, ast.Import):
            found += [(statement.lineno, alias.name) for alias in statement.names]
            continue
        if statement.level:
            base = package.split(".")
            base = base[:len(base) - (statement.level - 1)]
            target = ".".join(base + ([statement.module] if statement.module else []))
        else:
            target = statement.module
        for alias in statement.names:
            submodule = f"{target}.{alias.name}"
            found.append((statement.lineno, submodule if submodule in known else target))
    return found


def import_graph() -> tuple[nx.DiGraph, dict[tuple[str, str], int]]:
    """The core's modules and every import statement of theirs (edges into ``graphengine.*``
    only), with the line of the first import of each edge."""
    modules = core_modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    lines: dict[tuple[str, str], int] = {}
    for module, path in modules.items():
        for line, target in imports(path.read_text(), module, path.name == "__init__.py", set(modules)):
            if target in modules and target != module:
                graph.add_edge(module, target)
                lines.setdefault((module, target), line)
    return graph, lines


def test_the_import_reader_sees_function_level_imports_but_not_type_checking_ones():
    source = (
        "from typing import TYPE_CHECKING\n"
        "import os.path\n"
        "from . import b\n"
        "from .. import errors\n"
        "from ..ir.graph import Graph\n"
        "if TYPE_CHECKING:\n"
        "    import viz\n"
        "else:\n"
        "    import json\n"
        "def f():\n"
        "    import graphengine.plugins.activations\n"
        "    class C:\n"
        "        def g(self):\n"
        "            from .c import x\n")
    known = {"graphengine.tools.b", "graphengine.errors"}
    assert [name for _, name in imports(source, "graphengine.tools.a", known=known)] == [
        "typing", "os.path", "graphengine.tools.b", "graphengine.errors", "graphengine.ir.graph",
        "json", "graphengine.plugins.activations", "graphengine.tools.c"]
    assert imports("from .x import y", "graphengine", is_package=True) == [(1, "graphengine.x")]


def test_the_core_imports_neither_the_visualizer_nor_a_plugin_module():
    modules = core_modules()
    assert len(modules) > 10, "the core's modules were not found"
    offending = []
    for module, path in modules.items():
        for line, target in imports(path.read_text(), module, path.name == "__init__.py", set(modules)):
            if any(target == f or target.startswith(f + ".") for f in FORBIDDEN):
                offending.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not offending, ("the core must reach the visualizer and the plugins only through the "
                           "plugin manager:\n" + "\n".join(offending))


def test_the_import_graph_is_read():
    graph, _ = import_graph()
    assert graph.has_edge("graphengine.cli", "graphengine.hooks")
    assert graph.has_edge("graphengine", "graphengine.hooks")


def test_the_core_has_no_import_cycles():
    graph, lines = import_graph()
    groups = sorted((sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1),
                    key=lambda c: (-len(c), c))
    if not groups:
        return
    described = []
    for group in groups:
        described.append(f"{len(group)} modules import each other: {', '.join(group)}; e.g.")
        cycles = nx.simple_cycles(graph.subgraph(group))
        for cycle in sorted(itertools.islice(cycles, 200), key=len)[:5]:
            steps = [f"{a} (line {lines[a, b]})" for a, b in zip(cycle, cycle[1:] + cycle[:1])]
            described.append("    " + " -> ".join(steps + [cycle[0]]))
    pytest.fail("import cycles among graphengine's modules:\n" + "\n".join(described))


#: Modules that may call an operator's forward or backward: the executor's loops; the adapters of
#: plugin contracts and the fused step, which call the plugin they wrap; and check_backward.
OPERATOR_CALLERS = {"graphengine.runtime.executor", "graphengine.ir.contracts",
                    "graphengine.compiler.fusion", "graphengine.testing", "graphengine.tools.profile"}


def _calls(tree: ast.AST, method: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == method:
            yield node


def test_only_the_executor_runs_operators():
    offending = []
    for module, path in core_modules().items():
        if module in OPERATOR_CALLERS:
            continue
        tree = ast.parse(path.read_text())
        for method in ("forward", "backward"):
            for call in _calls(tree, method):
                receiver = ast.unparse(call.func.value)
                # the model's and executor's own entry points are not operator calls
                if receiver not in ("self", "model", "self.executor", "model.executor", "executor"):
                    offending.append(f"{path.relative_to(ROOT)}:{call.lineno} {ast.unparse(call)[:60]}")
    assert not offending, "operators run only through the executor:\n" + "\n".join(offending)


def test_only_the_model_touches_a_models_private_attributes():
    offending = []
    for module, path in core_modules().items():
        if module == "graphengine.model":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                    and not node.attr.startswith("__") and ast.unparse(node.value) == "model":
                offending.append(f"{path.relative_to(ROOT)}:{node.lineno} model.{node.attr}")
    assert not offending, "use the model's public parts:\n" + "\n".join(offending)
