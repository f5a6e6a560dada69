"""Small I/O of a snapshot table's devices straight on the file under them.

A snapshot's origin (LVM's ``-real``) and COW (``-cow``) are usually engine devices that map one
``linear`` segment onto a file the engine opened. Every copy-on-write moves a chunk through four
I/Os on them (origin read, COW write, the metadata area's PREFLUSH and FUA write) plus the origin
write; through the device stack (handle, endpoint, device gate, table, target, handle, backing
file, checks) each took about as many instructions as the system call several times over.

A :class:`Route` does the same I/O as its handle with one system call, inside the device's suspend
gate (a suspend still waits for it, a removed device still fails it), on the live table: only
while that table is one ``linear`` target over a file or block device whose I/O is a plain
system call (:meth:`~dmtools.endpoint.Endpoint.plain_fd`), writes smaller than ``DIRECT_MIN`` (which the
backing file writes buffered too) and inside the device. A handle that is such a file itself
(a table naming the file) is routed the same way without a gate. Anything else, a failed or short
system call, and every call while the handle's method is replaced on the handle itself (a test's
probe), goes through the handle as before, which does the I/O or raises the device's error.
Durability is unchanged: ``flush`` is the ``fdatasync`` the backing file's flush is, and
``write_durable`` the write then that flush, as the endpoint's default ``write_durable`` does,
both in one pass through the gate.

:func:`copy_commit` does a one-chunk first write's copy, its commit and the origin write in one
C call (dms.c ``dms_copy_commit_chunk``, the GIL released), inside both devices' gates, each
entered once (:meth:`~dmtools.engine.device.Device.enter_unheld`), in the same order and with the
same hand-back to the Python path at the first failure.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any, Callable

from dmtools.endpoint import Endpoint
from dmtools.engine.backing import DIRECT_MIN
from dmtools.engine.basic_targets import LinearTarget
from dmtools.engine.device import HELD
from dmtools.engine.device_endpoint import DeviceEndpoint
from dmtools.engine.target_driver import DeviceHandle
from dmtools.errors import DeviceIOError

__all__ = ["DMS_AREA", "DMS_COPY", "DMS_DONE", "DMS_FUA", "DMS_ORIGIN", "DMS_PREFLUSH", "DONE_WROTE",
           "FLUSH_COST_WEIGHT", "NOT_DONE", "Route", "c_library", "copy_commit", "last_flush_seconds"]

#: weight of the newest ``fdatasync`` in ``Route.flush_cost``, a moving average.
FLUSH_COST_WEIGHT = 0.125


def _file_of(ep: Endpoint) -> tuple[int, bool]:
    """The descriptor on which ``ep``'s I/O under ``DIRECT_MIN`` bytes is a plain ``pread`` or
    ``pwrite`` (:meth:`~dmtools.endpoint.Endpoint.plain_fd`: a file or block device the engine
    opened, under a handle), else -1; and whether it may be written so."""
    fd = ep.plain_fd(DIRECT_MIN - 1, True)
    if fd >= 0:
        return fd, True
    return ep.plain_fd(DIRECT_MIN - 1, False), False


class Route:
    """Reads, writes and flushes of ``handle`` (see the module docstring); each method does what
    the handle's does, or calls it."""

    __slots__ = ("handle", "_own", "_device", "_writable", "_table", "_fd", "_wfd", "_base", "_size", "flush_cost",
                 "_c_buffer")

    def __init__(self, handle: Endpoint) -> None:
        self.handle = handle
        #: the handle's instance attributes: a method replaced there sends every call through it.
        self._own: dict[str, Any] = vars(handle) if type(handle) is DeviceHandle else {}
        inner = handle.inner if type(handle) is DeviceHandle else None
        #: the engine device under the handle (its gate and live table), or None.
        self._device = inner.device if type(inner) is DeviceEndpoint else None
        #: the handle may write (an endpoint opened read-only may not, whatever its table)
        self._writable = type(handle) is DeviceHandle and not handle.read_only
        self._table: object = None  # the live table _fd/_wfd/_base/_size were learnt from
        #: the routed file's descriptor for reads (-1: none) and for writes (-1: none)
        self._fd, self._wfd = -1, -1
        if type(handle) is DeviceHandle and self._device is None:
            fd, writable = _file_of(handle)
            self._fd, self._wfd = fd, fd if writable and self._writable else -1
        self._base = 0
        self._size = handle.size if self._fd >= 0 else 0
        #: seconds a routed ``fdatasync`` takes, a moving average (``None`` before the first one)
        self.flush_cost: float | None = None
        #: ``(bytearray, its cffi buffer)`` of the last area :func:`copy_commit` wrote through this route
        self._c_buffer: tuple[bytearray, Any] | None = None

    def _learn(self, table: Any) -> None:
        """Learn the descriptors of ``table`` (a device's live table, under its gate) and its
        offset: -1 unless it is one ``linear`` target over a routable file."""
        self._table = table
        self._fd, self._wfd = -1, -1
        if table is not None and len(table.targets) == 1 and type(table.targets[0]) is LinearTarget:
            (dev, base), = table.targets[0].file_layout().legs
            fd, writable = _file_of(dev)
            if fd >= 0:
                self._fd, self._base, self._size = fd, base, table.size
                if writable and self._writable and not table.readonly:
                    self._wfd = fd

    def readinto_full(self, buf: memoryview, offset: int) -> bool:
        """Fill ``buf`` from byte ``offset`` with one ``preadv``; False (nothing promised of
        ``buf``) when the caller must read through the handle."""
        return "readinto" not in self._own and self._io(_preadv, buf, offset, False)

    def write(self, buf: memoryview, offset: int) -> None:
        """Write all of ``buf`` at byte ``offset`` (raises the device's error)."""
        if len(buf) >= DIRECT_MIN or "write" in self._own or not self._io(_pwrite, buf, offset, True):
            n = self.handle.write(buf, offset)
            if n != len(buf):
                raise DeviceIOError("short write", errno=errno.EIO, operation="write", device=self.handle.name)

    def write_durable(self, buf: memoryview, offset: int) -> int:
        """``write`` then ``flush`` (a FUA write); through the handle's ``write_durable`` unless
        both go to one routed file."""
        own = self._own
        if len(buf) >= DIRECT_MIN or "write_durable" in own or "write" in own or "flush" in own \
                or not self._io(self._write_flush, buf, offset, True):
            return self.handle.write_durable(buf, offset)
        return len(buf)

    def preflush_write_fua(self, buf: memoryview, offset: int) -> None:
        """A flush, then ``buf`` written at byte ``offset`` and flushed (a write with
        ``REQ_PREFLUSH|REQ_FUA``): in one pass through the device's gate when routed, else
        ``flush`` and the handle's ``write_durable``. Raises the device's error."""
        own = self._own
        if len(buf) >= DIRECT_MIN or "flush" in own or "write" in own or "write_durable" in own \
                or not self._io(self._flush_write_flush, buf, offset, True):
            self.flush()
            if self.handle.write_durable(buf, offset) != len(buf):
                raise DeviceIOError("short write", errno=errno.EIO, operation="write", device=self.handle.name)

    def flush(self) -> None:
        """Make completed writes durable: ``fdatasync`` of the routed file, or the handle's flush.
        A failed ``fdatasync`` raises, never tried again (a second one could report success for
        writes the first lost)."""
        if "flush" in self._own or not self._io(self._fdatasync, None, 0, True):
            self.handle.flush()

    def _fdatasync(self, fd: int, buf: None, at: int) -> int:
        t = time.perf_counter()
        try:
            os.fdatasync(fd)
        except OSError as err:
            raise DeviceIOError(f"flush failed: {err.strerror}", errno=err.errno, operation="flush",
                                device=self.handle.name) from err
        self.note_flush(time.perf_counter() - t)
        return 0

    def note_flush(self, took: float) -> None:
        """Count a flush of the routed file that took ``took`` seconds in :attr:`flush_cost`."""
        cost = self.flush_cost
        self.flush_cost = took if cost is None else cost + (took - cost) * FLUSH_COST_WEIGHT

    def _write_flush(self, fd: int, buf: memoryview, at: int) -> int:
        """``pwrite`` then ``fdatasync`` of ``fd``, in the caller's one pass through the gate (a
        reload between the two cannot send the flush to another file); -1 when the write failed
        or fell short (no flush then: the caller writes again through the handle, and flushes)."""
        n = _pwrite(fd, buf, at)
        if n != len(buf):
            return -1
        self._fdatasync(fd, None, 0)
        return n

    def _flush_write_flush(self, fd: int, buf: memoryview, at: int) -> int:
        """``fdatasync`` then :meth:`_write_flush` of ``fd``."""
        self._fdatasync(fd, None, 0)
        return self._write_flush(fd, buf, at)

    def _io(self, call: Callable[[int, Any, int], int], buf: memoryview | None, offset: int, write: bool) -> bool:
        """``call(fd, buf, at)`` on the routed file, inside the device's gate (when there is a
        device): True when it moved all of ``buf``; False when nothing is routed, ``buf`` does not
        lie inside the device, or the call failed or fell short (the caller then goes through the
        handle, which reads or writes all of it again)."""
        n = 0 if buf is None else len(buf)
        device = self._device
        if device is None:
            fd = self._wfd if write else self._fd
            return fd >= 0 and offset + n <= self._size and call(fd, buf, offset) == n
        return device.run(offset, self._on_table, call, buf, offset, n, write)

    def _on_table(self, table: Any, call: Callable[[int, Any, int], int], buf: memoryview | None, offset: int,
                  n: int, write: bool) -> bool:
        """:meth:`_io` inside the device's gate, ``table`` its live table."""
        if table is not self._table:
            self._learn(table)
        fd = self._wfd if write else self._fd
        return fd >= 0 and offset + n <= self._size and call(fd, buf, self._base + offset) == n


