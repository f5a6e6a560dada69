"""The client's page pool: ``num_pages`` page-aligned 4 KiB pages, never more.

The kernel client reserves pages for its jobs and a job waits (on the ``pages_jobs`` list) until
enough are free (drivers/md/dm-kcopyd.c, ``kcopyd_get_pages``/``run_pages_job``). Here the pages are
one anonymous ``mmap`` (page aligned, so usable with O_DIRECT) cut into runs; a request is served
from one contiguous run when possible, else from several runs (``preadv``-style scatter lists).
The pool never blocks: the client queues jobs and retries when pages come back.
"""

from __future__ import annotations

import bisect
import mmap
import threading

from dmtools.errors import InvalidArgument

__all__ = ["PAGE_SIZE", "PagePool", "Pages"]

#: Page size used for buffers (the kernel's PAGE_SIZE on x86-64; also the O_DIRECT alignment).
PAGE_SIZE = 4096


class Pages:
    """Pages lent to one sub-job: a list of page-aligned ``memoryview`` runs."""

    __slots__ = ("runs", "views", "npages")

    def __init__(self, runs: list[tuple[int, int]], views: list[memoryview]) -> None:
        self.runs = runs
        self.views = views
        self.npages = sum(n for _, n in runs)

    @property
    def nbytes(self) -> int:
        """Capacity in bytes."""
        return self.npages * PAGE_SIZE

    def spans(self, start: int, length: int) -> list[memoryview]:
        """The views covering bytes ``[start, start+length)`` of this buffer, in order."""
        out: list[memoryview] = []
        pos = 0
        end = start + length
        for v in self.views:
            vlen = len(v)
            lo, hi = max(start, pos), min(end, pos + vlen)
            if lo < hi:
                out.append(v[lo - pos : hi - pos])
            pos += vlen
            if pos >= end:
                break
        return out


class PagePool:
    """``num_pages`` pages of ``PAGE_SIZE`` bytes; ``try_alloc`` never exceeds them.

    ``in_use`` and ``peak`` count pages lent out now and at most (tests assert ``peak <= num_pages``).
    """

    def __init__(self, num_pages: int) -> None:
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
            raise InvalidArgument(f"num_pages must be a positive integer, not {num_pages!r}")
        self.num_pages = num_pages
        self._arena = mmap.mmap(-1, num_pages * PAGE_SIZE)
        self._view = memoryview(self._arena)
        # Free runs as parallel sorted lists of start page and length.
        self._free_start: list[int] = [0]
        self._free_len: list[int] = [num_pages]
        self._lock = threading.Lock()
        self.in_use = 0
        self.peak = 0
        self._closed = False

    def try_alloc(self, npages: int) -> Pages | None:
        """Lend ``npages`` pages, or return ``None`` when fewer are free."""
        if npages < 1 or npages > self.num_pages:
            raise InvalidArgument(f"cannot allocate {npages} pages from a pool of {self.num_pages}")
        with self._lock:
            if self._closed:
                raise InvalidArgument("page pool is closed")
            if self.num_pages - self.in_use < npages:
                return None
            runs: list[tuple[int, int]] = []
            # First fit: a single run large enough.
            for i, n in enumerate(self._free_len):
                if n >= npages:
                    start = self._free_start[i]
                    runs.append((start, npages))
                    if n == npages:
                        del self._free_start[i]
                        del self._free_len[i]
                    else:
                        self._free_start[i] = start + npages
                        self._free_len[i] = n - npages
                    break
            else:
                # Scatter: take whole runs from the front until satisfied.
                need = npages
                while need:
                    start, n = self._free_start[0], self._free_len[0]
                    take = min(n, need)
                    runs.append((start, take))
                    if take == n:
                        del self._free_start[0]
                        del self._free_len[0]
                    else:
                        self._free_start[0] = start + take
                        self._free_len[0] = n - take
                    need -= take
            self.in_use += npages
            if self.in_use > self.peak:
                self.peak = self.in_use
        views = [self._view[s * PAGE_SIZE : (s + n) * PAGE_SIZE] for s, n in runs]
        return Pages(runs, views)

    def free(self, pages: Pages) -> None:
        """Take ``pages`` back (coalescing neighbouring free runs)."""
        for v in pages.views:
            v.release()
        pages.views = []
        with self._lock:
            for start, n in pages.runs:
                i = bisect.bisect_left(self._free_start, start)
                # Merge with the following run.
                if i < len(self._free_start) and self._free_start[i] == start + n:
                    n += self._free_len[i]
                    del self._free_start[i]
                    del self._free_len[i]
                # Merge with the preceding run.
                if i > 0 and self._free_start[i - 1] + self._free_len[i - 1] == start:
                    self._free_len[i - 1] += n
                else:
                    self._free_start.insert(i, start)
                    self._free_len.insert(i, n)
            self.in_use -= pages.npages
            pages.runs = []
            pages.npages = 0

    def close(self) -> None:
        """Unmap the pages (every lent page must have come back)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._view.release()
            self._arena.close()
        except BufferError:
            # A slice is still referenced somewhere (say, by a logged exception's traceback):
            # the mapping is then unmapped by the garbage collector instead.
            pass
