"""The persistent and transient exception stores, checked byte for byte against dm-snap-persistent.c."""

from __future__ import annotations

import struct

import pytest

from dmtools.errors import CorruptMetadata, InvalidTable, NoSpace
from dmtools.target_values import StoreMode
from dmtools.testing.memory import MemoryEndpoint
from snapshot.store import (
    DiskHeader,
    ExceptionTable,
    PersistentStore,
    TransientStore,
    area_location,
    make_store,
    skip_metadata,
)

C = 8  # 4 KiB chunks: E = 256, stride 257
CB = C * 512


def new_store(chunks: int = 600, chunk: int = C, **kw: object) -> tuple[MemoryEndpoint, PersistentStore]:
    cow = MemoryEndpoint(chunks * chunk * 512, "cow")
    store = PersistentStore(cow, chunk, **kw)  # type: ignore[arg-type]
    store.read_metadata()
    return cow, store


def commit(store: PersistentStore, pairs: list[tuple[int, int]]) -> list[bool]:
    results: list[bool] = []
    for old, new in pairs:
        store.commit_exception(old, new, True, results.append)
    return results


def test_header_bytes_of_a_new_store() -> None:
    cow, store = new_store()
    assert bytes(cow.data[:16]) == bytes.fromhex("536e4170" "01000000" "01000000" "08000000")
    assert cow.data[16:CB] == bytes(CB - 16)
    assert cow.data[CB : 2 * CB] == bytes(CB)  # area 0 zeroed
    assert store.new_store and store.valid
    assert store.usage().status_text() == f"16/{600 * C} 16"


def test_header_pack_round_trip() -> None:
    h = DiskHeader.new(16)
    raw = h.pack(16 * 512)
    assert len(raw) == 8192 and raw[:16] == struct.pack("<4I", 0x70416E53, 1, 1, 16)
    assert DiskHeader.unpack(raw) == h


def test_area_locations_and_skip_rule() -> None:
    assert [area_location(k, 8) for k in range(3)] == [1, 258, 515]
    assert skip_metadata(258, 8) == 259 and skip_metadata(257, 8) == 257
    assert skip_metadata(2, 8) == 2


def test_allocation_skips_metadata_areas() -> None:
    _, store = new_store()
    got = [store.prepare_exception() for _ in range(257)]
    assert got[0] == 2 and got[255] == 257 and got[256] == 259


def test_records_bytes_and_group_commit() -> None:
    cow, store = new_store()
    a, b = store.prepare_exception(), store.prepare_exception()
    done: list[tuple[str, bool]] = []
    cow.journal.clear()
    store.commit_exception(10, a, True, lambda ok: done.append(("a", ok)))
    assert done == [] and not [e for e in cow.journal if e[0] == "write"]  # held: one still pending
    store.commit_exception(11, b, True, lambda ok: done.append(("b", ok)))
    assert done == [("a", True), ("b", True)]
    # one metadata write framed by flushes (PREFLUSH|FUA)
    assert cow.journal == [("flush", "cow", 0, 0), ("write", "cow", CB, CB), ("flush", "cow", 0, 0)]
    assert bytes(cow.data[CB : CB + 48]) == struct.pack("<QQQQ", 10, 2, 11, 3) + bytes(16)


def test_full_area_zeroes_the_next_one_before_commit() -> None:
    cow, store = new_store()
    nxt = area_location(1, C) * CB
    cow.data[nxt : nxt + CB] = b"\xff" * CB  # garbage where area 1 will be
    for i in range(255):
        store.commit_exception(i, store.prepare_exception(), True, lambda ok: None)
    cow.journal.clear()
    store.commit_exception(255, store.prepare_exception(), True, lambda ok: None)
    writes = [e for e in cow.journal if e[0] == "write"]
    assert writes == [("write", "cow", nxt, CB), ("write", "cow", CB, CB)]
    assert cow.journal.index(("write", "cow", nxt, CB)) < cow.journal.index(("flush", "cow", 0, 0))
    assert cow.data[nxt : nxt + CB] == bytes(CB)
    assert store.current_area == 1 and store.current_committed == 0
    assert store.usage().metadata_sectors == 3 * C


