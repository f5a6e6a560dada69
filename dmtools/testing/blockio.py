"""Reads and writes of a block device as kernel-tier tests need them: reads that bypass the page
cache's stale pages, writes that are on the device when the call returns."""

from __future__ import annotations

import os

__all__ = ["read_uncached", "write_synced"]


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
