"""The import graph of the packages: no circles, and ``dmtools`` never reaches up.

Every module of ``dmtools``, ``kcopyd``, ``snapshot``, ``mirror`` and ``thin`` is parsed with
:mod:`ast` (nothing is imported). An edge is any import a module can execute: at module level, in a
function (lazy), ``importlib.import_module("…")`` / ``__import__("…")`` with a literal name, and
``"module:attribute"`` specifications (how the CLI and ``dmtools/__init__`` name what they load
later). Imports under ``if TYPE_CHECKING:`` never run, so they take no part in circles; they still
count for the layering rule, since a type from an upper layer is an upward dependency too.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dmtools", "kcopyd", "snapshot", "mirror", "thin")
#: What ``dmtools`` may not import: the layers above it reach it through entry points.
UPPER = ("kcopyd", "snapshot", "mirror", "thin")
_SPEC = re.compile(r"^([A-Za-z_][\w.]*):[A-Za-z_]\w*$")


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``line``; ``typing_only`` under ``if TYPE_CHECKING:``."""

    source: str
    target: str
    line: int
    typing_only: bool


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name → file, for every module of :data:`PACKAGES`."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _docstrings(tree: ast.Module) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int, bool]]:
    """``(imported name, line, typing_only)`` for every import ``name`` (at ``path``) can run."""
    tree = ast.parse(path.read_text(), str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    docs = _docstrings(tree)

    def visit(node: ast.AST, typing_only: bool) -> Iterator[tuple[str, int, bool]]:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.body:
                yield from visit(child, True)
            for child in node.orelse:
                yield from visit(child, typing_only)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, typing_only
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in known else base), node.lineno, typing_only
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0] if node.args else None
            if called in ("import_module", "__import__") and isinstance(first, ast.Constant):
                if isinstance(first.value, str):
                    yield first.value, node.lineno, typing_only
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            spec = _SPEC.match(node.value)
            if spec and spec.group(1) in known:  # "module:attribute", the module named exactly
                yield spec.group(1), node.lineno, typing_only
        for child in ast.iter_child_nodes(node):
            yield from visit(child, typing_only)

    yield from visit(tree, False)


def graph(root: Path = ROOT) -> list[Edge]:
    """Every edge between two modules of :data:`PACKAGES` (to the most specific module named)."""
    known = modules(root)
    edges: list[Edge] = []
    for name, path in known.items():
        for target, line, typing_only in imports(name, path, known):
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.append(Edge(name, target, line, typing_only))
    return edges


def circles(edges: list[Edge]) -> list[list[Edge]]:
    """The strongly connected groups of the runtime graph, each as the edges inside it."""
    out: dict[str, dict[str, Edge]] = {}
    for edge in edges:
        if not edge.typing_only:
            out.setdefault(edge.source, {}).setdefault(edge.target, edge)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[Edge]] = []

    def connect(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in out.get(node, {}):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append([e for src in sorted(group) for e in out.get(src, {}).values() if e.target in group])

    for node in sorted(out):
        if node not in index:
            connect(node)
    return groups


def _describe(edge: Edge) -> str:
    kind = " (typing only)" if edge.typing_only else ""
    return f"{edge.source} -> {edge.target} (line {edge.line}){kind}"


def test_the_parser_sees_every_kind_of_import(tmp_path: Path) -> None:
    """Module-level, relative, lazy, import_module, spec-string and TYPE_CHECKING imports are edges."""
    pkg = tmp_path / "dmtools"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""dmtools:docstring"""\n_LAZY = {"E": "dmtools.sub.b:E"}\n')
    (pkg / "sub" / "__init__.py").write_text("from . import a\n")
    (pkg / "sub" / "a.py").write_text(
        "from typing import TYPE_CHECKING\nimport dmtools.sub.b\nif TYPE_CHECKING:\n    import mirror\n"
        "def f():\n    from .b import E\n    import importlib\n    importlib.import_module('kcopyd.x')\n"
    )
    (pkg / "sub" / "b.py").write_text("def g():\n    from dmtools import sub\nE = 1\n")
    for upper in ("kcopyd", "snapshot", "mirror", "thin"):
        (tmp_path / upper).mkdir()
        (tmp_path / upper / "__init__.py").write_text("")
    (tmp_path / "kcopyd" / "x.py").write_text("")
    edges = {(e.source, e.target, e.typing_only) for e in graph(tmp_path)}
    assert edges == {
        ("dmtools", "dmtools.sub.b", False),
        ("dmtools.sub", "dmtools.sub.a", False),
        ("dmtools.sub.a", "dmtools.sub.b", False),
        ("dmtools.sub.a", "mirror", True),
        ("dmtools.sub.a", "kcopyd.x", False),
        ("dmtools.sub.b", "dmtools.sub", False),
    }
    (group,) = circles(graph(tmp_path))
    assert {e.source for e in group} == {"dmtools.sub", "dmtools.sub.a", "dmtools.sub.b"}


def test_no_import_circles() -> None:
    """No module can reach itself through the imports it runs (lazy ones included)."""
    found = circles(graph())
    listing = "\n\n".join("\n".join(_describe(e) for e in group) for group in found)
    assert not found, f"import circles:\n{listing}"


@pytest.mark.parametrize("upper", UPPER)
def test_dmtools_never_imports_an_upper_layer(upper: str) -> None:
    """``dmtools`` reaches ``kcopyd``, ``snapshot``, ``mirror`` and ``thin`` only via entry points."""
    bad = [_describe(e) for e in graph() if e.source.split(".")[0] == "dmtools" and e.target.split(".")[0] == upper]
    assert not bad, f"dmtools imports {upper}:\n" + "\n".join(bad)
