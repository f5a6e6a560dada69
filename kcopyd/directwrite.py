"""Direct writes: a streamed copy writes an uncached destination file with ``O_DIRECT``.

A copy from an NBD export (a streamed source, ``NbdEndpoint.stream_read``) lands each piece in
the pool's page-aligned pages. Written through the page cache, every byte is copied once more
(into the cache), its pages are allocated, marked dirty, written back and dropped again
(:mod:`kcopyd.writebehind`); that copy and its bookkeeping were the largest part of the
process's CPU (perf, 1 GiB export -> file: ``copy_folio_from_iter_atomic`` 17% of the samples,
the socket's ``_copy_to_iter`` 9%, ext4's buffer heads and delayed allocation several more).
Written with ``O_DIRECT`` the disk takes the bytes from the pool's pages: no second copy, no
cache pages, and a write's error is its own call's (exact ``write_err``), not a later
writeback's.

Only a destination that write-behind would take (a regular file, none of the job's range cached,
the client's ``write_behind`` on): a file someone has cached keeps its pages and is written
through them. The twin descriptor is opened through ``/proc/self/fd`` (the same open file, not a
path that may name another one by now). Writes go direct only where they are aligned to the page
and to the file system's logical block size, in offset, length and buffer; the rest (a job's
unaligned tail, hole segments zeroed by ``Endpoint.zero``) goes through the endpoint as before,
on pages no direct write touches. A direct write that the file system refuses (``EINVAL``,
``EOPNOTSUPP``) is redone through the endpoint and the destination stops writing direct; any
other error is the destination's write error.

A direct write waits for the disk: kcopyd then writes streamed pieces on its workers, so the
connections' pump threads go on reading meanwhile, and the destination gets no write lane
(parallel direct writes fill the disk's queue).
"""

from __future__ import annotations

import errno
import os
import stat

from dmtools.blockdev import _sysfs_dio_alignment, buffer_address
from dmtools.endpoint import Endpoint
from kcopyd.fastpath import cached_bytes
from kcopyd.pagepool import PAGE_SIZE

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Sequence

__all__ = ["DirectWriter", "REFUSED"]

#: Errors of a direct write that mean "not this way" (the file system refuses ``O_DIRECT`` or the
#: request's alignment), not a failed destination.
REFUSED = (errno.EINVAL, errno.EOPNOTSUPP)


class DirectWriter:
    """An ``O_DIRECT`` descriptor of one destination file, for a job's aligned writes."""

    def __init__(self, fd: int, align: int) -> None:
        self.fd = fd
        self.align = align
        self.refused = False  # the file system refused a direct write: none are tried again

    @classmethod
    def for_destination(cls, ep: Endpoint, offset: int, length: int) -> DirectWriter | None:
        """A direct writer for ``ep``'s range when it is a regular file written through the page
        cache with none of the range cached; ``None`` otherwise, or when ``O_DIRECT`` cannot be
        opened on it."""
        fd = ep.fileno()
        if fd is None or not ep.is_regular_file or ep.direct or ep.read_only:
            return None
        if cached_bytes(fd, offset, length) != 0:  # cached (or unknown: None): left as it is
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            twin = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:  # no /proc, or a file system without O_DIRECT
            return None
        return cls(twin, max(PAGE_SIZE, _sysfs_dio_alignment(st.st_dev)))

    def takes(self, views: Sequence[memoryview], offset: int) -> bool:
        """True when ``views`` written back to back at ``offset`` can go direct."""
        if self.refused or offset % self.align:
            return False
        align = self.align
        for v in views:
            if len(v) % align or buffer_address(v) % align:
                return False
        return True

    def write(self, views: Sequence[memoryview], offset: int) -> None:
        """Write ``views`` back to back at ``offset`` (short writes continued); raises ``OSError``."""
        pending = [v for v in views if len(v)]
        while pending:
            n = os.pwritev(self.fd, pending, offset)
            if n <= 0:
                raise OSError(errno.ENOSPC, "the file took no data")
            offset += n
            while pending and n >= len(pending[0]):
                n -= len(pending.pop(0))
            if n:
                pending[0] = pending[0][n:]

    def close(self) -> None:
        """Close the twin descriptor (once)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
