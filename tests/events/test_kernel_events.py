"""Kernel tier (run in the VM: ``scripts/vmtest -k events``): events and policies on real
``snapshot``, ``mirror`` and ``error`` targets, with and without udevd's help."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmtools.blockdev import BlockDevice, aligned_buffer
from dmtools.errors import DMError
from dmtools.events import (DeviceRenamed, LegHealthChanged, PolicyAction, ResyncFinished, SnapshotInvalidated,
                            SnapshotUsageCrossed, UEvent, UeventSource, Watcher, sysfs_identity, udev_running)
from dmtools.monitor import Monitor, MonitorConfig, PolicySettings
from dmtools.status import parse_mirror_status

from mirror.manager import MirrorManager
from snapshot.manager import SnapshotManager

from ev_engine import Recorder, policies

pytestmark = pytest.mark.kernel

MiB = 1 << 20
WRITE = 16 << 10
WARN = (80, 85, 90, 95)


class Stack:
    """Devices made by a test, removed (topmost first) at the end whatever happened."""

    def __init__(self, dm: Any, base: str) -> None:
        self.dm = dm
        self.base = base[: -len("-dmtt")]
        self.snapshots: list[str] = []
        self.devices: list[str] = []

    def name(self, tag: str) -> str:
        return f"{self.base}{tag}-dmtt"

    def cleanup(self) -> None:
        sm = SnapshotManager(self.dm)
        for snap in reversed(self.snapshots):
            try:
                sm.remove(snap)
            except DMError:
                pass
        for name in reversed(self.devices):
            for n in (name, f"{name}-real"):
                try:
                    if self.dm.exists(n):
                        self.dm.remove(n, retry=True)
                except DMError:
                    pass


@pytest.fixture
def stack(kernel_dm: Any, dm_name: str, make_loop: Any, make_image: Any) -> Iterator[Stack]:
    # Depends on the loop fixtures so its devices go before the loop devices they sit on.
    s = Stack(kernel_dm, dm_name)
    try:
        yield s
    finally:
        s.cleanup()


def linear_on_loop(stack: Stack, tag: str, size: int, make_image: Callable[..., Path],
                   make_loop: Callable[..., Any]) -> str:
    loop = make_loop(make_image(size, name=tag))
    name = stack.name(tag)
    stack.dm.create(name, f"0 {size // 512} linear {loop.path} 0")
    stack.devices.append(name)
    return name


def snapshot_on_loop_cow(stack: Stack, make_image: Callable[..., Path], make_loop: Callable[..., Any],
                         cow_bytes: int) -> tuple[str, str, Path]:
    origin = linear_on_loop(stack, "o", 16 * MiB, make_image, make_loop)
    cow_file = make_image(cow_bytes, name="cow")
    cow_loop = make_loop(cow_file)
    snap = stack.name("s")
    SnapshotManager(stack.dm).create(origin, cow_loop.path, snap, chunk_size=8)
    stack.snapshots.append(snap)
    return origin, snap, cow_file


def write_through(dm: Any, name: str, monitor: Monitor, total: int) -> list[Any]:
    """O_DIRECT writes of 16 KiB to ``name`` (each reaches the snapshot before it returns), one
    monitor scan after each."""
    events: list[Any] = []
    buf = aligned_buffer(WRITE)
    with BlockDevice(dm.device_path(name), writable=True, direct=True) as dev:
        for off in range(0, total, WRITE):
            buf[:] = bytes([off // WRITE % 251 + 1]) * WRITE
            try:
                dev.write(buf, off)
            except DMError:
                pass  # an invalid snapshot fails nothing on the origin; keep going regardless
            events += monitor.step()
    return events


def test_snapshot_fill_warns_in_order_then_goes_invalid(stack: Stack, make_image: Callable[..., Path],
                                                        make_loop: Callable[..., Any]) -> None:
    origin, snap, _cow = snapshot_on_loop_cow(stack, make_image, make_loop, MiB)
    monitor = Monitor(stack.dm, MonitorConfig(PolicySettings(warn=WARN)), names=[snap],
                      event_numbers=False, uevents=False)
    monitor.step()
    events = write_through(stack.dm, origin, monitor, 2 * MiB)
    assert [e.threshold for e in events if isinstance(e, SnapshotUsageCrossed)] == list(WARN)
    invalid = [e for e in events if isinstance(e, SnapshotInvalidated)]
    assert len(invalid) == 1 and invalid[0].device == snap and "INVALID" in invalid[0].describe()
    assert stack.dm.status(snap)[0].params == "Invalid"


def test_autoextend_keeps_the_kernel_snapshot_valid(stack: Stack, make_image: Callable[..., Path],
                                                    make_loop: Callable[..., Any]) -> None:
    origin, snap, cow = snapshot_on_loop_cow(stack, make_image, make_loop, MiB)
    settings = PolicySettings(warn=WARN, autoextend_threshold=70, autoextend_percent=20)
    dm = Recorder(stack.dm)
    monitor = Monitor(dm, MonitorConfig(settings), names=[snap], event_numbers=False,
                      uevents=False, policy_loader=policies)
    monitor.step()
    events = write_through(stack.dm, origin, monitor, 3 * MiB)  # three times the original COW
    assert not [e for e in events if isinstance(e, SnapshotInvalidated)]
    extends = [e for e in events if isinstance(e, PolicyAction)]
    assert extends and all(e.ok and "handover" in e.detail for e in extends), [str(e) for e in extends]
    assert dm.handovers(origin, snap) == len(extends)  # each extension reloaded the snapshot table
    assert os.path.getsize(cow) > 3 * MiB
    used, total = (int(x) for x in stack.dm.status(snap)[0].params.split()[0].split("/"))
    assert total * 512 == os.path.getsize(cow) and used < total
    # the snapshot still shows the origin as it was: zeros
    buf = aligned_buffer(WRITE)
    with BlockDevice(stack.dm.device_path(snap), direct=True) as dev:
        dev.readinto(buf, 3 * MiB - WRITE)
    assert bytes(buf) == bytes(WRITE)


def mirror_on_linears(stack: Stack, make_image: Callable[..., Path],
                      make_loop: Callable[..., Any]) -> tuple[str, list[str]]:
    legs = [linear_on_loop(stack, f"l{i}", 4 * MiB, make_image, make_loop) for i in range(3)]
    refs = [stack.dm.device_ref(n) for n in legs]
    name = stack.name("m")
    stack.devices.append(name)
    MirrorManager(stack.dm).create(name, refs[:2], handle_errors=True, region_size=1024)
    MirrorManager(stack.dm).resync(name)
    return name, legs


def test_leg_failure_event_and_repair_onto_the_spare(stack: Stack, make_image: Callable[..., Path],
                                                     make_loop: Callable[..., Any]) -> None:
    dm = stack.dm
    mirror, legs = mirror_on_linears(stack, make_image, make_loop)
    refs = [dm.device_ref(n) for n in legs]
    settings = PolicySettings(mirror_policy="repair", spare=refs[2])
    monitor = Monitor(dm, MonitorConfig(settings), names=[mirror], poll_interval=30.0,
                      uevents=False, policy_loader=lambda name: MirrorManager)
    monitor.step()
    got: list[tuple[float, Any]] = []
    stop = threading.Event()

    def watch() -> None:
        for ev in monitor.events(timeout=60, stop=stop):
            got.append((time.monotonic(), ev))
            if isinstance(ev, ResyncFinished):
                stop.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    buf = aligned_buffer(65536)
    buf[:] = b"k" * 65536
    with BlockDevice(dm.device_path(mirror), writable=True, direct=True) as dev:
        dev.write(buf, 0)
    dm.load(legs[1], "0 8192 error")  # the leg's disk dies
    dm.resume(legs[1])
    started = time.monotonic()
    result: list[str] = []

    def write() -> None:
        try:
            with BlockDevice(dm.device_path(mirror), writable=True, direct=True) as dev:
                dev.write(buf, MiB)
            result.append("ok")
        except DMError as err:
            result.append(type(err).__name__)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    watcher.join(timeout=90)
    stop.set()
    writer.join(timeout=30)
    monitor.close()
    events = [e for _t, e in got]
    failed = [(t, e) for t, e in got if isinstance(e, LegHealthChanged) and e.failed]
    assert failed, [str(e) for e in events]
    assert failed[0][1].leg == 1 and failed[0][1].leg_device == refs[1]
    assert failed[0][0] - started < 10
    assert [(a.policy, a.ok) for a in events if isinstance(a, PolicyAction)] == [("mirror-repair", True)]
    assert isinstance(events[-1], ResyncFinished)
    status = parse_mirror_status(dm.status(mirror)[0].params)
    assert status.devices == (refs[0], refs[2]) and status.health == "AA" and status.in_sync_complete
    images = []
    for name in (legs[0], legs[2]):
        data = aligned_buffer(4 * MiB)
        with BlockDevice(dm.device_path(name), direct=True) as dev:
            dev.readinto(data, 0)
        images.append(bytes(data))
    assert images[0] == images[1] and images[0][:65536] == b"k" * 65536
    assert result and not writer.is_alive()



def first_event(watcher: Watcher) -> tuple[threading.Thread, list[Any]]:
    """A started thread collecting the first event ``watcher`` hands out (within 30 s)."""
    got: list[Any] = []
    stop = threading.Event()

    def run() -> None:
        for ev in watcher.events(timeout=30, stop=stop):
            got.append(ev)
            stop.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, got


def test_without_udev_events_come_from_event_numbers(stack: Stack, make_image: Callable[..., Path],
                                                     make_loop: Callable[..., Any]) -> None:
    dm = stack.dm
    name = linear_on_loop(stack, "r", MiB, make_image, make_loop)
    renamed = stack.name("r2")
    watcher = Watcher(dm, names=[name, renamed], poll_interval=30.0, uevents=False)
    watcher.poll()
    thread, got = first_event(watcher)
    time.sleep(0)  # let the waiter threads arm; the event number is compared, so no race
    dm.rename(name, renamed)  # dm_hash_rename raises a table event
    stack.devices[stack.devices.index(name)] = renamed
    thread.join(timeout=20)
    watcher.close()
    assert got and isinstance(got[0], DeviceRenamed), [str(e) for e in got]
    assert got[0].source == "event_nr" and got[0].old_name == name and got[0].device == renamed


def _change_uevent(stack: Stack, suffix: str, source: str, make_image: Callable[..., Path],
                   make_loop: Callable[..., Any]) -> UEvent:
    """The ``change`` uevent of a new linear device ``stack.name(suffix)``, heard from ``source``."""
    seen: list[UEvent] = []
    arrived = threading.Event()
    target = stack.name(suffix)

    def collect(ev: UEvent) -> None:
        seen.append(ev)
        if ev.action == "change" and ev.name == target:
            arrived.set()

    listener = UeventSource(collect, source=source)
    try:
        linear_on_loop(stack, suffix, MiB, make_image, make_loop)
        assert arrived.wait(20), [(e.action, e.name, e.origin) for e in seen]
    finally:
        listener.close()
    return [e for e in seen if e.action == "change" and e.name == target][0]


def test_raw_kernel_uevents_are_named_from_sysfs(stack: Stack, make_image: Callable[..., Path],
                                                 make_loop: Callable[..., Any]) -> None:
    change = _change_uevent(stack, "u", "kernel", make_image, make_loop)  # what a host without udevd receives
    info = stack.dm.info(stack.name("u"))
    assert (change.origin, change.source, change.devno) == ("sysfs", "uevent", info.devno)
    assert sysfs_identity(change.sys_name) == (stack.name("u"), info.uuid)


def test_udev_events_carry_dm_names(stack: Stack, make_image: Callable[..., Path],
                                    make_loop: Callable[..., Any]) -> None:
    if not udev_running():
        pytest.skip("udevd is not running in this VM (/run/udev/control absent or not listening); "
                    "plain scripts/vmtest starts it")
    change = _change_uevent(stack, "v", "udev", make_image, make_loop)
    assert (change.origin, change.source) == ("udev", "udev")


def test_new_device_reported_through_uevents(stack: Stack, make_image: Callable[..., Path],
                                             make_loop: Callable[..., Any]) -> None:
    """With udevd, through its events (``DM_NAME``); without, through the kernel's raw uevents."""
    dm = stack.dm
    target = stack.name("n")
    watcher = Watcher(dm, names=[target], poll_interval=30.0)  # polling alone would take 30 s
    watcher.poll()
    thread, got = first_event(watcher)
    deadline = time.monotonic() + 10
    while watcher.uevents_active is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the listener starts with events(); a device made before is still seen
    started = time.monotonic()
    linear_on_loop(stack, "n", MiB, make_image, make_loop)
    thread.join(timeout=30)
    watcher.close()
    assert got and got[0].kind == "device-added" and got[0].device == target
    assert got[0].source == ("udev" if udev_running() else "uevent")
    assert time.monotonic() - started < 15
