"""The embedded userspace device-mapper: dmsetup's verbs with the kernel's semantics, in-process.

``Engine`` keeps devices (name, uuid, live and inactive tables, suspend state, open counts, event
numbers) and dispatches their I/O to targets written in Python. Target types are found by name in
the ``dmtools.targets`` entry points (``dm_get_target_type`` loading ``dm-<name>`` in
``drivers/md/dm-target.c``). With ``expose=True`` every device is also served through FUSE and a
loop device (see ``dmtools.engine.expose``).
"""

from __future__ import annotations

import errno
import importlib
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from dmtools.backend import DeviceEntry, DeviceInfo, DeviceMapper, StatusLine, Versions
from dmtools.claims import Holder
from dmtools.engine.device import Device, LoadedTable, TableContext
from dmtools.engine.target_driver import DeviceHandle, TargetDriver
from dmtools.errors import (DeviceBusy, DeviceExists, DeviceNotFound, DMError, InvalidArgument, InvalidTable,
                            TargetNotSupported, quietly)
from dmtools.names import validate_name, validate_uuid
from dmtools.plugins import entry_points
from dmtools.table import Table
from dmtools.target_values import split_args

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.endpoint import Endpoint
    from dmtools.engine.expose import Exposure

#: Device numbers of devices that are not exposed: block major 0 is never a real block device, so
#: ``0:N`` cannot be mistaken for a device outside the engine.
PSEUDO_MAJOR = 0

#: Built-in target classes, used when the distribution's entry points are not installed.
_BUILTIN_TARGETS = {
    "linear": "dmtools.engine.basic_targets:LinearTarget",
    "striped": "dmtools.engine.basic_targets:StripedTarget",
    "zero": "dmtools.engine.basic_targets:ZeroTarget",
    "error": "dmtools.engine.basic_targets:ErrorTarget",
}

#: How long ``remove`` waits out openers of an exposed device that are outside the engine.
EXTERNAL_OPEN_GRACE = 0.5

#: How long removing an exposed device waits for outside openers of its loop device to close it
#: (it is detached at their last close anyway; ``close`` does not wait at all).
DETACH_WAIT = 5.0

#: The dm-ioctl interface version whose semantics the engine follows (``include/uapi/linux/dm-ioctl.h``).
DRIVER_VERSION = "4.50.0"

_T = TypeVar("_T")


def _load_spec(spec: str) -> type[TargetDriver]:
    module, _, attr = spec.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, TargetDriver)):
        raise TypeError(f"{spec} is not a dmtools.engine.target_driver.TargetDriver")
    return cls


