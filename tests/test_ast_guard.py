"""The suite's guard around ``ast.parse`` (``tests/ast_guard.py``, CPython gh-106905): a parse that a
garbage collection interrupts with another parse fails on the affected interpreters, and does not
once guarded."""

from __future__ import annotations

import ast
import gc
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ast_guard import ast_parse_is_unsafe, guarded_parse

#: enough nodes that building the tree allocates past a collection threshold of 1 many times
SOURCE = "".join(f"def f{i}(a, b):\n    return [x * {i} for x in (a, b) if x]\n" for i in range(200))


def _raw_parse(source: str) -> ast.Module:
    """``ast.parse`` without the guard."""
    tree = compile(source, "<outer>", "exec", ast.PyCF_ONLY_AST)
    assert isinstance(tree, ast.Module)
    return tree


@pytest.fixture
def collections_that_parse() -> Iterator[list[str]]:
    """Collect at almost every allocation, and parse a small module (with ``ast.parse`` as it is
    now) at the start of each collection; yields the phases seen."""
    seen: list[str] = []
    busy = False

    def parse_during_collection(phase: str, info: dict[str, Any]) -> None:
        nonlocal busy
        if phase == "start" and not busy:
            busy = True
            try:
                seen.append(phase)
                ast.parse("x = (1, [2, {3: 4}])")
            finally:
                busy = False

    threshold = gc.get_threshold()
    gc.callbacks.append(parse_during_collection)
    gc.set_threshold(1)
    try:
        yield seen
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(parse_during_collection)


def test_the_guard_is_installed_exactly_where_the_bug_is() -> None:
    assert ast_parse_is_unsafe((3, 11, 7)) and ast_parse_is_unsafe((3, 12, 1))
    assert not ast_parse_is_unsafe((3, 11, 8)) and not ast_parse_is_unsafe((3, 12, 2))
    assert not ast_parse_is_unsafe((3, 13, 0))
    assert getattr(ast.parse, "gh106905_guard", False) == ast_parse_is_unsafe(tuple(sys.version_info[:3]))


def test_an_unguarded_parse_fails_when_a_collection_parses(collections_that_parse: list[str]) -> None:
    """The failure the guard is for, reproduced: it shows the next test's scenario reaches it."""
    if not ast_parse_is_unsafe(tuple(sys.version_info[:3])):
        pytest.skip(f"CPython {sys.version.split()[0]} has the fix for gh-106905")
    with pytest.raises(SystemError, match="AST constructor recursion depth mismatch"):
        _raw_parse(SOURCE)
    assert collections_that_parse, "no collection ran during the parse"


def test_a_guarded_parse_survives_collections_that_parse(collections_that_parse: list[str]) -> None:
    parse: Callable[..., Any] = guarded_parse(_raw_parse)
    tree = parse(SOURCE)
    assert [node.name for node in tree.body] == [f"f{i}" for i in range(200)]  # type: ignore[attr-defined]
    assert gc.isenabled()
    gc.disable()
    try:
        parse("y = 1")
        assert not gc.isenabled(), "the guard turned on a collector that was off"
    finally:
        gc.enable()
