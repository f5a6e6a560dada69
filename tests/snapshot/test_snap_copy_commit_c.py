"""A one-chunk first write's copy and commit in one C call (``snapshot.route.copy_commit``,
fastio.c ``dms_copy_commit_chunk``): the kernel's order (origin read, COW write, flush, area
write, flush, origin write), and at each step a failure or short transfer handed to the Python
path, which copies again, writes the area again, fails the commit without flushing for it
again, or writes the origin; snapshot reads of the chunk never see the new origin bytes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from snap_helpers import FAULTS, c_ops, only_snapshot
from snap_stack import Stack

from snapshot.route import FLUSH_COST_WEIGHT, c_library
from snapshot.store.persistent import C_FLUSH_SAMPLE, PersistentStore
from snapshot.targets.core import origins_of

CB = 4096  # chunk size 8 sectors
CHUNKS = 64
WAIT = 30.0
_C = c_library()  # (ffi, lib): the functions copy_commit calls, whose test seams these tests use
FFI, LIB = _C if _C is not None else (None, None)

pytestmark = pytest.mark.skipif(LIB is None, reason="no C library (no compiler, or DMTOOLS_FAST_IO=0)")


def _origin_bytes() -> bytes:
    return bytes((i * 7 + j) % 251 for i in range(CHUNKS) for j in range(CB))


def _stack(engine: Any, tmp_path: Path, cow_device: bool = True, origin: bytes | None = None) -> tuple[Stack, Path]:
    """An origin with one persistent snapshot; its COW the engine device ``t-cow`` (one linear
    segment over the COW file), or with ``cow_device`` False the file itself."""
    st = Stack(engine, tmp_path, _origin_bytes() if origin is None else origin)
    cow = st.cow_file("s", 4 * CHUNKS * CB)
    if cow_device:
        engine.create("t-cow", f"0 {4 * CHUNKS * 8} linear {cow} 0")
        st.add_snapshot("s", 0, cow=engine.device_ref("t-cow"))
    else:
        st.add_snapshot("s", 0, cow=str(cow))
    return st, cow


def _records(cow: Path) -> list[tuple[int, int]]:
    """The records of metadata area 0 on the COW file, up to the first empty one."""
    area = cow.read_bytes()[CB : 2 * CB]
    out = []
    for i in range(CB // 16):
        old, new = (int.from_bytes(area[16 * i + k : 16 * i + k + 8], "little") for k in (0, 8))
        if not new:
            break
        out.append((old, new))
    return out


def _written(chunk: int, at: int, data: bytes) -> bytes:
    b = bytearray(_origin_bytes()[chunk * CB : (chunk + 1) * CB])
    b[at : at + len(data)] = data
    return bytes(b)


def _check_views(st: Stack, written: dict[int, bytes], snapshot_valid: bool = True) -> None:
    origin = bytearray(_origin_bytes())
    for chunk, data in written.items():
        origin[chunk * CB : (chunk + 1) * CB] = data
    assert st.read(st.base) == bytes(origin)
    if snapshot_valid:
        assert st.read("s") == _origin_bytes()


def _reloaded(engine: Any, cow: Path) -> dict[int, int]:
    """The exceptions a store loaded from the COW file holds (the kernel's reader)."""
    with engine.open_endpoint("t-cow", writable=False) as ep:
        store = PersistentStore(ep, 8, readonly=True)
        store.read_metadata()
        return dict(store.iter_records())


@pytest.mark.parametrize("cow_device", [True, False], ids=["cow-device", "cow-file"])
def test_a_first_write_copies_and_commits_in_one_c_call(engine: Any, tmp_path: Path, cow_device: bool) -> None:
    st, cow = _stack(engine, tmp_path, cow_device)
    snap = only_snapshot(engine)
    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 5 * CB + 512)  # the first one: the area's first write, zeroing ahead
        ep.write(b"b" * 512, 9 * CB + 1024)
        ops = c_ops()
    # the origin chunk read, the copy written, PREFLUSH, the area, FUA, then the origin write:
    # the kernel's order
    assert ops == "rwfwfw"
    snap.sync()  # (the exceptions C committed, folded into the table and the store)
    new = snap.table.lookup(9)
    assert new is not None and snap.store.records == 2 and snap.valid
    assert _records(cow)[-1] == (9, new)
    assert cow.read_bytes()[new * CB : (new + 1) * CB] == _origin_bytes()[9 * CB : 10 * CB]
    _check_views(st, {5: _written(5, 512, b"a" * 512), 9: _written(9, 1024, b"b" * 512)})


