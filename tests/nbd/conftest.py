"""Fixtures for the NBD tests: servers started by the tests themselves (nbdkit, qemu-nbd)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmtools.testing.nbdserver import NbdServer, missing_tools, nbdkit, qemu_nbd
from dmtools.testing.plugin import time_limit

#: No NBD test may run longer than this: a hang dumps every thread's stack and ends the run. The
#: kernel tier runs in an emulated VM on a shared machine, where one attach takes seconds.
TEST_LIMIT = 120
KERNEL_TEST_LIMIT = 900


@pytest.fixture(autouse=True)
def _bounded(request: pytest.FixtureRequest) -> Iterator[None]:
    """Bound every test in time, teardown included (a hung copy or server cannot stall the suite)."""
    limit = KERNEL_TEST_LIMIT if request.node.get_closest_marker("kernel") else TEST_LIMIT
    with time_limit(limit):
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
