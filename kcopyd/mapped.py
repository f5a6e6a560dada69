"""Mapped sources: a file source's piece is written from its page-cache pages, not copied out first.

A buffered piece costs one copy more than its destinations need: ``preadv`` copies the source's
page-cache pages into a pooled buffer, and each destination then copies that buffer again (into
its own page cache, or into a socket). When every destination's write is a system call that
takes the caller's buffer as it is (``Endpoint.writes_by_kernel``: ``pwritev`` to a file or
block device, ``send(2)`` of libnbd's plain connections), the piece's range of the source is
mapped read-only (``mmap`` ``MAP_SHARED``, the page cache's own pages) and the destinations are
written from the mapping: the read copy disappears (measured: a third of the CPU of a 1 GiB
file -> file + NBD copy).

Nothing in this process reads a mapping: only the kernel does, inside the destinations' system
calls, where a page that cannot be brought in fails the call (EFAULT) instead of raising SIGBUS
(arch/x86/mm/extable.c: a fault in a uaccess copy is fixed up). The "read" of a mapped piece is
``MADV_POPULATE_READ`` (Linux 5.14, mm/madvise.c): it faults the range in, reading it from disk,
and returns an error where a user access would get SIGBUS, so a source that cannot be read is
found before any destination is written, and the piece is then read through buffers instead,
where errors are exact and ``IGNORE_ERROR`` zero-fills unreadable blocks. A destination write
that fails on a mapped piece asks the source again (:meth:`SourceMap.readable`): a source
truncated meanwhile is the source's error (``read_err``), not the destination's.

The pieces in flight keep their pool pages (unused unless a piece falls back to buffers), so the
mapped bytes in flight never exceed the client's pages; a piece's mapping is removed when its
writes are done, before its pages return to the pool.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from dmtools.blockdev import buffer_address
from dmtools.linux import libc
from kcopyd.pagepool import PAGE_SIZE

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["MADV_POPULATE_READ", "SourceMap", "can_map", "supported"]

#: include/uapi/asm-generic/mman-common.h (Linux 5.14); Python 3.11's mmap module lacks it.
MADV_POPULATE_READ = 22

_madvise: Any = None
_unsupported = False


def supported() -> bool:
    """False once the kernel refused ``MADV_POPULATE_READ`` (older than 5.14)."""
    return not _unsupported


def can_map(src: Any, dests: list[Any]) -> bool:
    """True when a piece of endpoint ``src`` may be written to ``dests`` from a mapping of it:
    a regular file read through the page cache, and destinations that only hand buffers to the
    kernel (:attr:`dmtools.endpoint.Endpoint.writes_by_kernel`)."""
    if _unsupported or not src.is_regular_file or src.direct or src.fileno() is None:
        return False
    return all(d.writes_by_kernel for d in dests)


def _bind() -> Any:
    fn = libc().madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class SourceMap:
    """``length`` bytes of file ``fd`` from ``offset``, mapped read-only; offsets are relative to
    ``offset``. Raises ``OSError`` when the range cannot be mapped."""

    __slots__ = ("offset", "_mm", "_addr", "view")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.offset = offset
        skip = offset % PAGE_SIZE
        self._mm = mmap.mmap(fd, skip + length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=offset - skip)
        whole = memoryview(self._mm)
        self._addr = buffer_address(whole) + skip
        self.view = whole[skip:]
        whole.release()
        try:
            self._mm.madvise(mmap.MADV_SEQUENTIAL)  # faults read ahead, as the file's reads do
        except OSError:
            pass

    def populate(self, start: int, length: int) -> None:
        """Fault ``[start, start+length)`` in (read from disk now, the GIL released meanwhile);
        ``OSError`` where reading it would fail."""
        global _madvise, _unsupported
        if length <= 0:
            return
        _madvise = _madvise or _bind()
        # madvise wants a page-aligned start: round down (the bytes before are the file's too).
        addr = self._addr + start
        lo = addr - addr % PAGE_SIZE
        if _madvise(lo, addr + length - lo, MADV_POPULATE_READ) != 0:
            code = ctypes.get_errno()
            if code == errno.EINVAL:
                _unsupported = True  # a kernel before 5.14: buffers from now on
            raise OSError(code, os.strerror(code))

    def readable(self, start: int, length: int) -> bool:
        """True when ``[start, start+length)`` can still be faulted in (after a write failed)."""
        try:
            self.populate(start, length)
        except OSError:
            return False
        return True

    def spans(self, start: int, length: int) -> list[memoryview]:
        """The mapping's bytes ``[start, start+length)`` as one view (for the destinations' writes)."""
        return [self.view[start : start + length]]

    def release(self) -> None:
        """Remove the mapping; a view still referenced (a logged traceback) leaves it to the
        garbage collector."""
        try:
            self.view.release()
            self._mm.close()
        except BufferError:
            pass
