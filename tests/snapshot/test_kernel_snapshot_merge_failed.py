"""A failed merge on the kernel (VM tier): the COW's table becomes ``error`` under a
``snapshot-merge``, the kernel shuts the merge down with ``Merge failed`` (dm-snap.c
``merge_callback``), ``SnapshotManager`` reports it, and once the COW reads again a second
``merge`` reactivates the origin, which merges what the COW still holds."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmtools.errors import DMError
from dmtools.testing.blockio import read_uncached, write_synced
from snapshot import SnapshotManager

pytestmark = pytest.mark.kernel

SIZE = 4 << 20
COW_SIZE = 5 << 20


def _swap_table(dm: Any, name: str, table: Any) -> None:
    dm.load(name, table)
    dm.suspend(name)
    dm.resume(name)


def test_kernel_merge_failed_then_retried(kernel_dm: Any, tmp_path: Path, make_loop: Callable[..., Any],
                                          kernel_tag: str) -> None:
    tag = kernel_tag
    data = random.Random(7).randbytes(SIZE)
    origin = tmp_path / "dmtt-mf-origin.img"
    origin.write_bytes(data)
    cow = tmp_path / "dmtt-mf-cow.img"
    with open(cow, "wb") as f:
        f.truncate(COW_SIZE)
    ol, cl = make_loop(origin), make_loop(cow)
    vol, snap = f"{tag}-vol", f"{tag}-s"
    kernel_dm.create(vol, f"0 {SIZE // 512} linear {ol.path} 0")
    mgr = SnapshotManager(kernel_dm)
    mgr.create(vol, cl.path, snap, chunk_size=8)
    write_synced(kernel_dm.device_path(vol), b"K" * 65536, 0)  # the snapshot keeps ``data``
    cow_dev = f"{snap}-cow"
    cow_table = kernel_dm.table(cow_dev)
    _swap_table(kernel_dm, cow_dev, f"0 {cow_table.lines[0].length} error")
    with pytest.raises(DMError, match=r"Merge failed\. Retry merge or inspect manually\."):
        mgr.merge(snap, timeout=120)
    assert kernel_dm.status(vol)[0].params == "Merge failed"
    assert mgr.status(snap).state == "Merge failed"
    _swap_table(kernel_dm, cow_dev, cow_table)
    assert read_uncached(kernel_dm.device_path(vol), SIZE) == data  # the chunks come from the COW
    mgr.merge(snap, timeout=120)
    assert read_uncached(kernel_dm.device_path(vol), SIZE) == data
    assert origin.read_bytes() == data
    assert kernel_dm.table(vol).lines[0].target.target_type == "linear"
    assert sorted(e.name for e in kernel_dm.list() if e.name.startswith(tag)) == [vol]
