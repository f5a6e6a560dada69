"""The ``copy_file_range`` path between two regular files, and its fallback to buffers.

A job with one destination, both ends regular files, no WRITE_SEQ and no overlap is copied by
the kernel: no buffer, no pages. Its pieces are larger (``OFFLOAD_PIECE_SIZE``) and fewer are in
flight (``OFFLOAD_DEPTH``): writers of one file serialise on its inode lock, so more would only
wait (or spin) for it. The kernel refuses some pairs (EINVAL for non-regular files, EXDEV across
some file systems) and cannot say whether a failure was the read or the write, so a failed piece
is redone, with the rest of the job, through buffers (:meth:`kcopyd.job.Job.fall_back_to_buffers`),
where the errors are exact.
"""

from __future__ import annotations

import errno
import os

from dmtools.endpoint import Endpoint
from dmtools.lazy import logger
from kcopyd.fastpath import cached_bytes
from kcopyd.job import DEST_ZEROED, Piece
from kcopyd.throttle import Throttle

__all__ = ["OFFLOAD_DEPTH", "OFFLOAD_PIECE_SIZE", "can_offload", "copy_offload", "offload_depth", "offload_piece"]

log = logger("kcopyd")

OFFLOAD_PIECE_SIZE = 8 * 1024 * 1024
OFFLOAD_DEPTH = 4


def offload_depth(src: Endpoint, offset: int, length: int) -> int:
    """Pieces in flight for a ``copy_file_range`` job: ``OFFLOAD_DEPTH`` to keep the disk busy
    while the source is read from it; one when the source is (7/8 at least) in the page cache,
    where each piece is a memory copy that the other pieces would only wait behind (measured: the
    same time with a third less CPU, and none of the runs where waiters spin on the inode lock)."""
    fd = src.fileno()
    if fd is None or length <= OFFLOAD_PIECE_SIZE:
        return OFFLOAD_DEPTH
    cached = cached_bytes(fd, offset, length)
    return 1 if cached is not None and 8 * cached >= 7 * length else OFFLOAD_DEPTH


def can_offload(src: Endpoint, dst: Endpoint) -> bool:
    """True when ``copy_file_range`` may be tried between ``src`` and ``dst``."""
    return src.is_regular_file and dst.is_regular_file and None not in (src.fileno(), dst.fileno())


def copy_offload(src_fd: int, dst_fd: int, src_off: int, dst_off: int, length: int) -> None:
    """Copy ``length`` bytes with ``copy_file_range``; raise ``OSError`` on failure."""
    while length > 0:
        n = os.copy_file_range(src_fd, dst_fd, length, src_off, dst_off)
        if n <= 0:
            raise OSError(errno.EIO, "copy_file_range: unexpected end of source")
        src_off += n
        dst_off += n
        length -= n


def offload_piece(piece: Piece, i: int, throttle: Throttle) -> bool:
    """Copy ``piece`` to destination ``i`` (its data segments by ``copy_file_range``, its holes
    zeroed unless ``DEST_ZEROED``); True when it failed."""
    job = piece.job
    src, dst = job.open_src, job.open_dests[i]
    assert src is not None
    try:
        sfd, dfd = src.endpoint.fileno(), dst.endpoint.fileno()
        assert sfd is not None and dfd is not None
        for off, length, is_data in piece.segments:
            if is_data:
                throttle.io_start()
                try:
                    copy_offload(sfd, dfd, src.offset + piece.offset + off, dst.offset + piece.offset + off, length)
                finally:
                    throttle.io_finish()
            elif not job.flags & DEST_ZEROED:
                dst.endpoint.zero(dst.offset + piece.offset + off, length)
    except Exception as err:  # noqa: BLE001
        log.debug("kcopyd: copy_file_range to destination %d failed: %s", i, err)
        return True
    return False