def test_reload_gives_the_same_table_and_counters() -> None:
    cow, store = new_store()
    pairs = [(i * 3, store.prepare_exception()) for i in range(300)]
    commit(store, pairs)
    again = PersistentStore(cow, 0)
    again.read_metadata()
    assert again.chunk_size == C and not again.new_store
    assert sorted(again.table.items()) == sorted(pairs)
    assert (again.next_free, again.current_area, again.current_committed) == (store.next_free, store.current_area,
                                                                              store.current_committed)
    assert again.usage() == store.usage()
    assert again.iter_records() == pairs


def test_holes_after_a_crash() -> None:
    cow, store = new_store()
    # records for chunks 2 and 4 only: chunk 3 was allocated but never committed
    cow.data[CB : CB + 32] = struct.pack("<QQQQ", 5, 2, 7, 4)
    again = PersistentStore(cow, C)
    again.read_metadata()
    assert again.next_free == 5 and again.current_committed == 2
    assert again.table.lookup(5) == 2 and again.table.lookup(7) == 4 and again.table.lookup(6) is None


def test_table_chunk_size_is_overridden_by_the_header() -> None:
    cow, store = new_store(chunk=16)
    again = PersistentStore(cow, 8)
    again.read_metadata()
    assert again.chunk_size == 16 and again.mode is StoreMode.PERSISTENT


def test_invalid_flag() -> None:
    cow, store = new_store()
    commit(store, [(1, store.prepare_exception())])
    store.drop_snapshot()
    assert bytes(cow.data[:16]) == struct.pack("<4I", 0x70416E53, 0, 1, C)
    again = PersistentStore(cow, C)
    again.read_metadata()
    assert not again.valid and len(again.table) == 0


@pytest.mark.parametrize(
    "patch, message",
    [
        ((0, struct.pack("<I", 0x12345678)), "magic 0x12345678"),
        ((8, struct.pack("<I", 2)), "disk version 2"),
        ((12, struct.pack("<I", 12)), "not a power of 2"),
        ((CB, struct.pack("<QQ", 1, 10**6)), "past the end of the COW"),
        ((CB, struct.pack("<QQ", 1, 258)), "metadata chunk"),
    ],
)
def test_corrupt_metadata_is_refused_and_nothing_written(patch: tuple[int, bytes], message: str) -> None:
    cow, store = new_store()
    off, raw = patch
    cow.data[off : off + len(raw)] = raw
    before = bytes(cow.data)
    cow.journal.clear()
    with pytest.raises(CorruptMetadata, match=message):
        PersistentStore(cow, C).read_metadata()
    assert bytes(cow.data) == before and not [e for e in cow.journal if e[0] == "write"]


def test_full_cow_raises_nospace() -> None:
    _, store = new_store(chunks=4)
    assert store.prepare_exception() == 2
    assert store.prepare_exception() == 3
    with pytest.raises(NoSpace):
        store.prepare_exception()


def test_commit_failure_invalidates() -> None:
    cow, store = new_store()
    n = store.prepare_exception()
    cow.fail_writes = True
    results: list[bool] = []
    store.commit_exception(1, n, True, results.append)
    assert results == [False] and not store.valid


def test_failed_copy_is_not_recorded() -> None:
    cow, store = new_store()
    n = store.prepare_exception()
    results: list[bool] = []
    store.commit_exception(1, n, False, results.append)
    assert results == [False] and bytes(cow.data[CB : CB + 16]) == bytes(16)


def test_merge_runs_newest_first() -> None:
    cow, store = new_store()
    pairs = [(100, 2), (101, 3), (102, 4), (50, 5), (7, 6), (8, 7)]
    for _ in pairs:
        store.prepare_exception()
    commit(store, pairs)
    assert store.prepare_merge() == (2, 8, 7)
    store.commit_merge(2)
    assert bytes(cow.data[CB + 64 : CB + 96]) == bytes(32)
    assert store.next_free == 1 + 4 + 1
    assert store.prepare_merge() == (1, 50, 5)
    store.commit_merge(1)
    assert store.prepare_merge() == (3, 102, 4)
    store.commit_merge(3)
    assert store.prepare_merge() == (0, 0, 0)
    assert store.usage().sectors_allocated == store.usage().metadata_sectors


def test_merge_steps_back_into_previous_area() -> None:
    cow, store = new_store()
    pairs = [(i, store.prepare_exception()) for i in range(257)]
    commit(store, pairs)
    assert store.prepare_merge() == (1, 256, 259)
    store.commit_merge(1)
    assert store.prepare_merge() == (256, 255, 257)


