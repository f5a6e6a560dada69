"""Fixtures for the engine tests: ``dm`` runs a test on the userspace engine and on the kernel.

``dm`` is parametrized with lazy fixtures: ``engine`` (in-process ``Engine``) and ``daemon`` (the
same engine behind its control socket), unit tier, and ``kernel`` (the real device-mapper, kernel
tier, via the plugin's ``kernel_dm``). ``backing(size)`` gives a device
reference usable in that backend's tables (an image file for the engine, a loop device for the
kernel) and ``printed(ref)`` how that backend prints it in table and status text.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pytest_lazy_fixtures import lf

from dmtools._ffi import fastio
from dmtools.backend import DeviceMapper
from dmtools.blockdev import BlockDevice
from dmtools.endpoint import Endpoint
from dmtools.testing.daemon import serving_daemon
from dmtools.testing.loops import backing


@dataclass
class Harness:
    """A backend plus the helpers a parametrized test needs."""

    dm: DeviceMapper
    kind: str
    backing: Callable[..., str]

    def printed(self, ref: str) -> str:
        """How the backend prints ``ref`` in tables: ``major:minor`` for block devices."""
        st = os.stat(ref)
        if os.path.exists(ref) and not os.path.isfile(ref):
            return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        return os.path.abspath(ref)

    def open_direct(self, name: str) -> Endpoint:
        """An endpoint whose reads really reach the device (no page cache on the kernel)."""
        if self.kind == "kernel":
            return BlockDevice(self.dm.device_path(name), writable=True, direct=True)
        return self.dm.open_endpoint(name)


@pytest.fixture
def engine_harness(make_image: Callable[..., Any]) -> Iterator[Harness]:
    """The in-process ``Engine`` over image files."""
    from dmtools.engine import Engine

    with Engine() as eng:
        yield Harness(eng, "engine", backing(make_image))


@pytest.fixture
def daemon_harness(make_image: Callable[..., Any], tmp_path: Path) -> Iterator[Harness]:
    """The same engine behind the control socket (``UserspaceClient``, no exposure)."""
    from dmtools.engine.client import UserspaceClient

    with serving_daemon(str(tmp_path / "run")) as daemon:
        with UserspaceClient(daemon.run_dir) as client:
            yield Harness(client, "daemon", backing(make_image))


@pytest.fixture
def kernel_harness(kernel_dm: DeviceMapper, make_image: Callable[..., Any], make_loop: Callable[..., Any]) -> Harness:
    """The real device-mapper over loop devices."""
    return Harness(kernel_dm, "kernel", backing(make_image, make_loop))


@pytest.fixture(
    params=[
        pytest.param(lf("engine_harness"), id="engine"),
        pytest.param(lf("daemon_harness"), id="daemon"),
        pytest.param(lf("kernel_harness"), id="kernel", marks=pytest.mark.kernel),
    ]
)
def dm(request: pytest.FixtureRequest) -> Harness:
    """The backend under test, with a ``backing(size)`` factory for table device references.

    ``engine`` is the in-process engine, ``daemon`` the same engine behind the control socket,
    ``kernel`` the real device-mapper.
    """
    harness: Harness = request.param
    return harness


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Any]:
    """A ``Daemon`` without exposure serving ``tmp_path/run`` on a thread; stopped at teardown."""
    with serving_daemon(str(tmp_path / "run")) as d:
        yield d


# --- the exposure's C data path (dmtools/_ffi/fastio.c), driven without FUSE ---------------------
@pytest.fixture(scope="module")
def lib() -> fastio.FastIO:
    """fastio.c's library, built here (a C compiler is part of ``scripts/setup-env``)."""
    loaded = fastio.load()
    if loaded is None:
        pytest.skip(f"the C fast path cannot be built here: {fastio.unavailable()} "
                    "(scripts/setup-env installs gcc)")
    return loaded


@pytest.fixture
def ctx(lib: fastio.FastIO) -> Iterator[int]:
    handle = lib.ctx_new(0, 0, 0, 8192, 1 << 20)
    try:
        yield handle
    finally:
        lib.ctx_free(handle)
