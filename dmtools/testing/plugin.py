"""pytest plugin for dmtools and its users: tiers, temporary images, loop devices, backends.

Tiers are markers. ``root`` tests need root, ``/dev/loop-control`` and ``/dev/fuse``; ``kernel``
tests need real device-mapper (``/dev/mapper/control``), which ``scripts/vmtest`` provides by booting
a kernel under QEMU. A test whose prerequisite is missing is skipped with the reason and the command
that runs its tier; with ``DMTOOLS_NO_SKIP=1`` (set by ``scripts/test`` in CI) it fails instead.

Every test device name carries the suffix ``-dmtt`` and every test image the prefix ``dmtt-``; a sweep
before and after the session removes leftovers carrying them (devices, and loop devices whose image
file is gone).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmtools.backends import kernel_available

TEST_SUFFIX = "-dmtt"
IMAGE_PREFIX = "dmtt-"


def _root_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (run the root tier as root: scripts/test)"
    for path in ("/dev/loop-control", "/dev/fuse"):
        if not os.path.exists(path):
            return f"needs {path} (run the root tier on a host with it: scripts/test)"
    return None


def _kernel_missing() -> str | None:
    if not kernel_available():
        return "needs kernel device-mapper (/dev/mapper/control); run this tier in the VM: scripts/vmtest"
    return None


_CHECKS: dict[str, Callable[[], str | None]] = {"root": _root_missing, "kernel": _kernel_missing}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "root: needs root, loop devices and /dev/fuse (run: scripts/test as root)")
    config.addinivalue_line("markers", "kernel: needs real kernel device-mapper (run: scripts/vmtest)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, check in _CHECKS.items():
        if item.get_closest_marker(marker) is None:
            continue
        reason = check()
        if reason:
            if os.environ.get("DMTOOLS_NO_SKIP") == "1":
                pytest.fail(f"tier {marker} cannot run here: {reason}", pytrace=False)
            pytest.skip(reason)


def _sweep_kernel() -> None:
    if not kernel_available():
        return
    from dmtools.kernel import KernelBackend
    from dmtools.testing.leftovers import remove_devices

    remove_devices(KernelBackend(), lambda name: name.endswith(TEST_SUFFIX), rounds=4)


def _sweep_loops() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        return
    from dmtools import loop

    for dev in loop.list_loops():
        backing = dev.backing_file or ""
        # Only leftovers: a test image whose file is gone. A live image may belong to another
        # pytest run on the same host; the fixtures detach their own devices at teardown.
        # The name is checked first: stat() of another engine's FUSE file can block while
        # that engine is stuck.
        if IMAGE_PREFIX not in os.path.basename(backing):
            continue
        if backing.endswith(" (deleted)") or not os.path.exists(backing):
            try:
                loop.detach(dev)
            except Exception:  # noqa: BLE001 - best-effort sweep of our own leftovers
                continue


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Bound a test in time: past ``seconds`` every thread's stack is dumped and the run ends.

    For suites whose failure mode is a hang (a copy waiting for I/O that never completes).
    """
    import faulthandler

    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session", autouse=True)
def _dmtools_sweep() -> Iterator[None]:
    """Remove leftover test devices and loop devices before and after the session."""
    _sweep_kernel()
    _sweep_loops()
    yield
    _sweep_kernel()
    _sweep_loops()


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_image(size_bytes, name=None, fill=None)`` makes a sparse image file."""
    counter = [0]

    def make(size: int, name: str | None = None, fill: bytes | None = None) -> Path:
        counter[0] += 1
        path = tmp_path / f"{IMAGE_PREFIX}{name or counter[0]}.img"
        with open(path, "wb") as f:
            if fill:
                reps = size // len(fill)
                f.write(fill * reps)
            f.truncate(size)
        return path

    return make


@pytest.fixture
def make_loop() -> Iterator[Callable[..., Any]]:
    """Factory: ``make_loop(path, **attach_kwargs)`` attaches a loop device, detached at teardown."""
    from dmtools.testing.loops import LoopTracker

    tracker = LoopTracker()
    try:
        yield tracker.attach
    finally:
        tracker.detach_all()


@pytest.fixture
def dm_name() -> str:
    """A unique device name carrying the test suffix."""
    return f"t{uuid.uuid4().hex[:10]}{TEST_SUFFIX}"


@pytest.fixture
def kernel_dm() -> Iterator[Any]:
    """The kernel backend (kernel tier only)."""
    reason = _kernel_missing()
    if reason:
        pytest.fail(f"kernel_dm used outside the kernel tier: {reason}", pytrace=False)
    from dmtools.kernel import KernelBackend

    with KernelBackend() as dm:
        yield dm


@pytest.fixture
def kernel_tag(kernel_dm: Any) -> Iterator[str]:
    """A unique name prefix for kernel devices; every device starting with it is removed afterwards,
    devices stacked on others first whatever their names."""
    from dmtools.testing.leftovers import remove_devices

    tag = f"k{uuid.uuid4().hex[:8]}"
    yield tag
    remove_devices(kernel_dm, lambda name: name.startswith(tag))


@pytest.fixture
def private_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A daemon of the test's own (root tier): its run directory is under ``tmp_path`` and
    ``DMTOOLS_RUN_DIR`` names it, so CLI commands the test runs reach it too; it is shut down,
    forced, at teardown, which returns once its process is gone
    (:func:`dmtools.testing.daemon.stop_daemon`). Yields its ``UserspaceClient``."""
    from dmtools.engine.client import open_userspace
    from dmtools.testing.daemon import stop_daemon

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    monkeypatch.setenv("DMTOOLS_RUN_DIR", str(run_dir))
    client = open_userspace(str(run_dir))
    try:
        yield client
    finally:
        stop_daemon(client)


@pytest.fixture
def engine() -> Iterator[Any]:
    """An in-process userspace engine, closed at teardown."""
    from dmtools.engine import Engine

    with Engine() as eng:
        yield eng


@pytest.fixture
def exposed_engine(tmp_path: Path) -> Iterator[Any]:
    """An in-process engine whose devices are block devices (FUSE + loop: root tier), its run
    directory ``tmp_path / "run"``; closed at teardown."""
    from dmtools.engine import Engine

    with Engine(expose=True, run_dir=str(tmp_path / "run")) as eng:
        yield eng
