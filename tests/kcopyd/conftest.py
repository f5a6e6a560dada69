"""Fixtures for the kcopyd tests: device factories over several endpoint kinds, a client."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kcopyd
from dmtools.endpoint import Endpoint
from dmtools.testing.faults import MemoryEndpoint
from dmtools.testing.plugin import time_limit
from kc_helpers import Dev, Recorder, make_writable

#: No kcopyd test may run longer than this: a hang dumps every thread's stack and ends the run.
TEST_LIMIT = 120


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    """Bound every test in time, teardown included (a hung copy or destroy cannot stall the suite)."""
    with time_limit(TEST_LIMIT):
        yield


@pytest.fixture
def make_dev(tmp_path: Path, make_loop: Callable[..., Any]) -> Iterator[Callable[..., Dev]]:
    """``make_dev(kind, size, data=None)``: kind is "file", "path", "memory" or "loop"."""
    from dmtools.blockdev import BlockDevice

    opened: list[Endpoint] = []
    counter = [0]

    def make(kind: str, size: int, data: bytes | None = None) -> Dev:
        counter[0] += 1
        if kind == "memory":
            ep = MemoryEndpoint(data if data is not None else size, name=f"mem{counter[0]}")
            if len(ep.data) < size:
                ep.data.extend(bytes(size - len(ep.data)))
            return Dev(ep, lambda: bytes(ep.data))
        path = tmp_path / f"dmtt-kc{counter[0]}.img"
        with open(path, "wb") as f:
            if data:
                f.write(data)
            f.truncate(size)

        def read_file(p: str = str(path)) -> bytes:
            with open(p, "rb") as f:
                return f.read()

        if kind == "path":
            return Dev(str(path), read_file, str(path))
        if kind == "file":
            ep = BlockDevice(path, writable=True)
            opened.append(ep)
            return Dev(ep, read_file, str(path))
        if kind == "loop":
            lo = make_loop(path)  # make_loop is set up first, so torn down after these endpoints
            make_writable(lo.path)

            def read_loop(p: str = lo.path) -> bytes:
                fd = os.open(p, os.O_RDONLY)
                try:
                    with os.fdopen(fd, "rb", closefd=False) as f:
                        return f.read()
                finally:
                    os.close(fd)

            return Dev(lo.path, read_loop, lo.path)
        raise ValueError(kind)

    yield make
    for ep in opened:
        ep.close()


@pytest.fixture
def make_ep(make_dev: Callable[..., Dev]) -> Iterator[Callable[..., Dev]]:
    """``make_ep(kind, size, data=None)``: like ``make_dev`` but ``dev`` is always an open Endpoint."""
    from dmtools.blockdev import BlockDevice

    opened: list[Endpoint] = []

    def make(kind: str, size: int, data: bytes | None = None) -> Dev:
        d = make_dev(kind, size, data)
        if isinstance(d.dev, Endpoint):
            return d
        ep = BlockDevice(d.dev, writable=True)
        opened.append(ep)
        return Dev(ep, d.read, d.path)

    yield make
    for ep in opened:
        ep.close()


@pytest.fixture
def kc() -> Iterator[kcopyd.Client]:
    """A small client: 64 pages, 16 KiB sub-jobs (so tests split jobs into many pieces)."""
    client = kcopyd.Client(num_pages=64, sub_job_size=16 * 1024, threads=4)
    try:
        yield client
    finally:
        client.destroy()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
