"""The last drop of a drop-behind job: the pages ``POSIX_FADV_DONTNEED`` skipped are dropped too.

DONTNEED drops the clean, unlocked, unreferenced folios of a range and passes over the others
without a word: ``find_lock_entries`` (mm/filemap.c) skips a folio it cannot lock, and a folio
under read I/O is locked until the read completes. A drop-behind job's range can hold such
folios when its front passes: the kernel takes clean pages back while the job runs (reclaim
under memory pressure; this host's DAMON ``pageout`` scheme on physical addresses takes tens of
MB/s of unmapped file pages), and a piece still reading faults one of its own pages in again
with the file's readahead window (``read_ahead_kb``, twice that after ``POSIX_FADV_SEQUENTIAL``:
16 MiB on this host's disk), which reads every missing page after it, pieces already read
included. The job's last piece can be done while those reads are in flight, and the pages
they bring in stay cached after the job.

So once the job's whole range is read, :func:`drop_left` asks ``cachestat(2)`` what is still
cached; where something is, it waits for those pages' reads and drops them. ``mincore`` cannot
find them: it reports only uptodate pages (mm/mincore.c), and a page being read is not yet.
``cachestat`` counts it, so the cached runs are found by halving the range where it counts
some but not all. The wait is ``MADV_POPULATE_READ`` on those runs of a ``MADV_RANDOM`` mapping:
it waits for a locked folio, reads ahead nothing (mm/filemap.c ``do_sync_mmap_readahead``
returns at once for ``VM_RAND_READ``), and reads only a page taken back between the two calls.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from dmtools.blockdev import buffer_address
from dmtools.linux import libc
from kcopyd.fastpath import cached_bytes
from kcopyd.mapped import MADV_POPULATE_READ
from kcopyd.pagepool import PAGE_SIZE

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["CHUNK", "cached_runs", "drop_left", "wait_cached"]

#: The range is looked at in chunks this large (one mapping each).
CHUNK = 64 << 20

_madvise: Any = None


def cached_runs(fd: int, offset: int, length: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` runs of file ``fd``'s ``[offset, offset+length)`` (page-aligned) held in
    the page cache, pages being read included (``cachestat``, halving the range)."""
    n = cached_bytes(fd, offset, length) or 0
    if n == 0:
        return []
    if n >= length or length <= PAGE_SIZE:
        return [(offset, offset + length)]
    half = (length // 2 + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
    runs = cached_runs(fd, offset, half)
    for lo, hi in cached_runs(fd, offset + half, length - half):
        if runs and runs[-1][1] == lo:
            runs[-1] = (runs[-1][0], hi)
        else:
            runs.append((lo, hi))
    return runs


def wait_cached(fd: int, offset: int, length: int) -> None:
    """Wait until the pages of file ``fd``'s ``[offset, offset+length)`` (page-aligned, within the
    file) that are in the page cache are read; pages not cached are left alone. ``OSError``
    when the range cannot be mapped."""
    global _madvise
    runs = cached_runs(fd, offset, length)
    if not runs:
        return
    if _madvise is None:
        _madvise = libc().madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=offset)
    try:
        mm.madvise(mmap.MADV_RANDOM)
        view = memoryview(mm)
        addr = buffer_address(view) - offset
        view.release()
        for lo, hi in runs:
            # an error (a page past a shrunken end of file) leaves that run as it is
            _madvise(addr + lo, hi - lo, MADV_POPULATE_READ)
    finally:
        mm.close()


def drop_left(fd: int, offset: int, length: int) -> None:
    """Drop what is still cached of file ``fd``'s ``[offset, offset+length)`` once no read of the
    job is left: wait for the reads in flight there, then ``POSIX_FADV_DONTNEED`` again. Only
    advice, as DONTNEED is: a range that cannot be mapped is dropped without the wait."""
    if not cached_bytes(fd, offset, length):
        return
    end = offset + length
    start = offset - offset % PAGE_SIZE
    size = os.fstat(fd).st_size
    for lo in range(start, end, CHUNK):
        hi = min(lo + CHUNK, end)
        first = max(lo, offset)
        if not cached_bytes(fd, first, hi - first):
            continue
        try:
            if lo < size:
                wait_cached(fd, lo, min(hi, size) - lo)
        except (OSError, ValueError):
            pass
        os.posix_fadvise(fd, first, hi - first, os.POSIX_FADV_DONTNEED)
