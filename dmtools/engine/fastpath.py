"""The exposure's C data path: FUSE writes and reads of ``linear``/``striped`` devices without Python.

Python per request was the limit of exposed devices (each FUSE callback takes the GIL). The C
functions of ``dmtools/_ffi/fastio.c`` take the place of mfusepy's ``write``, ``read_buf`` and
``init`` entries of libfuse's ``struct fuse_operations``: a request whose device has a *map* is
moved in C (``pwrite``; ``splice`` into a pipe for read replies), every other one runs the Python
callback exactly as before.

- A :class:`Session` per FUSE mount. libfuse copies the operations table when the session starts
  (``fuse_main_real``), so the entries are replaced on the way in: :func:`serving` marks the
  thread that runs mfusepy's ``FUSE(...)``, and the hook put in place of ``mfusepy.fuse_main_real``
  patches the table that thread passes (other callers of mfusepy pass through unchanged).
- A :class:`Slot` per exposed device: its FUSE file's handle (``fuse_file_info.fh``) names it. The
  device's suspend gate drives it (``Device.block_io``/``unblock_io``/``kill``): the map is
  withdrawn before the gate closes, which waits for the C requests in flight, and the live
  table's map is installed once the gate opens again, so nothing passes a suspend, and a reload
  is seen at its resume. A table gets a map only when every target is exactly ``linear`` or
  ``striped`` over backing files or block devices (:func:`describe`); its readonly flag and size
  come with it (a write to a read-only device, or any request past the end, goes to Python).
- The session's loop is fastio.c's ``dmf_main`` (``fuse_main_real`` with workers of its own): a
  write's data is received page-aligned and goes to the backing file with ``O_DIRECT`` from
  there, a read is read into that buffer, and both are answered on ``/dev/fuse`` without entering
  libfuse's dispatch. Where libfuse lacks the functions it needs, libfuse's loop runs as before.
- An error in C is not reported from C: the request goes to Python, which does it again and
  reports (and counts, for ``striped``) the error as it always has.

What is left is the kernel's part (measured on Linux 6.18, 2 CPUs in a VM; ``scripts/bench
engine`` prints these per MiB). A 1 MiB ``O_DIRECT`` write reaches us as two requests: the
loop device's queue takes 128 segments (``loop_add`` in drivers/block/loop.c leaves the block
layer's default), so a writer's buffer of scattered 4 KiB pages arrives as 2 × 512 KiB; pages
that happen to be contiguous merge into larger segments (964 + 60 KiB), and a buffer on a huge
page arrives whole (FUSE itself carries 1 MiB: libfuse asks for 256 pages, ``FUSE_MAX_PAGES``).
Each request wakes three threads (the loop worker, a FUSE worker, the writer) where the backing
file wakes one: about 40 µs per request (random 4 KiB reads, 105 against 64 µs). Half the
workers' CPU is ``read`` on ``/dev/fuse``: the kernel copying the data into the receive buffer,
which it pins one page at a time (fs/fuse/dev.c ``fuse_copy_fill``).

The floor (``scripts/bench engine --floor``: 10 runs of 5 rounds, 256 MiB passes, load 3.9-5.9;
medians of the 58 rounds' ratios to the backing file): sequential 1 MiB writes reach 0.89×
through the kernel's own loop device over the file, 0.90× through a loop device over FUSE
passthrough (no server in the data path), 0.78× through a loop device over a trivial FUSE server
that makes one ``O_DIRECT`` pwrite per request, and 0.82× through this path (CPU 0.23 s/GiB, the
trivial server's 0.24). The hops alone (that server writing nothing) take 0.22 ms per MiB
against the backing file's 0.52. Reads are 1.00-1.05× on every path. So a server that receives
the bytes stays near 0.8× here: writes at 0.9× need the kernel to move them, which only
passthrough does (below). More workers do not shorten a request: the trivial server answered
1 MiB writes with no disk I/O in 0.184, 0.176 and 0.184 ms per MiB with 2, 4 and 16 threads
(alternating, 60 rounds of 32 MiB, load 5.7).
Not used, and why:

- FUSE passthrough: the backing file is bound to an open file when it is opened
  (``FOPEN_PASSTHROUGH``), and the loop device keeps its one open for life, so a suspend could
  not hold its I/O nor a reload redirect it (measured above all the same: 0.90×).
- FUSE over io_uring: the ``INIT`` reply must announce it, and libfuse 3.14 writes that reply
  itself; the kernel offers it only with the ``fuse`` module's ``enable_uring`` set (off here).
  It would save one system call per request, not a wake-up or the copy.
- Smaller requests (``max_write``), for more of them in flight: 1 MiB writes went 0.52× the
  backing file at 512 KiB, 0.56× at 256 KiB, 0.40× at 128 KiB, with engine CPU 0.28, 0.38 and
  0.51 s/GiB (load 3.4).
- Receiving through a pipe (``splice`` from ``/dev/fuse``, then into the backing file): the
  kernel copies a loop device's pages into pipe pages all the same (fs/fuse/dev.c copies user
  pages), allocating pages instead of pinning ours. A prototype's profile put it near 7% less
  CPU per byte: not worth a second receive path and its fallbacks.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from typing import TYPE_CHECKING, Any, Iterator

from dmtools._ffi import fastio
from dmtools.engine import fuse_io, passthrough
from dmtools.engine.backing import DIRECT_MIN, BackingDevice
from dmtools.engine.basic_targets import LinearTarget, StripedTarget

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.engine.device import Device, LoadedTable

log = logging.getLogger(__name__)

#: Targets whose bytes sit straight on their devices. Exact types: a subclass may move them
#: otherwise (a test target failing on demand).
_FILE_TARGETS = (LinearTarget, StripedTarget)
#: Reads smaller than this go through a descriptor without read-ahead (``POSIX_FADV_RANDOM``):
#: measured, random 4 KiB reads through the read-ahead one made the disk read 25 times the
#: bytes asked for. Sequential streams reach the engine in larger requests.
RANDOM_MAX = 64 << 10


def describe(table: "LoadedTable") -> list[int] | None:
    """The words of ``table``'s map for ``fastio.c`` (``dmf_slot_set``), or ``None`` when some
    target's bytes do not sit straight on a backing file or block device of this process."""
    words = [table.size, int(table.readonly), DIRECT_MIN, RANDOM_MAX, len(table.targets)]
    for start, end, tgt in zip(table.starts, table.ends, table.targets):
        if type(tgt) not in _FILE_TARGETS:
            return None
        layout = tgt.file_layout()  # type: ignore[attr-defined]
        words += [start, end, layout.chunk, len(layout.legs)]
        for handle, base in layout.legs:
            inner = handle.inner
            if not isinstance(inner, BackingDevice):
                return None  # an engine device, an NBD export...
            fd = inner.fileno()
            if fd is None:
                return None
            direct = inner.direct_fileno()
            dfd, align = direct if direct is not None else (-1, 512)
            words += [fd, inner.random_fileno(), dfd, align, base]
    return words


