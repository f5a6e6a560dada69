"""Kernel tier (run in the VM: ``scripts/vmtest tests/thin/test_thin_kernel.py``): our metadata
against the kernel's dm-thin-pool.

* a pool the kernel wrote (dmsetup messages create_thin/create_snap, writes through the thin
  devices): our dump equals thin_dump's, our check passes, and ``thin export`` of each volume
  equals the bytes the kernel's thin device reads;
* a pool whose metadata we wrote activates on the kernel, each thin device reads what we put there,
  and after the kernel has written to it (breaking sharing) thin_check and our check still pass.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from thin_helpers import build_pool, volume_bytes

from thin.metadata import ThinMetadata, dump_xml
from thin.metadata.check import check
from thin.offline import export

pytestmark = pytest.mark.kernel

BS = 128  # sectors per data block (64 KiB)
BLOCK = BS * 512
NR_BLOCKS = 256
VOL = 8 << 20  # each thin volume: 128 blocks


@pytest.fixture
def tag(kernel_tag: str) -> str:
    """A unique name prefix; the plugin removes its devices afterwards (thins before the pool)."""
    return kernel_tag


def _read(path: str, size: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read(size)


def _write(path: str, data: bytes, offset: int) -> None:
    with open(path, "r+b", buffering=0) as f:
        f.seek(offset)
        f.write(data)
        os.fsync(f.fileno())


def _our_dump(meta: Path) -> str:
    out = io.StringIO()
    with ThinMetadata.open(meta) as md:
        dump_xml(md, out)
    return out.getvalue()


def _compare_with_thin_tools(thin_tools: Any, meta: Path) -> str:
    """thin_check passes, our dump equals thin_dump's, our check passes; returns the dump.

    The tools run on the loop device: thin_check opens with O_DIRECT, which the VM's /tmp lacks.
    """
    thin_tools.check(meta)
    theirs = thin_tools.dump(meta)
    assert _our_dump(meta) == theirs
    report = check(meta)
    assert report.ok and not report.leaks, (report.errors, report.leaks)
    return str(theirs)


def _pool(kernel_dm: Any, tag: str, meta_loop: Any, data_loop: Any) -> str:
    pool = f"{tag}-pool"
    kernel_dm.create(pool, f"0 {NR_BLOCKS * BS} thin-pool {meta_loop.path} {data_loop.path} {BS} 0")
    return pool


def _thin(kernel_dm: Any, tag: str, pool: str, dev_id: int) -> str:
    name = f"{tag}-t{dev_id}"
    kernel_dm.create(name, f"0 {VOL // 512} thin /dev/mapper/{pool} {dev_id}")
    return f"/dev/mapper/{name}"


def test_we_read_the_kernels_pool(kernel_dm: Any, thin_tools, tmp_path: Path, make_loop: Callable[..., Any],
                                  tag: str) -> None:
    meta, data = tmp_path / "dmtt-meta.img", tmp_path / "dmtt-data.img"
    for path, size in ((meta, 8 << 20), (data, NR_BLOCKS * BLOCK)):
        with open(path, "wb") as f:
            f.truncate(size)
    ml, dl = make_loop(meta), make_loop(data)
    pool = _pool(kernel_dm, tag, ml, dl)  # the kernel formats the zeroed metadata
    rng = random.Random(7)
    kernel_dm.message(pool, 0, "create_thin 1")
    t1 = _thin(kernel_dm, tag, pool, 1)
    for _ in range(40):  # partial and whole-block writes
        size = rng.choice([4096, BLOCK, 3 * BLOCK, 100 * 512])
        _write(t1, rng.randbytes(size), rng.randrange(0, (VOL - size) // 512) * 512)
    kernel_dm.suspend(f"{tag}-t1")
    kernel_dm.message(pool, 0, "create_snap 2 1")
    kernel_dm.resume(f"{tag}-t1")
    t2 = _thin(kernel_dm, tag, pool, 2)
    for thin in (t1, t2, t1):
        for _ in range(15):
            size = rng.choice([4096, BLOCK])
            _write(thin, rng.randbytes(size), rng.randrange(0, (VOL - size) // 512) * 512)
    kernel_dm.message(pool, 0, "set_transaction_id 0 5")
    views = {1: _read(t1, VOL), 2: _read(t2, VOL)}
    for name in (f"{tag}-t1", f"{tag}-t2", pool):  # the pool commits when it goes
        kernel_dm.remove(name, retry=True)  # udev may be probing it after the writes
    theirs = _compare_with_thin_tools(thin_tools, Path(ml.path))
    assert 'transaction="5"' in theirs and 'time="1"' in theirs
    for dev_id, view in views.items():
        out = tmp_path / f"vol{dev_id}.img"
        export(ml.path, dl.path, dev_id, out, size=VOL)
        assert out.read_bytes() == view, f"thin {dev_id}"
    # and we change what the kernel wrote: a snapshot, new mappings, a deletion
    with ThinMetadata.open(ml.path, writable=True, data_block_size=BS) as md:
        md.create_snap(3, 2)
        for v in range(100, 120):
            md.insert(3, v, md.alloc_data_block())
        md.delete(1)
        md.commit()
    theirs = _compare_with_thin_tools(thin_tools, Path(ml.path))
    assert '<device dev_id="1"' not in theirs and '<device dev_id="3" mapped_blocks=' in theirs


def test_kernel_activates_our_pool(kernel_dm: Any, thin_tools, tmp_path: Path, make_loop: Callable[..., Any],
                                   tag: str) -> None:
    meta, data = tmp_path / "dmtt-meta.img", tmp_path / "dmtt-data.img"
    with open(meta, "wb") as f:
        f.truncate(8 << 20)
    views = build_pool(meta, data, block_sectors=BS, nr_blocks=NR_BLOCKS)
    ml, dl = make_loop(meta), make_loop(data)
    pool = _pool(kernel_dm, tag, ml, dl)
    paths = {dev_id: _thin(kernel_dm, tag, pool, dev_id) for dev_id in (1, 2)}
    for dev_id, path in paths.items():
        assert _read(path, VOL) == volume_bytes(views[dev_id], VOL, BLOCK), f"thin {dev_id}"
    # the kernel changes our metadata: a partial write to a shared block, a new block, a snapshot
    _write(paths[1], b"\x5a" * 4096, 5 * BLOCK + 8192)
    _write(paths[2], b"\xa5" * BLOCK, 90 * BLOCK)
    kernel_dm.message(pool, 0, "create_thin 3")
    expect1 = bytearray(volume_bytes(views[1], VOL, BLOCK))
    expect1[5 * BLOCK + 8192:5 * BLOCK + 12288] = b"\x5a" * 4096
    expect2 = bytearray(volume_bytes(views[2], VOL, BLOCK))
    expect2[90 * BLOCK:91 * BLOCK] = b"\xa5" * BLOCK
    assert _read(paths[1], VOL) == expect1 and _read(paths[2], VOL) == expect2
    for name in (f"{tag}-t1", f"{tag}-t2", pool):
        kernel_dm.remove(name, retry=True)
    theirs = _compare_with_thin_tools(thin_tools, Path(ml.path))
    assert '<device dev_id="3" mapped_blocks="0"' in theirs
    for dev_id, view in ((1, expect1), (2, expect2)):
        out = tmp_path / f"vol{dev_id}.img"
        export(ml.path, dl.path, dev_id, out, size=VOL)
        assert out.read_bytes() == view
