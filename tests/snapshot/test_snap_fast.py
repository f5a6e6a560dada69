"""The common first write whole in C (``snapshot.store.fast``, dms.c ``dms_snap_write``): the
same bytes on the COW and the origin as the Python path writes, in the kernel's order; the
table and the store folded from C's log before the snapshot's own paths read them (status,
snapshot reads, handover, merge); C off while anything unusual goes on."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest
from snap_helpers import c_ops, only_snapshot
from snap_stack import Stack

from dmtools.engine import Engine
from snapshot import SnapshotManager
from snapshot.route import c_library
from snapshot.store import fast as fast_mod
from snapshot.store.persistent import PersistentStore
from snapshot.targets import core
from snapshot.targets.core import origins_of

CB = 4096  # chunk size 8 sectors
CHUNKS = 600  # more first writes than one metadata area holds (255 records)
pytestmark = pytest.mark.skipif(c_library() is None, reason="no C library (no compiler, or DMTOOLS_FAST_IO=0)")


def _origin_bytes() -> bytes:
    return random.Random(3).randbytes(CHUNKS * CB)


def _run(tmp: Path, c: bool, writes: list[tuple[int, bytes]], nsnaps: int = 1, chunk: int = 8) -> list[Any]:
    """The origin file, then each snapshot's COW file, status and view after ``writes``
    (``(offset, data)`` to the origin) with the whole first write in C on or off (chunks of
    ``chunk`` sectors)."""
    tmp.mkdir()
    with Engine() as eng:
        st = Stack(eng, tmp, _origin_bytes())
        names = [f"s{i}" for i in range(nsnaps)]
        for name in names:
            st.add_snapshot(name, 2 * CHUNKS * CB, chunk=chunk)
        snaps = origins_of(eng).all_snapshots()
        for snap in snaps:
            snap._no_fast = not c
        with eng.open_endpoint(st.base) as ep:
            for off, data in writes:
                ep.write(data, off)
        assert all((snap._fast is not None) is c for snap in snaps)
        out: list[Any] = [st.origin_path.read_bytes()]
        for name in names:
            out += [st.status(name), st.read(name), Path(st.snaps[name]).read_bytes()]
        return out


def _writes(seed: int, n: int) -> list[tuple[int, bytes]]:
    """``n`` first writes inside one chunk each, in random chunks; rewrites of 20 of them; 10
    writes across two chunks (the Python path)."""
    rng = random.Random(seed)
    out = []
    for c in rng.sample(range(CHUNKS), n):
        first = rng.randrange(8)  # (sectors of the chunk)
        out.append((c * CB + 512 * first, rng.randbytes(512 * rng.randrange(1, 9 - first))))
    out += [(off, b"r" * 512) for off, _ in out[:20]]
    out += [(c * CB + CB - 512, b"x" * 1024) for c in rng.sample(range(CHUNKS - 1), 10)]
    return out


@pytest.mark.parametrize("nsnaps", [1, 3])
def test_c_writes_the_same_bytes_as_the_python_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    nsnaps: int) -> None:
    # (several snapshots: each copied in turn on the writer's thread, whatever the flushes take)
    monkeypatch.setattr(core, "PARALLEL_FLUSH_SECONDS", float("inf"))
    writes = _writes(1, 400 if nsnaps == 1 else 150)  # (one snapshot: two metadata areas)
    with_c = _run(tmp_path / "c", True, writes, nsnaps)
    in_python = _run(tmp_path / "py", False, writes, nsnaps)
    for i in range(nsnaps):
        assert with_c[2 + 3 * i] == _origin_bytes()  # the snapshot's view
    assert with_c == in_python


def test_zeroing_ahead_after_the_first_is_made_in_c(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 KiB chunks: the store zeroes 128 chunks ahead at a time, four times per metadata area (512
    records). The first zeroing is the Python path's (it learns whether the COW tells its holes);
    C makes the next ones itself, before the copy, instead of declining the write to Python; the
    origin, the COW, the status and the view are what the Python path makes of the same writes."""
    calls: list[bool] = []
    zero_ahead = PersistentStore._zero_ahead_locked

    def counted(store: PersistentStore, first: int) -> None:
        calls.append(True)
        zero_ahead(store, first)

    monkeypatch.setattr(PersistentStore, "_zero_ahead_locked", counted)
    rng = random.Random(5)
    writes = [(c * 2 * CB + 512, rng.randbytes(512)) for c in rng.sample(range(CHUNKS // 2), 290)]
    with_c = _run(tmp_path / "c", True, writes, chunk=16)
    assert len(calls) == 1  # (290 chunks allocated: zeroed ahead from chunks 3, 131 and 259)
    in_python = _run(tmp_path / "py", False, writes, chunk=16)
    assert len(calls) == 4
    assert with_c[2] == _origin_bytes() and with_c == in_python


def test_several_snapshots_are_copied_in_turn_in_c(engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "PARALLEL_FLUSH_SECONDS", float("inf"))
    st = Stack(engine, tmp_path, _origin_bytes())
    for name in ("a", "b", "c"):
        st.add_snapshot(name, 2 * CHUNKS * CB)
    snaps: list[Any] = origins_of(engine).all_snapshots()
    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 3 * CB)  # zeroing ahead (I/O): in Python
        ep.write(b"b" * 512, 9 * CB)
        assert c_ops() == "rwfwfw"  # the last snapshot's copy and commit, then the origin write
        assert all(snap._fast is not None and snap._fast.armed for snap in snaps)
        assert all(snap.table.lookup(9) is None for snap in snaps)  # (not folded yet)
    for name in ("a", "b", "c"):
        assert st.read(name) == _origin_bytes()
    assert all(snap.table.lookup(9) is not None and snap.store.records == 2 for snap in snaps)
    origin = bytearray(_origin_bytes())
    origin[3 * CB : 3 * CB + 512] = b"a" * 512
    origin[9 * CB : 9 * CB + 512] = b"b" * 512
    assert st.read(st.base) == bytes(origin)


def test_a_first_write_is_made_whole_in_c_and_folded_before_a_read(engine: Any, tmp_path: Path) -> None:
    st = Stack(engine, tmp_path, _origin_bytes())
    st.add_snapshot("s", 2 * CHUNKS * CB)
    snap = only_snapshot(engine)
    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 3 * CB)  # the first: zeroing ahead (I/O), in Python
        ep.write(b"b" * 512, 9 * CB + 512)
        ops = c_ops()
        assert snap._fast is not None and snap._fast.armed
        # C made it: the table learns of it only at a fence
        assert snap.table.lookup(9) is None and snap.store.records == 1
        assert ops == "rwfwfw"  # origin read, copy, PREFLUSH, area, FUA, origin write
        # a snapshot read folds C's log first, and reads the copy
        assert st.read("s", 9 * CB, CB) == _origin_bytes()[9 * CB : 10 * CB]
        assert not snap._fast.armed and snap.table.lookup(9) is not None and snap.store.records == 2
        ep.write(b"c" * 512, 11 * CB)  # armed again by the next first write
        assert snap._fast.armed and c_ops() == "rwfwfw"
    origin = bytearray(_origin_bytes())
    origin[3 * CB : 3 * CB + 512] = b"a" * 512
    origin[9 * CB + 512 : 9 * CB + 1024] = b"b" * 512
    origin[11 * CB : 11 * CB + 512] = b"c" * 512
    assert st.read(st.base) == bytes(origin)
    assert st.read("s") == _origin_bytes()


def test_a_rewrite_of_a_chunk_c_copied_is_written_by_c_alone(engine: Any, tmp_path: Path) -> None:
    st = Stack(engine, tmp_path, _origin_bytes())
    st.add_snapshot("s", 2 * CHUNKS * CB)
    snap = only_snapshot(engine)
    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 3 * CB)
        ep.write(b"b" * 512, 9 * CB)
        records = snap.store.records
        ep.write(b"c" * 512, 9 * CB + 512)  # the chunk has its exception (C's bitmap): no copy
        assert snap._fast is not None and snap._fast.armed and snap.store.records == records
    snap.sync()
    assert snap.store.records == 2
    assert st.read(st.base, 9 * CB, 1024) == b"b" * 512 + b"c" * 512
    assert st.read("s") == _origin_bytes()


