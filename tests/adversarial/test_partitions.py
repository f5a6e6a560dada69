"""A disk and its partitions in tables: our engine claims them as the kernel's dm does.

``block/bdev.c`` ``bd_may_claim``: claiming a partition marks its whole disk as claimed "for
partitioning", so the disk cannot be claimed any more, not even by the same holder (every dm
table shares one, ``_dm_claim_ptr``), and a partition of a claimed disk cannot be claimed either;
two partitions of one disk can. Bytes do not matter: a table over a partition and the disk's last
megabyte (no byte shared) is refused all the same. One body runs on the userspace engine (root
tier) and on the kernel (kernel tier, in the VM); the partitions are made with ``BLKPG`` on a loop
device attached with ``--partscan`` (this host's kernel reads no partition table itself).
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmtools import claims
from dmtools.errors import DeviceBusy

MiB = 1 << 20
#: (first byte, length) of partitions 1 and 2 on an 8 MiB disk
PARTS = ((MiB, 2 * MiB), (3 * MiB, 4 * MiB))
#: include/uapi/linux/blkpg.h: BLKPG = _IO(0x12, 105), BLKPG_ADD_PARTITION = 1;
#: struct blkpg_ioctl_arg {int op; int flags; int datalen; void *data;},
#: struct blkpg_partition {long long start, length; int pno; char devname[64], volname[64];}
BLKPG = 0x1269
BLKPG_ADD_PARTITION = 1
_PART = struct.Struct("=qqi64s64s")
_ARG = struct.Struct("@iiiP")  # native: the pointer is aligned as in C


def add_partition(disk: str, number: int, start: int, length: int) -> str:
    """Add partition ``number`` (bytes ``[start, start + length)``) to ``disk``; its path."""
    import ctypes

    part = ctypes.create_string_buffer(_PART.pack(start, length, number, b"", b""), _PART.size)
    arg = _ARG.pack(BLKPG_ADD_PARTITION, 0, _PART.size, ctypes.addressof(part))
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, BLKPG, arg)
    finally:
        os.close(fd)
    path = f"{disk}p{number}"
    assert os.path.exists(path), f"no {path} after BLKPG"
    return path


def _disk(make_image: Callable[..., Path], make_loop: Callable[..., Any]) -> tuple[str, str, str]:
    img = make_image(8 * MiB)
    disk = make_loop(img, partscan=True).path
    p1, p2 = (add_partition(disk, i + 1, start, length) for i, (start, length) in enumerate(PARTS))
    return disk, p1, p2


def _disk_and_partition(dm: Any, tag: str, disk: str, p1: str, p2: str) -> None:
    lin = lambda dev, off=0: f"0 2048 linear {dev} {off}"  # noqa: E731 - 1 MiB over dev
    names = [f"{tag}-{i}-dmtt" for i in range(4)]
    try:
        dm.create(names[0], f"0 2048 linear {p1} 0\n2048 2048 linear {p2} 0")  # two partitions
        before = sorted(e.name for e in dm.list())
        for table in (lin(disk, 14336),  # the disk's last MiB: no byte of a partition
                      lin(disk, 0)):
            with pytest.raises(DeviceBusy):
                dm.create(names[1], table)
        assert sorted(e.name for e in dm.list()) == before  # nothing left behind
        dm.remove(names[0])
        # the other way round: the disk in a table, then one of its partitions
        dm.create(names[2], lin(disk, 14336))
        with pytest.raises(DeviceBusy):
            dm.create(names[3], lin(p1))
        # and a tool claiming the partition meanwhile is refused too
        with pytest.raises(DeviceBusy):
            with claims.claim(p2):
                pass
    finally:
        for name in names:
            if dm.exists(name):
                dm.remove(name, retry=True)


@pytest.mark.root
def test_engine_claims_a_disk_and_its_partitions_as_the_kernel(
        engine: Any, make_image: Callable[..., Path], make_loop: Callable[..., Any]) -> None:
    disk, p1, p2 = _disk(make_image, make_loop)
    _disk_and_partition(engine, "part", disk, p1, p2)
    # the engine's own message names both, and says why
    engine.create("p1-dmtt", f"0 2048 linear {p1} 0")
    try:
        with pytest.raises(DeviceBusy, match=f"{disk} and {p1} are a disk and its partition"):
            engine.create("d-dmtt", f"0 2048 linear {disk} 14336")
        # a tool that claims the disk is told a partition is in use
        with pytest.raises(DeviceBusy, match=r"one of its partitions \(.*p1.*\) is mounted or claimed"):
            with claims.claim(disk):
                pass
        # a second loop device over the same image nests with the partition (one holder)
        second = make_loop(_backing(disk))
        engine.create("second-dmtt", f"0 2048 linear {second.path} 0")
        engine.remove("second-dmtt")
    finally:
        engine.remove("p1-dmtt")


def _backing(disk: str) -> str:
    with open(f"/sys/block/{os.path.basename(disk)}/loop/backing_file") as f:
        return f.read().strip()


@pytest.mark.kernel
def test_kernel_claims_a_disk_and_its_partitions(kernel_dm: Any, kernel_tag: str, make_image: Callable[..., Path],
                                                 make_loop: Callable[..., Any]) -> None:
    disk, p1, p2 = _disk(make_image, make_loop)
    _disk_and_partition(kernel_dm, kernel_tag, disk, p1, p2)
