"""One engine device: live and inactive tables, the suspend gate, open counts and events.

The I/O path is ``Device.read``/``write``: enter the gate (held while suspended), split the byte
range over the live table's targets, leave the gate. Suspend follows ``__dm_suspend`` in
``drivers/md/dm.c``: presuspend the targets, stop new I/O, wait for in-flight I/O, (flush), then
postsuspend.
"""

from __future__ import annotations

import bisect
import errno
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from dmtools.engine.target_driver import SECTOR, DeviceHandle, TargetDriver
from dmtools.errors import DeviceIOError, DeviceNotFound, InvalidArgument, NoSpace, quietly
from dmtools.table import Table, TableLine

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.engine.engine import Engine

_T = TypeVar("_T")


class RequeueIO(DeviceIOError):
    """Raised by a target to hand an I/O back to its device during a ``noflush`` suspend.

    The kernel's ``DM_ENDIO_REQUEUE``/``BLK_STS_DM_REQUEUE`` (``drivers/md/dm.c``): while the device
    is noflush-suspending the I/O is resubmitted after the resume, to the table live then (a mirror
    hands back writes it held after a leg failure, so they reach the repaired table). At any other
    time the device reports it as the EIO it is.
    """

    def __init__(self, message: str = "I/O requeued", *, device: str | None = None) -> None:
        super().__init__(message, errno=errno.EIO, device=device)


#: :meth:`Device.enter_unheld`'s answer while the device is suspended (nothing counted in).
HELD: Any = object()


class TableContext:
    """The ``TargetContext`` handed to the targets of one table (``struct dm_table``)."""

    def __init__(self, engine: "Engine", device: "Device", readonly: bool) -> None:
        self._engine = engine
        self._device = device
        self._readonly = readonly
        #: handles opened by this table, one per device, shared between its targets.
        self.handles: dict[str, DeviceHandle] = {}
        #: each device reference as written -> the name the kernel shows for it (``major:minor``).
        self.shown: dict[str, str] = {}

    @property
    def device_name(self) -> str:
        return self._device.name

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def noflush_suspending(self) -> bool:
        return self._device.noflush_suspending

    @property
    def suspended(self) -> bool:
        return self._device.suspended

    @property
    def device(self) -> "Device":
        """The engine device this table belongs to."""
        return self._device

    def get_device(self, ref: str, *, writable: bool | None = None) -> DeviceHandle:
        if writable is None:
            writable = not self._readonly
        handle = self._engine.open_reference(ref, writable=writable, for_device=self._device)
        key = self.shown[ref] = handle.name
        if key in self.handles:
            handle.inner.close()
            return self.handles[key]
        self.handles[key] = handle
        return handle

    def event(self) -> None:
        self._device.raise_event()

    def target_state(self, key: str, factory: Callable[[], _T]) -> _T:
        return self._engine.target_state(key, factory)

    def close_all(self) -> None:
        """Close every handle (after the targets are destroyed)."""
        quietly(*(h.inner.close for h in self.handles.values()), errors=Exception)  # release every handle
        self.handles.clear()


@dataclass
class LoadedTable:
    """A constructed table: the typed table it was loaded from, its targets and the handles they
    opened."""

    table: Table
    targets: list[TargetDriver]
    context: TableContext
    readonly: bool
    starts: list[int] = field(default_factory=list)  # byte offsets
    ends: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.starts = [ln.start * SECTOR for ln in self.table]
        self.ends = [ln.end * SECTOR for ln in self.table]

    @property
    def sectors(self) -> int:
        """Size in sectors."""
        return self.table.size

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.ends[-1] if self.ends else 0

    def shown(self) -> Table:
        """The table as the kernel prints it back: each target's ``table_value``, with every device
        shown as the kernel shows it (``major:minor``)."""
        names = self.context.shown
        return Table(
            TableLine(ln.start, ln.length,
                      tgt.table_value(ln.target).map_devices(lambda ref: names.get(ref, ref)))
            for ln, tgt in zip(self.table, self.targets)
        )

    def devnos(self) -> list[tuple[int, int]]:
        """Device numbers of the devices this table holds, in table order, without repeats."""
        seen: list[tuple[int, int]] = []
        for handle in self.context.handles.values():
            if handle.devno is not None and handle.devno not in seen:
                seen.append(handle.devno)
        return seen

    def engine_devices(self) -> list["Device"]:
        """Engine devices this table references (for cycle checks)."""
        out = []
        for handle in self.context.handles.values():
            dev = handle.inner.device
            if isinstance(dev, Device):
                out.append(dev)
        return out

    def destroy(self) -> None:
        """Destroy every target (``dtr``) and then close the devices they opened."""
        quietly(*(t.destroy for t in self.targets), errors=Exception)  # a failing dtr must not leak the others
        self.context.close_all()


