"""Fixtures for the NBD tests: servers started by the tests themselves (nbdkit, qemu-nbd)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmtools.testing.nbdserver import NbdServer, missing_tools, nbdkit, qemu_nbd
from dmtools.testing.plugin import time_limit

#: No NBD test may run longer than this: a hang dumps every thread's stack and ends the run.
TEST_LIMIT = 120


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    """Bound every test in time, teardown included (a hung copy or destroy cannot stall the suite)."""
    with time_limit(TEST_LIMIT):
        yield


def _need(*tools: str) -> None:
    reason = missing_tools(*tools)
    if reason:
        pytest.skip(reason)


@pytest.fixture
def start_nbdkit(tmp_path: Path) -> Iterator[Callable[..., NbdServer]]:
    """``start_nbdkit(plugin_args, filters=(), options=(), name=…)`` → a running nbdkit; stopped after."""
    _need("nbdkit")
    servers: list[NbdServer] = []
    counter = [0]

    def start(plugin_args: list[str], **kw: Any) -> NbdServer:
        counter[0] += 1
        kw.setdefault("name", f"nbdkit{counter[0]}")
        srv = nbdkit(tmp_path, plugin_args, **kw)
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def start_qemu_nbd(tmp_path: Path) -> Iterator[Callable[..., NbdServer]]:
    """``start_qemu_nbd(image, options=())`` → a running qemu-nbd; stopped after."""
    _need("qemu-nbd")
    servers: list[NbdServer] = []

    def start(image: Path, **kw: Any) -> NbdServer:
        srv = qemu_nbd(tmp_path, image, name=f"qemu{len(servers)}", **kw)
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        s.stop()