class TargetRegistry:
    """Target types by name: the ``dmtools.targets`` entry points, loaded on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._classes: dict[str, type[TargetDriver]] = {}
        self._extra: dict[str, type[TargetDriver]] = {}

    def _specs(self) -> dict[str, str]:
        specs = dict(_BUILTIN_TARGETS)
        for ep in entry_points("dmtools.targets"):
            specs[ep.name] = ep.value
        return specs

    def get(self, name: str) -> type[TargetDriver]:
        """The class for target type ``name``; raises ``TargetNotSupported``."""
        with self._lock:
            cls = self._classes.get(name)
            if cls is not None:
                return cls
            spec = self._specs().get(name)
            if spec is None:
                raise TargetNotSupported(f"unknown target type {name!r}", operation="load")
            try:
                cls = _load_spec(spec)
            except (ImportError, AttributeError, TypeError) as err:
                raise TargetNotSupported(f"target type {name!r} cannot be loaded from {spec}: {err}",
                                         operation="load") from err
            self._classes[name] = cls
            return cls

    def register(self, cls: type[TargetDriver], name: str | None = None) -> None:
        """Add (or replace) a target type without an entry point."""
        if not (isinstance(cls, type) and issubclass(cls, TargetDriver)):
            raise TypeError(f"{cls!r} is not a dmtools.engine.target_driver.TargetDriver")
        with self._lock:
            self._extra[name or cls.name] = cls
            self._classes[name or cls.name] = cls

    def versions(self) -> dict[str, tuple[int, int, int]]:
        """Every loadable target type and its version."""
        out: dict[str, tuple[int, int, int]] = {}
        for name in sorted(set(self._specs()) | set(self._extra)):
            try:
                out[name] = tuple(self.get(name).version)  # type: ignore[assignment]
            except TargetNotSupported:
                continue
        return out


class Engine(DeviceMapper):
    """The userspace device-mapper, in-process.

    ``Engine()`` keeps devices in memory only; ``Engine(expose=True)`` also serves each device as a
    block device (FUSE + loop, needs root and ``/dev/fuse``) with ``<run_dir>/mapper/NAME`` links.
    Thread-safe: verbs on one device are serialised, I/O runs concurrently.
    """

    backend = "userspace"

    def __init__(self, *, expose: bool = False, run_dir: str | None = None) -> None:
        self._lock = threading.RLock()
        self._devices: dict[str, Device] = {}
        self._by_devno: dict[tuple[int, int], Device] = {}
        self._next_minor = 0
        self._registry = TargetRegistry()
        self._target_state: dict[str, Any] = {}
        #: one claim holder for every table of this engine, as the kernel's ``_dm_claim_ptr``.
        self.claims = Holder(f"dmtools engine {id(self):#x} (pid {os.getpid()})")
        self._closed = False
        self._exposure: "Exposure | None" = None
        if expose:
            from dmtools.engine.expose import Exposure

            self._exposure = Exposure(self, run_dir)

    # --- lookups ----------------------------------------------------------------------------
    def _get(self, name: str, operation: str) -> Device:
        with self._lock:
            dev = self._devices.get(name)
        if dev is None or dev.minor < 0:  # a create still numbering it holds the name only
            raise DeviceNotFound("no such device", operation=operation, device=name)
        return dev

    def device_by_devno(self, major: int, minor: int) -> Device | None:
        """The engine device with this device number, if any."""
        with self._lock:
            return self._by_devno.get((major, minor))

    def register_target(self, cls: type[TargetDriver], name: str | None = None) -> None:
        """Make target type ``name`` (default ``cls.name``) available to this engine's tables."""
        self._registry.register(cls, name)

    def target_state(self, key: str, factory: Callable[[], _T]) -> _T:
        """This engine's state shared by the targets of one module, made by ``factory`` on first
        use: what a kernel module keeps in globals (dm-snap.c's origin hash), one per engine."""
        with self._lock:
            if key not in self._target_state:
                self._target_state[key] = factory()
            state: _T = self._target_state[key]
            return state

    @property
    def exposure(self) -> "Exposure | None":
        """The FUSE/loop exposure manager, when enabled."""
        return self._exposure

    # --- tables -----------------------------------------------------------------------------
    def open_reference(self, ref: str, *, writable: bool, for_device: Device) -> DeviceHandle:
        """Open a table's device reference (``dm_get_device``); refuses cycles."""
        from dmtools.engine.resolve import resolve

        handle = resolve(self, ref, writable=writable)
        target_dev = handle.inner.device
        if isinstance(target_dev, Device) and self._reaches(target_dev, for_device):
            handle.inner.close()
            raise InvalidTable(f"{ref}: table would make {for_device.name} depend on itself",
                               operation="load", device=for_device.name)
        return handle

    def _reaches(self, start: Device, goal: Device) -> bool:
        stack, seen = [start], set()
        while stack:
            dev = stack.pop()
            if dev is goal:
                return True
            if id(dev) in seen:
                continue
            seen.add(id(dev))
            for table in (dev.live, dev.inactive):
                if table is not None:
                    stack.extend(table.engine_devices())
        return False

    def _lines(self, table: "Table | str") -> Table:
        """The typed table to load: text is parsed once, by :meth:`Table.parse`."""
        if isinstance(table, str):
            return Table.parse(table)
        if not isinstance(table, Table):
            raise InvalidTable(f"not a table: {type(table).__name__}", operation="load")
        return table

    def _build(self, dev: Device, table: "Table | str", readonly: bool) -> LoadedTable:
        """Construct a table; all-or-nothing (a failure closes everything it opened)."""
        try:
            lines = self._lines(table)
        except InvalidTable as err:
            raise InvalidTable(err.message, operation="load", device=dev.name) from err
        if not lines:
            raise InvalidTable("no targets specified", operation="load", device=dev.name)
        ctx = TableContext(self, dev, readonly)
        targets: list[TargetDriver] = []
        try:
            for ln in lines:
                cls = self._registry.get(ln.target_type)
                try:
                    tgt = cls.build(ctx, ln.start, ln.length, ln.target)
                except DMError:
                    raise
                except (ValueError, OSError) as err:
                    raise InvalidTable(f"{ln.target_type}: {err}", operation="load", device=dev.name) from err
                targets.append(tgt)
        except BaseException:
            quietly(*(t.destroy for t in targets), errors=Exception)  # unwinding a failed load
            ctx.close_all()
            raise
        return LoadedTable(lines, targets, ctx, readonly)

    # --- verbs ------------------------------------------------------------------------------
    def create(self, name: str, table: "Table | str | None" = None, *, uuid: str = "",
               readonly: bool = False) -> DeviceInfo:
        """Create a device, empty or with a live table (load + resume); all-or-nothing.

        Raises ``InvalidName``, ``DeviceExists`` (name or uuid taken), ``InvalidTable`` /
        ``TargetNotSupported`` (bad table: nothing is left behind) or ``DMError`` (exposure failed).
        Until its exposure gave it a device number the device holds its name but is not found
        (as in the kernel, where a device is numbered before it is hashed).
        """
        validate_name(name)
        validate_uuid(uuid)
        with self._lock:
            self._check_open()
            if name in self._devices:
                raise DeviceExists("device already exists", operation="create", device=name)
            if uuid and any(d.uuid == uuid for d in self._devices.values()):
                raise DeviceExists(f"uuid {uuid!r} is already in use", operation="create", device=name)
            dev = Device(name, uuid, PSEUDO_MAJOR, -1)
            self._devices[name] = dev
        try:
            if self._exposure is not None:
                major, minor = self._exposure.add(dev)
            else:
                with self._lock:
                    major, minor = PSEUDO_MAJOR, self._next_minor
                    self._next_minor += 1
            with self._lock:
                dev.major, dev.minor = major, minor
                self._by_devno[dev.devno] = dev
            dev.on_last_close = self._deferred_remove
            if table is not None:
                self.load(name, table, readonly=readonly)
                self.resume(name)
        except BaseException:
            self._drop(dev)
            raise
        return self.info(name)

    def load(self, name: str, table: "Table | str", *, readonly: bool = False) -> None:
        """Load ``table`` into the inactive slot (replacing an inactive table already there).

        All-or-nothing: a bad table raises ``InvalidTable`` (``TargetNotSupported`` for an unknown
        type) and leaves the device as it was. Raises ``DeviceNotFound`` for a missing device.
        """
        dev = self._get(name, "load")
        with dev.op_lock:
            self._alive(dev, "load")
            new = self._build(dev, table, readonly)
            old, dev.inactive = dev.inactive, new
        if old is not None:
            old.destroy()

    def clear(self, name: str) -> None:
        """Drop the inactive table."""
        dev = self._get(name, "clear")
        with dev.op_lock:
            self._alive(dev, "clear")
            old, dev.inactive = dev.inactive, None
        if old is not None:
            old.destroy()

    def suspend(self, name: str, *, noflush: bool = False) -> None:
        """Suspend: presuspend, hold new I/O, wait for in-flight I/O, flush unless ``noflush``, postsuspend.

        Suspending a suspended device does nothing. Raises ``DeviceNotFound``; a target hook that
        raises undoes the suspend (``presuspend_undo``) and the error propagates.
        """
        dev = self._get(name, "suspend")
        with dev.op_lock:
            self._alive(dev, "suspend")
            self._suspend(dev, noflush)

    def _suspend(self, dev: Device, noflush: bool) -> None:
        if dev.suspended:
            return
        live = dev.live
        dev.noflush_suspending = noflush
        try:
            if live is not None:
                for tgt in live.targets:
                    tgt.presuspend()
            dev.block_io()
            if live is not None:
                if not noflush:
                    for tgt in live.targets:
                        tgt.flush()
                for tgt in live.targets:
                    tgt.postsuspend()
        except BaseException:
            if live is not None:
                quietly(*(t.presuspend_undo for t in live.targets), errors=Exception)  # undoing a failed suspend
            dev.unblock_io()
            raise
        finally:
            dev.noflush_suspending = False

    def resume(self, name: str) -> None:
        """Resume, swapping in the inactive table first if one is loaded (``do_resume``).

        Raises ``InvalidTable`` when the new table's device areas do not fit their devices (the
        new table is dropped, the device stays suspended on its old table, as in the kernel),
        ``InvalidArgument`` when there is no table to resume, or a target's ``preresume`` error
        (the device then stays suspended with the new table).
        """
        dev = self._get(name, "resume")
        with dev.op_lock:
            self._alive(dev, "resume")
            old: LoadedTable | None = None
            if dev.inactive is not None:
                self._suspend(dev, False)
                problems = [p for t in dev.inactive.targets for p in t.area_errors()]
                if problems:
                    # dm_swap_table fails: the new table is dropped, the device stays suspended.
                    bad, dev.inactive = dev.inactive, None
                    bad.destroy()
                    raise InvalidTable("; ".join(problems), operation="resume", device=name)
                old, dev.live, dev.inactive = dev.live, dev.inactive, None
            elif not dev.suspended:
                return
            try:
                live = dev.live
                if live is None:
                    raise InvalidArgument("no table to resume", errno=errno.EINVAL, operation="resume", device=name)
                for tgt in live.targets:
                    tgt.preresume()
                dev.unblock_io()
                for tgt in live.targets:
                    tgt.resume()
            finally:
                # do_resume destroys the old table after dm_resume, whether it succeeded or not:
                # a new snapshot table takes over its exceptions before the old one goes.
                if old is not None:
                    old.destroy()
        # The loop device learns the new size and read-only flag once I/O flows again and without
        # the device's lock (``Exposure.resized``: an open of it waits for writes to it).
        if self._exposure is not None:
            self._exposure.resized(dev)

    def remove(self, name: str, *, retry: bool = False, deferred: bool = False) -> None:
        """Remove a device.

        Raises ``DeviceBusy`` while it is open (``retry`` keeps trying for 5 s; ``deferred`` marks
        it to go when the last opener closes) and ``DeviceNotFound`` when it does not exist.
        """
        start = time.monotonic()
        while True:
            dev = self._get(name, "remove")
            outside = self._outside_opens(dev)
            with dev.op_lock:
                self._alive(dev, "remove")
                count = dev.opens + outside
                if count == 0:
                    self._drop(dev)
                    return
                if deferred:
                    dev.deferred_remove = True
                    return
            # Openers of the exposed loop device outside the engine may be passing probes (udev,
            # blkid, a loop attach trying this device number): give them a moment.
            waited = time.monotonic() - start
            limit = 5.0 if retry else (EXTERNAL_OPEN_GRACE if dev.opens == 0 else 0.0)
            if waited >= limit:
                raise DeviceBusy(f"device is open ({count} openers)", operation="remove", device=name)
            time.sleep(0.02 if waited < 0.2 else 0.1)

    def _deferred_remove(self, dev: Device) -> None:
        if dev.removed or not dev.deferred_remove:
            return
        outside = self._outside_opens(dev)
        with dev.op_lock:
            if dev.removed or not dev.deferred_remove or dev.opens + outside:
                return
            self._drop(dev)

    def _drop(self, dev: Device, *, detach_wait: float = DETACH_WAIT) -> None:
        """Unlink and destroy a device (``dev_remove`` → ``__dm_destroy``).

        The device is quiesced and killed (I/O it still holds fails) *before* its exposure is
        withdrawn: once ``LOOP_CLR_FD`` was issued on a loop device that someone holds open, an
        open of it waits, uninterruptibly, for the I/O queued on it (seen on Linux 6.18), so with
        a write still held here the teardown's own opens (or udev's) would wait on themselves.
        ``detach_wait`` bounds the wait for an outside opener of the loop device to let go (the
        kernel detaches it at their last close).
        """
        with self._lock:
            if self._devices.get(dev.name) is dev:
                del self._devices[dev.name]
            if self._by_devno.get(dev.devno) is dev:
                del self._by_devno[dev.devno]
        live, inactive = dev.live, dev.inactive
        if live is not None and not dev.suspended:
            quietly(*(t.presuspend for t in live.targets), errors=Exception)  # the device goes regardless
            dev.block_io(timeout=30)
            quietly(*(t.postsuspend for t in live.targets), errors=Exception)
        dev.kill()
        if self._exposure is not None and dev.exposure is not None:
            self._exposure.remove(dev, timeout=detach_wait)
        dev.live = dev.inactive = None
        for table in (live, inactive):
            if table is not None:
                table.destroy()

    def rename(self, name: str, new_name: str) -> None:
        """Rename a device; bumps its event number when it has a live table (``dm_hash_rename``)."""
        validate_name(new_name)
        dev = self._get(name, "rename")
        with dev.op_lock:
            self._alive(dev, "rename")
            with self._lock:
                if new_name in self._devices:
                    raise DeviceExists(f"{new_name} already exists", operation="rename", device=name)
                del self._devices[name]
                self._devices[new_name] = dev
                dev.name = new_name
            if self._exposure is not None and dev.exposure is not None:
                self._exposure.renamed(dev)
            if dev.live is not None:
                dev.raise_event()

    def info(self, name: str, *, open_count: bool = True) -> DeviceInfo:
        """Device state as ``dmsetup info`` reports it; ``open_count=False`` skips counting the
        openers of an exposed device (``open_count`` is then ``-1``)."""
        dev = self._get(name, "info")
        live, inactive = dev.live, dev.inactive
        return DeviceInfo(name=dev.name, uuid=dev.uuid, exists=True, suspended=dev.suspended,
                          live_table=live is not None, inactive_table=inactive is not None,
                          open_count=self._open_count(dev) if open_count else -1, event_nr=dev.event_nr,
                          major=dev.major, minor=dev.minor, read_only=dev.read_only,
                          target_count=len(live.table) if live else 0, deferred_remove=dev.deferred_remove)

    def _open_count(self, dev: Device) -> int:
        return dev.opens + self._outside_opens(dev)

    def _outside_opens(self, dev: Device) -> int:
        """Openers of the device's loop device outside the engine (0 when it is not exposed).

        Counted without opening the loop device (``Exposure.open_count``): an open waits for the
        writes that ``sync(2)`` or a last close is flushing to it, which a suspended device, or
        a mirror write held until the guard's reload, does not finish.
        """
        if self._exposure is None or dev.exposure is None:
            return 0
        return self._exposure.open_count(dev)

    def table_text(self, name: str, *, inactive: bool = False) -> str:
        """The live (or inactive) table as text, ``str(table)``: what the daemon sends."""
        return str(self.table(name, inactive=inactive))

    def table(self, name: str, *, inactive: bool = False) -> "Table":
        """The live (or inactive) table as the kernel prints it back, devices as ``major:minor``."""
        dev = self._get(name, "table")
        table = dev.inactive if inactive else dev.live
        return table.shown() if table is not None else Table()

    def _target_lines(self, name: str, operation: str, inactive: bool,
                      text: "Callable[[TargetDriver], str]") -> list[StatusLine]:
        """One line per target of the live (or inactive) table, with ``text(target)`` as params."""
        dev = self._get(name, operation)
        table = dev.inactive if inactive else dev.live
        if table is None:
            return []
        return [
            StatusLine(ln.start, ln.length, ln.target_type, text(tgt))
            for ln, tgt in zip(table.table, table.targets)
        ]

    def status(self, name: str, *, inactive: bool = False) -> list[StatusLine]:
        """Each target's status line."""
        return self._target_lines(name, "status", inactive, lambda tgt: tgt.status())

    def measure(self, name: str, *, inactive: bool = False) -> list[StatusLine]:
        """Each target's IMA measurement text (``TargetDriver.ima_status``), as ``dmsetup measure``."""
        return self._target_lines(name, "measure", inactive, lambda tgt: tgt.ima_status())

    def message(self, name: str, sector: int, message: str) -> str | None:
        """Send a message to the target at ``sector`` (``target_message`` in dm-ioctl.c)."""
        dev = self._get(name, "message")
        argv = split_args(message)
        if not argv:
            raise InvalidArgument("Empty message received.", operation="message", device=name)
        if argv[0] == "@cancel_deferred_remove":
            if len(argv) != 1:
                raise InvalidArgument("Invalid arguments for @cancel_deferred_remove", operation="message", device=name)
            with dev.op_lock:
                if not dev.deferred_remove:
                    raise InvalidArgument("device is not marked for deferred remove",
                                          errno=errno.ENXIO, operation="message", device=name)
                dev.deferred_remove = False
            return None
        table = dev.live
        if table is None:
            raise InvalidArgument("no live table", errno=errno.ENXIO, operation="message", device=name)
        if not 0 <= sector < table.sectors:
            raise InvalidArgument("Target message sector outside device.", operation="message", device=name)
        for ln, tgt in zip(table.table, table.targets):
            if ln.start <= sector < ln.end:
                return tgt.message(argv)
        raise InvalidArgument("Target message sector outside device.", operation="message",
                              device=name)  # pragma: no cover - the table has no gaps

    def deps(self, name: str) -> list[tuple[int, int]]:
        """``(major, minor)`` of the devices the live table uses (regular files have none)."""
        dev = self._get(name, "deps")
        return dev.live.devnos() if dev.live is not None else []

    def list(self) -> list[DeviceEntry]:
        """Every device, by name."""
        with self._lock:
            devs = sorted((d for d in self._devices.values() if d.minor >= 0), key=lambda d: d.name)
        return [DeviceEntry(d.name, d.major, d.minor, d.event_nr, d.uuid) for d in devs]

    def targets(self) -> dict[str, tuple[int, int, int]]:
        """Target type → version."""
        return self._registry.versions()

    def version(self) -> Versions:
        """Library (dmtools) and driver (dm-ioctl semantics followed) versions."""
        from dmtools.version import __version__

        return Versions(library=__version__, driver=DRIVER_VERSION, backend="userspace")

    def wait_event(self, name: str, event_nr: int = 0, timeout: float | None = None) -> int:
        """Wait until the device's event number differs from ``event_nr``; return it."""
        return self._get(name, "wait_event").wait_event(event_nr, timeout)

    def device_path(self, name: str) -> str:
        """``<run_dir>/mapper/NAME`` for an exposed device."""
        dev = self._get(name, "device_path")
        if self._exposure is None or dev.exposure is None:
            raise DMError("device is not exposed as a block device (needs root and /dev/fuse)",
                          errno=errno.ENODEV, operation="device_path", device=name)
        return self._exposure.link_path(dev)

    def device_ref(self, name: str) -> str:
        """``major:minor``, which this engine resolves to its own device in-process."""
        dev = self._get(name, "device_ref")
        return f"{dev.major}:{dev.minor}"

    def open_endpoint(self, name: str, *, writable: bool = True) -> "Endpoint":
        """An endpoint on the device (counted in its open count until closed)."""
        from dmtools.engine.device_endpoint import DeviceEndpoint

        return DeviceEndpoint(self._get(name, "open"), writable=writable)

    def close(self) -> None:
        """Remove every device (stacked ones first) and stop the exposure; bounded in time.

        I/O held by a suspended device fails (EIO to a block-device user) instead of waiting for
        a resume that can no longer come; I/O in flight elsewhere is drained as on ``remove``.
        Loop devices that outside users still hold open are left to detach at their last close.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            suspended = [d for d in self._devices.values() if d.suspended]
        # First, so that I/O of devices stacked above them (in flight, waiting here) ends too
        # and their drain below does not wait for it.
        for dev in suspended:
            dev.kill()
        for _ in range(64):
            with self._lock:
                devs = list(self._devices.values())
            if not devs:
                break
            held = {id(d) for dev in devs for t in (dev.live, dev.inactive) if t for d in t.engine_devices()}
            top = [d for d in devs if id(d) not in held] or devs
            for dev in top:
                with dev.op_lock:
                    if self._devices.get(dev.name) is dev:
                        self._drop(dev, detach_wait=0.0)
        if self._exposure is not None:
            self._exposure.close()
        self.claims.close()

    # --- helpers ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise DMError("engine is closed", errno=errno.ESHUTDOWN)

    @staticmethod
    def _alive(dev: Device, operation: str) -> None:
        if dev.removed:
            raise DeviceNotFound("no such device", operation=operation, device=dev.name)

    def __repr__(self) -> str:
        return f"Engine(devices={len(self._devices)}, exposed={self._exposure is not None})"