def test_zeros_are_not_copied_onto_a_chunk_zeroed_ahead(engine: Any, tmp_path: Path) -> None:
    origin = bytearray(_origin_bytes())
    origin[12 * CB : 13 * CB] = bytes(CB)
    st, cow = _stack(engine, tmp_path, origin=bytes(origin))
    snap = only_snapshot(engine)
    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 2 * CB)
        ep.write(b"z" * 512, 12 * CB)
        ops = c_ops()
    assert ops == "rfwfw"  # no write of the zeros: the chunk reads as zeros already
    snap.sync()
    new = snap.table.lookup(12)
    assert new is not None and _records(cow)[-1] == (12, new)
    assert st.read("s") == bytes(origin)
    assert _reloaded(engine, cow)[12] == new


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failure_at_each_step_goes_on_in_python(engine: Any, tmp_path: Path, fault: str) -> None:
    step, short, calls, valid = FAULTS[fault]
    st, cow = _stack(engine, tmp_path)
    snap = only_snapshot(engine)
    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 3 * CB)
        LIB.dms_set_fault(step, int(short))
        try:
            ep.write(b"b" * 512, 7 * CB + 512)  # the origin write lands, whatever the snapshot's fate
            ops = c_ops()
        finally:
            LIB.dms_set_fault(-1, 0)
    assert ops == calls
    snap.sync()
    assert snap.valid is valid
    _check_views(st, {3: _written(3, 0, b"a" * 512), 7: _written(7, 512, b"b" * 512)},
                 snapshot_valid=valid)
    records = dict(_records(cow))
    if valid:
        new = snap.table.lookup(7)
        assert new is not None and records[7] == new and snap.store.records == 2
        assert cow.read_bytes()[new * CB : (new + 1) * CB] == _origin_bytes()[7 * CB : 8 * CB]
        assert _reloaded(engine, cow)[7] == new
    else:
        assert 7 not in records or step == 4  # after a failed PREFLUSH the record is never written
        assert "Invalid" in st.status("s")
        assert snap.table.lookup(7) is None


def test_a_suspended_cow_sends_the_copy_to_python_which_waits(engine: Any, tmp_path: Path) -> None:
    st, cow = _stack(engine, tmp_path)
    snap = only_snapshot(engine)
    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 3 * CB)  # routes learnt
        before = cow.read_bytes()
        engine.suspend("t-cow")
        writer = threading.Thread(target=ep.write, args=(b"b" * 512, 11 * CB), daemon=True)
        writer.start()
        writer.join(0.3)
        held = writer.is_alive()
        unchanged = cow.read_bytes() == before
        engine.resume("t-cow")
        writer.join(WAIT)
    assert held and unchanged, "a first write wrote to a suspended COW"
    assert not writer.is_alive()
    new = snap.table.lookup(11)
    assert new is not None and _records(cow)[-1] == (11, new)
    _check_views(st, {3: _written(3, 0, b"a" * 512), 11: _written(11, 0, b"b" * 512)})


