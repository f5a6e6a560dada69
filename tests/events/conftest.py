"""Fixtures for the event and monitor tests."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ev_engine import Stack  # noqa: E402 - found through the path set above


@pytest.fixture
def engine_stack(engine: Any, dm_name: str, make_image: Callable[..., Path]) -> Stack:
    """A scenario's devices on the in-process engine, over image files (the engine fixture
    removes what is left)."""
    return Stack(engine, dm_name, make_image)


@pytest.fixture
def kernel_stack(kernel_dm: Any, dm_name: str, make_loop: Any, make_image: Any) -> Iterator[Stack]:
    """A scenario's devices on the kernel, over loop devices; it depends on the loop fixtures so
    its devices go before the loop devices they sit on."""
    s = Stack(kernel_dm, dm_name, make_image, make_loop)
    try:
        yield s
    finally:
        s.cleanup()
