"""Fixtures for the mirror tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from typing import Any, Iterator  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def mengine() -> Iterator[Any]:
    """An in-process engine with the ``mirror`` target registered on it."""
    from dmtools.engine import Engine
    from mirror.target import MirrorTarget

    eng = Engine()
    eng.register_target(MirrorTarget)
    try:
        yield eng
    finally:
        eng.close()
