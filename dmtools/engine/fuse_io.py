"""The exposure's read replies: bytes moved by the kernel where the targets allow.

libfuse (3.x) can take a read reply as a pipe and splice it into ``/dev/fuse``
(``FUSE_CAP_SPLICE_WRITE``, ``FUSE_CAP_SPLICE_MOVE``), through the ``read_buf`` operation and
its ``struct fuse_bufvec`` (``fuse_common.h``). For a range whose targets put bytes into pipes
themselves (``TargetDriver.pipe_io``: ``linear``, ``striped``) the bytes then never enter this
process: the backing file's page-cache pages are referenced by the pipe and copied once, into the
kernel's request. Other targets read into a ``malloc``'d buffer, as libfuse's own ``read`` does.

Each FUSE worker splices into a pipe of its own, inside the device's suspend gate, and hands
that pipe to libfuse: what the reply carries was read before the gate was left.

Writes stay on libfuse's copy into its buffer (``ZeroCopyFUSE.write``): measured here, receiving
them spliced (``FUSE_CAP_SPLICE_READ``) and splicing the pipe to the backing file cost more CPU
(a fresh page per 4 KiB and a one-page-per-segment direct write) than the copy it saves.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import sys
import termios
import threading
from typing import TYPE_CHECKING, Any

from dmtools.errors import DeviceIOError

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.engine.device import Device

log = logging.getLogger(__name__)

#: ``fuse_common.h`` (libfuse 3): connection capabilities and ``struct fuse_buf`` flags.
FUSE_CAP_SPLICE_WRITE = 1 << 7
FUSE_CAP_SPLICE_MOVE = 1 << 8
FUSE_BUF_IS_FD = 1 << 1
#: ``fcntl.h``: F_SETPIPE_SZ (Linux), not in Python's fcntl before 3.10 on every platform.
F_SETPIPE_SZ = 1031
#: Room of each worker's read pipe: 1 MiB, the default ``/proc/sys/fs/pipe-max-size`` (more
#: needs ``CAP_SYS_RESOURCE``, which a container's root may lack).
PIPE_BYTES = 1 << 20
#: The smallest read worth a pipe: libfuse copies a reply under two pages out of the pipe into
#: memory anyway (``fuse_send_data_iov`` in fuse_lowlevel.c), so those are read into a buffer.
PIPE_MIN_READ = 2 * 4096
#: The largest read spliced into that pipe (256 pages; one that starts mid-page, or pieces of
#: several stripes, may need more: the pipe then fills up and the read takes the buffer path).
PIPE_MAX_READ = PIPE_BYTES


class FuseBuf(ctypes.Structure):
    """``struct fuse_buf``."""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("flags", ctypes.c_int),
        ("mem", ctypes.c_void_p),
        ("fd", ctypes.c_int),
        ("pos", ctypes.c_int64),
    ]


class FuseBufvec(ctypes.Structure):
    """``struct fuse_bufvec`` with its one inline ``buf[1]``."""

    _fields_ = [
        ("count", ctypes.c_size_t),
        ("idx", ctypes.c_size_t),
        ("off", ctypes.c_size_t),
        ("buf", FuseBuf * 1),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_malloc = _libc.malloc
_malloc.restype = ctypes.c_void_p
_malloc.argtypes = [ctypes.c_size_t]
_free = _libc.free
_free.restype = None
_free.argtypes = [ctypes.c_void_p]


def want_splice(conn: Any) -> None:
    """In the ``init`` callback: ask for spliced read replies where the kernel can.

    ``conn`` is libfuse's ``struct fuse_conn_info``. More background requests than the kernel's
    default 12 (``FUSE_DEFAULT_MAX_BACKGROUND``, fs/fuse/inode.c) let a loop device keep a deep
    queue of direct I/O in flight.
    """
    conn.want |= (FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE) & conn.capable
    conn.max_background = 64
    conn.congestion_threshold = 48
    log.debug("FUSE connection: capable %#x, want %#x", conn.capable, conn.want)


def _pending(fd: int) -> int:
    """Bytes waiting in a pipe (``FIONREAD``)."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)


