"""Where a monitor learns that something may have changed.

- :class:`UeventSource`: uevents for ``dm-N`` block devices through pyudev's netlink monitor. With
  udevd running (``/run/udev/control`` exists) it listens to udevd's processed events, whose
  properties carry ``DM_NAME``/``DM_UUID`` (added by the dm udev rules, ``10-dm.rules``); without
  udevd it listens to the kernel's raw uevents (``add``/``change``/``remove`` from dm.c
  ``dm_kobject_uevent``, no names) and reads the names from sysfs (``/sys/block/dm-N/dm/name``,
  ``…/uuid``, drivers/md/dm-sysfs.c). Suspends raise no uevent; those are seen by scans.
- :class:`EventNumberWaiter`: one thread per device blocked in the backend's ``wait_event`` (the
  kernel's DM_DEV_WAIT semantics; the userspace engine's device events), reporting when a device's
  event number moves — what target events (snapshot invalidated, mirror leg failed, resync done)
  raise.

Both only *wake* the monitor; what changed is always read from the devices themselves.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from dmtools.backend import DeviceMapper
from dmtools.errors import DeviceNotFound, DMError
from dmtools.linux import SYS_BLOCK, sysfs_attr, udev_running

__all__ = ["UEvent", "UeventSource", "EventNumberWaiter", "sysfs_identity", "identity"]

log = logging.getLogger(__name__)


def sysfs_identity(sys_name: str, sys_root: str = SYS_BLOCK) -> tuple[str, str]:
    """``(name, uuid)`` of ``dm-N`` from ``/sys/block/dm-N/dm/{name,uuid}``; empty when gone."""
    if "/" in sys_name or not sys_name:
        return "", ""
    base = os.path.join(sys_root, sys_name, "dm")
    return sysfs_attr(os.path.join(base, "name")) or "", sysfs_attr(os.path.join(base, "uuid")) or ""


def identity(sys_name: str, properties: Mapping[str, str], sys_root: str = SYS_BLOCK) -> tuple[str, str, str]:
    """``(name, uuid, origin)`` of a dm device: udev's ``DM_NAME``/``DM_UUID`` when present
    (origin ``"udev"``), else sysfs (origin ``"sysfs"``), else empty (origin ``""``)."""
    name = properties.get("DM_NAME", "")
    if name:
        return name, properties.get("DM_UUID", ""), "udev"
    name, uuid = sysfs_identity(sys_name, sys_root)
    return (name, uuid, "sysfs") if name else ("", "", "")


@dataclass(frozen=True)
class UEvent:
    """A uevent for a dm device: action, ``dm-N``, ``major:minor`` and who named it."""

    action: str
    sys_name: str
    devno: str
    name: str
    uuid: str
    #: ``"udev"`` (names from udev properties) or ``"sysfs"`` or ``""`` (unknown, e.g. removed).
    origin: str
    #: ``"udev"`` (udevd's processed event) or ``"uevent"`` (the kernel's raw uevent).
    source: str


class UeventSource:
    """A thread reading dm uevents and passing each to ``callback``.

    ``source``: ``"udev"`` or ``"kernel"``; by default ``"udev"`` where udevd runs, else
    ``"kernel"``. Raises ``DMError`` when pyudev or libudev is not available.
    """

    def __init__(self, callback: Callable[[UEvent], None], *, source: str | None = None,
                 poll_timeout: float = 0.25) -> None:
        self.source = source or ("udev" if udev_running() else "kernel")
        if self.source not in ("udev", "kernel"):
            raise DMError(f"uevent source is udev or kernel, not {self.source!r}")
        self._callback = callback
        self._timeout = poll_timeout
        self._stop = threading.Event()
        try:
            import pyudev

            self._context = pyudev.Context()
            self._monitor = pyudev.Monitor.from_netlink(self._context, source=self.source)
            self._monitor.filter_by("block")
            self._monitor.start()
        except (ImportError, OSError, ValueError) as err:
            raise DMError(f"cannot listen to uevents: {err}") from err
        self._thread = threading.Thread(target=self._run, name="dmtools-uevents", daemon=True)
        self._thread.start()

    def _convert(self, device: Any) -> UEvent | None:
        sys_name = str(device.sys_name)
        if not sys_name.startswith("dm-"):
            return None
        props: dict[str, str] = {}
        for key in ("DM_NAME", "DM_UUID", "MAJOR", "MINOR"):
            value = device.properties.get(key)
            if value is not None:
                props[key] = str(value)
        name, uuid, origin = identity(sys_name, props)
        devno = f"{props['MAJOR']}:{props['MINOR']}" if "MAJOR" in props and "MINOR" in props else ""
        return UEvent(str(device.action or ""), sys_name, devno, name, uuid, origin,
                      "udev" if self.source == "udev" else "uevent")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                device = self._monitor.poll(timeout=self._timeout)
            except (OSError, ValueError) as err:  # the socket went away: stop listening
                log.warning("uevent monitor stopped: %s", err)
                return
            if device is None:
                continue
            event = self._convert(device)
            if event is not None:
                try:
                    self._callback(event)
                except Exception:  # noqa: BLE001 - a callback bug must not kill the listener
                    log.exception("uevent callback failed")

    def close(self) -> None:
        """Stop the thread (within ``poll_timeout``)."""
        self._stop.set()
        self._thread.join(timeout=5)


class EventNumberWaiter:
    """Threads blocked in ``dm.wait_event`` for watched devices.

    ``callback(name, event_nr)`` runs when a device's event number moves; ``event_nr`` is ``None``
    when the device went away. Each wait is cut into ``slice_s`` pieces so ``close`` is prompt.
    """

    def __init__(self, dm: DeviceMapper, callback: Callable[[str, int | None], None], *, slice_s: float = 0.5) -> None:
        self._dm = dm
        self._callback = callback
        self._slice = slice_s
        self._lock = threading.Lock()
        self._threads: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._closed = False

    def watch(self, name: str, event_nr: int) -> None:
        """Start waiting on ``name`` from ``event_nr`` (no-op when already watched)."""
        with self._lock:
            if self._closed:
                return
            current = self._threads.get(name)
            if current is not None and current[0].is_alive():
                return
            stop = threading.Event()
            thread = threading.Thread(target=self._run, args=(name, event_nr, stop),
                                      name=f"dmtools-wait-{name}", daemon=True)
            self._threads[name] = (thread, stop)
            thread.start()

    def unwatch(self, name: str) -> None:
        """Stop waiting on ``name``."""
        with self._lock:
            entry = self._threads.pop(name, None)
        if entry is not None:
            entry[1].set()

    def watched(self) -> set[str]:
        """Names currently waited on."""
        with self._lock:
            return {n for n, (t, _s) in self._threads.items() if t.is_alive()}

    def _run(self, name: str, event_nr: int, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                current = self._dm.wait_event(name, event_nr, timeout=self._slice)
            except DeviceNotFound:
                if not stop.is_set():
                    self._callback(name, None)
                return
            except DMError as err:
                log.debug("wait_event %s: %s", name, err)
                stop.wait(self._slice)
                continue
            if current != event_nr and not stop.is_set():
                event_nr = current
                self._callback(name, current)

    def close(self) -> None:
        """Stop every thread and wait for them (bounded by one slice)."""
        with self._lock:
            self._closed = True
            entries = list(self._threads.values())
            self._threads.clear()
        for _thread, stop in entries:
            stop.set()
        for thread, _stop in entries:
            thread.join(timeout=self._slice + 5)
