"""The I/O steps of one buffered sub-job (``copy_file_range`` is in :mod:`kcopyd.offload`).

- reads into page-aligned pooled buffers and writes from them (``preadv``/``pwritev``
  through the endpoints, O_DIRECT on block devices), one read serving every destination.
- ``cachestat(2)`` tells whether a file source's range is in the page cache (an uncached one
  is dropped from the cache once read).
- holes of a sparse source (``Endpoint.data_extents``) are not read: they are skipped when the
  destinations are known to be zero, else written with ``Endpoint.zero`` (fallocate/BLKZEROOUT).

Everything here runs on worker threads; the syscalls release the GIL.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from dmtools.endpoint import Endpoint
from dmtools.errors import DeviceIOError
from dmtools.linux import libc

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Any, Sequence

__all__ = ["Segment", "cached_bytes", "plan_segments", "read_exact", "read_salvage", "write_exact"]

#: A piece-relative ``(offset, length, is_data)`` range; ``is_data`` False means a hole (zeros).
Segment = tuple[int, int, bool]

#: cachestat(2) (Linux 6.5): one number on every architecture (include/uapi/asm-generic/unistd.h).
_NR_CACHESTAT = 451
_syscall: Any = None
_cachestat_missing = False


def cached_bytes(fd: int, offset: int, length: int) -> int | None:
    """Bytes of ``[offset, offset+length)`` of file ``fd`` held in the page cache (``cachestat``).

    ``None`` when the kernel cannot tell (no ``cachestat``, or an error): callers then assume the
    range is cached. Counted in pages, so a partly cached page counts whole.
    """
    global _syscall, _cachestat_missing
    if _cachestat_missing:
        return None
    if _syscall is None:
        fn = libc().syscall
        fn.restype = ctypes.c_long
        _syscall = fn
    rng = struct.pack("=QQ", offset, length)  # struct cachestat_range (include/uapi/linux/mman.h)
    out = ctypes.create_string_buffer(5 * 8)  # struct cachestat: nr_cache, nr_dirty, ...
    res = _syscall(ctypes.c_long(_NR_CACHESTAT), ctypes.c_uint(fd), ctypes.c_char_p(rng), out, ctypes.c_uint(0))
    if res != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # old kernel, or a seccomp filter
            _cachestat_missing = True
        return None
    nr_cache = struct.unpack_from("=Q", out.raw)[0]
    return int(nr_cache) * os.sysconf("SC_PAGE_SIZE")


def read_exact(ep: Endpoint, views: Sequence[memoryview], offset: int) -> None:
    """Fill every view from ``offset`` on; short reads are retried, end of device is an error."""
    for v in views:
        want = len(v)
        got = ep.readinto(v, offset)
        while got < want:
            if got <= 0:
                raise DeviceIOError("unexpected end of device", operation="read", device=ep.name, errno=errno.EIO)
            n = ep.readinto(v[got:], offset + got)
            if n <= 0:
                raise DeviceIOError("unexpected end of device", operation="read", device=ep.name, errno=errno.EIO)
            got += n
        offset += want


def write_exact(ep: Endpoint, views: Sequence[memoryview], offset: int) -> None:
    """Write every view at ``offset`` on, one ``write`` each (a short write is continued)."""
    Endpoint.writev(ep, views, offset)


def read_salvage(ep: Endpoint, view: memoryview, offset: int, grain: int) -> bool:
    """Read what can be read into ``view``; zero-fill unreadable ``grain``-sized blocks.

    Used with IGNORE_ERROR after a failed read: the range is split in halves until the bad blocks
    are found (dm-io zero-fills a failed read bio; here only the blocks that fail are zeroed).
    Returns True when some block was unreadable.
    """
    try:
        read_exact(ep, [view], offset)
        return False
    except Exception:  # noqa: BLE001 - any failure of this range is an unreadable range
        pass
    length = len(view)
    if length <= grain:
        view[:] = bytes(length)
        return True
    half = ((length // 2 + grain - 1) // grain) * grain
    if half >= length:
        half = length - grain
    bad = read_salvage(ep, view[:half], offset, grain)
    return read_salvage(ep, view[half:], offset + half, grain) or bad


def plan_segments(src: Endpoint | None, offset: int, length: int, grain: int) -> list[Segment]:
    """Split ``[offset, offset+length)`` of ``src`` into data and hole segments (piece-relative).

    A hole is only used when it covers whole ``grain``-aligned blocks of the piece (so writes stay
    aligned for O_DIRECT destinations); smaller holes are copied as data. A zero job
    (``src is None``) is one hole.
    """
    if src is None:
        return [(0, length, False)]
    extents = src.data_extents(offset, length)
    if extents is None:
        return [(0, length, True)]
    segs: list[Segment] = []
    pos = 0  # piece-relative end of what is planned
    for ext_off, ext_len in sorted(extents):  # tolerate unsorted or overlapping extents
        lo = max(ext_off - offset, pos)
        hi = min(ext_off + ext_len - offset, length)
        if hi <= lo:
            continue
        # The hole before this extent, rounded inwards to the grain.
        hole_lo = -(-pos // grain) * grain
        hole_hi = (lo // grain) * grain
        if hole_hi > hole_lo:
            if hole_lo > pos:
                _add(segs, pos, hole_lo - pos, True)
            _add(segs, hole_lo, hole_hi - hole_lo, False)
            _add(segs, hole_hi, hi - hole_hi, True)
        else:
            _add(segs, pos, hi - pos, True)
        pos = hi
    if pos < length:
        hole_lo = -(-pos // grain) * grain
        if hole_lo < length:
            if hole_lo > pos:
                _add(segs, pos, hole_lo - pos, True)
            _add(segs, hole_lo, length - hole_lo, False)
        else:
            _add(segs, pos, length - pos, True)
    return segs


def _add(segs: list[Segment], off: int, length: int, is_data: bool) -> None:
    if length <= 0:
        return
    if segs and segs[-1][2] == is_data and segs[-1][0] + segs[-1][1] == off:
        prev = segs[-1]
        segs[-1] = (prev[0], prev[1] + length, is_data)
    else:
        segs.append((off, length, is_data))
