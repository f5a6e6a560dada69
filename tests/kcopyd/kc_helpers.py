"""Helpers shared by the kcopyd tests (imported as ``kc_helpers``)."""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from typing import Any, Callable

#: Every blocking wait in these tests is bounded by this many seconds.
TIMEOUT = 30.0


def pattern(nbytes: int, seed: int = 1) -> bytes:
    """Non-repeating test data: each 512-byte sector carries its number and the seed."""
    out = bytearray(nbytes)
    for s in range(0, nbytes, 512):
        chunk = f"{seed:08x}:{s // 512:016x}:".encode() * 20
        out[s : s + 512] = chunk[: min(512, nbytes - s)]
    return bytes(out)


class Dev:
    """A test device: ``dev`` goes into a Region, ``read()`` returns its whole content."""

    def __init__(self, dev: Any, read: Callable[[], bytes], path: str | None = None) -> None:
        self.dev = dev
        self.read = read
        self.path = path


class Recorder:
    """A notify callback that records its calls and signals the first."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, int, Any]] = []
        self.threads: set[int] = set()
        self.event = threading.Event()

    def __call__(self, read_err: bool, write_err: int, context: Any) -> None:
        self.threads.add(threading.get_ident())
        self.calls.append((read_err, write_err, context))
        self.event.set()

    def wait(self) -> tuple[bool, int, Any]:
        assert self.event.wait(TIMEOUT), "notify was never called"
        return self.calls[0]


def make_writable(path: str) -> None:
    """Clear a read-only policy (BLKROSET) that a previous user of this loop device left behind:
    it outlives detaching, and the engine's read-only exposure sets it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, 0x125D, struct.pack("i", 0))  # BLKROSET, include/uapi/linux/fs.h
    finally:
        os.close(fd)


def evict_file(path: Any) -> None:
    """Write a file back and drop its pages from the page cache (the next read goes to the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached(path: Any) -> int:
    """Bytes of the file in the page cache; skips the test where cachestat(2) cannot tell.

    Tests compare it with half the file, not with all of it: kept and dropped differ by the whole
    file, and this host's kernel pages out cold memory on its own (a DAMON ``pageout`` scheme on
    physical addresses), which can take a page of a file just read."""
    import pytest

    from kcopyd.fastpath import cached_bytes

    fd = os.open(path, os.O_RDONLY)
    try:
        n = cached_bytes(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    if n is None:
        pytest.skip("cachestat(2) is missing here (Linux < 6.5): kcopyd then keeps every page cached")
    return n