def test_a_full_log_is_folded_and_c_goes_on(engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_mod, "LOG_MAX", 4)
    st = Stack(engine, tmp_path, _origin_bytes())
    st.add_snapshot("s", 2 * CHUNKS * CB)
    snap = only_snapshot(engine)
    chunks = list(range(1, 40))
    with engine.open_endpoint(st.base) as ep:
        for c in chunks:
            ep.write(b"w" * 512, c * CB)
    snap.sync()
    assert {c for c in chunks if snap.table.lookup(c) is not None} == set(chunks)
    assert snap.store.records == len(chunks) and snap.valid
    assert st.read("s") == _origin_bytes()


def test_handover_and_merge_take_the_exceptions_c_committed(tmp_path: Path) -> None:
    origin = tmp_path / "vol.img"
    origin.write_bytes(_origin_bytes())
    cow = tmp_path / "s.cow"
    with open(cow, "wb") as f:
        f.truncate(2 * CHUNKS * CB)
    with Engine() as eng:
        mgr = SnapshotManager(eng)
        eng.create("vol", f"0 {CHUNKS * 8} linear {origin} 0")
        mgr.create("vol", str(cow), "s", chunk_size=8)
        snap = only_snapshot(eng)
        with eng.open_endpoint("vol") as ep:
            for c in range(0, 40, 3):
                ep.write(bytes([c]) * 512, c * CB + 1024)
        assert snap._fast is not None and snap._fast.armed and snap.store.records < 14
        mgr.merge("s")  # the snapshot's exceptions handed over to snapshot-merge, merged back
        with eng.open_endpoint("vol", writable=False) as ep:
            buf = bytearray(CHUNKS * CB)
            ep.readinto(buf, 0)
    assert bytes(buf) == _origin_bytes()