class ReadPipes:
    """Pipes for read replies: one per FUSE worker thread, while it uses one.

    Keyed by ``threading.get_ident()``: libfuse's workers are C threads that get a new Python
    thread state for every callback, so ``threading.local`` would not last. A thread's pipe is
    busy from :meth:`get` to :meth:`put` (its callback), then holds the reply until libfuse has
    spliced it out: only a pipe neither busy nor holding bytes may be closed (:meth:`sweep`). A
    pipe its own thread finds not empty at its next request (a reply abandoned half-way) is
    replaced.
    """

    def __init__(self) -> None:
        self._pipes: dict[int, list[int]] = {}  # ident -> [read fd, write fd, busy]
        self._lock = threading.Lock()
        self.usable = True

    def get(self) -> tuple[int, int] | None:
        """This thread's empty ``(read_fd, write_fd)``, busy until :meth:`put`; ``None`` when
        pipes cannot be sized here."""
        if not self.usable:
            return None
        ident = threading.get_ident()
        with self._lock:
            entry = self._pipes.get(ident)
            if entry is not None:
                if not _pending(entry[0]):
                    entry[2] = 1
                    return entry[0], entry[1]
                self._close(ident)
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_BYTES)
            except OSError as err:
                os.close(r)
                os.close(w)
                log.info("FUSE reads go through buffers: cannot grow a pipe to %d bytes: %s", PIPE_BYTES, err)
                self.usable = False
                return None
            self._pipes[ident] = [r, w, 1]
            return r, w

    def __len__(self) -> int:
        """Pipes open now."""
        return len(self._pipes)

    def put(self) -> None:
        """This thread's callback is over (its pipe may still hold the reply)."""
        entry = self._pipes.get(threading.get_ident())
        if entry is not None:
            entry[2] = 0

    def _close(self, ident: int) -> None:
        r, w, _ = self._pipes.pop(ident)
        os.close(r)
        os.close(w)

    def sweep(self) -> None:
        """Close the pipes no callback holds and no reply still fills (no device left to read)."""
        with self._lock:
            for ident, (r, _, busy) in list(self._pipes.items()):
                if not busy and not _pending(r):
                    self._close(ident)

    def close(self) -> None:
        """Close every pipe (the FUSE loop has ended)."""
        with self._lock:
            for ident in list(self._pipes):
                self._close(ident)


def read_buf(dev: "Device", pipes: ReadPipes, bufpp: Any, size: int, offset: int) -> int:
    """A read request: reply with this thread's pipe, filled by the targets in the kernel, or with
    a ``malloc``'d buffer (libfuse frees both bufvec and buffer: ``fuse_free_buf`` in fuse.c)."""
    pipe = pipes.get() if PIPE_MIN_READ <= size <= PIPE_MAX_READ else None
    try:
        got = None
        if pipe is not None:
            try:
                got = dev.read_to(pipe[1], size, offset)
            except DeviceIOError as err:
                if err.errno != errno.EAGAIN:
                    raise
                # The pipe filled up (pieces of many stripes, each starting mid-page): read the
                # request into a buffer instead; the pipe, left holding a part, is replaced.
        _reply(dev, bufpp, size, offset, pipe[0] if pipe is not None and got else None, got)
    finally:
        if pipe is not None:
            pipes.put()
    return 0


def _reply(dev: "Device", bufpp: Any, size: int, offset: int, fd: int | None, got: int | None) -> None:
    """Store in ``*bufpp`` a ``malloc``'d bufvec: ``got`` bytes in pipe ``fd``, or a buffer that
    ``dev.read`` fills."""
    vec = _malloc(ctypes.sizeof(FuseBufvec))
    if not vec:
        raise OSError(errno.ENOMEM, "no memory for a read reply")
    ctypes.memset(vec, 0, ctypes.sizeof(FuseBufvec))
    bufv = FuseBufvec.from_address(vec)
    bufv.count = 1
    buf = bufv.buf[0]
    try:
        if fd is not None and got:
            buf.size, buf.flags, buf.fd = got, FUSE_BUF_IS_FD, fd
        else:
            buf.mem = _malloc(max(size, 1))
            if not buf.mem:
                raise OSError(errno.ENOMEM, "no memory for a read reply")
            view = (ctypes.c_char * size).from_address(buf.mem)
            buf.size = dev.read(memoryview(view).cast("B"), offset) if size else 0
    except BaseException:
        if buf.mem:
            _free(buf.mem)
        _free(vec)
        raise
    ctypes.cast(bufpp, ctypes.POINTER(ctypes.c_void_p))[0] = vec
