"""Fixtures for the snapshot tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402


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


@pytest.fixture
def snap_engine() -> Iterator[Any]:
    """An in-process engine that knows the snapshot targets."""
    from dmtools.engine import Engine

    eng = Engine()
    register_snapshot_targets(eng)
    try:
        yield eng
    finally:
        eng.close()
