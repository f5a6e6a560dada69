"""The userspace snapshot-origin, snapshot and snapshot-merge targets on the in-process engine."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from snap_stack import Stack

from dmtools.errors import DeviceIOError, InvalidArgument, InvalidTable
from snapshot.offline import export, inspect
from snapshot.store import PersistentStore
from dmtools.blockdev import BlockDevice

CB = 4096
SIZE = 256 * 1024


@pytest.fixture
def data() -> bytes:
    return random.Random(3).randbytes(SIZE)


def test_origin_write_preserves_snapshot(engine: Any, tmp_path: Path, data: bytes) -> None:
    st = Stack(engine, tmp_path, data)
    st.add_snapshot("s1", 128 * 1024)
    st.write(st.base, b"x" * 10000, 5000)
    assert st.read("s1") == data
    assert st.read(st.base)[5000:15000] == b"x" * 10000
    assert st.status("s1") == f"{5 * 8}/{128 * 2} 16"  # header + area + 3 chunks
    assert engine.table("s1").lines[0].target.params.endswith(" P 8")
    assert st.status(st.base) == ""


def test_snapshot_writes_and_full_chunk_path(engine: Any, tmp_path: Path, data: bytes) -> None:
    st = Stack(engine, tmp_path, data)
    st.add_snapshot("s1", 128 * 1024)
    st.write("s1", b"a" * 100, 3 * CB + 10)  # partial: origin chunk copied first
    st.write("s1", b"b" * CB, 7 * CB)  # whole chunk: no origin read
    view = st.read("s1")
    expect = bytearray(data)
    expect[3 * CB + 10 : 3 * CB + 110] = b"a" * 100
    expect[7 * CB : 8 * CB] = b"b" * CB
    assert view == bytes(expect)
    assert st.read(st.base) == data  # the origin never changes


def test_several_snapshots_and_reactivation(engine: Any, tmp_path: Path, data: bytes) -> None:
    st = Stack(engine, tmp_path, data)
    st.add_snapshot("s1", 128 * 1024)
    st.write(st.base, b"1" * CB, 0)
    v1 = st.read(st.base)
    st.add_snapshot("s2", 128 * 1024, chunk=16)
    st.write(st.base, b"2" * 3 * CB, CB // 2)
    assert st.read("s1") == data
    assert st.read("s2") == v1
    cow1 = st.snaps["s1"]
    st.drop_snapshot("s2")
    st.drop_snapshot("s1")
    # offline export of the persistent COW gives the same view
    export(st.origin_path, cow1, tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == data
    info = inspect(cow1)
    assert info.valid and info.exceptions >= 1


def test_origin_write_waits_for_durable_record(engine: Any, tmp_path: Path, data: bytes) -> None:
    st = Stack(engine, tmp_path, data)
    st.add_snapshot("s1", 128 * 1024)
    st.write(st.base, b"z" * CB, 5 * CB)
    # the record is on disk as soon as the origin write returned
    with BlockDevice(st.snaps["s1"]) as cow:
        store = PersistentStore(cow, 0, readonly=True)
        store.read_metadata()
        new = store.table.lookup(5)
        assert new is not None
        buf = bytearray(CB)
        cow.readinto(buf, new * CB)
        assert bytes(buf) == data[5 * CB : 6 * CB]


def test_full_cow_invalidates_on_origin_write(engine: Any, tmp_path: Path, data: bytes) -> None:
    st = Stack(engine, tmp_path, data)
    st.add_snapshot("s1", 4 * CB)  # header, area, 2 data chunks
    st.add_snapshot("s2", 128 * 1024)
    st.write(st.base, b"q" * 3 * CB, 0)
    assert st.status("s1") == "Invalid"
    with pytest.raises(DeviceIOError):
        st.read("s1", 0, 512)
    assert st.read("s2") == data
    assert st.read(st.base)[: 3 * CB] == b"q" * 3 * CB
    with open(st.snaps["s1"], "rb") as f:
        assert f.read(8)[4:8] == b"\0\0\0\0"  # header valid=0


def test_snapshot_write_overflow_without_po_invalidates(engine: Any, tmp_path: Path, data: bytes) -> None:
    st = Stack(engine, tmp_path, data)
    st.add_snapshot("s1", 3 * CB)
    st.write("s1", b"1" * CB, 0)
    with pytest.raises(DeviceIOError):
        st.write("s1", b"2" * CB, CB)
    assert st.status("s1") == "Invalid"


def test_po_overflow_fails_writes_only(engine: Any, tmp_path: Path, data: bytes) -> None:
    st = Stack(engine, tmp_path, data)
    st.add_snapshot("s1", 3 * CB, store="PO")
    st.write("s1", b"1" * CB, 0)
    with pytest.raises(DeviceIOError):
        st.write("s1", b"2" * CB, CB)
    assert st.status("s1") == "Overflow"
    assert st.read("s1")[:CB] == b"1" * CB  # reads still work
    with pytest.raises(DeviceIOError):
        st.write("s1", b"3" * CB, 0)  # even to an existing exception
    assert engine.table("s1").lines[0].target.params.endswith(" PO 8")
    # an origin write needing a new chunk still invalidates it
    st.write(st.base, b"o" * CB, 9 * CB)
    assert st.status("s1") == "Invalid"


def test_transient_store(engine: Any, tmp_path: Path, data: bytes) -> None:
    st = Stack(engine, tmp_path, data)
    st.add_snapshot("s1", 64 * 1024, store="N")
    st.write(st.base, b"n" * CB, 0)
    assert st.read("s1") == data
    assert st.status("s1") == f"8/128 0"


def test_cow_in_use_is_refused(engine: Any, tmp_path: Path, data: bytes) -> None:
    st = Stack(engine, tmp_path, data)
    st.add_snapshot("s1", 64 * 1024)
    # same origin: the new table is a handover destination, which cannot go live beside its
    # source (dm-snap.c snapshot_preresume); create fails and leaves nothing behind
    with pytest.raises(InvalidArgument, match="until source is suspended"):
        engine.create("s2", f"0 {st.sectors} snapshot {engine.device_ref(st.real)} {st.snaps['s1']} P 8")
    assert not engine.exists("s2")
    # another origin: refused at load
    other = Stack(engine, tmp_path, data, prefix="u")
    with pytest.raises(InvalidTable, match="in use"):
        engine.create("s3", f"0 {other.sectors} snapshot {engine.device_ref(other.real)} {st.snaps['s1']} P 8")
    assert not engine.exists("s3")
    st.write(st.base, b"z" * CB, 0)
    assert st.read("s1") == data


@pytest.mark.parametrize(
    "args, msg",
    [
        ("{o} {c} P", "requires 4 or more"),
        ("{o} {c} P 7", "power of 2"),
        ("{o} {c} X 8", "Exception store type is not P or N"),
        ("{o} {c} PX 8", "Exception store type constructor failed"),
        ("{o} {c} N 0", "Chunk size not set"),
        ("{o} {o} P 8", "cannot be the same"),
        ("{o} {c} P 8 1 bogus", "Unrecognised feature"),
    ],
)
def test_bad_tables(engine: Any, tmp_path: Path, data: bytes, args: str, msg: str) -> None:
    st = Stack(engine, tmp_path, data)
    cow = st.cow_file("x", 64 * 1024)
    text = args.format(o=engine.device_ref(st.real), c=cow)
    with pytest.raises(InvalidTable, match=msg):
        engine.create("bad", f"0 {st.sectors} snapshot {text}")
    assert cow.read_bytes() == bytes(64 * 1024)  # nothing written


def test_corrupt_cow_refused_nothing_written(engine: Any, tmp_path: Path, data: bytes) -> None:
    st = Stack(engine, tmp_path, data)
    cow = st.cow_file("x", 64 * 1024)
    with open(cow, "r+b") as f:
        f.write(b"JUNKJUNK")
    before = cow.read_bytes()
    with pytest.raises(InvalidTable, match="Invalid or corrupt snapshot"):
        engine.create("bad", f"0 {st.sectors} snapshot {engine.device_ref(st.real)} {cow} P 8")
    assert cow.read_bytes() == before


def merge(engine: Any, st: Stack, name: str, timeout: float = 20.0) -> None:
    """Convert ``name`` into a merge on the origin and wait for it (as the manager does)."""
    eng = engine
    cow = st.snaps[name]
    table = eng.table(name).lines[0].target.params.split()
    eng.suspend(st.base)
    eng.remove(name)
    del st.snaps[name]
    eng.load(st.base, f"0 {st.sectors} snapshot-merge {eng.device_ref(st.real)} {cow} {table[2]} {table[3]}")
    eng.resume(st.base)
    deadline = time.monotonic() + timeout
    while True:
        used, meta = st.status(st.base).split()
        if used.split("/")[0] == meta:
            break
        assert time.monotonic() < deadline, "merge did not finish"
        time.sleep(0.01)


def test_merge_rolls_the_origin_back(engine: Any, tmp_path: Path, data: bytes) -> None:
    st = Stack(engine, tmp_path, data)
    st.add_snapshot("s1", 128 * 1024)
    for i in range(0, 20, 3):
        st.write(st.base, bytes([i]) * CB * 2, i * CB)
    st.write("s1", b"S" * CB, 30 * CB)
    changed = st.read(st.base)
    st.add_snapshot("s2", 128 * 1024)
    merge(engine, st, "s1")
    expect = bytearray(data)
    expect[30 * CB : 31 * CB] = b"S" * CB
    assert st.read(st.base) == bytes(expect)
    assert st.read("s2") == changed  # the other snapshot kept its view
    assert inspect(tmp_path / "t-s1.cow").exceptions == 0


def test_merge_serves_io_while_merging(engine: Any, tmp_path: Path, data: bytes) -> None:
    st = Stack(engine, tmp_path, data)
    st.add_snapshot("s1", 256 * 1024)
    st.write(st.base, os.urandom(SIZE // 2), 0)
    merge(engine, st, "s1")
    st.write(st.base, b"after" * 100, 1000)
    assert st.read(st.base)[1000:1500] == b"after" * 100
    assert st.read(st.base)[1500:] == data[1500:]


def test_merge_holds_writes_to_the_chunks_being_merged(engine: Any, tmp_path: Path, data: bytes) -> None:
    import threading

    eng = engine
    st = Stack(eng, tmp_path, data)
    st.add_snapshot("s1", 128 * 1024)
    st.write(st.base, b"o" * 4 * CB, 2 * CB)  # exceptions for chunks 2..5
    cow = st.snaps.pop("s1")
    eng.suspend(st.base)
    eng.remove("s1")
    eng.load(st.base, f"0 {st.sectors} snapshot-merge {eng.device_ref(st.real)} {cow} P 8")
    tgt = eng._devices[st.base].inactive.targets[0]
    tgt.merge_done.set()  # keep the worker from starting: this test drives the merge range
    eng.resume(st.base)
    snap = tgt.snap
    with snap.cond:
        snap.merge_range = (3, 4)
    writer = threading.Thread(target=st.write, args=(st.base, b"H" * CB, 3 * CB))
    writer.start()
    writer.join(0.3)
    assert writer.is_alive()  # held: chunk 3 is being merged
    st.write(st.base, b"F" * CB, 2 * CB)  # chunk 2 is not: served at once (from the COW)
    with snap.cond:
        snap.merge_range = (0, 0)
        snap.cond.notify_all()
    writer.join(10)
    assert not writer.is_alive()
    # now let the merge run: the origin ends up as the snapshot view plus the writes above
    tgt.merge_done.clear()
    tgt.resume()
    deadline = time.monotonic() + 20
    while not tgt.merge_done.is_set():
        assert time.monotonic() < deadline
        tgt.merge_done.wait(0.05)
    expect = bytearray(data)
    expect[2 * CB : 3 * CB] = b"F" * CB
    expect[3 * CB : 4 * CB] = b"H" * CB
    assert st.read(st.base) == bytes(expect)
    used, meta = st.status(st.base).split()
    assert used.split("/")[0] == meta


def test_origin_discard_and_zero_copy_first(engine: Any, tmp_path: Path, data: bytes) -> None:
    st = Stack(engine, tmp_path, data)
    st.add_snapshot("s1", 128 * 1024)
    with engine.open_endpoint(st.base) as ep:
        ep.discard(0, 4 * CB)
        ep.zero(8 * CB, 2 * CB)
    assert st.read(st.base)[8 * CB : 10 * CB] == bytes(2 * CB)
    assert st.read("s1") == data
