"""Helpers for the snapshot tests."""

from __future__ import annotations

import time
from collections.abc import Callable

#: seconds: bound for every wait on an observable state, on a loaded 2-CPU machine.
WAIT = 30.0


def until(cond: Callable[[], bool], what: str) -> None:
    """Wait (bounded by ``WAIT``) for an observable state."""
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)