def _preadv(fd: int, buf: memoryview, at: int) -> int:
    try:
        return os.preadv(fd, [buf], at)
    except OSError:
        return -1


def _pwrite(fd: int, buf: memoryview, at: int) -> int:
    try:
        return os.pwrite(fd, buf, at)
    except OSError:
        return -1


# -- the copy-on-write of one chunk in C ----------------------------------------------------------
#: :func:`copy_commit`'s answers: dms.c's ``DMS_*`` (how far the C call got), and ``NOT_DONE``
#: (nothing was done: not routed, a device suspended, C unavailable).
DMS_DONE, DMS_COPY, DMS_PREFLUSH, DMS_AREA, DMS_FUA, DMS_ORIGIN = 0, 1, 2, 3, 4, 5
NOT_DONE = -1
#: :func:`copy_commit`'s ``DMS_DONE`` where C made the origin write too.
DONE_WROTE = 6
#: the system calls a route makes, as this module found them: while a test replaces one in ``os``
#: (a probe), every routed I/O is made in Python, where it sees them.
_OS_CALLS = (os.preadv, os.pwrite, os.fdatasync)
#: dms.c's ``dms_copy_commit_chunk`` and ``dms_commit_copy``: the API-mode extension's
#: (:mod:`dmtools._ffi.dms`), else the C library's through cffi's ABI mode; None until first
#: asked, False without C.
_c_copy: Any = None
_c_commit: Any = None
_c_flush_ns: Any = None
_ffi: Any = None


