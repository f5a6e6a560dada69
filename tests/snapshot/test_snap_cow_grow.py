"""A COW grown while active (LVM autoextend): the exception table widens its packed keys, and a
failure while completing exceptions invalidates the snapshot instead of hanging origin writes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from dmtools.errors import DeviceIOError

from snapshot.store.format import DiskHeader
from snapshot.store.table import FLOAT_EXACT, ExceptionTable
from snapshot.manager import SnapshotManager
from snapshot.targets import origins_of

CHUNK = 4096  # chunk size 8 sectors
WAIT = 30.0  # seconds: generous bound for a loaded 2-CPU machine


def test_table_widens_past_the_next_power_of_two() -> None:
    # activated on a 100-chunk COW: 7 bits + 2 spare, room for chunk numbers below 512
    t = ExceptionTable(100 .bit_length() + 2)
    narrow = t.shift
    pairs = [(o, o + 2) for o in range(0, 300)]
    t.insert_new(pairs)
    t.compact()
    # the COW grew 40 times: chunk numbers need 12 bits
    t.insert(5000, 3999)
    t.insert_new([(o, o + 4000) for o in range(300, 5000)])
    assert t.shift > narrow and (3999 + 5000) >> t.shift == 0
    t.insert(7, 4000 + 4999 + 1)  # replaces an old mapping with a wide one
    assert len(t) == 5001
    assert t.lookup(0) == 2 and t.lookup(299) == 301 and t.lookup(5000) == 3999
    assert t.lookup(300) == 4300 and t.lookup(4999) == 8999 and t.lookup(7) == 9000
    assert t.lookup(5001) is None
    items = list(t.items())
    assert [o for o, _ in items] == list(range(5001))
    assert dict(items)[7] == 9000 and dict(items)[123] == 125


def test_table_widens_past_float_exactness() -> None:
    # huge origin chunk numbers: widening pushes keys above 2**53, out of the float array
    t = ExceptionTable(4)
    big = (FLOAT_EXACT >> 6) + 3
    t.insert_new([(big, 9), (1, 2)])
    t.compact()
    t.insert(big + 1, 1 << 10)
    t.compact()
    assert t.lookup(big) == 9 and t.lookup(1) == 2 and t.lookup(big + 1) == 1 << 10
    assert list(t.items()) == [(1, 2), (big, 9), (big + 1, 1 << 10)]


def _snapshot_obj(eng: Any, name: str) -> Any:
    found = [s for s in origins_of(eng).all_snapshots() if s.name == name]
    assert len(found) == 1, f"snapshot {name} not registered"
    return found[0]


def _stack(eng: Any, tmp: Path, origin: bytes, cow_bytes: int) -> Path:
    """``o-real`` over a file, ``s-cow`` linear over a COW file, ``s`` snapshot, ``o`` origin."""
    opath = tmp / "origin.img"
    opath.write_bytes(origin)
    cpath = tmp / "s.cow"
    with open(cpath, "wb") as f:
        f.truncate(cow_bytes)
    sectors = len(origin) // 512
    eng.create("o-real", f"0 {sectors} linear {opath} 0")
    eng.create("s-cow", f"0 {cow_bytes // 512} linear {cpath} 0")
    real, cow = eng.device_ref("o-real"), eng.device_ref("s-cow")
    eng.create("s", f"0 {sectors} snapshot {real} {cow} P 8")
    eng.create("o", f"0 {sectors} snapshot-origin {real}")
    return cpath


def _pattern(chunks: int) -> bytes:
    return b"".join(bytes([c % 251 + 1]) * 8 + c.to_bytes(8, "little") * ((CHUNK - 8) // 8) + bytes(
        (CHUNK - 8) % 8) for c in range(chunks))


def test_cow_grown_three_times_under_writes_keeps_the_data(engine: Any, tmp_path: Path) -> None:
    eng = engine
    chunks = 400
    original = _pattern(chunks)
    cow_file = _stack(eng, tmp_path, original, 16 * CHUNK)  # 16 chunks: header + area + 14 data
    snap = _snapshot_obj(eng, "s")
    shift0 = snap.table.shift
    allowed = [12]  # origin chunks the writer may overwrite: never more than the COW holds
    written = [0]
    errors: list[BaseException] = []
    cond = threading.Condition()

    def writer() -> None:
        try:
            with eng.open_endpoint("o") as ep:
                for c in range(chunks):
                    with cond:
                        if not cond.wait_for(lambda: c < allowed[0], timeout=WAIT):
                            raise TimeoutError(f"writer starved at chunk {c}")
                    ep.write(bytes([0xEE]) * 512, c * CHUNK + 512)  # partial: needs the copy
                    with cond:
                        written[0] = c + 1
                        cond.notify_all()
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            errors.append(err)
            with cond:
                cond.notify_all()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    cow_chunks = 16
    for _ in range(3):
        # extend while the writer is busy in the space it has (it may be held by the suspend)
        with cond:
            assert cond.wait_for(lambda: written[0] >= allowed[0] // 2 or errors, timeout=WAIT)
        assert not errors
        SnapshotManager(eng).extend("s", 200)  # x3, through handover: a new table takes over
        cow_chunks *= 3
        assert cow_file.stat().st_size == cow_chunks * CHUNK
        with cond:
            # header, metadata areas (one per 256 exceptions) and a spare chunk stay free
            allowed[0] = min(chunks, cow_chunks - 2 - cow_chunks // 256 - 2)
            cond.notify_all()
    thread.join(WAIT * 4)
    assert not thread.is_alive(), "origin writer hung"
    assert not errors, errors
    assert written[0] == allowed[0] == min(chunks, 432 - 2 - 1 - 2)
    assert not snap.valid  # handed over: the table that took over holds the exceptions
    snap = _snapshot_obj(eng, "s")
    assert snap.valid and snap.table.shift > shift0  # the packed keys were widened
    assert (1 << shift0) <= cow_chunks
    status = eng.status("s")[0].params
    used, total = (int(x) for x in status.split()[0].split("/"))
    assert total == 432 * 8 and used > (1 << shift0) * 8
    # the snapshot still shows the original data; the origin has the new sectors
    with eng.open_endpoint("s", writable=False) as sp, eng.open_endpoint("o", writable=False) as op:
        sbuf, obuf = bytearray(len(original)), bytearray(len(original))
        sp.readinto(sbuf, 0)
        op.readinto(obuf, 0)
    assert sbuf == original
    for c in range(chunks):
        chunk = obuf[c * CHUNK:(c + 1) * CHUNK]
        expect = bytearray(original[c * CHUNK:(c + 1) * CHUNK])
        if c < written[0]:
            expect[512:1024] = bytes([0xEE]) * 512
        assert chunk == expect, f"origin chunk {c}"
    # and the on-disk metadata reloads to the same mapping: re-create the snapshot from the COW
    before = dict(snap.table.items())
    eng.suspend("o")
    eng.remove("s")
    eng.create("s", f"0 {len(original) // 512} snapshot {eng.device_ref('o-real')} "
                    f"{eng.device_ref('s-cow')} P 8")
    eng.resume("o")
    assert dict(_snapshot_obj(eng, "s").table.items()) == before
    with eng.open_endpoint("s", writable=False) as sp:
        sp.readinto(sbuf, 0)
    assert sbuf == original


def test_failure_while_completing_invalidates_instead_of_hanging(engine: Any, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    eng = engine
    original = _pattern(64)
    cow_file = _stack(eng, tmp_path, original, 32 * CHUNK)

    def broken(self: ExceptionTable, *pairs: Any) -> None:
        raise ValueError("COW chunk does not fit")  # what the fixed-width table used to raise

    monkeypatch.setattr(ExceptionTable, "insert_new", broken)
    monkeypatch.setattr(ExceptionTable, "insert_one", broken)  # (one chunk's exception)
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with eng.open_endpoint("o") as ep:
                ep.write(b"\xaa" * 512, 3 * CHUNK + 512)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
        done.set()

    threading.Thread(target=write, daemon=True).start()
    assert done.wait(WAIT), "origin write hung after a failed exception completion"
    assert not errors, errors  # the origin keeps working: the snapshot is dropped, not the write
    assert eng.status("s")[0].params == "Invalid"
    with open(cow_file, "rb") as f:
        header = DiskHeader.unpack(f.read(512))
    assert header.valid == 0
    with eng.open_endpoint("s", writable=False) as sp, pytest.raises(DeviceIOError):
        sp.readinto(bytearray(CHUNK), 0)
    with eng.open_endpoint("o", writable=False) as op:
        buf = bytearray(CHUNK)
        op.readinto(buf, 3 * CHUNK)
    assert buf[512:1024] == b"\xaa" * 512