class Session:
    """The C data path of one FUSE mount, from before it starts until it has ended."""

    def __init__(self, lib: fastio.FastIO) -> None:
        self.lib = lib
        self.ctx = 0
        self._lock = threading.Condition()
        self._users = 0
        self._closed = False

    @classmethod
    def create(cls) -> "Session | None":
        """A session, or ``None`` where the C library is unavailable (the log says why)."""
        lib = fastio.load()
        return None if lib is None else cls(lib)

    def attach(self, ops: Any) -> int:
        """Put the C functions into mfusepy's ``fuse_operations`` ``ops`` (before libfuse copies
        it); returns the context for ``fuse_main_real``'s ``user_data``, 0 when not attached."""
        import mfusepy

        fields = type(ops)
        base = ctypes.addressof(ops)
        slots = {name: ctypes.c_void_p.from_address(base + getattr(fields, name).offset) for name in fastio.OPERATIONS}
        python = {name: slot.value for name, slot in slots.items()}
        if not all(python.values()):
            log.warning("exposed devices' I/O runs in Python: mfusepy wired no %s callback",
                        [n for n, v in python.items() if not v])
            return 0
        self.lib.setup(ctypes.cast(mfusepy._libfuse.fuse_get_context, ctypes.c_void_p).value or 0,
                       mfusepy.fuse_context.private_data.offset, mfusepy.fuse_file_info.fh.offset)
        self.ctx = self.lib.ctx_new(python["write"] or 0, python["read_buf"] or 0,
                                    python["init"] or 0, fuse_io.PIPE_MIN_READ, fuse_io.PIPE_BYTES)
        for name, slot in slots.items():
            slot.value = self.lib.operation(name)
        return self.ctx

    @contextlib.contextmanager
    def _using(self) -> Iterator[int]:
        """The context while the session lasts (0 after): :meth:`close` waits for its users."""
        with self._lock:
            if self._closed or not self.ctx:
                yield 0
                return
            self._users += 1
        try:
            yield self.ctx
        finally:
            with self._lock:
                self._users -= 1
                self._lock.notify_all()

    def slot(self) -> "Slot | None":
        """A new slot for a device's file; ``None`` when the session is not attached or full."""
        with self._using() as ctx:
            ident = self.lib.slot_new(ctx) if ctx else 0
        return Slot(self, ident) if ident else None

    def close(self) -> None:
        """The FUSE session has ended: free the context (and every map)."""
        with self._lock:
            self._closed = True
            self._lock.wait_for(lambda: self._users == 0)
            ctx, self.ctx = self.ctx, 0
        if ctx:
            self.lib.ctx_free(ctx)