def c_library() -> tuple[Any, Any] | None:
    """``(ffi, lib)`` of the dms.c functions :func:`copy_commit` calls (``lib`` has
    ``dms_set_fault`` and ``dms_last_ops`` for tests too), or None without C."""
    from dmtools._ffi import dms

    ext = dms.module()
    if ext is not None:
        return ext.ffi, ext.lib
    from dmtools._ffi._libdm import ffi
    from dmtools._ffi.fastio import kcopyd_lib

    lib = kcopyd_lib()
    return None if lib is None else (ffi, lib)


def _c_function() -> Any:
    global _c_copy, _c_commit, _c_flush_ns, _ffi
    if _c_copy is None:
        found = c_library()
        if found is None:
            _c_commit = _c_flush_ns = _c_copy = False
        else:
            _ffi, lib = found
            _c_commit, _c_flush_ns = lib.dms_commit_copy, lib.dms_last_flush_ns
            _c_copy = lib.dms_copy_commit_chunk
    return _c_copy


def last_flush_seconds() -> float | None:
    """The mean time of the flushes this thread's last :func:`copy_commit` made in C, or None."""
    ns = _c_flush_ns()
    return None if ns < 0 else ns * 1e-9


def copy_commit(origin: Route, cow: Route, src: int, n: int, dest: int, old: int, new: int,
                write: "tuple[Route, memoryview, int] | None", source: memoryview | None, zeroed: bool,
                area: bytearray, aoff: int, index: int) -> int:
    """Copy ``n`` bytes at ``src`` of ``origin``'s device to ``dest`` of ``cow``'s, then commit
    the exception ``{old, new}`` as record ``index`` of the metadata area ``area`` (at ``aoff``
    of the COW): a flush, the area (the record written into ``area`` first), a flush; then
    ``write`` = ``(route, data, offset)``, the origin write that needed the copy, where ``route``
    writes the origin's device and may do so in C too. One C call (dms.c
    ``dms_copy_commit_chunk``, the GIL released) inside both devices' gates, each entered once,
    on their live tables; the caller holds what keeps the area from being written by another
    (the store's commit lock) and the chunk from being read through the snapshot before the
    exception is published. ``zeroed``: the COW chunk reads as zeros (an origin chunk of zeros
    is then not written).

    Returns ``NOT_DONE`` (nothing done) unless both routes are one system call per I/O for these
    sizes, C is available, no method is replaced on the handles nor a system call in ``os``, and
    neither device is suspended (the caller, holding locks, then copies in Python, which waits);
    else how far C got (``DMS_*``), stopped at the first failure or short transfer: ``DMS_COPY``
    nothing of the copy is in place (also for zeros onto a COW chunk not known to be zeros);
    ``DMS_PREFLUSH``/``DMS_FUA`` a flush failed (the commit has failed: never flush again for
    it); ``DMS_AREA`` the copy is durable and the record in ``area``, whose write failed;
    ``DMS_ORIGIN`` committed, the origin write not done or not whole; ``DMS_DONE`` committed
    (the caller writes the origin: C could not); ``DONE_WROTE`` committed and ``write`` made.

    ``source``: the ``n`` origin bytes, read already (for several snapshots at once): no origin
    read then, only the COW's gate, and no ``write``.
    """
    fn = _c_copy if _c_copy is not None else _c_function()
    if not fn or n >= DIRECT_MIN or len(area) >= DIRECT_MIN or "readinto" in origin._own \
            or _OS_CALLS != (os.preadv, os.pwrite, os.fdatasync):
        return NOT_DONE
    own = cow._own
    if "write" in own or "flush" in own or "write_durable" in own:
        return NOT_DONE
    buf = cow._c_buffer
    if buf is None or buf[0] is not area:
        buf = cow._c_buffer = (area, _ffi.from_buffer(area))
    lead: tuple[Any, ...]
    wargs: tuple[Any, ...] = ()  # (the origin write's arguments: none for a source)
    if source is not None:
        if len(source) != n:
            return NOT_DONE
        odev = None
        fn, lead = _c_commit, (_ffi.from_buffer(source),)
    else:
        odev = origin._device
        table = None if odev is None else odev.enter_unheld(src)
        if table is HELD:
            return NOT_DONE
    try:
        if source is None:
            # inside the origin device's gate (each gate is entered once, the origin's first)
            if odev is not None and table is not origin._table:
                origin._learn(table)
            fd = origin._fd
            if fd < 0 or src + n > origin._size:
                return NOT_DONE
            lead = (fd, origin._base + src)
            wargs = (-1, _ffi.NULL, 0, 0)
            if write is not None:
                route, data, offset = write
                if route._device is odev and len(data) < DIRECT_MIN and "write" not in route._own:
                    if table is not route._table:
                        route._learn(table)
                    if route._wfd >= 0 and offset + len(data) <= route._size:
                        wargs = (route._wfd, _ffi.from_buffer(data), len(data), route._base + offset)
        # the COW's side, inside its gate (and the origin's unless a source is copied)
        cdev = cow._device
        table = None if cdev is None else cdev.enter_unheld(dest)
        if table is HELD:
            return NOT_DONE
        try:
            if cdev is not None and table is not cow._table:
                cow._learn(table)
            fd = cow._wfd
            alen = len(area)
            if fd < 0 or dest + n > cow._size or aoff + alen > cow._size:
                return NOT_DONE
            base = cow._base
            rc = int(fn(*lead, n, fd, base + dest, int(zeroed), buf[1], alen, base + aoff, index, old, new, *wargs))
        finally:
            if cdev is not None:
                cdev.leave()
    finally:
        if odev is not None:
            odev.leave()
    return DONE_WROTE if rc == DMS_DONE and wargs and wargs[2] else rc


