"""Helpers shared by the CLI tests of the root and kernel tiers."""

from __future__ import annotations

import os
from typing import Any

MiB = 1 << 20
SECTOR = 512


def devno(path: str) -> str:
    """``major:minor`` of a block device node, as tables print device references."""
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def write_synced(path: str, *pieces: tuple[int, bytes]) -> None:
    """Write each ``(byte offset, data)`` to the block device ``path`` and fsync it."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, data in pieces:
            assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes of ``path`` from byte ``offset``, as the device holds them now.

    A write through a dm device above ``path`` reaches ``path``'s disk, not its page cache: pages
    cached earlier (udev's blkid probe of a new loop device reads its start) would be stale, so
    they are dropped first.
    """
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        f.seek(offset)
        return f.read(size)


class Devices:
    """Device names for one test, derived from ``dm_name`` (so they end in ``-dmtt``).

    ``cleanup()`` resumes and removes whatever still exists and returns those names: a test ends
    with ``assert devices.cleanup() == []`` and the fixture calls it again at teardown.
    """

    def __init__(self, base: str, dm: Any) -> None:
        self.base = base
        self.dm = dm
        self.names: list[str] = []

    def name(self, tag: str = "") -> str:
        """A new name: ``base`` with ``tag`` before the suffix."""
        name = self.base.replace("-dmtt", f"{tag}-dmtt") if tag else self.base
        self.names.append(name)
        return name

    def cleanup(self) -> list[str]:
        """Remove every named device that still exists; return their names."""
        left = []
        for name in self.names:
            if not self.dm.exists(name):
                continue
            left.append(name)
            if self.dm.info(name).suspended:
                self.dm.resume(name)
            self.dm.remove(name, retry=True)
        return left
