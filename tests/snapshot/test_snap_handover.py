"""Exception handover (kernel.md §2.9): one test body on the userspace engine and on the kernel.

Each test runs on the in-process engine (unit tier), on the engine daemon (root tier: a private
daemon with FUSE exposure) and on the kernel's dm-snapshot (kernel tier,
``scripts/vmtest tests/snapshot -m kernel``): refusals, the handover on resume, EIO from the old
table, cancellation when the source goes first, ``SnapshotManager.refresh`` (also after growing the
COW) and LVM's snapshot -> snapshot-merge conversion done by hand.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_lazy_fixtures import lf

from dmtools.errors import DMError
from dmtools.testing.leftovers import remove_devices
from snapshot import SnapshotManager
from snapshot.targets import handover, origins

SIZE = 256 * 1024
CB = 4096  # chunk size 8 sectors
SECTORS = SIZE // 512
WAIT = 60.0  # seconds: bound for a merge on a loaded 2-CPU machine or in the VM


class Rig:
    """A backend, its device references for files, and direct I/O on its devices."""

    def __init__(self, kind: str, dm: Any, tmp: Path, make_loop: Callable[..., Any]) -> None:
        self.kind = kind
        self.dm = dm
        self.tmp = tmp
        self.make_loop = make_loop
        self.tag = f"h{uuid.uuid4().hex[:6]}"
        self.loops: dict[Path, Any] = {}

    def name(self, short: str) -> str:
        """A device name unique to this test."""
        return f"{self.tag}-{short}"

    def file(self, short: str, size: int, data: bytes | None = None) -> Path:
        path = self.tmp / f"dmtt-{self.tag}-{short}.img"
        with open(path, "wb") as f:
            if data:
                f.write(data)
            f.truncate(size)
        return path

    def ref(self, path: Path) -> str:
        """How a table names the file: the path (engine) or a loop device (kernel)."""
        if self.kind == "engine":
            return str(path)
        if path not in self.loops:
            self.loops[path] = self.make_loop(path)
        return str(self.loops[path].path)

    def grow(self, path: Path, size: int) -> None:
        """Grow a file (and its loop device's capacity)."""
        os.truncate(path, size)
        if path in self.loops:
            from dmtools import loop

            loop.set_capacity(self.loops[path].path)

    def read(self, name: str, offset: int = 0, length: int = SIZE) -> bytes:
        if self.kind == "engine":
            buf = bytearray(length)
            with self.dm.open_endpoint(name, writable=False) as ep:
                ep.readinto(buf, offset)
            return bytes(buf)
        from dmtools.blockdev import BlockDevice, aligned_buffer

        mbuf = aligned_buffer(length)
        with BlockDevice(self.dm.device_path(name), direct=True) as dev:
            dev.readinto(mbuf, offset)
        return bytes(mbuf)

    def write(self, name: str, data: bytes, offset: int) -> None:
        if self.kind == "engine":
            with self.dm.open_endpoint(name) as ep:
                ep.write(data, offset)
            return
        from dmtools.blockdev import BlockDevice, aligned_buffer

        mbuf = aligned_buffer(len(data))
        mbuf[:] = data
        with BlockDevice(self.dm.device_path(name), writable=True, direct=True) as dev:
            dev.write(mbuf, offset)
            dev.flush()

    def status(self, name: str, *, inactive: bool = False) -> str:
        lines = self.dm.status(name, inactive=inactive)
        return lines[0].params if lines else ""

    def table_params(self, name: str, *, inactive: bool = False) -> str:
        return self.dm.table(name, inactive=inactive).lines[0].target.params

    def refused(self, op: Callable[[], object], message: str) -> None:
        """``op`` fails; the engine says ``message``, the kernel logs it (when dmesg is readable)."""
        mark = _klog()
        with pytest.raises(DMError) as info:
            op()
        if self.kind == "engine":
            assert message in str(info.value)
        else:
            assert mark is not None, "dmesg is needed to check the kernel's message"
            after = _klog()
            assert after is not None and message in "\n".join(after[len(mark) :])

    def wait_merged(self, origin: str) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            used, meta = self.status(origin).split()
            if int(used.split("/")[0]) == int(meta):
                return
            assert time.monotonic() < deadline, f"merge still running: {self.status(origin)}"
            time.sleep(0.05)

    def cleanup(self) -> None:
        remove_devices(self.dm, lambda name: name.startswith(self.tag))


def _klog() -> list[str] | None:
    """The kernel log lines, or ``None`` when they cannot be read."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()


@pytest.fixture
def engine_rig(engine: Any, tmp_path: Path) -> Rig:
    """The plugin's in-process engine."""
    return Rig("engine", engine, tmp_path, lambda path: None)


@pytest.fixture
def daemon_rig(tmp_path: Path) -> Iterator[Rig]:
    """The engine daemon in a private run directory."""
    from dmtools.engine.client import open_userspace

    run_dir = tempfile.mkdtemp(prefix="dmtt-snap-")  # short: the socket path has a limit
    client = open_userspace(run_dir)
    try:
        yield Rig("engine", client, tmp_path, lambda path: None)
    finally:
        try:
            client.shutdown(force=True)
        finally:
            client.close()  # the daemon has exited: its FUSE directory is unmounted
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def kernel_rig(kernel_dm: Any, make_loop: Any, tmp_path: Path) -> Iterator[Rig]:
    """The kernel's snapshot targets over loop devices."""
    r = Rig("kernel", kernel_dm, tmp_path, make_loop)
    try:
        yield r
    finally:
        r.cleanup()


@pytest.fixture(
    params=[
        pytest.param(lf("engine_rig"), id="engine"),
        pytest.param(lf("daemon_rig"), id="daemon", marks=pytest.mark.root),
        pytest.param(lf("kernel_rig"), id="kernel", marks=pytest.mark.kernel),
    ]
)
def rig(request: pytest.FixtureRequest) -> Rig:
    """The snapshot stack's backend: in-process engine, engine daemon, or the kernel."""
    chosen: Rig = request.param
    return chosen


def _volume(rig: Rig, seed: int = 1) -> tuple[str, bytes]:
    data = random.Random(seed).randbytes(SIZE)
    vol = rig.name("vol")
    rig.dm.create(vol, f"0 {SECTORS} linear {rig.ref(rig.file('origin', SIZE, data))} 0")
    return vol, data


def _snapshot(rig: Rig, mgr: SnapshotManager, vol: str, short: str, cow_bytes: int = 128 * 1024) -> tuple[str, Path]:
    cow = rig.file(f"{short}-cow", cow_bytes)
    name = rig.name(short)
    mgr.create(vol, rig.ref(cow), name, chunk_size=CB // 512)
    return name, cow


def test_refresh_keeps_the_exceptions(rig: Rig) -> None:
    vol, data = _volume(rig)
    mgr = SnapshotManager(rig.dm)
    s, _ = _snapshot(rig, mgr, vol, "s")
    rig.write(vol, b"A" * CB, 0)
    rig.write(s, b"S" * CB, 5 * CB)
    view, status, table = rig.read(s), rig.status(s), rig.table_params(s)
    assert view == data[: 5 * CB] + b"S" * CB + data[6 * CB :]
    info = mgr.refresh(s)
    assert info.status.format() == status == rig.status(s)
    assert rig.table_params(s) == table
    assert rig.read(s) == view
    rig.write(vol, b"B" * CB, CB)  # the new table still copies on write
    assert rig.read(s) == view
    assert rig.read(vol, 0, 2 * CB) == b"A" * CB + b"B" * CB
    used = int(rig.status(s).split("/")[0])
    assert used == int(status.split("/")[0]) + CB // 512


def test_refresh_picks_up_a_grown_cow(rig: Rig) -> None:
    vol, data = _volume(rig, 2)
    mgr = SnapshotManager(rig.dm)
    s, cow = _snapshot(rig, mgr, vol, "s", 6 * CB)  # header + area + 4 data chunks
    for c in range(4):
        rig.write(vol, bytes([c + 1]) * CB, c * CB)
    assert rig.status(s) == f"{6 * CB // 512}/{6 * CB // 512} {2 * CB // 512}"  # full
    rig.grow(cow, 16 * CB)
    info = mgr.refresh(s)
    assert info.status.total == 16 * CB // 512
    rig.write(vol, b"\x05" * CB, 4 * CB)  # would invalidate the snapshot without the refresh
    assert rig.status(s) == f"{7 * CB // 512}/{16 * CB // 512} {2 * CB // 512}"
    assert rig.read(s) == data


def test_second_destination_is_refused(rig: Rig) -> None:
    vol, data = _volume(rig, 3)
    mgr = SnapshotManager(rig.dm)
    s, _ = _snapshot(rig, mgr, vol, "s")
    rig.write(vol, b"A" * CB, 0)
    table = rig.dm.table(s)
    rig.dm.load(s, table)  # the handover destination: no metadata read, chunk size 0
    assert rig.table_params(s, inactive=True).endswith(" P 0")
    assert rig.status(s, inactive=True) == f"0/{128 * 1024 // 512} 0"
    other = rig.name("s2")
    rig.refused(lambda: rig.dm.create(other, table), origins.PAIRING_FAILED)
    assert other not in [e.name for e in rig.dm.list()]
    rig.dm.clear(s)  # dropping the destination leaves the source as it was
    rig.write(vol, b"B" * CB, CB)
    assert rig.read(s) == data
    assert rig.status(s) == f"{4 * CB // 512}/{128 * 1024 // 512} {2 * CB // 512}"


def test_merge_conversion_by_hand(rig: Rig) -> None:
    """LVM's lvconvert --merge: snapshot-merge loaded on the origin, resumed once the snapshot is
    suspended; the old snapshot table returns EIO; a second merge is refused."""
    vol, data = _volume(rig, 4)
    mgr = SnapshotManager(rig.dm)
    s, _ = _snapshot(rig, mgr, vol, "s")
    rig.write(vol, b"A" * 2 * CB, 0)
    rig.write(s, b"S" * CB, 3 * CB)
    view = rig.read(s)
    t, t_cow = _snapshot(rig, mgr, vol, "t")
    before_merge = rig.read(vol)
    s_table = rig.dm.table(s).lines[0].target
    merge = f"0 {SECTORS} snapshot-merge {s_table.origin} {s_table.cow} P 8"
    rig.dm.load(vol, merge)
    # the source is still live: the origin cannot take the exceptions yet
    rig.refused(lambda: rig.dm.resume(vol), handover.SOURCE_ACTIVE)
    rig.dm.suspend(s)
    rig.refused(lambda: rig.dm.resume(s), handover.RESUME_SOURCE)
    rig.dm.resume(vol)  # handover, merge running
    rig.dm.resume(s)  # nothing pending any more: the old table goes live, invalid
    with pytest.raises((DMError, OSError)):
        rig.read(s, 0, CB)
    assert rig.status(s) == "Invalid"
    assert rig.table_params(s).endswith(" P 0")
    t_target = rig.dm.table(t).lines[0].target
    x = rig.name("x")
    rig.dm.create(x)
    try:
        rig.refused(lambda: rig.dm.load(x, f"0 {SECTORS} snapshot-merge {t_target.origin} {t_target.cow} P 8"),
                    "A snapshot is already merging.")
    finally:
        rig.dm.remove(x)
    rig.wait_merged(vol)
    assert rig.read(vol) == view
    assert rig.read(t) == before_merge  # the merge copied into the other snapshot first
    rig.dm.remove(s, retry=True)


def test_destroying_the_source_cancels(rig: Rig) -> None:
    vol, data = _volume(rig, 5)
    mgr = SnapshotManager(rig.dm)
    s, _ = _snapshot(rig, mgr, vol, "s")
    rig.write(vol, b"A" * CB, 0)
    s_table = rig.dm.table(s).lines[0].target
    rig.dm.load(vol, f"0 {SECTORS} snapshot-merge {s_table.origin} {s_table.cow} P 8")
    rig.dm.remove(s, retry=True)  # the source goes before the handover
    rig.dm.suspend(vol)
    rig.dm.resume(vol)
    assert rig.status(vol) == "Invalid"
    expect = b"A" * CB + data[CB:]
    assert rig.read(vol) == expect  # an invalid merging snapshot maps everything to the origin
    rig.write(vol, b"B" * CB, CB)
    assert rig.read(vol, 0, 2 * CB) == b"A" * CB + b"B" * CB


def test_refresh_while_the_origin_merges(rig: Rig) -> None:
    """A handover into another snapshot of a merging origin stops and restarts the merge."""
    vol, data = _volume(rig, 6)
    mgr = SnapshotManager(rig.dm)
    s, _ = _snapshot(rig, mgr, vol, "s")
    rig.write(vol, b"A" * 2 * CB, 0)
    t, _ = _snapshot(rig, mgr, vol, "t")
    rig.write(vol, b"B" * CB, 2 * CB)
    rig.write(t, b"T" * CB, 6 * CB)
    t_view = rig.read(t)
    assert t_view == b"A" * 2 * CB + data[2 * CB : 6 * CB] + b"T" * CB + data[7 * CB :]
    mgr.merge(s, wait=False)
    info = mgr.refresh(t)  # (the merge may be copying into t meanwhile: its usage moves)
    assert info.state == "active" and info.chunk_size == CB // 512
    # the same without suspending the merging origin: the handover itself stops the merge, holds
    # the origin's writes (the kernel's internal suspend) and restarts the merge
    rig.dm.load(t, rig.dm.table(t))
    rig.dm.resume(t)
    assert rig.table_params(t).endswith(f" P {CB // 512}")
    mgr.merge(s, timeout=WAIT)  # waits for the merge started above, then restores the origin
    assert rig.read(vol) == data
    assert rig.read(t) == t_view
    assert rig.dm.table(vol).lines[0].target.target_type == "snapshot-origin"
    assert [i.name for i in mgr.list()] == [t]
