"""Exclusive claims on block devices: a mounted device, one held ``O_EXCL`` by another process,
and one claimed by another engine are refused with ``DeviceBusy``, and nothing changes.

Each case runs on the userspace engine (root tier: real loop devices, a real ext4 mount) and on
the kernel's device-mapper (kernel tier, in the VM), which refuses them with EBUSY from
``dm_get_device`` → ``bdev_file_open_by_dev`` (``drivers/md/dm-table.c``). While a table holds a
device, mounting it or opening it ``O_EXCL`` fails in turn, on both. A ``SIGKILL``\\ ed daemon
leaves no claim behind.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_lazy_fixtures import lf

from dmtools import claims
from dmtools.backend import DeviceMapper
from dmtools.engine import Engine
from dmtools.engine.client import open_userspace
from dmtools.engine.expose import clear_stale
from dmtools.errors import DeviceBusy
from dmtools.testing.wait import wait_until

MiB = 1 << 20
SECTORS = 8 * MiB // 512

#: Holds its argument open with O_EXCL, says so, and waits for stdin to close.
EXCL_HOLDER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture(params=[pytest.param(lf("engine"), id="engine", marks=pytest.mark.root),
                        pytest.param(lf("kernel_dm"), id="kernel", marks=pytest.mark.kernel)])
def backend(request: pytest.FixtureRequest) -> DeviceMapper:
    """The backend under test: the in-process userspace engine, or the kernel."""
    dm: DeviceMapper = request.param
    return dm


@pytest.fixture
def lo(make_image: Callable[..., Path], make_loop: Callable[..., Any]) -> Any:
    return make_loop(make_image(16 * MiB))


@pytest.fixture
def mounted(lo: Any, tmp_path: Path) -> Iterator[str]:
    """``lo`` with an ext4 file system mounted; yields the mount point."""
    subprocess.run(["mkfs.ext4", "-q", "-F", lo.path], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", lo.path, str(mnt)], check=True)
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _refused(dm: DeviceMapper, name: str, ref: str, *, why: str | None = None) -> None:
    with pytest.raises(DeviceBusy) as exc:
        dm.create(name, f"0 {SECTORS} linear {ref} 0")
    assert exc.value.errno == errno.EBUSY
    if dm.backend == "kernel":
        assert "busy" in str(exc.value).lower()  # libdm: "reload ioctl ... Device or resource busy"
    elif why is not None:
        assert why in str(exc.value)
    assert not dm.exists(name)


def test_mounted_device_is_refused(backend: DeviceMapper, lo: Any, mounted: str, dm_name: str) -> None:
    _refused(backend, dm_name, lo.path, why=f"mounted on {mounted}")
    if backend.backend == "userspace":  # the file behind the mounted loop device, too
        _refused(backend, dm_name, lo.backing_file, why=f"in use through {lo.path}")
    assert os.path.ismount(mounted)


def test_device_held_o_excl_elsewhere_is_refused(backend: DeviceMapper, lo: Any, dm_name: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", EXCL_HOLDER, lo.path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
        _refused(backend, dm_name, lo.path, why="held open exclusively")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(10) == 0
    backend.create(dm_name, f"0 {SECTORS} linear {lo.path} 0")  # free once the holder is gone
    backend.remove(dm_name)


def test_device_claimed_by_another_engine_is_refused(backend: DeviceMapper, lo: Any, dm_name: str) -> None:
    other = Engine()
    try:
        other.create("holder", f"0 {SECTORS} linear {lo.path} 0")
        _refused(backend, dm_name, lo.path, why="held open exclusively")
        other.remove("holder")
        backend.create(dm_name, f"0 {SECTORS} linear {lo.path} 0")
        # ... and the other way round: the backend's table now holds it.
        with pytest.raises(DeviceBusy):
            other.create("holder", f"0 {SECTORS} linear {lo.path} 0")
        assert not other.exists("holder")
        backend.remove(dm_name)
    finally:
        other.close()


def test_claimed_device_cannot_be_mounted_or_opened_exclusively(backend: DeviceMapper, lo: Any, dm_name: str,
                                                                tmp_path: Path) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", lo.path], check=True)
    backend.create(dm_name, f"0 {SECTORS} linear {lo.path} 0")
    try:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        res = subprocess.run(["mount", lo.path, str(mnt)], capture_output=True, text=True)
        assert res.returncode != 0 and not os.path.ismount(mnt), res.stderr
        with pytest.raises(OSError) as exc:
            os.close(os.open(lo.path, os.O_RDONLY | os.O_EXCL))
        assert exc.value.errno == errno.EBUSY
        with pytest.raises(DeviceBusy):  # an offline tool's claim
            with claims.claim(lo.path):
                pass
    finally:
        backend.remove(dm_name)
    with claims.claim(lo.path):
        pass


@pytest.mark.root
def test_killed_daemon_leaves_no_claim(lo: Any, tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    client = open_userspace(run_dir)
    try:
        client.create("k-dmtt", f"0 {SECTORS} linear {lo.path} 0")
        pid = client.ping()["pid"]
        with pytest.raises(DeviceBusy):
            with claims.claim(lo.path):
                pass
    finally:
        client.close()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), "the daemon to die")
    try:
        with claims.claim(lo.path):
            pass
    finally:
        clear_stale(run_dir)


@pytest.mark.root
def test_engine_device_under_a_table_is_claimed_too(exposed_engine: Engine, make_image: Callable[..., Path],
                                                    tmp_path: Path) -> None:
    """A table over one of the engine's own devices holds that device's block device as the
    kernel's dm holds a dm device under another table: no mount, no O_EXCL opener, open count 1."""
    img = make_image(16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    exposed_engine.create("low-dmtt", f"0 {2 * SECTORS} linear {img} 0")
    low = exposed_engine.device_path("low-dmtt")
    exposed_engine.create("top-dmtt", f"0 {SECTORS} linear {low} 0")
    assert exposed_engine.info("low-dmtt").open_count == 1
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", low, str(mnt)], capture_output=True, text=True)
    assert res.returncode != 0 and not os.path.ismount(mnt), res.stderr
    with pytest.raises(DeviceBusy):
        with claims.claim(low):
            pass
    exposed_engine.remove("top-dmtt")
    assert exposed_engine.info("low-dmtt").open_count == 0
    with claims.claim(low):
        pass
    exposed_engine.remove("low-dmtt")


@pytest.mark.root
def test_claims_of_one_device_racing_in_one_holder_all_nest(make_image: Callable[..., Path],
                                                             make_loop: Callable[..., Any]) -> None:
    """A holder opens a device for its claim without its lock (the open may wait for a sync):
    claims of that device made meanwhile by other threads wait for that open and nest in it,
    instead of failing on its O_EXCL."""
    from dmtools.testing.threads import run_together

    lo = make_loop(make_image(MiB))
    holder = claims.Holder("race")
    taken: list[claims.Claim] = []
    for _ in range(20):
        run_together([lambda: taken.append(holder.claim(lo.path))] * 4)
        assert len(taken) == 4 and holder.holds(("blk", (lo.major, lo.minor)))
        with pytest.raises(DeviceBusy):
            with claims.claim(lo.path):
                pass
        for c in taken:
            c.release()
        taken.clear()
        assert not holder.holds(("blk", (lo.major, lo.minor)))
    with claims.claim(lo.path):
        pass


def test_managers_write_nothing_on_a_mounted_device(backend: DeviceMapper, lo: Any, mounted: str, dm_name: str,
                                                     make_image: Callable[..., Path],
                                                     make_loop: Callable[..., Any]) -> None:
    """``snapshot create`` zeroes the COW's header and ``thin pool create`` the start of the
    metadata device before a table claims them: a mounted COW or metadata device is refused
    with DeviceBusy before that write, so its file system keeps its superblock (the ext4 magic
    0xEF53 at byte 1080), and no device is left behind."""
    from dmtools.testing.blockio import read_uncached
    from snapshot import SnapshotManager
    from thin.manager import ThinPoolManager

    assert read_uncached(lo.path, 2, 1080) == b"\x53\xef"
    backend.create(dm_name, f"0 {SECTORS} linear {make_loop(make_image(16 * MiB)).path} 0")
    try:
        with pytest.raises(DeviceBusy, match=f"mounted on {mounted}"):
            SnapshotManager(backend).create(dm_name, lo.path, f"s{dm_name}")
        with pytest.raises(DeviceBusy, match=f"mounted on {mounted}"):
            ThinPoolManager(backend).create_pool(f"p{dm_name}", lo.path, make_loop(make_image(16 * MiB)).path)
        assert [e.name for e in backend.list() if dm_name in e.name] == [dm_name]
    finally:
        backend.remove(dm_name)
    assert read_uncached(lo.path, 2, 1080) == b"\x53\xef" and os.path.ismount(mounted)
