"""The userspace thin-pool/thin targets: provisioning, zeroing, sharing, external origins, discards.

Each test ends with ``thin_check`` and ``thin_dump`` (thin-provisioning-tools) on the metadata our
target wrote.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from dmtools.errors import DMError
from target_rig import BB, PoolRig, file_bytes, pattern, read


def _mapping(thin_tools: Any, rig: PoolRig) -> str:
    return str(thin_tools.dump(rig.meta))


def _spy_zero_jobs(pool: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The destinations of every zero job the pool's kcopyd client runs from now on."""
    zeroed: list[Any] = []
    real = pool.kc.run

    def run(src: Any, dests: Any, *a: Any, **k: Any) -> Any:
        if src is None:
            zeroed.append(dests)
        return real(src, dests, *a, **k)

    monkeypatch.setattr(pool.kc, "run", run)
    return zeroed


def test_first_write_provisions_and_zeroes_the_rest(engine: Any, tmp_path: Path, thin_tools: Any) -> None:
    rig = PoolRig(engine, tmp_path, data_fill=b"\xee")  # stale bytes on the data device
    t = rig.thin(1, "t1")
    assert read(t, 0, 4096) == bytes(4096)  # unprovisioned reads zeros, allocates nothing
    assert rig.status().used_data == 0
    t.write(pattern(1, 4096), BB + 4096)
    assert rig.status().used_data == 1
    block = read(t, BB, BB)
    assert block[4096:8192] == pattern(1, 4096)
    assert block[:4096] == bytes(4096) and block[8192:] == bytes(BB - 8192)  # zeroed, not stale
    st = rig.thin_status("t1")
    assert (st.mapped_sectors, st.highest_mapped) == (rig.block, 2 * rig.block - 1)
    rig.close()
    thin_tools.check(rig.meta)
    assert '<single_mapping origin_block="1" data_block="0" time="0"/>' in _mapping(thin_tools, rig)


def test_skip_block_zeroing_keeps_stale_bytes(engine: Any, tmp_path: Path, thin_tools: Any) -> None:
    rig = PoolRig(engine, tmp_path, data_fill=b"\xee", features=("skip_block_zeroing",))
    t = rig.thin(1, "t1")
    t.write(pattern(2, 512), 0)
    assert read(t, 0, 1024) == pattern(2, 512) + b"\xee" * 512
    rig.close()
    thin_tools.check(rig.meta)


