"""Reads and writes of a block device as tests need them: reads that bypass the page cache's stale
pages, writes that are on the device when the call returns, and ``O_DIRECT`` requests that reach
the device's driver (an exposed device's FUSE file) as they are."""

from __future__ import annotations

import errno
import os

from dmtools.blockdev import aligned_buffer

__all__ = ["read_direct", "read_uncached", "write_direct", "write_synced"]


def read_uncached(path: str, size: int, offset: int = 0) -> bytes:
    """``size`` bytes at ``offset``, after dropping the device's cached pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def write_synced(path: str, data: bytes, offset: int = 0) -> None:
    """Write ``data`` at ``offset`` and fsync."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_direct(path: str, data: bytes, offset: int, flags: int = 0) -> None:
    """Write ``data`` at ``offset`` with one ``O_DIRECT`` request (open ``flags`` added)."""
    buf = aligned_buffer(len(data))
    buf[:] = data
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | flags)
    try:
        if os.pwritev(fd, [buf], offset) != len(data):
            raise OSError(errno.EIO, f"short O_DIRECT write to {path}")
    finally:
        os.close(fd)


def read_direct(path: str, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset``, read with one ``O_DIRECT`` request."""
    buf = aligned_buffer(size)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        if os.preadv(fd, [buf], offset) != size:
            raise OSError(errno.EIO, f"short O_DIRECT read of {path}")
    finally:
        os.close(fd)
    return bytes(buf)