class Device:
    """An engine device (the kernel's ``struct mapped_device`` plus its hash cell)."""

    def __init__(self, name: str, uuid: str, major: int, minor: int) -> None:
        self.name = name
        self.uuid = uuid
        self.major = major
        self.minor = minor
        self.live: LoadedTable | None = None
        self.inactive: LoadedTable | None = None
        self.suspended = False
        self._noflush = False
        self.event_nr = 0
        self.removed = False
        self.deferred_remove = False
        #: endpoints open on this device (users, and tables of other devices that reference it).
        self.opens = 0
        #: serialises the verbs on this device (load, suspend, resume, remove...).
        self.op_lock = threading.RLock()
        #: the suspend gate; the I/O path takes its lock directly (a C-level ``with``).
        self._gate_lock = threading.Lock()
        self._gate = threading.Condition(self._gate_lock)
        self._inflight = 0
        self._events = threading.Condition(threading.Lock())
        #: called when the last opener goes (for deferred remove).
        self.on_last_close: Callable[["Device"], None] | None = None
        #: exposure bookkeeping (set by the exposure manager).
        self.exposure: Any = None
        #: the exposure's C data path for this device (``dmtools.engine.fastpath.Slot``): the live
        #: table's map is withdrawn as the gate closes and installed again once it opens.
        self.fast_path: Any = None

    # --- identity ---------------------------------------------------------------------------
    @property
    def devno(self) -> tuple[int, int]:
        return (self.major, self.minor)

    @property
    def size(self) -> int:
        """Size in bytes of the live table (0 without one)."""
        live = self.live
        return live.size if live else 0

    @property
    def read_only(self) -> bool:
        live = self.live
        return bool(live and live.readonly)

    # --- open counts ------------------------------------------------------------------------
    def acquire(self) -> None:
        """Count one more opener; raises ``DeviceNotFound`` for a removed device."""
        with self._gate:
            if self.removed:
                raise DeviceNotFound("device was removed", operation="open", device=self.name)
            self.opens += 1

    def release(self) -> None:
        """Drop one opener."""
        with self._gate:
            self.opens -= 1
            last = self.opens == 0
        if last and self.deferred_remove and self.on_last_close is not None:
            self.on_last_close(self)

    # --- events -----------------------------------------------------------------------------
    def raise_event(self) -> None:
        """``dm_table_event``: bump the event number and wake waiters."""
        with self._events:
            self.event_nr += 1
            self._events.notify_all()

    def wait_event(self, event_nr: int, timeout: float | None) -> int:
        """Wait until the event number differs from ``event_nr`` (or the device goes)."""
        with self._events:
            self._events.wait_for(lambda: self.event_nr != event_nr or self.removed, timeout)
            if self.removed:
                raise DeviceNotFound("device was removed", operation="wait_event", device=self.name)
            return self.event_nr

    # --- the suspend gate -------------------------------------------------------------------
    @property
    def noflush_suspending(self) -> bool:
        """True while a ``noflush`` suspend is in progress (``dm_noflush_suspending``)."""
        return self._noflush

    @noflush_suspending.setter
    def noflush_suspending(self, value: bool) -> None:
        with self._gate:
            self._noflush = value
            self._gate.notify_all()  # requeued I/O waits on it

    def _requeue_wait(self) -> None:
        """Wait, outside the gate, until a requeued I/O may be resubmitted: the noflush suspend that
        handed it back is over and the device is resumed (or removed)."""
        with self._gate:
            while (self.suspended or self._noflush) and not self.removed:
                self._gate.wait()

    def _enter(self, offset: int = 0) -> LoadedTable | None:
        """Count an I/O in flight and return the live table; waits while suspended."""
        if offset < 0:
            raise InvalidArgument(f"negative offset {offset}", operation="io", device=self.name)
        lock = self._gate_lock  # (acquire and release: half the cost of a with statement)
        lock.acquire()
        try:
            while self.suspended and not self.removed:
                self._gate.wait()
            if self.removed:
                raise DeviceIOError("device was removed", errno=errno.ENXIO, device=self.name)
            self._inflight += 1
            return self.live
        finally:
            lock.release()

    def _leave(self) -> None:
        lock = self._gate_lock
        lock.acquire()
        try:
            self._inflight -= 1
            if self._inflight == 0 and self.suspended:
                self._gate.notify_all()  # block_io waits for the last one (nobody else does)
        finally:
            lock.release()

    def run(self, offset: int, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(table, *args)`` inside the suspend gate on the live table (``None`` without one), as
        the device's own I/O runs: for a caller that moves the bytes the table maps itself
        (``snapshot.route``). It waits while the device is suspended (a suspend waits for it in
        turn) and raises ``ENXIO`` once the device is removed; ``offset`` is the I/O's first byte
        (a negative one raises ``InvalidArgument``)."""
        table = self._enter(offset)
        try:
            return fn(table, *args)
        finally:
            self._leave()

    def enter_unheld(self, offset: int) -> LoadedTable | None:
        """:meth:`run`'s gate without its callback and without its wait, for a caller already inside
        another device's gate, which must not hold that one while it waits for this one: count an
        I/O in flight and return the live table (``None`` without one), or ``HELD`` at once (nothing
        counted) while the device is suspended; raises as :meth:`run` does. Every answer but
        ``HELD`` must be followed by one :meth:`leave`."""
        if offset < 0:
            raise InvalidArgument(f"negative offset {offset}", operation="io", device=self.name)
        lock = self._gate_lock
        lock.acquire()
        try:
            if self.removed:
                raise DeviceIOError("device was removed", errno=errno.ENXIO, device=self.name)
            if self.suspended:
                return HELD  # type: ignore[no-any-return]
            self._inflight += 1
            return self.live
        finally:
            lock.release()

    #: the second half of :meth:`enter_unheld`: count the I/O out.
    leave = _leave

    def block_io(self, timeout: float | None = None) -> bool:
        """Hold new I/O and wait for in-flight I/O to finish; False if ``timeout`` expired."""
        with self._gate:
            self.suspended = True
        if self.fast_path is not None:
            self.fast_path.off(timeout)
        with self._gate:
            return self._gate.wait_for(lambda: self._inflight == 0, timeout)

    def unblock_io(self) -> None:
        """Let held and new I/O run again."""
        with self._gate:
            self.suspended = False
            self._gate.notify_all()
        if self.fast_path is not None:
            self.fast_path.on(self)

    def kill(self) -> None:
        """Mark removed: held I/O fails, waiters wake."""
        with self._gate:
            self.removed = True
            self._gate.notify_all()
        if self.fast_path is not None:
            self.fast_path.off(0.0)  # block_io withdrew it already, unless a C request hangs
        with self._events:
            self.event_nr += 1
            self._events.notify_all()

    # --- I/O --------------------------------------------------------------------------------
    def read(self, buf: Any, offset: int) -> int:
        """Read into ``buf`` from byte ``offset``; short only at the end of the device."""
        mv = memoryview(buf).cast("B")
        table = self._enter(offset)
        try:
            if table is None or offset >= table.size or not len(mv):
                return 0
            n = min(len(mv), table.size - offset)
            self._map(table, mv[:n], offset, False)
            return n
        finally:
            self._leave()

    def write(self, buf: Any, offset: int, *, durable: bool = False) -> int:
        """Write all of ``buf`` at byte ``offset``; ``durable``: durable on return (a bio with
        ``REQ_FUA``, which dm passes to every target the write spans)."""
        mv = memoryview(buf).cast("B")

        def write(table: LoadedTable | None) -> int:
            if not len(mv):
                return 0
            if table is not None and table.readonly:
                raise DeviceIOError("device is read-only", errno=errno.EROFS, operation="write", device=self.name)
            if table is None or offset + len(mv) > table.size:
                raise NoSpace("write past the end of the device", errno=errno.ENOSPC,
                              operation="write", device=self.name)
            if durable:
                pos = 0
                for tgt, off, n in self._ranges(table, offset, len(mv)):
                    tgt.write_durable(mv[pos : pos + n], off)
                    pos += n
            else:
                self._map(table, mv, offset, True)
            return len(mv)

        return self._requeueable(offset, write)

    def read_to(self, pipe: int, length: int, offset: int) -> int | None:
        """Put up to ``length`` bytes from byte ``offset`` into the pipe ``pipe`` (which has room
        for them); returns how many (short only at the end of the device), or ``None``, with the
        pipe untouched, when a target of the range does not move bytes into pipes
        (``TargetDriver.pipe_io``): the caller then uses :meth:`read`."""
        table = self._enter(offset)
        try:
            if table is None or offset >= table.size or not length:
                return 0
            n = min(length, table.size - offset)
            ranges = self._ranges(table, offset, n)
            if not all(tgt.pipe_io for tgt, _, _ in ranges):
                return None
            for tgt, off, k in ranges:
                tgt.read_to(pipe, off, k)
            return n
        finally:
            self._leave()

    def _requeueable(self, offset: int, op: Callable[[LoadedTable | None], _T]) -> _T:
        """Run ``op`` on the live table inside the gate; an I/O a target hands back with
        ``RequeueIO`` during a noflush suspend is run again once the device is resumed."""
        while True:
            table = self._enter(offset)
            try:
                return op(table)
            except RequeueIO:
                if not self._noflush:
                    raise
            finally:
                self._leave()
            self._requeue_wait()

    def _map(self, table: LoadedTable, mv: memoryview, offset: int, write: bool) -> None:
        i = bisect.bisect_right(table.starts, offset) - 1
        pos = 0
        total = len(mv)
        while pos < total:
            here = offset + pos
            end = min(table.ends[i], offset + total)
            piece = mv[pos : pos + end - here]
            tgt = table.targets[i]
            if write:
                tgt.write(piece, here - table.starts[i])
            else:
                tgt.read(piece, here - table.starts[i])
            pos += end - here
            i += 1

    def _ranges(self, table: LoadedTable, offset: int, length: int) -> list[tuple[TargetDriver, int, int]]:
        out = []
        end = min(offset + length, table.size)
        pos = offset
        i = bisect.bisect_right(table.starts, pos) - 1
        while pos < end:
            stop = min(table.ends[i], end)
            out.append((table.targets[i], pos - table.starts[i], stop - pos))
            pos = stop
            i += 1
        return out

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """Byte ranges in ``[offset, offset+length)`` that may hold data; ``None`` if unknown.

        Ranges of targets that cannot tell (``TargetDriver.data_extents`` returning ``None``) count as
        data; holes are only reported where a target knows (a sparse file under ``linear``,
        ``zero``).
        """
        table = self._enter(offset)
        try:
            if table is None:
                return []
            out: list[tuple[int, int]] = []
            known = False
            end = min(offset + length, table.size)
            pos = offset
            i = bisect.bisect_right(table.starts, pos) - 1
            while pos < end:
                stop = min(table.ends[i], end)
                base = table.starts[i]
                ext = table.targets[i].data_extents(pos - base, stop - pos)
                if ext is None:
                    out.append((pos, stop - pos))
                else:
                    known = True
                    out.extend((base + o, n) for o, n in ext)
                pos = stop
                i += 1
            return out if known else None
        finally:
            self._leave()

    def flush(self) -> None:
        """Flush every target of the live table."""

        def flush(table: LoadedTable | None) -> None:
            if table is not None:
                for tgt in table.targets:
                    tgt.flush()

        self._requeueable(0, flush)

    def discard(self, offset: int, length: int) -> None:
        """Discard a byte range."""
        table = self._enter(offset)
        try:
            if table is not None:
                for tgt, off, n in self._ranges(table, offset, length):
                    tgt.discard(off, n)
        finally:
            self._leave()

    def zero(self, offset: int, length: int) -> None:
        """Write zeros over a byte range."""

        def zero(table: LoadedTable | None) -> None:
            if table is not None:
                if table.readonly:
                    raise DeviceIOError("device is read-only", errno=errno.EROFS, operation="write", device=self.name)
                for tgt, off, n in self._ranges(table, offset, length):
                    tgt.zero(off, n)

        self._requeueable(offset, zero)
