"""Backing files and block devices of engine tables: page cache for small I/O, ``O_DIRECT`` for big writes.

Large sequential writes through the page cache leave the whole volume to be written back at the
next flush; sending writes of ``DIRECT_MIN`` bytes or more (aligned to the logical block size)
through a second ``O_DIRECT`` descriptor writes them as they come, like the kernel's dm targets
do. The kernel keeps the two paths coherent (a direct write writes back and invalidates cached
pages of its range). Reads stay buffered: the backing device's read-ahead serves sequential reads
better than one direct request at a time.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import threading
from typing import TYPE_CHECKING, Any

from dmtools.blockdev import BlockDevice, aligned_buffer, buffer_address
from dmtools.endpoint import ForwardingEndpoint
from dmtools.errors import DMError

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.claims import Claim

#: Smallest write sent through ``O_DIRECT``.
DIRECT_MIN = 256 << 10

_bounce: "queue.SimpleQueue[mmap.mmap]" = queue.SimpleQueue()


def _take(size: int) -> mmap.mmap:
    """A bounce buffer of at least ``size`` bytes, on huge pages (``aligned_buffer``)."""
    try:
        buf = _bounce.get_nowait()
    except queue.Empty:
        return aligned_buffer(size, huge=True)
    if len(buf) < size:
        buf.close()
        return aligned_buffer(size, huge=True)
    return buf


def _copy(dst: mmap.mmap, src: memoryview, n: int) -> None:
    """Copy ``n`` bytes with the GIL released (``ctypes.memmove``), so FUSE threads overlap."""
    ctypes.memmove(ctypes.addressof(ctypes.c_char.from_buffer(dst)), buffer_address(src), n)


class BackingDevice(ForwardingEndpoint):
    """A ``BlockDevice`` (``inner``, buffered) plus an ``O_DIRECT`` twin for large aligned writes;
    all but writes, :meth:`plain_fd` and :meth:`direct_fileno` go to ``inner``."""

    inner: BlockDevice

    def __init__(self, path: str, *, writable: bool) -> None:
        super().__init__(BlockDevice(path, writable=writable))
        self.path = path
        #: the engine's claim on the device, released by ``close`` (set by ``resolve``).
        self.claim: "Claim | None" = None
        # Requests arrive split over several FUSE threads, which hides their sequential pattern
        # from read-ahead; a larger read-ahead window keeps sequential reads streaming (random
        # reads are unaffected: their initial window depends on the request size).
        self.inner.fadvise(0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._direct: BlockDevice | None = None
        self._random: int | None = None
        self._random_lock = threading.Lock()
        if writable:
            try:
                self._direct = BlockDevice(path, writable=True, direct=True)
            except DMError:
                self._direct = None  # the file system cannot do O_DIRECT: buffered only

    @property
    def devno(self) -> tuple[int, int] | None:
        """``(major, minor)`` of a block device, ``None`` for a regular file."""
        return self.inner.devno

    def plain_fd(self, length: int, write: bool) -> int:
        """The buffered descriptor's (:meth:`BlockDevice.plain_fd`), except for a write that
        :meth:`write` sends through the ``O_DIRECT`` twin (``DIRECT_MIN`` bytes or more)."""
        if write and length >= DIRECT_MIN and self._direct is not None:
            return -1
        return self.inner.plain_fd(length, write)

    def random_fileno(self) -> int:
        """A read-only descriptor of the same file without read-ahead (``POSIX_FADV_RANDOM``),
        for small reads that the read-ahead of the main one would inflate; opened on first use
        (through ``/proc/self/fd``: the same file, even if its path changed since)."""
        with self._random_lock:
            if self._random is None:
                fd = os.open(f"/proc/self/fd/{self.inner.fileno()}", os.O_RDONLY | os.O_CLOEXEC)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._random = fd
            return self._random

    def direct_fileno(self) -> tuple[int, int] | None:
        """The ``O_DIRECT`` twin's descriptor and alignment (its logical block size), used for
        writes of ``DIRECT_MIN`` bytes or more; ``None`` without one."""
        direct = self._direct
        return None if direct is None else (direct.fileno(), direct.logical_block_size)

    def write(self, buf: Any, offset: int) -> int:
        direct = self._direct
        mv = memoryview(buf).cast("B")
        n = len(mv)
        if direct is None or n < DIRECT_MIN:
            return self.inner.write(mv, offset)
        align = direct.logical_block_size
        if offset % align or n % align:
            return self.inner.write(mv, offset)
        if buffer_address(mv) % align == 0:
            # The caller's buffer can go to the disk as it is (kcopyd's pages, aligned_buffer):
            # the copy below cost more than the write's own CPU (0.176 s of 0.52 s for 512 MiB in
            # 1 MiB writes under cProfile: a buffer that just went out by DMA is cold).
            return direct.write(mv, offset)
        bounce = _take(n)
        try:
            _copy(bounce, mv, n)
            # One request, not pieces: measured on virtio, a 1 MiB write in 256 KiB pieces issued
            # in parallel took twice as long as the single write.
            direct.write(memoryview(bounce)[:n], offset)
        finally:
            _bounce.put(bounce)
        return n

    def splice_to(self, pipe: int, offset: int, length: int) -> None:
        self.inner.splice_to(pipe, offset, length)

    def close(self) -> None:
        if self._random is not None:
            os.close(self._random)
            self._random = None
        self.inner.close()
        if self._direct is not None:
            self._direct.close()
        if self.claim is not None:
            self.claim.release()
