"""Kernel tier (run in the VM: ``scripts/vmtest -k events``): events of real devices, with and
without udevd's help (the policies' scenarios on real ``snapshot``, ``mirror`` and ``error`` targets
are in test_policy_scenarios.py, on both backends)."""

from __future__ import annotations

import threading
import time

import pytest

from dmtools.events import DeviceRenamed, UEvent, UeventSource, Watcher, sysfs_identity, udev_running

from ev_engine import MiB, Stack, collect_events

pytestmark = pytest.mark.kernel


@pytest.fixture
def stack(kernel_stack: Stack) -> Stack:
    """The kernel's devices only, here."""
    return kernel_stack


def test_without_udev_events_come_from_event_numbers(stack: Stack) -> None:
    dm = stack.dm
    name = stack.linear("r", MiB)
    renamed = stack.name("r2")
    watcher = Watcher(dm, names=[name, renamed], poll_interval=30.0, uevents=False)
    watcher.poll()
    got, thread = collect_events(watcher, lambda e: True, 30)
    time.sleep(0)  # let the waiter threads arm; the event number is compared, so no race
    dm.rename(name, renamed)  # dm_hash_rename raises a table event
    stack.devices[stack.devices.index(name)] = renamed
    thread.join(timeout=20)
    watcher.close()
    first = got[0][1] if got else None
    assert isinstance(first, DeviceRenamed), first
    assert first.source == "event_nr" and first.old_name == name and first.device == renamed


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
    got, thread = collect_events(watcher, lambda e: True, 30)
    deadline = time.monotonic() + 10
    while watcher.uevents_active is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the listener starts with events(); a device made before is still seen
    started = time.monotonic()
    stack.linear("n", MiB)
    thread.join(timeout=30)
    watcher.close()
    first = got[0][1] if got else None
    assert first is not None and first.kind == "device-added" and first.device == target
    assert first.source == ("udev" if udev_running() else "uevent")
    assert time.monotonic() - started < 15