def test_concurrent_first_writes_commit_in_allocation_order(engine: Any, tmp_path: Path) -> None:
    st, cow = _stack(engine, tmp_path)
    snap = only_snapshot(engine)
    chunks = list(range(1, CHUNKS))
    with engine.open_endpoint(st.base) as ep:

        def run(first: int) -> None:
            for c in chunks[first::4]:
                ep.write(bytes([c]) * 512, c * CB + 1024)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
    snap.sync()
    assert snap.valid and not any(t.is_alive() for t in threads)
    on_disk = _records(cow)
    # every exception on disk, in the order of its COW chunk (allocation order), and no other
    assert sorted(on_disk, key=lambda r: r[1]) == on_disk and len(on_disk) == len(chunks)
    assert dict(on_disk) == {c: snap.table.lookup(c) for c in chunks}
    _check_views(st, {c: _written(c, 1024, bytes([c]) * 512) for c in chunks})


def test_a_snapshot_read_of_a_sealed_chunk_waits_for_the_exception(engine: Any, tmp_path: Path) -> None:
    st, _ = _stack(engine, tmp_path)
    snap = only_snapshot(engine)
    got: list[bytes] = []
    snap.sealed = 5  # as while C writes the origin chunk before the exception is published
    reader = threading.Thread(target=lambda: got.append(st.read("s", 4 * CB, 2 * CB)), daemon=True)
    reader.start()
    reader.join(0.3)
    held = reader.is_alive()
    with snap.cond:
        snap.sealed = -1
        snap.cond.notify_all()
    reader.join(WAIT)
    assert held, "a snapshot read of a sealed chunk went to the origin"
    assert got == [_origin_bytes()[4 * CB : 6 * CB]]


def test_an_origin_chunk_with_snapshot_reads_in_flight_is_written_after_them(engine: Any, tmp_path: Path) -> None:
    st, _ = _stack(engine, tmp_path)
    snap = only_snapshot(engine)
    ops: list[str] = []
    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 3 * CB)
        with snap.cond:
            snap.tracked[7] = 1  # a snapshot read of chunk 7 from the origin, in flight

        def write() -> None:
            ep.write(b"b" * 512, 7 * CB)
            ops.append(c_ops())

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(0.3)
        held = writer.is_alive()
        unchanged = st.origin_path.read_bytes()[7 * CB : 8 * CB] == _origin_bytes()[7 * CB : 8 * CB]
        with snap.cond:
            del snap.tracked[7]
            snap.cond.notify_all()
        writer.join(WAIT)
    assert held and unchanged, "the origin chunk changed under a snapshot read of it"
    assert ops == ["rwfwf"]  # copied and committed in C; the origin written after the read, in Python
    _check_views(st, {3: _written(3, 0, b"a" * 512), 7: _written(7, 0, b"b" * 512)})


@pytest.mark.parametrize("fast", [True, False], ids=["writers-thread", "pool"])
def test_several_snapshots_commit_copies_of_one_origin_read_in_c(engine: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    from snapshot.targets import core

    st = Stack(engine, tmp_path, _origin_bytes())
    for name in ("a", "b", "c"):
        st.add_snapshot(name, 4 * CHUNKS * CB)
    snaps = origins_of(engine).all_snapshots()
    for snap in snaps:  # (the shared read: for snapshots without the whole first write in C, see test_snap_fast.py)
        snap._no_fast = True
    monkeypatch.setattr(core, "PARALLEL_FLUSH_SECONDS", float("inf") if fast else 0.0)
    answers: list[tuple[int, int]] = []
    real = core.copy_commit

    def copy_commit(*args: Any) -> int:
        rc = real(*args)
        answers.append((args[5], rc))  # (origin chunk, answer)
        return rc

    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 1 * CB)
        monkeypatch.setattr(core, "copy_commit", copy_commit)
        ep.write(b"b" * 512, 20 * CB + 512)
        ops = c_ops()
    # one C commit of the shared origin read per snapshot, on the writer's thread or in the pool
    assert answers == [(20, 0)] * 3
    if fast:  # the last snapshot's commit on this thread: no origin read (the shared one), no origin write
        assert ops == "wfwf"
    for snap in snaps:
        assert snap.valid and snap.store.flush_cost is not None
        new = snap.table.lookup(20)
        assert new is not None
        cow = Path(st.snaps[snap.name])
        assert _records(cow)[-1] == (20, new)
        assert cow.read_bytes()[new * CB : (new + 1) * CB] == _origin_bytes()[20 * CB : 21 * CB]
    for name in ("a", "b", "c"):
        assert st.read(name) == _origin_bytes()
    assert st.read(st.base) == bytes(_merge({1: _written(1, 0, b"a" * 512), 20: _written(20, 512, b"b" * 512)}))