def first_write(state: Any, origin: Route, cow: Route, chunk: int, cb: int,
                write: "tuple[Route, memoryview, int] | None") -> int:
    """The origin write ``write`` = ``(route, data, offset)`` inside origin chunk ``chunk`` (of
    ``cb`` bytes), made whole by dms.c ``dms_snap_write`` on ``state`` (a snapshot's C state,
    :class:`snapshot.store.fast.FastWrites`): the chunk's copy and commit first where it has no
    exception yet (and only that without ``write``: for one of several snapshots). Inside the
    origin's and the COW's gates, each entered once, on their live tables, as
    :func:`copy_commit`. Returns ``NOT_DONE`` (nothing done) unless all of it is one system call
    per I/O on routed files (as :func:`copy_commit` requires) and no device is suspended; else
    ``dms_snap_write``'s answer (``DMS_OFF``: nothing done either)."""
    fn = _c_snap_write or _c_snap_function()
    own = cow._own
    if not fn or cb >= DIRECT_MIN or "readinto" in origin._own or "write" in own or "flush" in own \
            or "write_durable" in own or os.pwrite is not _OS_CALLS[1] or os.preadv is not _OS_CALLS[0] \
            or os.fdatasync is not _OS_CALLS[2]:
        return NOT_DONE
    odev = origin._device
    if write is not None:
        route, data, offset = write
        if route._device is not odev or len(data) >= DIRECT_MIN or "write" in route._own:
            return NOT_DONE
    src = chunk * cb
    table = None if odev is None else odev.enter_unheld(src)
    if table is HELD:
        return NOT_DONE
    cdev, ctable = cow._device, HELD  # (the COW's gate: entered once the origin's side is known good)
    try:
        if odev is not None and table is not origin._table:  # (inside the origin device's gate)
            origin._learn(table)
        fd = origin._fd
        if fd < 0 or src + cb > origin._size:
            return NOT_DONE
        if write is None:
            wfd, wbuf, wlen, woff = -1, _ffi.NULL, 0, 0
        else:
            if odev is not None and table is not route._table:
                route._learn(table)
            wfd, wlen = route._wfd, len(data)
            if wfd < 0 or offset + wlen > route._size:
                return NOT_DONE
            wbuf, woff = _ffi.from_buffer(data), route._base + offset
        ctable = None if cdev is None else cdev.enter_unheld(0)
        if ctable is HELD:
            return NOT_DONE
        if cdev is not None and ctable is not cow._table:
            cow._learn(ctable)
        if cow._wfd < 0:
            return NOT_DONE
        return fn(state, chunk, fd, origin._base + src, cow._wfd, cow._base, cow._size, wfd, wbuf, wlen, woff)  # type: ignore[no-any-return]
    finally:
        if cdev is not None and ctable is not HELD:
            cdev.leave()
        if odev is not None:
            odev.leave()


#: dms.c ``dms_snap_write`` (as ``_c_copy``), and its answers beyond ``DMS_*``.
_c_snap_write: Any = None
DMS_OFF, DMS_MAPPED, DMS_MAPPED_WROTE = -2, 7, 8


def _c_snap_function() -> Any:
    global _c_snap_write
    if _c_snap_write is None:
        _c_snap_write = _c_function() and c_library()[1].dms_snap_write  # type: ignore[index]
    return _c_snap_write
