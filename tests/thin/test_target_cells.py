"""Concurrent writers on one block: the cell (dm-bio-prison-v1.c, as dm-thin's ``bio_detain`` uses
it) makes every writer to a block that is being provisioned or whose sharing is being broken wait
for the one doing it, so the block is allocated (or copied) once and no writer's bytes are lost.

The data file is filled with a non-zero pattern, so every partial first write zeroes (or copies)
its new block through kcopyd first: a window wide enough for a second writer to slip in if the
cell did not hold it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from dmtools.testing.threads import run_together
from target_rig import BB, PoolRig, pattern, read

WRITERS = 8
PIECE = BB // WRITERS


def _pieces(ep: Any, base: int, seed: int) -> list[Any]:
    return [lambda i=i: ep.write(pattern(seed + i, PIECE), base + i * PIECE) for i in range(WRITERS)]


def test_writers_on_one_unprovisioned_block_share_one_allocation(engine: Any, tmp_path: Path, thin_tools: Any) -> None:
    rig = PoolRig(engine, tmp_path, data_fill=b"\xee")
    t = rig.thin(1, "t1")
    for rnd in range(4):  # a fresh block each round
        run_together(_pieces(t, rnd * BB, 10 * rnd))
        assert read(t, rnd * BB, BB) == b"".join(pattern(10 * rnd + i, PIECE) for i in range(WRITERS))
        assert rig.status().used_data == rnd + 1
    assert rig.thin_status("t1").mapped_sectors == 4 * rig.block
    rig.close()
    thin_tools.check(rig.meta)


def test_writers_on_one_shared_block_break_sharing_once(engine: Any, tmp_path: Path, thin_tools: Any) -> None:
    rig = PoolRig(engine, tmp_path, data_fill=b"\xee")
    t = rig.thin(1, "origin")
    t.write(pattern(1, 2 * BB), 0)
    rig.snapshot(2, 1, "origin")
    s = rig.thin(2, "snap", create=False)
    assert rig.status().used_data == 2
    run_together(_pieces(t, 0, 20))
    assert read(t, 0, BB) == b"".join(pattern(20 + i, PIECE) for i in range(WRITERS))
    assert rig.status().used_data == 3  # one copy of block 0, whoever came first
    # origin and snapshot break the sharing of block 1 at once: each gets its own copy, and each
    # keeps the other's bytes out
    run_together(_pieces(t, BB, 40)[: WRITERS // 2] + _pieces(s, BB, 60)[WRITERS // 2:])
    half = WRITERS // 2 * PIECE
    assert read(t, BB, BB) == b"".join(pattern(40 + i, PIECE) for i in range(WRITERS // 2)) + pattern(1, half)
    assert read(s, BB, BB) == pattern(1, half) + b"".join(pattern(60 + i, PIECE) for i in range(WRITERS // 2, WRITERS))
    assert read(s, 0, BB) == pattern(1, BB)
    rig.close()
    thin_tools.check(rig.meta)


def _gate_writes(monkeypatch: Any, rig: PoolRig, block: int, gate: Any, events: list[str]) -> None:
    """Writes to data block ``block`` wait for ``gate()`` inside the data device, then are logged;
    passed-down discards are logged too."""
    data = rig.in_core().data
    write, discard = data.write, data.discard

    def gated_write(buf: Any, offset: int) -> int:
        if offset // BB == block:
            gate()
        n = write(buf, offset)
        if offset // BB == block:
            events.append("write done")
        return int(n)

    def logged_discard(offset: int, length: int) -> None:
        events.append(f"discard {offset // BB}")
        discard(offset, length)

    monkeypatch.setattr(data, "write", gated_write)
    monkeypatch.setattr(data, "discard", logged_discard)


def test_writers_on_one_mapped_block_run_side_by_side(rig: PoolRig, monkeypatch: Any) -> None:
    """Only the lookup holds the cell of a mapped, unshared block: two writers are inside the data
    device at once (with the cell held through the write, the second could not get there)."""
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    both_inside = threading.Barrier(2, timeout=10)
    events: list[str] = []
    _gate_writes(monkeypatch, rig, rig.in_core().lookup(1, 0).data_block, both_inside.wait, events)
    run_together([lambda: t.write(pattern(2, 512), 0), lambda: t.write(pattern(3, 512), 4096)])
    assert events == ["write done", "write done"]
    assert read(t, 0, 4608) == pattern(2, 512) + pattern(1, 3584) + pattern(3, 512)


def test_discard_waits_for_writes_in_flight_on_its_block(rig: PoolRig, monkeypatch: Any) -> None:
    """A discard holds the block's cell and waits until the writes already sent to the data block
    are done before it unmaps the block and passes the discard down (dm-thin.c quiesces through
    ``all_io_ds``), so a block freed by a discard never takes a late write."""
    t = rig.thin(1, "t1")
    t.write(pattern(1, 2 * BB), 0)
    block = rig.in_core().lookup(1, 0).data_block
    inside, release = threading.Event(), threading.Event()
    events: list[str] = []

    def gate() -> None:
        inside.set()
        assert release.wait(10)

    _gate_writes(monkeypatch, rig, block, gate, events)
    writer = threading.Thread(target=t.write, args=(pattern(2, 512), 0))
    writer.start()
    assert inside.wait(10)
    discarder = threading.Thread(target=t.discard, args=(0, BB))
    discarder.start()
    discarder.join(0.5)
    assert discarder.is_alive() and events == []  # waiting for the write, not unmapping under it
    assert rig.in_core().lookup(1, 0) is not None
    release.set()
    writer.join(10)
    discarder.join(10)
    assert not writer.is_alive() and not discarder.is_alive()
    assert events == ["write done", f"discard {block}"]
    assert rig.in_core().lookup(1, 0) is None and read(t, 0, BB) == bytes(BB)
    assert read(t, BB, BB) == pattern(1, BB)