def _merge(written: dict[int, bytes]) -> bytearray:
    origin = bytearray(_origin_bytes())
    for chunk, data in written.items():
        origin[chunk * CB : (chunk + 1) * CB] = data
    return origin


def test_the_flushes_made_in_c_count_in_the_stores_flush_cost(engine: Any, tmp_path: Path) -> None:
    st, _ = _stack(engine, tmp_path)
    snap = only_snapshot(engine)
    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 2 * CB)
        route = snap.store._cow_route()
        route.flush_cost = 10.0  # an old, slow figure: C's flushes move the moving average down
        for chunk in range(4, 4 + C_FLUSH_SAMPLE):  # one of them sampled
            ep.write(b"b" * 512, chunk * CB)
            assert c_ops() == "rwfwfw"
    snap.sync()
    cost = snap.store.flush_cost
    assert cost is not None and 10.0 * (1 - FLUSH_COST_WEIGHT) <= cost < 10.0


def test_a_chunk_stays_sealed_until_its_exception_is_published(engine: Any, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    st, _ = _stack(engine, tmp_path)
    snap = only_snapshot(engine)
    snap._no_fast = True  # (the one-chunk copy and commit in C, not the whole write: see test_snap_fast.py)
    got: list[bytes] = []
    held: list[bool] = []
    real = snap._publish

    def publish(batch: Any) -> None:
        # C has written the origin chunk; a snapshot read of it starts before the exception is
        # in the table, and must not read the new origin bytes
        reader = threading.Thread(target=lambda: got.append(st.read("s", 9 * CB, CB)), daemon=True)
        reader.start()
        reader.join(0.3)
        held.append(reader.is_alive())
        real(batch)
        reader.join(WAIT)

    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 3 * CB)
        monkeypatch.setattr(snap, "_publish", publish)
        ep.write(b"b" * 512, 9 * CB)
        ops = c_ops()
    assert ops == "rwfwfw" and held == [True]
    assert got == [_origin_bytes()[9 * CB : 10 * CB]]
    _check_views(st, {3: _written(3, 0, b"a" * 512), 9: _written(9, 0, b"b" * 512)})


def test_the_last_chunk_cut_at_the_origins_end_is_copied_in_c(engine: Any, tmp_path: Path) -> None:
    origin = _origin_bytes() + bytes(range(256)) * 4  # the last chunk: 1 KiB on the origin
    st = Stack(engine, tmp_path, origin)
    cow = st.cow_file("s", 4 * CHUNKS * CB)
    engine.create("t-cow", f"0 {4 * CHUNKS * 8} linear {cow} 0")
    st.add_snapshot("s", 0, cow=engine.device_ref("t-cow"))
    snap = only_snapshot(engine)
    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 2 * CB)
        ep.write(b"z" * 512, CHUNKS * CB + 512)
        ops = c_ops()
    assert ops == "rwfwfw"
    snap.sync()
    new = snap.table.lookup(CHUNKS)
    assert new is not None and _records(cow)[-1] == (CHUNKS, new)
    assert cow.read_bytes()[new * CB : new * CB + 1024] == origin[CHUNKS * CB :]
    assert st.read("s") == origin
    assert st.read(st.base)[CHUNKS * CB :] == origin[CHUNKS * CB : CHUNKS * CB + 512] + b"z" * 512
