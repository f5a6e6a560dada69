"""Removal waits out a passing opener and still refuses a real one (issue 15, the flaky kernel tier).

``SnapshotManager.remove`` failed once with ``DeviceBusy: snapshot is open`` because udev was
probing the snapshot right after the test read it. Every manager's ``remove`` and the backends'
``remove(retry=True)`` now wait, bounded, for the open count to fall:

* a process that opens the device and closes it 0.3 s later does not stop the removal;
* a process that keeps it open gets ``DeviceBusy`` after the bound, and nothing was removed.

On the userspace engine (root tier: its devices are real block devices through FUSE + loop) and
on the kernel (kernel tier, in the VM).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pytest_lazy_fixtures import lf

from dmtools import backend
from dmtools.errors import DeviceBusy
from dmtools.testing.leftovers import remove_devices
from dmtools.testing.loops import backing
from dmtools.testing.openers import Opener

SIZE = 1 << 20
#: the transient opener's hold, as long as a slow blkid probe
TRANSIENT = 0.3
#: the bound the managers wait for openers, shortened so a refusal comes quickly
BOUND = 1.5


@dataclass
class Stack:
    dm: Any
    backing: Callable[..., str]

    def path(self, name: str) -> str:
        return str(self.dm.device_path(name))

    def read(self, name: str) -> bytes:
        fd = os.open(self.path(name), os.O_RDONLY)
        try:
            return os.pread(fd, SIZE, 0)
        finally:
            os.close(fd)

    def names(self) -> set[str]:
        return {e.name for e in self.dm.list()}


@pytest.fixture
def engine_stack(make_image: Callable[..., Path]) -> Iterator[Stack]:
    """The exposed in-process engine over image files."""
    from dmtools.engine import Engine

    with Engine(expose=True) as eng:
        yield Stack(eng, backing(make_image))


@pytest.fixture
def kernel_stack(kernel_dm: Any, make_image: Callable[..., Path], make_loop: Callable[..., Any]) -> Iterator[Stack]:
    """The kernel over loop devices; what a failed test left is removed after it."""
    try:
        yield Stack(kernel_dm, backing(make_image, make_loop))
    finally:  # what a failed test left, stacked devices first
        remove_devices(kernel_dm, lambda name: "-dmtt" in name)


@pytest.fixture(params=[pytest.param(lf("engine_stack"), id="engine", marks=pytest.mark.root),
                        pytest.param(lf("kernel_stack"), id="kernel", marks=pytest.mark.kernel)])
def stack(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """The exposed in-process engine over image files, or the kernel over loop devices."""
    monkeypatch.setattr(backend, "REMOVE_WAIT", BOUND)
    chosen: Stack = request.param
    return chosen


def _snapshot(stack: Stack, dm_name: str) -> tuple[Any, str, str, dict[str, str]]:
    from snapshot import SnapshotManager

    origin = f"o{dm_name}"
    stack.dm.create(origin, f"0 {SIZE // 512} linear {stack.backing(SIZE, fill=b'O')} 0")
    mgr = SnapshotManager(stack.dm)
    snap = f"s{dm_name}"
    mgr.create(origin, stack.backing(SIZE, fill=b"\0"), snap, chunk_size=8)
    tables = {n: str(stack.dm.table(n)) for n in stack.names()}
    return mgr, origin, snap, tables


def _mirror(stack: Stack, dm_name: str) -> tuple[Any, str, str, dict[str, str]]:
    from mirror import MirrorManager

    mgr = MirrorManager(stack.dm)
    name = f"m{dm_name}"
    mgr.create(name, [stack.backing(SIZE, fill=b"M"), stack.backing(SIZE, fill=b"M")], nosync=True)
    tables = {n: str(stack.dm.table(n)) for n in stack.names()}
    return mgr, name, name, tables


def _plain(stack: Stack, dm_name: str) -> tuple[Any, str, str, dict[str, str]]:
    stack.dm.create(dm_name, f"0 {SIZE // 512} linear {stack.backing(SIZE, fill=b'P')} 0")
    tables = {n: str(stack.dm.table(n)) for n in stack.names()}

    class Retrying:
        def remove(self, name: str) -> None:
            stack.dm.remove(name, retry=True)

    return Retrying(), dm_name, dm_name, tables


BUILDERS = {"snapshot": _snapshot, "mirror": _mirror, "remove(retry=True)": _plain}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_a_passing_opener_is_waited_for(stack: Stack, dm_name: str, kind: str) -> None:
    mgr, origin, device, _ = BUILDERS[kind](stack, dm_name)
    opener = Opener(stack.path(device))
    closer = threading.Timer(TRANSIENT, opener.close)
    try:
        assert stack.dm.info(device).open_count >= 1  # open when the removal starts
        closer.start()  # and closed 0.3 s later, while the removal runs
        mgr.remove(device)
    finally:
        closer.cancel()
        closer.join()
        assert opener.close() == 0
    assert device not in stack.names()
    if kind == "snapshot":  # the plain origin came back, and nothing of the snapshot is left
        assert stack.names() == {origin}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_a_user_holding_it_open_is_refused_and_nothing_changes(stack: Stack, dm_name: str, kind: str) -> None:
    mgr, _, device, tables = BUILDERS[kind](stack, dm_name)
    before = stack.read(device)
    with Opener(stack.path(device)):
        start = time.monotonic()
        with pytest.raises(DeviceBusy):
            mgr.remove(device)
        took = time.monotonic() - start
        assert {n: str(stack.dm.table(n)) for n in stack.names()} == tables
        assert stack.dm.info(device).state == "ACTIVE"
    # waited the bound (the engine's own remove(retry=True) waits its 5 s), not forever
    assert BOUND - 0.1 <= took < 5.0 + 2.0
    assert stack.read(device) == before
    mgr.remove(device)  # free now
    assert device not in stack.names()
