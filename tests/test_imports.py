"""The import graph of composer/: data flows one way.

Every import inside the package is listed — module-level, function-local, and `import_module`
calls (whose argument must then be a literal, so the graph can be read) — and the graph must have
no cycle, with the CLI at the top: nothing imports `composer.cli` (but `python -m composer`).
Importing `composer.a.b` runs the package `composer.a` too, so that edge is counted — unless the
importer lives inside `composer.a`, whose package is then initialised already (a package that
imports its own submodules to register them is no cycle). The root package `composer`, which
every submodule's import runs, is the public facade and is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

from helpers import REPO

PACKAGE = REPO / "composer"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _absolute(module: str, level: int, here: str) -> str:
    if not level:
        return module or ""
    base = here.split(".")
    base = base if _is_package(here) else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _targets(name: str, here: str) -> set[str]:
    """A module and the packages above it (but the root, and those holding `here`) that importing
    it from module `here` runs."""
    out = set()
    parts = name.split(".")
    for k in range(2, len(parts) + 1):
        prefix = ".".join(parts[:k])
        inside = here.startswith(prefix + ".")
        if prefix in MODULES and not inside:
            out.add(prefix)
    return out


def imports_of(name: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found |= _targets(alias.name, name)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, name)
            found |= _targets(base, name)
            for alias in node.names:  # `from . import api`: the submodule itself
                found |= _targets(f"{base}.{alias.name}", name) if f"{base}.{alias.name}" in MODULES else set()
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "import_module":
            arg = node.args[0] if node.args else None
            if name == "composer":  # the facade imports its names on first use; it is left out of the graph
                continue
            assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), (
                f"{path}:{node.lineno}: import_module with a computed name hides an import from this test")
            package = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else name
            level = len(arg.value) - len(arg.value.lstrip("."))
            found |= _targets(_absolute(arg.value.lstrip("."), level, package if level else name), name)
    found.discard(name)
    return found


def import_graph() -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(MODULES)
    for name, path in MODULES.items():
        for target in imports_of(name, path):
            g.add_edge(name, target)
    return g


def test_the_graph_sees_every_kind_of_import():
    """The reader itself: module-level, function-local and relative imports of several levels."""
    g = import_graph()
    assert ("composer.api", "composer.resolve") in g.edges  # module level, `from . import resolve`
    assert ("composer.commands", "composer.builder") in g.edges  # function-local
    assert any(a.startswith("composer.ops.") and b == "composer.shapes" for a, b in g.edges)  # `from ..shapes`
    assert ("composer.__main__", "composer.cli") in g.edges
    assert ("composer.builder", "composer.layers") in g.edges  # `from .layers.core import ...` runs the package
    assert ("composer.ops.conv", "composer.ops") not in g.edges  # a sibling import: the package is running


def test_no_import_cycle():
    g = import_graph()
    cycles = sorted(" -> ".join(c + [c[0]]) for c in nx.simple_cycles(g))
    assert not cycles, "import cycles in composer/:\n" + "\n".join(cycles)


def test_nothing_imports_the_cli():
    g = import_graph()
    users = sorted(a for a, b in g.edges if b == "composer.cli" and a != "composer.__main__")
    assert not users, f"the CLI is the top of the package; imported by {users}"
    users = sorted(a for a, b in g.edges if b == "composer.commands" and a != "composer.cli")
    assert not users, f"the CLI's commands are imported by {users}"
