"""Blocks the prison knows mapped and not shared (``Prison.enter_mapped``): I/O to them skips the
metadata lookup, and every change of a mapping makes the pool forget them first.

Each test that changes a mapping after its block became known writes or reads it again and checks
the bytes where they must be: a stale known block would send the I/O to the old data block.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from dmtools.errors import DMError
from target_rig import BB, PoolRig, file_bytes, pattern, read
from thin.targets import cells
from thin.targets.pool_core import Mode


def _count_lookups(pool: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The virtual blocks the pool looks up in its metadata from now on."""
    looked: list[int] = []
    real = pool.md.find

    def find(dev_id: int, vblock: int) -> Any:
        looked.append(vblock)
        return real(dev_id, vblock)

    monkeypatch.setattr(pool.md, "find", find)
    return looked


def test_io_to_a_block_mapped_here_needs_no_lookup(rig: PoolRig, monkeypatch: pytest.MonkeyPatch) -> None:
    t = rig.thin(1, "t1")
    t.write(pattern(1, 512), 0)  # provisioned: the new mapping is known
    t.write(pattern(2, 4 * BB), BB)  # several whole blocks at once: known from a lookup on
    pool = rig.in_core()
    looked = _count_lookups(pool, monkeypatch)
    t.write(pattern(3, 512), 512)
    t.write(pattern(4, 512), 2 * BB + 1024)
    t.write(pattern(5, 512), 2 * BB + 1536)
    assert read(t, 0, 1024) == pattern(1, 512) + pattern(3, 512)
    assert read(t, 2 * BB, 2048) == pattern(2, 1024) + pattern(4, 512) + pattern(5, 512)
    assert looked == [2]
    data = pool.md.find(1, 2)[0]
    assert file_bytes(rig.data, data * BB + 1024, 512) == pattern(4, 512)
    assert pool.prison.held() == 0 and not pool.prison._count


def test_a_block_looked_up_once_is_known(rig: PoolRig, monkeypatch: pytest.MonkeyPatch) -> None:
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    t.flush()
    pool = rig.in_core()
    pool.prison.forget_all()  # as after a restart: known from the lookup on
    looked = _count_lookups(pool, monkeypatch)
    t.write(pattern(2, 512), 0)
    t.write(pattern(3, 512), 512)
    assert looked == [0]
    assert read(t, 0, BB) == pattern(2, 512) + pattern(3, 512) + pattern(1, BB - 1024)


def test_a_snapshot_makes_known_blocks_shared(rig: PoolRig, thin_tools: Any) -> None:
    t = rig.thin(1, "origin")
    t.write(pattern(1, 2 * BB), 0)
    t.write(pattern(2, 512), 0)  # block 0 is known now
    rig.message("create_snap 2 1")  # the origin stays live (no suspend): its next write must copy
    t.write(pattern(3, 512), 512)
    s = rig.thin(2, "snap", create=False)
    assert read(s, 0, 1024) == pattern(2, 512) + pattern(1, 512)
    assert read(t, 0, 1536) == pattern(2, 512) + pattern(3, 512) + pattern(1, 512)
    assert rig.status().used_data == 3  # the broken block
    t.write(pattern(4, 512), 1024)  # the copy is known: a plain write to it
    assert read(s, 1024, 512) == pattern(1, 512)
    assert rig.status().used_data == 3


def test_a_discard_forgets_its_block(rig: PoolRig) -> None:
    t = rig.thin(1, "t1")
    t.write(pattern(1, 2 * BB), 0)
    t.write(pattern(2, 512), BB)  # known
    t.discard(BB, BB)
    assert rig.status().used_data == 1
    t.write(pattern(3, 512), BB + 512)  # a first write again: a new block, zeroed around the write
    assert read(t, BB, BB) == bytes(512) + pattern(3, 512) + bytes(BB - 1024)
    assert rig.status().used_data == 2


def test_a_deleted_device_leaves_nothing_known(rig: PoolRig) -> None:
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    pool = rig.in_core()
    assert pool.prison.mapped
    t.close()
    rig.endpoints.remove(t)
    rig.dm.remove("t1")
    rig.thins.remove("t1")
    rig.message("delete 1")
    assert not pool.prison.mapped
    t2 = rig.thin(1, "again")  # the same id, a new device: its block 0 is unmapped
    assert read(t2, 0, 512) == bytes(512)


def test_fail_mode_fails_io_to_known_blocks(rig: PoolRig) -> None:
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    pool = rig.in_core()
    with pool.lock:
        pool.set_mode(Mode.FAIL)
    for io in (lambda: t.write(pattern(2, 512), 0), lambda: read(t, 0, 512)):
        with pytest.raises(DMError) as err:
            io()
        assert err.value.errno == errno.EIO
    assert file_bytes(rig.data, pool.md.find(1, 0)[0] * BB, 512) == pattern(1, 512)
    rig.close()
    rig.thins.clear()


def test_known_blocks_are_bounded(rig: PoolRig, monkeypatch: pytest.MonkeyPatch) -> None:
    t = rig.thin(1, "t1")
    pool = rig.in_core()
    assert pool.prison.mapped_max == cells.MAPPED_MAX
    monkeypatch.setattr(pool.prison, "mapped_max", 3)
    sizes = []
    for v in range(8):
        t.write(pattern(v, 512), v * BB)
        sizes.append(len(pool.prison.mapped))
    assert max(sizes) == 3 and sizes[-1] < 3
    assert [read(t, v * BB, 512) for v in range(8)] == [pattern(v, 512) for v in range(8)]
