"""Kernel tier (``scripts/vmtest tests/thin/test_target_kernel.py``): our userspace thin-pool/thin
targets against the kernel's dm-thin-pool, over the same image files.

* a pool our target wrote (thin devices, a snapshot, partial and whole-block writes, discards, a
  deleted device, a transaction id) activates on the kernel: every thin device reads what ours
  read, the pool's and the thin devices' status text is the kernel's text, character for
  character, and thin_check passes after the kernel wrote to it;
* a pool the kernel wrote (dmsetup messages and writes) activates on our target: every device
  reads what the kernel's read, the status text is the one the kernel printed last.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from dmtools.engine import Engine
from dmtools.testing.blockio import read_uncached, write_synced
from dmtools.testing.loops import LoopTracker

pytestmark = pytest.mark.kernel

BS = 128  # sectors per data block (64 KiB)
BLOCK = BS * 512
NR_BLOCKS = 256
VOL_BLOCKS = 96
VOL = VOL_BLOCKS * BLOCK


def _files(tmp_path: Path) -> tuple[Path, Path]:
    meta, data = tmp_path / "dmtt-meta.img", tmp_path / "dmtt-data.img"
    for path, size in ((meta, 8 << 20), (data, NR_BLOCKS * BLOCK)):
        with open(path, "wb") as f:
            f.truncate(size)
    return meta, data


def _pool_table(meta: str, data: str) -> str:
    return f"0 {NR_BLOCKS * BS} thin-pool {meta} {data} {BS} 0 0"


def _history(dm: Any, pool: str, thin_path: Any, activate: Any, rng: random.Random) -> None:
    """The same operations on either backend: thin 1 written, snapshot 2, both written, a discard,
    thin 3 made, written and deleted, the transaction id moved."""
    dm.message(pool, 0, "create_thin 1")
    activate(1)
    for _ in range(30):
        size = rng.choice([4096, BLOCK, 3 * BLOCK, 100 * 512])
        thin_path(1, "write", rng.randbytes(size), rng.randrange(0, (VOL - size) // 512) * 512)
    dm.suspend(f"{pool}-t1")
    dm.message(pool, 0, "create_snap 2 1")
    dm.resume(f"{pool}-t1")
    activate(2)
    for dev in (1, 2, 1):
        for _ in range(12):
            size = rng.choice([4096, BLOCK])
            thin_path(dev, "write", rng.randbytes(size), rng.randrange(0, (VOL - size) // 512) * 512)
    thin_path(1, "discard", None, 10 * BLOCK, 6 * BLOCK)
    dm.message(pool, 0, "create_thin 3")
    activate(3)
    thin_path(3, "write", rng.randbytes(2 * BLOCK), 0)
    dm.remove(f"{pool}-t3", retry=True)  # udev may be probing it after the write
    dm.message(pool, 0, "delete 3")
    dm.message(pool, 0, "set_transaction_id 0 4")


def _engine_io(eng: Engine, pool: str) -> tuple[Any, Any]:
    def activate(dev: int) -> None:
        eng.create(f"{pool}-t{dev}", f"0 {VOL // 512} thin {eng.device_ref(pool)} {dev}")

    def io(dev: int, op: str, data: bytes | None, offset: int, length: int = 0) -> None:
        with eng.open_endpoint(f"{pool}-t{dev}") as ep:
            if op == "write":
                assert data is not None
                ep.write(data, offset)
                ep.flush()
            else:
                ep.discard(offset, length)

    return io, activate


def _kernel_io(kdm: Any, pool: str) -> tuple[Any, Any]:
    def activate(dev: int) -> None:
        kdm.create(f"{pool}-t{dev}", f"0 {VOL // 512} thin /dev/mapper/{pool} {dev}")

    def io(dev: int, op: str, data: bytes | None, offset: int, length: int = 0) -> None:
        path = f"/dev/mapper/{pool}-t{dev}"
        if op == "write":
            assert data is not None
            write_synced(path, data, offset)
        else:
            import fcntl
            import struct

            fd = os.open(path, os.O_WRONLY)
            try:
                fcntl.ioctl(fd, 0x1277, struct.pack("QQ", offset, length))  # BLKDISCARD
            finally:
                os.close(fd)

    return io, activate


def test_kernel_activates_what_our_target_wrote(kernel_dm: Any, kernel_tag: str, thin_tools: Any,
                                                tmp_path: Path) -> None:
    meta, data = _files(tmp_path)
    pool = f"{kernel_tag}-pool"
    eng = Engine()
    try:
        eng.create(pool, _pool_table(str(meta), str(data)))
        io, activate = _engine_io(eng, pool)
        _history(eng, pool, io, activate, random.Random(11))
        ours = {dev: bytes(_engine_read(eng, f"{pool}-t{dev}")) for dev in (1, 2)}
        our_status = {n: eng.status(n)[0].params for n in (pool, f"{pool}-t1", f"{pool}-t2")}
    finally:
        eng.close()  # the pool commits as it goes
    with LoopTracker() as loops:
        ml, dl = loops.attach(meta), loops.attach(data)
        thin_tools.check(Path(ml.path))  # on the loop device: thin_check opens with O_DIRECT
        kernel_dm.create(pool, _pool_table(ml.path, dl.path))
        _, kactivate = _kernel_io(kernel_dm, pool)
        for dev in (1, 2):
            kactivate(dev)
            assert read_uncached(f"/dev/mapper/{pool}-t{dev}", VOL) == ours[dev], f"thin {dev}"
        kernel_status = {n: kernel_dm.status(n)[0].params for n in our_status}
        assert kernel_status == our_status
        # the kernel writes into our pool: a partial write to a block thin 2 shares, a new block
        write_synced(f"/dev/mapper/{pool}-t1", b"\x5a" * 4096, 40 * BLOCK + 8192)
        write_synced(f"/dev/mapper/{pool}-t1", b"\xa5" * BLOCK, 90 * BLOCK)
        for name in (f"{pool}-t1", f"{pool}-t2", pool):
            kernel_dm.remove(name, retry=True)  # udev may be probing it after the writes
        thin_tools.check(Path(ml.path))


def test_our_target_reads_what_the_kernel_wrote(kernel_dm: Any, kernel_tag: str, thin_tools: Any,
                                                tmp_path: Path) -> None:
    meta, data = _files(tmp_path)
    pool = f"{kernel_tag}-pool"
    with LoopTracker() as loops:
        ml, dl = loops.attach(meta), loops.attach(data)
        kernel_dm.create(pool, _pool_table(ml.path, dl.path))
        io, activate = _kernel_io(kernel_dm, pool)
        _history(kernel_dm, pool, io, activate, random.Random(12))
        theirs = {dev: read_uncached(f"/dev/mapper/{pool}-t{dev}", VOL) for dev in (1, 2)}
        kernel_status = {n: kernel_dm.status(n)[0].params for n in (pool, f"{pool}-t1", f"{pool}-t2")}
        for name in (f"{pool}-t1", f"{pool}-t2", pool):
            kernel_dm.remove(name, retry=True)
        thin_tools.check(Path(ml.path))
    eng = Engine()
    try:
        eng.create(pool, _pool_table(str(meta), str(data)))
        _, activate = _engine_io(eng, pool)
        for dev in (1, 2):
            activate(dev)
            assert bytes(_engine_read(eng, f"{pool}-t{dev}")) == theirs[dev], f"thin {dev}"
        assert {n: eng.status(n)[0].params for n in kernel_status} == kernel_status
    finally:
        eng.close()


def _engine_read(eng: Engine, name: str) -> bytearray:
    buf = bytearray(VOL)
    with eng.open_endpoint(name, writable=False) as ep:
        assert ep.readinto(buf, 0) == VOL
    return buf
