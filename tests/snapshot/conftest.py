"""Fixtures for the snapshot tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from snap_helpers import register_snapshot_targets  # noqa: E402


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