def test_a_reloaded_snapshot_takes_over_the_exceptions_c_committed(engine: Any, tmp_path: Path) -> None:
    st = Stack(engine, tmp_path, _origin_bytes())
    st.add_snapshot("s", 2 * CHUNKS * CB)
    snap = only_snapshot(engine)
    with engine.open_endpoint(st.base) as ep:
        for c in range(0, 40, 3):
            ep.write(bytes([c]) * 512, c * CB + 1024)
    assert snap._fast is not None and snap._fast.armed
    table = engine.table("s")
    engine.suspend("s")
    engine.load("s", table)
    engine.resume("s")  # handover: the new table's snapshot takes the store over
    assert st.read("s") == _origin_bytes()
    dest = only_snapshot(engine)
    assert dest is not snap and dest.store.records == 14 and dest.table.lookup(39) is not None


def test_the_bitmap_of_a_reloaded_cow_holds_its_exceptions(tmp_path: Path) -> None:
    """A snapshot activated on a COW holding exceptions: C learns them from the loaded table
    (its packed keys), so a write to one of those chunks copies nothing again."""
    chunks = [5, 17, 200, 201, 599]
    with Engine() as eng:
        st = Stack(eng, tmp_path, _origin_bytes())
        st.add_snapshot("s", 2 * CHUNKS * CB)
        with eng.open_endpoint(st.base) as ep:
            for c in chunks:
                ep.write(b"1" * 512, c * CB)
        cow = st.snaps["s"]
        origin_now = st.origin_path.read_bytes()
        st.drop_snapshot("s")
    (tmp_path / "again").mkdir()
    with Engine() as eng:
        st = Stack(eng, tmp_path / "again", origin_now)
        st.add_snapshot("s", 0, cow=cow)  # (loads the exceptions)
        snap = only_snapshot(eng)
        with eng.open_endpoint(st.base) as ep:
            ep.write(b"2" * 512, 300 * CB)  # zeroing ahead: in Python
            ep.write(b"2" * 512, 301 * CB)  # C armed
            for c in chunks:  # chunks with exceptions, in C's bitmap from the loaded table
                ep.write(b"3" * 512, c * CB + 512)
            assert snap._fast is not None and snap._fast.armed
        snap.sync()
        assert snap.store.records == len(chunks) + 2
        view = st.read("s")
    for c in chunks:  # the snapshot still shows what the origin held when it was taken
        assert view[c * CB : (c + 1) * CB] == _origin_bytes()[c * CB : (c + 1) * CB]


@pytest.mark.parametrize("slow", [False, True], ids=["fast-flushes", "slow-flushes"])
def test_a_write_finding_another_in_flight_waits_unless_flushes_are_slow(
        engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: bool) -> None:
    """Where the COW's flushes are slow, concurrent first writes go to the Python path, which
    commits them together (one area write for all); where they are fast, C takes them in turn."""
    monkeypatch.setattr(core, "PARALLEL_FLUSH_SECONDS", 0.0 if slow else float("inf"))
    st = Stack(engine, tmp_path, _origin_bytes())
    st.add_snapshot("s", 2 * CHUNKS * CB)
    snap = only_snapshot(engine)
    ffi, lib = c_library()  # type: ignore[misc]
    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 3 * CB)  # zeroing ahead: in Python
        ep.write(b"b" * 512, 4 * CB)  # C armed; its flushes count as slow with a threshold of 0
        fast = snap._fast
        assert fast is not None and fast.armed
        lib.dms_snap_hold(fast.state, 1)  # as a write in flight
        writer = threading.Thread(target=ep.write, args=(b"c" * 512, 9 * CB), daemon=True)
        writer.start()
        writer.join(0.3)  # (it waits: in C for the mutex, or in the Python path's fence)
        lib.dms_snap_hold(fast.state, 0)
        writer.join(30.0)
        assert not writer.is_alive()
        assert fast.armed is not slow  # (the Python path fenced C, and did not arm it again)
    snap.sync()
    assert snap.table.lookup(9) is not None and snap.store.records == 3
    assert st.read("s") == _origin_bytes()
    assert st.read(st.base, 9 * CB, 512) == b"c" * 512
