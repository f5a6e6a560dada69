"""Helpers for the snapshot tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: seconds: bound for every wait on an observable state, on a loaded 2-CPU machine.
WAIT = 30.0


def until(cond: Callable[[], bool], what: str) -> None:
    """Wait (bounded by ``WAIT``) for an observable state."""
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def register_snapshot_targets(engine: Any) -> None:
    """Make the engine load our targets even before the entry points are installed."""
    from snapshot.targets import TARGETS

    registry = getattr(engine, "_registry", None)
    if registry is None:
        return
    try:
        registry.get("snapshot")
    except Exception:  # noqa: BLE001 - entry points missing: register the classes directly
        registry._classes.update(TARGETS)
