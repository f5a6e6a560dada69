"""A guard around ``ast.parse`` for CPython gh-106905, installed for the whole suite by ``tests/conftest.py``.

CPython 3.11 before 3.11.8, and 3.12 before 3.12.2, keep the AST constructor's recursion depth in
state that every ``ast.parse`` shares. A garbage collection during a parse runs Python code
(finalizers, ``gc.callbacks``). Another parse can start there, on this thread or on another that
takes the GIL. The first parse then fails with ``SystemError: AST constructor recursion depth
mismatch`` for a tree it built correctly.

This suite parses from several threads:
- pytest rewrites the asserts of every module of the five packages as it is first imported (the
  distribution declares a ``pytest11`` plugin), and many are imported lazily, mid-test;
- on 3.11, formatting a traceback parses the failing line for its carets, and engine and merge
  threads log exceptions.

Seen here: a merge worker logged its injected error while the CLI imported ``kcopyd.progress``
(once in 13 runs of the unit tier of ``tests/snapshot``). On those interpreters the guard holds
garbage collection off for the parse, so no Python code runs inside it, and lets one thread parse
at a time. ``tests/test_ast_guard.py`` shows the failure and the guard.
"""

from __future__ import annotations

import ast
import functools
import gc
import sys
import threading
from collections.abc import Callable
from typing import Any


def ast_parse_is_unsafe(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> bool:
    """Whether ``version`` has gh-106905 (fixed in 3.11.8 and 3.12.2)."""
    return (3, 11) <= version < (3, 11, 8) or (3, 12) <= version < (3, 12, 2)


def guarded_parse(parse: Callable[..., Any]) -> Callable[..., Any]:
    """``parse`` run under one lock with garbage collection held off (restored as it was)."""
    lock = threading.RLock()

    @functools.wraps(parse)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        with lock:
            enabled = gc.isenabled()
            gc.disable()
            try:
                return parse(*args, **kwargs)
            finally:
                if enabled:
                    gc.enable()

    guarded.gh106905_guard = True  # type: ignore[attr-defined]
    return guarded


def install() -> None:
    """Guard ``ast.parse`` where the interpreter has the bug (once)."""
    if ast_parse_is_unsafe() and not getattr(ast.parse, "gh106905_guard", False):
        ast.parse = guarded_parse(ast.parse)
