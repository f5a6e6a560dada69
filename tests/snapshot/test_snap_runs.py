"""Exceptions handled a run at a time: allocation, range lookups, grouped commits and one origin
write making many exceptions must give exactly what one exception at a time gives."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

import pytest

from dmtools.blockdev import BlockDevice
from dmtools.endpoint import ForwardingEndpoint
from dmtools.engine.target_driver import DeviceHandle
from dmtools.errors import NoSpace
from dmtools.testing.memory import MemoryEndpoint
from snapshot.store import ExceptionTable, PersistentStore, TransientStore
from snapshot.store.persistent import ZERO_AHEAD_BYTES
from snapshot.targets.core import CopyOnWrite, _runs

C = 8  # 4 KiB chunks: 256 records per area, stride 257
CB = C * 512


def new_store(chunks: int) -> tuple[MemoryEndpoint, PersistentStore]:
    cow = MemoryEndpoint(chunks * CB, "cow")
    store = PersistentStore(cow, C)
    store.read_metadata()
    return cow, store


def test_prepare_exceptions_takes_what_one_at_a_time_takes() -> None:
    # (COW chunks, chunks taken first, chunks asked for, metadata areas the allocation steps over)
    cases = [(600, 0, 600, 2), (600, 250, 20, 1), (1200, 3, 700, 2), (520, 0, 515, 2), (300, 0, 1, 0)]
    for chunks, first, count, crossed in cases:
        _, one = new_store(chunks)
        _, many = new_store(chunks)
        for _ in range(first):
            one.prepare_exception()
        if first:
            many.prepare_exceptions(first)
        expect: list[int] = []
        while len(expect) < count:
            try:
                expect.append(one.prepare_exception())
            except NoSpace:  # the COW is full
                break
        got = many.prepare_exceptions(count)
        assert got == expect and many.next_free == one.next_free, (chunks, first, count)
        areas = {1 + 257 * k for k in range(chunks // 257 + 1)}  # chunk of metadata area k
        assert not areas & set(got), (chunks, first, count)
        assert len([a for a in areas if got[0] < a < got[-1]]) == crossed, (chunks, first, count)


def test_prepare_exceptions_on_a_full_cow_raises_and_takes_nothing() -> None:
    _, store = new_store(300)
    taken = store.prepare_exceptions(1000)
    assert len(taken) < 1000 and store.next_free == taken[-1] + 1
    with pytest.raises(NoSpace):
        store.prepare_exceptions(1)
    assert store.next_free == taken[-1] + 1


def test_commit_runs_across_an_area_writes_the_records_of_single_commits() -> None:
    cow_a, runs = new_store(1200)
    cow_b, single = new_store(1200)
    news = runs.prepare_exceptions(600)
    assert single.prepare_exceptions(600) == news
    pairs = list(zip(range(5000, 5600), news))
    done: list[tuple[str, bool]] = []
    # runs of consecutive chunks, broken where the COW skips a metadata chunk (258, 515)
    spans = _runs([o for o, _ in pairs], [n for _, n in pairs], 100)
    assert sum(c for _, _, c in spans) == 600 and all(c <= 100 for _, _, c in spans)
    callbacks = [lambda ok, i=i: done.append((f"r{i}", ok)) for i in range(len(spans))]
    runs.commit_runs([(o, n, c, True) for o, n, c in spans], callbacks)
    for old, new in pairs:
        single.commit_exception(old, new, True, lambda ok: None)
    assert done == [(f"r{i}", True) for i in range(len(spans))]  # each run's callback once
    assert runs.iter_records() == single.iter_records() == pairs
    assert cow_a.data == cow_b.data
    assert runs.current_area == 2 and runs.records == 600
    assert struct.unpack_from("<QQ", cow_a.data, 258 * CB + 255 * 16) == (5000 + 511, news[511])


def test_a_failed_run_invalidates_the_store_and_reports_failure_once() -> None:
    _, store = new_store(600)
    a = store.prepare_exceptions(10)
    b = store.prepare_exceptions(10)
    done: list[tuple[str, bool]] = []
    store.commit_runs([(0, a[0], 10, True), (10, b[0], 10, False)],
                      [lambda ok: done.append(("a", ok)), lambda ok: done.append(("b", ok))])
    assert done == [("a", False), ("b", False)] and not store.valid


def test_transient_store_commits_runs_with_one_callback_each() -> None:
    store = TransientStore(MemoryEndpoint(64 * CB, "cow"), C)
    store.read_metadata()
    done: list[bool] = []
    store.commit_runs([(0, 0, 5, True), (9, 5, 3, False)], [done.append, done.append])
    assert done == [True, False]


def test_unmapped_matches_lookup() -> None:
    rnd = random.Random(5)
    for shift, top in [(20, 1 << 19), (40, 1 << 39)]:  # float keys, and int keys past 2**53
        t = ExceptionTable(shift)
        base = sorted(rnd.sample(range(2000), 300))
        t.insert_new([(o, rnd.randrange(top)) for o in base])
        t.compact()
        fresh = rnd.sample([c for c in range(2000) if c not in base], 200)
        t.insert_new([(o, rnd.randrange(top)) for o in fresh])
        for lo, hi in [(0, 2000), (17, 400), (1999, 2000), (500, 500), (2000, 2300)]:
            assert t.unmapped(lo, hi) == [c for c in range(lo, hi) if t.lookup(c) is None]
        for o in base[:50]:
            t.remove(o)  # removed entries in the overlay take the careful path
        assert t.unmapped(0, 2000) == [c for c in range(2000) if t.lookup(c) is None]
        t.compact()
        assert t.unmapped(0, 2000) == [c for c in range(2000) if t.lookup(c) is None]


def test_a_range_found_mapped_is_remembered_until_a_merge_removes_a_chunk() -> None:
    t = ExceptionTable(20)
    t.insert_new([(c, 100 + c) for c in range(10, 20)])
    assert t.unmapped(10, 20) == [] and t.unmapped(12, 14) == []
    t.compact()  # folding the overlay in keeps every mapping
    assert t.unmapped(10, 20) == []
    t.remove(15)  # a merged chunk: the remembered ranges go
    assert t.unmapped(10, 20) == [15] and t.unmapped(12, 14) == []
    t.insert(15, 7)
    assert t.unmapped(10, 20) == []
    t.remove(12)
    assert t.unmapped(12, 14) == [12] and t.unmapped(10, 20) == [12]


def test_a_loaded_table_with_a_chunk_recorded_twice_still_finds_the_gap() -> None:
    # a damaged COW: chunk 5 recorded twice, chunk 6 never; as many keys in [5, 7) as chunks
    t = ExceptionTable.from_key_list(20, [float((5 << 20) | 9), float((5 << 20) | 10), float((7 << 20) | 11)])
    assert t.unmapped(5, 7) == [6] and t.unmapped(5, 8) == [6]
    grown = ExceptionTable(20)  # grown by inserts: the count of keys in a range answers
    grown.insert_new([(c, 100 + c) for c in range(10, 20)])
    grown.compact()
    assert grown.unmapped(10, 20) == [] and grown.unmapped(9, 21) == [9, 20]


def test_runs_split_at_gaps_and_at_the_job_size() -> None:
    assert _runs([1, 2, 3, 4, 5], [10, 11, 12, 13, 14], 2) == [(1, 10, 2), (3, 12, 2), (5, 14, 1)]
    assert _runs([1, 2, 4, 5], [10, 11, 12, 13], 9) == [(1, 10, 2), (4, 12, 2)]
    assert _runs([1, 2, 3], [10, 12, 13], 9) == [(1, 10, 1), (2, 12, 2)]
    assert _runs([], [], 4) == []


def active_snapshot(origin_ep: MemoryEndpoint,
                    cow_type: type[MemoryEndpoint]) -> tuple[MemoryEndpoint, PersistentStore, CopyOnWrite]:
    """An active snapshot of ``origin_ep`` on a new persistent COW twice its size."""
    origin = DeviceHandle(origin_ep, "origin", -1, -1, "/nonexistent/origin")
    cow_ep = cow_type(2 * origin_ep.size, "cow")
    cow = DeviceHandle(cow_ep, "cow", -1, -1, "/nonexistent/cow")
    store = PersistentStore(cow, C)
    store.read_metadata()
    snap = CopyOnWrite(origin, cow, store, origin_ep.size, name="t", event=lambda: None)
    snap.active = True
    return cow_ep, store, snap


def test_one_origin_write_over_mapped_pending_and_new_chunks() -> None:
    chunks = 600
    original = bytes(random.Random(1).randrange(256) for _ in range(chunks * CB // 64)) * 64
    cow_ep, store, snap = active_snapshot(MemoryEndpoint(original, "origin"), MemoryEndpoint)
    try:
        assert snap.wait_all(snap.origin_write_prepare(10 * CB, 5 * CB))  # chunks 10..14 mapped
        with snap.cond:
            held = snap._alloc_locked(20)  # chunk 20 pending, its copy not yet finished
        pes = snap.origin_write_prepare(0, 300 * CB)  # spans a metadata area of the COW
        assert held in pes and all(p.count <= 256 for p in pes)
        assert sum(p.count for p in pes if p is not held) == 300 - 5 - 1
        snap._submit_copies([held])
        assert snap.wait_all(pes) and not snap.pending
        for c in range(300):
            new = snap.table.lookup(c)
            assert new is not None and cow_ep.data[new * CB : (new + 1) * CB] == original[c * CB : (c + 1) * CB]
        assert len(snap.table) == 300 and store.records == 300
        assert sorted(o for o, _ in store.iter_records()) == list(range(300))
    finally:
        snap.destroy()


def test_compaction_keeps_every_mapping() -> None:
    rnd = random.Random(7)
    for shift, top in [(20, 1 << 19), (40, 1 << 39)]:
        t = ExceptionTable(shift)
        model: dict[int, int] = {}
        olds = rnd.sample(range(100_000), 12_000)
        for i in range(0, 12_000, 1000):  # several compactions of new chunks only
            pairs = [(o, rnd.randrange(top)) for o in olds[i : i + 1000]]
            t.insert_new(pairs)
            model.update(pairs)
            t.compact()
        t.insert(olds[0], 5)  # replaces a mapping of the sorted array: the careful path
        t.remove(olds[1])
        model[olds[0]] = 5
        del model[olds[1]]
        t.compact()
        assert list(t.items()) == sorted(model.items()) and len(t) == len(model)
        t.insert_new([(100_001, 1), (100_002, top - 1)])
        t.compact()
        assert t.lookup(100_002) == top - 1 and t.lookup(olds[1]) is None and len(t) == len(model) + 2


class SparseMemory(MemoryEndpoint):
    """Reports a range holding only zero bytes as a hole (as SEEK_DATA may for a sparse file)."""

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        return [] if not any(self.data[offset : offset + length]) else [(offset, length)]


def test_holes_of_origin_and_cow_are_not_copied_but_still_committed_in_order() -> None:
    chunks = 64
    data = bytes(range(1, 256)) * (CB // 255 + 1)
    original = bytearray(chunks * CB)
    for c in (3, 40, 41):
        original[c * CB : (c + 1) * CB] = data[:CB]
    cow_ep, store, snap = active_snapshot(SparseMemory(original, "origin"), SparseMemory)
    try:
        cow_ep.journal.clear()
        pes = snap.origin_write_prepare(0, 32 * CB)  # all holes but chunk 3: one run, one job
        assert snap.wait_all(pes) and not snap.pending and snap.in_progress == 0
        data_writes = [e for e in cow_ep.journal if e[0] == "write" and e[2] != CB]  # CB: metadata area
        # the free space of the sparse COW is zeroed ahead as the run is allocated (past it), then
        # the one run is copied
        ahead = ("write", "cow", store.next_free * CB, min(ZERO_AHEAD_BYTES, cow_ep.size - store.next_free * CB))
        assert data_writes == [ahead, ("write", "cow", snap.table.lookup(0) * CB, 32 * CB)]
        cow_ep.journal.clear()
        pes = snap.origin_write_prepare(32 * CB, 8 * CB)  # only holes: nothing copied
        assert snap.wait_all(pes) and snap.in_progress == 0
        assert [e for e in cow_ep.journal if e[0] == "write"] == [("write", "cow", CB, CB)]  # the records only
        assert snap.wait_all(snap.origin_write_prepare(40 * CB, 24 * CB))
        assert [o for o, _ in store.iter_records()] == list(range(chunks))  # allocation order
        for c in range(chunks):
            new = snap.table.lookup(c)
            assert new is not None and cow_ep.data[new * CB : (new + 1) * CB] == original[c * CB : (c + 1) * CB]
    finally:
        snap.destroy()


class CountingWrites(ForwardingEndpoint):
    """Notes the offset and length of every write to a real file."""

    def __init__(self, inner: BlockDevice) -> None:
        super().__init__(inner)
        self.writes: list[tuple[int, int]] = []

    def write(self, buf: Any, offset: int) -> int:
        self.writes.append((offset, len(memoryview(buf))))
        return self.inner.write(buf, offset)


def test_a_sparse_cow_file_is_zeroed_ahead_of_small_allocations(tmp_path: Path) -> None:
    """Random first writes land in written blocks (no block allocation in each commit's flush);
    a copy of zeros into the zeroed space writes nothing; the records and data stay exact."""
    chunks = 64
    original = bytearray(chunks * CB)
    original[5 * CB : 6 * CB] = bytes(range(256)) * (CB // 256)
    path = tmp_path / "cow"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    with BlockDevice(str(path), writable=True) as dev:
        cow_ep = CountingWrites(dev)
        origin = DeviceHandle(MemoryEndpoint(original, "origin"), "origin", -1, -1, "/nonexistent/origin")
        cow = DeviceHandle(cow_ep, "cow", -1, -1, str(path))
        store = PersistentStore(cow, C)
        store.read_metadata()
        snap = CopyOnWrite(origin, cow, store, len(original), name="t", event=lambda: None)
        snap.active = True
        try:
            assert dev.data_extents(2 * CB, ZERO_AHEAD_BYTES) == []  # free space: a hole
            cow_ep.writes.clear()
            assert snap.wait_all(snap.origin_write_prepare(5 * CB, 512))
            first = snap.table.lookup(5)
            assert first == 2  # the first data chunk
            ahead = (3 * CB, ZERO_AHEAD_BYTES)
            assert cow_ep.writes[0] == ahead and (first * CB, CB) in cow_ep.writes
            assert dev.data_extents(*ahead) == [ahead]  # written: blocks allocated
            cow_ep.writes.clear()
            assert snap.wait_all(snap.origin_write_prepare(9 * CB, CB))  # zeros onto zeros
            assert cow_ep.writes == [(CB, CB)]  # only the record: the chunk reads as zeros already
            # allocations inside the zeroed space zero nothing more
            for c in range(10, 20):
                assert snap.wait_all(snap.origin_write_prepare(c * CB, CB))
            assert all(size <= CB for _, size in cow_ep.writes)
            assert [o for o, _ in store.iter_records()] == [5, 9, *range(10, 20)]
            for c in (5, 9, *range(10, 20)):
                new = snap.table.lookup(c)
                assert new is not None
                got = bytearray(CB)
                assert dev.readinto(got, new * CB) == CB and got == original[c * CB : (c + 1) * CB]
        finally:
            snap.destroy()
        reloaded = PersistentStore(cow, C)
        reloaded.read_metadata()
        assert sorted(reloaded.table.items()) == sorted(snap.table.items())
