"""Kernel tier (run in the VM: ``scripts/vmtest -k events``): events and policies on real
``snapshot``, ``mirror`` and ``error`` targets, with and without udevd's help."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from dmtools.blockdev import BlockDevice, aligned_buffer
from dmtools.errors import DMError
from dmtools.events import (DeviceRenamed, LegHealthChanged, PolicyAction, ResyncFinished, UEvent, UeventSource,
                            Watcher, sysfs_identity, udev_running)
from dmtools.monitor import Monitor, MonitorConfig, PolicySettings
from dmtools.status import parse_mirror_status

from mirror.manager import MirrorManager

from ev_engine import MiB, Stack

pytestmark = pytest.mark.kernel



@pytest.fixture
def stack(kernel_stack: Stack) -> Stack:
    return kernel_stack


def mirror_on_linears(stack: Stack) -> tuple[str, list[str]]:
    legs = [stack.linear(f"l{i}", 4 * MiB) for i in range(3)]
    refs = [stack.dm.device_ref(n) for n in legs]
    name = stack.name("m")
    stack.devices.append(name)
    MirrorManager(stack.dm).create(name, refs[:2], handle_errors=True, region_size=1024)
    MirrorManager(stack.dm).resync(name)
    return name, legs


def test_leg_failure_event_and_repair_onto_the_spare(stack: Stack) -> None:
    dm = stack.dm
    mirror, legs = mirror_on_linears(stack)
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


def test_without_udev_events_come_from_event_numbers(stack: Stack) -> None:
    dm = stack.dm
    name = stack.linear("r", MiB)
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


def _change_uevent(stack: Stack, suffix: str, source: str) -> UEvent:
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
        stack.linear(suffix, MiB)
        assert arrived.wait(20), [(e.action, e.name, e.origin) for e in seen]
    finally:
        listener.close()
    return [e for e in seen if e.action == "change" and e.name == target][0]


def test_raw_kernel_uevents_are_named_from_sysfs(stack: Stack) -> None:
    change = _change_uevent(stack, "u", "kernel")  # what a host without udevd receives
    info = stack.dm.info(stack.name("u"))
    assert (change.origin, change.source, change.devno) == ("sysfs", "uevent", info.devno)
    assert sysfs_identity(change.sys_name) == (stack.name("u"), info.uuid)


def test_udev_events_carry_dm_names(stack: Stack) -> None:
    if not udev_running():
        pytest.skip("udevd is not running in this VM (/run/udev/control absent or not listening); "
                    "plain scripts/vmtest starts it")
    change = _change_uevent(stack, "v", "udev")
    assert (change.origin, change.source) == ("udev", "udev")


def test_new_device_reported_through_uevents(stack: Stack) -> None:
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
    stack.linear("n", MiB)
    thread.join(timeout=30)
    watcher.close()
    assert got and got[0].kind == "device-added" and got[0].device == target
    assert got[0].source == ("udev" if udev_running() else "uevent")
    assert time.monotonic() - started < 15
