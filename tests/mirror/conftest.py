"""Fixtures for the mirror tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from typing import Any, Iterator  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def mengine() -> Iterator[Any]:
    """An in-process engine that can load the ``mirror`` target.

    Until the ``mirror`` entry point is installed, the class is registered on the engine directly.
    """
    from dmtools.engine import Engine
    from dmtools.errors import TargetNotSupported
    from mirror.target import MirrorTarget

    eng = Engine()
    try:
        eng._registry.get("mirror")
    except TargetNotSupported:
        eng._registry._classes["mirror"] = MirrorTarget
    try:
        yield eng
    finally:
        eng.close()
