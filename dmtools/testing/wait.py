"""Waiting in tests for something another thread or process does: a condition polled until a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["wait_until"]


def wait_until(cond: Callable[[], object], what: str | Callable[[], str], timeout: float = 10.0,
               interval: float = 0.01) -> None:
    """Poll ``cond`` every ``interval`` seconds until it is true. Raises ``AssertionError`` naming
    ``what`` (a text, or a function giving one, called then) when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what() if callable(what) else what}")
        time.sleep(interval)
