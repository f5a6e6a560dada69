"""Write-behind: a destination file's written pages go to disk during the copy and leave the cache.

A copy that writes a whole file through the page cache needs as many fresh cache pages as it
writes, and dirties all of them at once; on a virtual machine whose free memory was handed back to
the host (a balloon's free page reporting) every fresh page costs a fault on the host the first
time it is touched, which made a 1 GiB copy to a file spend seconds of system time in
``copy_folio_from_iter_atomic``. As nbdcopy (libnbd ``copy/file-ops.c``) and ``dd oflag=nocache``
do, each range written to a destination is handed to writeback at once (``sync_file_range``
``SYNC_FILE_RANGE_WRITE``, which does not wait), and once more than ``WINDOW`` bytes are behind
it, the oldest range is waited for (``WAIT_BEFORE | WRITE | WAIT_AFTER``) and dropped from the
cache (``POSIX_FADV_DONTNEED``): the copy keeps about ``WINDOW`` bytes of the destination in the
cache, and the pages it drops serve the next writes.

Only destinations written through a page cache (kcopyd's write lanes, one writer at a time, so a
:class:`WriteBehind` is never used by two threads at once) whose range held nothing in the cache
when the job started: a file the caller has cached keeps its pages, as a cached source does.
A writeback error that the wait reports (the file's ``errseq``: ``file_check_and_advance_wb_err``
in mm/filemap.c, which also marks it seen, so a later ``fsync`` would not report it again) fails
the destination: :meth:`WriteBehind.written` raises it, and the client sets the destination's
``write_err`` bit.
"""

from __future__ import annotations

import ctypes
import os
from collections import deque

from dmtools.endpoint import Endpoint
from dmtools.linux import libc
from kcopyd.fastpath import cached_bytes

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Any, Iterator

__all__ = ["CHUNK", "WINDOW", "WriteBehind", "sync_range", "chunks"]

#: Bytes written and not yet waited for, per destination: enough to keep the disk busy while the
#: copy goes on (measured on this project's VM: 2 MiB made the copy wait for the disk, 32 MiB did
#: not), few enough that the cache pages in use stay a small, reused set.
WINDOW = 32 << 20
#: Bytes written to a destination between two hand-overs to writeback: a piece (an NBD copy's are
#: 4 MiB, a batch of waiting pieces more) is written and handed over in steps of this size, so the
#: disk starts on its first MiB while the rest is still being copied into the cache (measured on
#: this project's VM, 1 GiB written from memory with a 32 MiB window, 6 rounds each: 4 MiB steps
#: 0.56-0.67 s, median 0.60; 1 MiB steps 0.51-0.70 s, median 0.52; 256 and 512 KiB as 1 MiB, 2 MiB
#: 0.53-0.56 s).
CHUNK = 1 << 20
#: include/uapi/linux/fs.h
SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4

_sync_file_range: Any = None


def _bind() -> Any:
    fn = libc().sync_file_range
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def sync_range(fd: int, offset: int, length: int, flags: int) -> None:
    """``sync_file_range(2)`` (Python's ``os`` has no binding); raises ``OSError`` on failure."""
    global _sync_file_range
    _sync_file_range = _sync_file_range or _bind()
    if _sync_file_range(fd, offset, length, flags):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def chunks(views: list[memoryview], size: int) -> Iterator[tuple[list[memoryview], int]]:
    """``views`` (back to back) cut into runs of ``size`` bytes (the last may be shorter): each
    run's views and its length."""
    run: list[memoryview] = []
    n = 0
    for v in views:
        while len(v):
            take = min(len(v), size - n)
            run.append(v[:take])
            v = v[take:]
            n += take
            if n == size:
                yield run, n
                run, n = [], 0
    if n:
        yield run, n


class WriteBehind:
    """The ranges of one destination handed to writeback and not yet dropped from the cache."""

    def __init__(self, ep: Endpoint, fd: int, window: int | None = None) -> None:
        self.ep = ep
        self.fd = fd
        self.window = WINDOW if window is None else window
        self._ranges: deque[tuple[int, int]] = deque()
        self._behind = 0

    @classmethod
    def for_destination(cls, ep: Endpoint, offset: int, length: int) -> WriteBehind | None:
        """A write-behind for ``ep``'s range when it is a file with none of the range cached."""
        fd = ep.fileno()
        if fd is None or not ep.is_regular_file or ep.direct:
            return None
        if cached_bytes(fd, offset, length) != 0:  # cached (or unknown: None): left as it is
            return None
        return cls(ep, fd)

    def written(self, offset: int, length: int) -> None:
        """``[offset, offset+length)`` was written: start its writeback; wait for and drop the
        oldest ranges beyond the window. Raises ``OSError`` when writeback failed."""
        sync_range(self.fd, offset, length, SYNC_FILE_RANGE_WRITE)
        self._ranges.append((offset, length))
        self._behind += length
        while self._behind > self.window:
            off, n = self._ranges.popleft()
            self._behind -= n
            sync_range(self.fd, off, n,
                       SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER)
            self.ep.fadvise(off, n, os.POSIX_FADV_DONTNEED)