def test_transient_store() -> None:
    cow = MemoryEndpoint(3 * CB)
    store = TransientStore(cow, C)
    store.read_metadata()
    assert [store.prepare_exception() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(NoSpace):
        store.prepare_exception()
    assert store.usage().status_text() == f"{3 * C}/{3 * C} 0"
    # chunk 0 is the snapshot target's business ("Chunk size not set" unless a handover
    # destination); the store itself only refuses a bad non-zero size
    assert TransientStore(cow, 0).chunk_size == 0
    with pytest.raises(InvalidTable, match="power of 2"):
        TransientStore(cow, 7)


@pytest.mark.parametrize("mode, cls", [(StoreMode.PERSISTENT, PersistentStore),
                                        (StoreMode.PERSISTENT_OVERFLOW, PersistentStore),
                                        (StoreMode.TRANSIENT, TransientStore)])
def test_make_store(mode: StoreMode, cls: type) -> None:
    store = make_store(MemoryEndpoint(10 * CB), mode, 8)
    assert isinstance(store, cls) and store.mode is mode and store.chunk_size == 8
    assert store.overflow == (mode is StoreMode.PERSISTENT_OVERFLOW)


def test_exception_table_overlay_and_compaction() -> None:
    t = ExceptionTable.from_key_list(20, list(ExceptionTable.pack_keys([5, 1, 9], [10, 11, 12], 20)))
    assert [t.lookup(i) for i in (1, 5, 9, 2)] == [11, 10, 12, None]
    t.insert(2, 13)
    t.remove(5)
    assert len(t) == 3 and t.lookup(5) is None and t.lookup(2) == 13
    t.compact()
    assert list(t.items()) == [(1, 11), (2, 13), (9, 12)]
    for i in range(10_000):
        t.insert(100 + i, i)
    assert len(t) == 10_003 and t.lookup(5000) == 4900


def test_duplicate_records_resolve_to_one_mapping() -> None:
    t = ExceptionTable.from_key_list(8, list(ExceptionTable.pack_keys([3, 3, 4], [2, 5, 6], 8)))
    assert t.lookup(3) == 2 and t.lookup(4) == 6


def test_huge_origin_chunks_fall_back_to_int_keys() -> None:
    cow, store = new_store()
    pairs = [(1, store.prepare_exception()), (2**50, store.prepare_exception()), (3, store.prepare_exception())]
    commit(store, pairs)
    again = PersistentStore(cow, C)
    again.read_metadata()
    assert [again.table.lookup(o) for o, _ in pairs] == [n for _, n in pairs]
    assert sorted(again.table.items()) == sorted(pairs)


def test_batch_allocation_and_commit_across_an_area() -> None:
    cow, store = new_store()
    news = store.prepare_exceptions(300)
    assert news[:2] == [2, 3] and 258 not in news and news[256] == 259
    cow.journal.clear()
    done: list[bool] = []
    store.commit_batch([(1000 + i, n, True) for i, n in enumerate(news)], [done.append] * 300)
    assert done == [True] * 300
    writes = [e for e in cow.journal if e[0] == "write"]
    nxt = area_location(1, C) * CB
    # area 1 zeroed, area 0 committed full, then area 1 committed with the rest
    assert writes == [("write", "cow", nxt, CB), ("write", "cow", CB, CB), ("write", "cow", nxt, CB)]
    again = PersistentStore(cow, C)
    again.read_metadata()
    assert again.iter_records() == [(1000 + i, n) for i, n in enumerate(news)]
    assert (again.current_area, again.current_committed) == (1, 44)


def test_batch_allocation_stops_when_full() -> None:
    _, store = new_store(chunks=5)
    assert store.prepare_exceptions(10) == [2, 3, 4]
    with pytest.raises(NoSpace):
        store.prepare_exceptions(1)


def test_table_grows_with_the_cow() -> None:
    t = ExceptionTable.from_key_list(4, list(ExceptionTable.pack_keys([1, 2], [3, 15], 4)))
    t.insert(7, 1000)  # a chunk of a COW extended while active
    t.insert_new([(9, 5000)])
    assert [t.lookup(o) for o in (1, 2, 7, 9)] == [3, 15, 1000, 5000]
    assert list(t.items()) == [(1, 3), (2, 15), (7, 1000), (9, 5000)]