class Slot:
    """One device's slot: its FUSE file's handle, and the map of its live table while it is open.

    ``on``/``off`` are driven by the device's suspend gate; ``off`` returns once no C request of
    the device is in flight.
    """

    def __init__(self, session: Session, ident: int) -> None:
        self.session = session
        #: the FUSE file handle (``fuse_file_info.fh``) of the device's file.
        self.handle = ident
        self._lock = threading.Lock()
        self.active = False

    def on(self, dev: "Device") -> None:
        """Install the map of ``dev``'s live table, if it has one and the gate is open."""
        with self._lock:
            live = dev.live
            if dev.suspended or dev.removed or live is None:
                return
            try:
                words = describe(live)
            except OSError as err:  # a descriptor without read-ahead could not be opened
                log.warning("%s: I/O runs in Python: %s", dev.name, err)
                return
            if words is None:
                self.active = self._origin(dev.name, live)
                return
            with self.session._using() as ctx:
                if not ctx:
                    return
                try:
                    self.session.lib.slot_set(ctx, self.handle, words)
                except OSError as err:
                    log.warning("%s: I/O runs in Python: %s", dev.name, err)
                    return
            self.active = True

    def _origin(self, name: str, live: "LoadedTable") -> bool:
        """Install the map of a snapshot origin (:mod:`dmtools.engine.passthrough`) if ``live`` is
        one; True when installed."""
        found = passthrough.origin_map(live, self.session)
        if found is None:
            return False
        writes, lower = found
        with self.session._using() as ctx, writes.held() as chunks:
            if not ctx or not chunks:
                return False
            try:
                self.session.lib.slot_set_origin(ctx, self.handle, live.size, live.readonly, chunks, lower)
            except OSError as err:
                log.warning("%s: I/O runs in Python: %s", name, err)
                return False
        writes.installed(self.session)
        return True

    def off(self, timeout: float | None = None) -> None:
        """Withdraw the map and wait (at most ``timeout`` seconds) for the C requests in flight.

        New requests go to Python at once; one still running after ``timeout`` (a backing device
        that hangs) keeps the map, unused, until it is done (the map's descriptors are its own).
        """
        with self._lock:
            with self.session._using() as ctx:
                if ctx:
                    try:
                        self.session.lib.slot_set(ctx, self.handle, None, timeout)
                    except OSError as err:
                        log.debug("fast path slot %d: %s", self.handle, err)
            self.active = False

    def close(self, timeout: float | None = None) -> None:
        """Drop the slot (the device's file is gone), waiting at most ``timeout`` seconds for its
        requests in flight (after that it stays taken, unused, until the session ends)."""
        with self._lock:
            with self.session._using() as ctx:
                if ctx:
                    try:
                        self.session.lib.slot_free(ctx, self.handle, timeout)
                    except OSError as err:
                        log.debug("fast path slot %d: %s", self.handle, err)
            self.active = False

    def stats(self) -> dict[str, int]:
        """Requests and bytes moved in C, and requests handed to Python (``fastio.STATS``)."""
        with self.session._using() as ctx:
            return self.session.lib.slot_stats(ctx, self.handle) if ctx else {}


# --- the hook into mfusepy --------------------------------------------------------------------
_pending = threading.local()
_hook_lock = threading.Lock()
_real_main: Any = None


def _main_hook(argc: int, argv: Any, ops_p: Any, size: int, user_data: Any) -> int:
    """``mfusepy.fuse_main_real``: patch the operations of a thread marked by :func:`serving`."""
    session: Session | None = getattr(_pending, "session", None)
    if session is not None:
        _pending.session = None
        ctx = session.attach(ops_p.contents)
        if ctx:
            import mfusepy

            if session.lib.loop_setup(mfusepy._libfuse):
                session.lib.py_setup()
                return session.lib.main(argc, argv, ops_p, size, ctx)
            user_data = ctypes.c_void_p(ctx)
    return int(_real_main(argc, argv, ops_p, size, user_data))


@contextlib.contextmanager
def serving(session: Session | None) -> Iterator[None]:
    """Around ``mfusepy.FUSE(...)`` on this thread: its session gets ``session``'s C functions."""
    global _real_main
    if session is None:
        yield
        return
    import mfusepy

    with _hook_lock:
        if _real_main is None:
            _real_main = mfusepy.fuse_main_real
            mfusepy.fuse_main_real = _main_hook
    _pending.session = session
    try:
        yield
    finally:
        _pending.session = None