def test_whole_block_write_is_not_zeroed_first(engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = PoolRig(engine, tmp_path, data_fill=b"\xee")  # stale bytes: zeroing is needed
    t = rig.thin(1, "t1")
    pool = _pool(rig)
    zeroed = _spy_zero_jobs(pool, monkeypatch)
    t.write(pattern(3, BB), 0)
    assert zeroed == []
    t.write(pattern(4, 512), BB)
    assert len(zeroed) == 1
    assert read(t, 0, BB) == pattern(3, BB)
    rig.close()


def test_a_hole_on_the_data_device_is_not_zeroed_again(rig: PoolRig, monkeypatch: pytest.MonkeyPatch) -> None:
    t = rig.thin(1, "t1")
    pool = _pool(rig)
    zeroed = _spy_zero_jobs(pool, monkeypatch)
    t.write(pattern(4, 512), BB)  # the sparse data file's block is a hole: it reads zeros already
    assert zeroed == []
    assert read(t, BB, BB) == pattern(4, 512) + bytes(BB - 512)


def test_snapshot_shares_until_a_write_breaks_sharing(rig: PoolRig, thin_tools: Any) -> None:
    t = rig.thin(1, "origin")
    t.write(pattern(1, 2 * BB), 0)
    rig.snapshot(2, 1, "origin")
    s = rig.thin(2, "snap", create=False)
    assert rig.status().used_data == 2
    t.write(pattern(5, 512), 512)  # partial write to a shared block: copy, then write
    assert rig.status().used_data == 3
    assert read(t, 0, 1536) == pattern(1, 512) + pattern(5, 512) + pattern(1, 512)
    assert read(s, 0, BB) == pattern(1, BB)
    s.write(pattern(6, BB), BB)  # whole-block overwrite of a shared block: no copy needed
    assert read(s, BB, BB) == pattern(6, BB) and read(t, BB, BB) == pattern(1, BB)
    assert rig.status().used_data == 4
    # The snapshot still believes block 0 is shared (dm-thin's time rule) and copies it again;
    # its old block, now mapped by nobody, is freed.
    before = rig.in_core().lookup(2, 0).data_block
    s.write(pattern(7, 512), 0)
    assert read(s, 0, 1024) == pattern(7, 512) + pattern(1, 512)
    assert rig.in_core().lookup(2, 0).data_block != before
    assert rig.status().used_data == 4


def test_external_origin_reads_and_copies(engine: Any, tmp_path: Path, make_image: Any, thin_tools: Any) -> None:
    rig = PoolRig(engine, tmp_path)
    origin = make_image(BB + BB // 2, "origin", fill=b"\x5a")  # one and a half blocks
    t = rig.thin(1, "ext", origin=str(origin))
    assert read(t, 0, 512) == b"\x5a" * 512
    assert read(t, BB, BB) == b"\x5a" * (BB // 2) + bytes(BB // 2)  # past the origin's end: zeros
    assert read(t, 2 * BB, 512) == bytes(512)
    t.write(pattern(8, 512), 1024)  # inside the origin: copied from it
    t.write(pattern(9, 512), BB)  # straddling its end: copy the part inside, zero the rest
    assert read(t, 0, 2048) == b"\x5a" * 1024 + pattern(8, 512) + b"\x5a" * 512
    assert read(t, BB, BB) == pattern(9, 512) + b"\x5a" * (BB // 2 - 512) + bytes(BB // 2)
    assert file_bytes(origin, 1024, 512) == b"\x5a" * 512  # the origin is never written
    assert engine.table_text("ext").endswith(f" 1 {origin}")
    rig.close()
    thin_tools.check(rig.meta)


def test_discard_unmaps_and_passes_down(rig: PoolRig, thin_tools: Any) -> None:
    t = rig.thin(1, "t1")
    t.write(pattern(1, 3 * BB), 0)
    assert rig.status().used_data == 3
    t.discard(512, BB)  # covers no whole block: nothing happens
    assert rig.status().used_data == 3
    t.discard(BB - 512, BB + 1024)  # covers block 1 only
    assert rig.status().used_data == 2
    assert read(t, BB, 512) == bytes(512)
    assert read(t, 0, 512) == pattern(1, 512) and read(t, 2 * BB, 512) == pattern(1, 512)
    assert file_bytes(rig.data, BB, 512) == bytes(512)  # the data block was discarded (hole)
    t.flush()
    assert rig.thin_status("t1").mapped_sectors == 2 * rig.block


def test_discard_of_a_shared_block_keeps_the_snapshot(rig: PoolRig) -> None:
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    rig.snapshot(2, 1, "t1")
    s = rig.thin(2, "s", create=False)
    t.discard(0, BB)
    assert read(t, 0, 512) == bytes(512)
    assert read(s, 0, BB) == pattern(1, BB)
    assert rig.status().used_data == 1


def test_ignore_discard(engine: Any, tmp_path: Path) -> None:
    rig = PoolRig(engine, tmp_path, features=("ignore_discard",))
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    t.discard(0, BB)
    assert read(t, 0, 512) == pattern(1, 512)
    assert rig.status().discard == "ignore_discard"
    rig.close()


def test_no_discard_passdown_leaves_the_data_device(engine: Any, tmp_path: Path) -> None:
    rig = PoolRig(engine, tmp_path, features=("no_discard_passdown",))
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    t.discard(0, BB)
    assert rig.status().used_data == 0
    assert file_bytes(rig.data, 0, 512) == pattern(1, 512)
    assert rig.status().discard == "no_discard_passdown"
    rig.close()


def test_io_spanning_blocks_and_devices(rig: PoolRig) -> None:
    a = rig.thin(1, "a")
    b = rig.thin(2, "b")
    a.write(pattern(1, 3 * BB), BB // 2)
    b.write(pattern(2, BB), 0)
    assert read(a, BB // 2, 3 * BB) == pattern(1, 3 * BB)
    assert read(a, 0, BB // 2) == bytes(BB // 2)
    assert read(b, 0, BB) == pattern(2, BB)
    assert rig.status().used_data == 5


def test_flush_commits_and_the_pool_reopens(engine: Any, tmp_path: Path, thin_tools: Any) -> None:
    rig = PoolRig(engine, tmp_path)
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    t.flush()
    # Read the committed metadata while the pool is live: the mapping is there.
    assert '<single_mapping origin_block="0" data_block="0"' in thin_tools.dump(rig.meta)
    rig.close()
    rig2 = PoolRig.__new__(PoolRig)
    rig2.__dict__.update(rig.__dict__, thins=[], endpoints=[])
    engine.create(rig.name, rig.table(64))
    t = rig2.thin(1, "t1", create=False)
    assert read(t, 0, BB) == pattern(1, BB)
    rig2.close()


def test_write_to_a_missing_block_of_a_read_only_pool_fails(engine: Any, tmp_path: Path) -> None:
    rig = PoolRig(engine, tmp_path)
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    rig.close()
    engine.create(rig.name, rig.table(64, ("read_only",)))
    rig.thins, rig.endpoints = [], []
    t = rig.thin(1, "t1", create=False)
    assert rig.status().mode is not None and rig.status().read_only
    t.write(pattern(2, 512), 0)  # mapped, unshared: allowed
    with pytest.raises(DMError) as err:
        t.write(pattern(2, 512), BB)
    assert err.value.errno == errno.EIO
    with pytest.raises(DMError) as err:
        rig.message("create_thin 5")
    assert err.value.errno == errno.EOPNOTSUPP
    t.discard(0, BB)  # completes, does nothing
    assert read(t, 0, 512) == pattern(2, 512)
    rig.close()


def _pool(rig: PoolRig) -> Any:
    return rig.in_core()


def test_multi_block_write_over_mapped_shared_and_new_blocks(rig: PoolRig) -> None:
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 2 * BB)  # block 2 mapped
    t.write(pattern(1, BB), 4 * BB)  # block 4 mapped, then shared by a snapshot
    rig.snapshot(2, 1, "t1")
    t.write(pattern(1, BB), 5 * BB)  # block 5 mapped after the snapshot: not shared
    s = rig.thin(2, "s", create=False)
    t.write(pattern(9, 6 * BB + 1024), BB - 512)  # head piece, blocks 1..6 whole, tail piece
    assert read(t, BB - 512, 6 * BB + 1024) == pattern(9, 6 * BB + 1024)
    assert read(t, 0, BB - 512) == bytes(BB - 512)
    assert read(s, 4 * BB, BB) == pattern(1, BB) and read(s, 2 * BB, BB) == pattern(1, BB)
    assert read(s, BB, BB) == bytes(BB)
    # blocks 0..7 of thin 1 are mapped; thin 2 keeps blocks 2 and 4 to itself
    assert rig.thin_status("t1").mapped_sectors == 8 * rig.block
    assert rig.status().used_data == 10


def test_multi_block_write_that_runs_out_of_space(engine: Any, tmp_path: Path, thin_tools: Any) -> None:
    rig = PoolRig(engine, tmp_path, data_blocks=3, features=("error_if_no_space",))
    t = rig.thin(1, "t1")
    with pytest.raises(DMError) as err:
        t.write(pattern(4, 5 * BB), 0)
    assert err.value.errno == errno.ENOSPC
    assert read(t, 0, 3 * BB) == pattern(4, 3 * BB)  # the blocks the pool had are written
    assert read(t, 3 * BB, 2 * BB) == bytes(2 * BB)
    assert rig.thin_status("t1").mapped_sectors == 3 * rig.block
    rig.close()
    thin_tools.check(rig.meta)
