"""Root tier: a snapshot origin's first writes made whole by the FUSE worker in C (fastio.c
``first_write``: each snapshot's ``dms_snap_write`` in turn, then the origin write), through real
loop devices and FUSE.

What Python does for them is checked against: the kernel's order of system calls per write
(origin read, COW write, PREFLUSH, area, FUA, origin write), a failure at each step going on in
Python as the API's first writes do, the same COW, origin and status bytes as the Python path,
16 writers against snapshot reads and status, a suspended COW or origin holding them, a handover
and a removed snapshot withdrawing the C states, several snapshots copied in turn.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from snap_helpers import FAULTS, WAIT, until

from dmtools._ffi import fastio
from dmtools.engine import Engine
from dmtools.testing.blockio import read_direct, write_direct
from snapshot import SnapshotManager
from snapshot.route import c_library
from snapshot.store.persistent import PersistentStore
from snapshot.targets import core
from snapshot.targets.core import CopyOnWrite, origins_of

pytestmark = pytest.mark.root

CB = 4096  # chunk size 8 sectors
SIZE = 4 << 20
NCHUNKS = SIZE // CB


@pytest.fixture(autouse=True)
def _built(monkeypatch: pytest.MonkeyPatch) -> None:
    if fastio.load() is None or c_library() is None:
        pytest.skip(f"the C fast path cannot be built here: {fastio.unavailable()}")
    # several snapshots: each copied in turn on the writer's thread whatever the flushes take
    monkeypatch.setattr(core, "PARALLEL_FLUSH_SECONDS", float("inf"))


@pytest.fixture
def lib() -> Any:
    found = fastio.load()
    assert found is not None
    found.first_trace(True)
    yield found
    found.first_trace(False)
    found.first_fault(-1)


def _origin_bytes() -> bytes:
    return random.Random(5).randbytes(SIZE)


class _Stack:
    """``vol`` over a file of ``_origin_bytes``, with ``n`` persistent snapshots ``s0``... on the
    engine (exposed), each COW a file under an engine device ``sN-cow``."""

    def __init__(self, eng: Engine, tmp: Path, n: int = 1) -> None:
        self.eng, self.tmp = eng, tmp
        self.img = tmp / "vol.img"
        self.img.write_bytes(_origin_bytes())
        eng.create("vol", f"0 {SIZE // 512} linear {self.img} 0")
        self.mgr = SnapshotManager(eng)
        self.names = [f"s{i}" for i in range(n)]
        self.cows = [tmp / f"s{i}.cow" for i in range(n)]
        for name, cow in zip(self.names, self.cows):
            with open(cow, "wb") as f:
                f.truncate(2 * SIZE)
            self.mgr.create("vol", str(cow), name, chunk_size=CB // 512)
        self.node = eng.device_path("vol")

    def snap(self, name: str = "s0") -> CopyOnWrite:
        (found,) = [s for s in origins_of(self.eng).all_snapshots() if s.name.endswith(name) and s.active]
        return found

    def stats(self) -> dict[str, int]:
        assert self.eng.exposure is not None
        return self.eng.exposure.fast_stats("vol")

    def write(self, chunk: int, data: bytes, at: int = 0) -> None:
        write_direct(self.node, data, chunk * CB + at)

    def read(self, name: str, chunk: int = 0, n: int = NCHUNKS) -> bytes:
        return read_direct(self.eng.device_path(name), n * CB, chunk * CB)

    def records(self, i: int = 0) -> list[tuple[int, int]]:
        """The COW's exceptions as a store reading it (the kernel's reader) finds them."""
        with self.eng.open_endpoint(f"s{i}-cow", writable=False) as ep:
            store = PersistentStore(ep, CB // 512, readonly=True)
            store.read_metadata()
            return list(store.iter_records())


def _expected(written: dict[int, bytes]) -> bytes:
    """The origin's bytes after ``_warm`` and ``written`` (chunk -> its new bytes)."""
    origin = bytearray(_origin_bytes())
    origin[-2 * CB :] = b"w" * 2 * CB
    for c, data in written.items():
        origin[c * CB : (c + 1) * CB] = data
    return bytes(origin)


def _writers(st: _Stack, chunks: list[int], n: int, errors: list[BaseException]) -> list[threading.Thread]:
    """``n`` threads (not started) writing ``chunks`` in turn, each chunk once (its number's
    bytes); what they raise goes to ``errors``."""

    def writer(k: int) -> None:
        try:
            for c in chunks[k::n]:
                st.write(c, bytes([c % 250 + 1]) * CB)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    return [threading.Thread(target=writer, args=(k,)) for k in range(n)]


def _check_after(st: _Stack, chunks: list[int]) -> None:
    """After ``_warm`` and ``_writers`` over ``chunks``: the snapshot valid, holding each chunk's
    copy once, showing the origin as it was; the origin holding every write."""
    snap = st.snap()
    snap.sync()
    records = st.records()
    assert snap.valid and sorted(old for old, _ in records) == sorted([*chunks, NCHUNKS - 2, NCHUNKS - 1])
    assert len({new for _, new in records}) == len(records)
    assert st.read("s0") == _origin_bytes()
    assert st.read("vol") == _expected({c: bytes([c % 250 + 1]) * CB for c in chunks})


def _warm(st: _Stack) -> None:
    """A snapshot's first write zeroes ahead (I/O): C declines it, and Python makes it (its C
    state disarmed); the next one, in Python too, arms it again."""
    st.write(NCHUNKS - 1, b"w" * CB)
    st.write(NCHUNKS - 2, b"w" * CB)


def test_first_writes_are_made_by_the_worker_in_the_kernels_order(exposed_engine: Engine, tmp_path: Path,
                                                                  lib: Any, python_writes: list[int]) -> None:
    st = _Stack(exposed_engine, tmp_path)
    _warm(st)
    calls, before = len(python_writes), st.stats()
    lib.first_trace(True)
    chunks = random.Random(1).sample(range(NCHUNKS - 2), 40)
    for c in chunks:
        st.write(c, bytes([c % 250 + 1]) * CB)
    after = st.stats()
    assert len(python_writes) == calls, "a first write ran the Python callback"
    assert after["first_writes"] - before["first_writes"] == len(chunks)
    # each: origin chunk read, copy written, PREFLUSH, record, FUA, then the origin write
    assert lib.first_ops() == "rwfwfw." * len(chunks)
    snap = st.snap()
    snap.sync()
    assert snap.valid and snap.store.records == len(chunks) + 2
    assert {old for old, _ in st.records()} == {*chunks, NCHUNKS - 2, NCHUNKS - 1}
    assert st.read("s0") == _origin_bytes()
    assert st.read("vol") == _expected({c: bytes([c % 250 + 1]) * CB for c in chunks})
    # a rewrite of those chunks: marked in the chunk set, moved in C without any copy
    lib.first_trace(True)
    st.write(chunks[0], b"r" * CB)
    assert lib.first_ops() == "" and len(python_writes) == calls
    assert st.stats()["first_writes"] == after["first_writes"]


@pytest.mark.parametrize("chunks", [1, 2], ids=["one-chunk", "two-chunks"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_failure_at_each_step_goes_on_in_python(exposed_engine: Engine, tmp_path: Path, lib: Any,
                                                  python_writes: list[int], fault: str, chunks: int) -> None:
    """C stops at the failed step (the origin not written after a failed copy or commit), the
    request goes to Python, which goes on from there: the write lands, and the snapshot either
    holds the chunks' copies and records or is invalid without their commit."""
    step, short, calls, valid = FAULTS[fault]  # (as the API's first writes: test_snap_copy_commit_c)
    st = _Stack(exposed_engine, tmp_path)
    _warm(st)
    st.write(3, b"a" * CB)  # (in C)
    snap = st.snap()
    lib.first_trace(True)
    lib.first_fault(step, short)
    n = len(python_writes)
    st.write(7, b"b" * chunks * CB)  # the origin write lands, whatever the snapshot's fate
    assert lib.first_ops() == calls + "."
    assert python_writes[n:] == [7 * CB]
    snap.sync()
    assert snap.valid is valid
    assert st.read("vol") == _expected({3: b"a" * CB, **{c: b"b" * CB for c in range(7, 7 + chunks)}})
    records = dict(st.records())
    copied = range(7, 7 + chunks)
    if valid:
        assert st.read("s0") == _origin_bytes()
        assert all(c in records and snap.table.lookup(c) == records[c] for c in copied)
        assert snap.store.records == 3 + chunks
    else:
        assert "Invalid" in exposed_engine.status("s0")[0].params
        # after a failed PREFLUSH the records are never written
        assert step == 4 or not any(c in records for c in copied)


def _run(eng: Engine, tmp: Path, writes: list[tuple[int, bytes]], nsnaps: int) -> list[Any]:
    st = _Stack(eng, tmp, nsnaps)
    for off, data in writes:
        write_direct(st.node, data, off)
    out: list[Any] = [st.read("vol")]
    for i in range(nsnaps):
        out += [eng.status(f"s{i}")[0].params, st.read(f"s{i}"), st.cows[i].read_bytes()]
    out.append(st.stats()["first_writes"])
    return out


@pytest.mark.parametrize("nsnaps", [1, 3])
def test_the_worker_writes_the_same_bytes_as_the_python_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             nsnaps: int) -> None:
    rng = random.Random(nsnaps)
    writes = [(c * CB + 512 * rng.randrange(8), rng.randbytes(512)) for c in rng.sample(range(NCHUNKS), 300)]
    writes += [(off, b"r" * 512) for off, _ in writes[:20]]  # rewrites
    writes += [(c * CB + CB - 512, b"x" * 1024) for c in rng.sample(range(NCHUNKS - 1), 10)]  # over two chunks
    (tmp_path / "c").mkdir()
    with Engine(expose=True, run_dir=str(tmp_path / "c" / "run")) as eng:
        in_c = _run(eng, tmp_path / "c", writes, nsnaps)
    monkeypatch.setattr(CopyOnWrite, "c_first_write", lambda self: False)  # no first writes in C
    (tmp_path / "py").mkdir()
    with Engine(expose=True, run_dir=str(tmp_path / "py" / "run")) as eng:
        in_python = _run(eng, tmp_path / "py", writes, nsnaps)
    assert in_c[-1] >= 250 and in_python[-1] == 0
    assert in_c[:-1] == in_python[:-1]
    for i in range(nsnaps):
        assert in_c[2 + 3 * i] == _origin_bytes()


def test_several_snapshots_are_copied_in_turn_then_the_origin_written(exposed_engine: Engine, tmp_path: Path,
                                                                      lib: Any, python_writes: list[int]) -> None:
    st = _Stack(exposed_engine, tmp_path, 3)
    _warm(st)
    calls = len(python_writes)
    lib.first_trace(True)
    for c in (4, 9, 30):
        st.write(c, b"n" * CB)
    assert len(python_writes) == calls
    # each snapshot's copy and commit in turn, the origin written once, after the last commit
    assert lib.first_ops() == "rwfwf.rwfwf.rwfwfw." * 3
    for i in range(3):
        assert st.read(f"s{i}") == _origin_bytes()
        assert {4, 9, 30} <= {old for old, _ in st.records(i)}
    assert st.read("vol", 9, 1) == b"n" * CB


def test_sixteen_writers_against_snapshot_reads_and_status(exposed_engine: Engine, tmp_path: Path,
                                                           lib: Any) -> None:
    st = _Stack(exposed_engine, tmp_path)
    _warm(st)
    chunks = random.Random(2).sample(range(NCHUNKS - 2), 480)
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[bytes] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.append(st.read("s0", 0, NCHUNKS - 2))
                exposed_engine.status("s0")
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    before = st.stats()["first_writes"]
    threads = _writers(st, chunks, 16, errors)
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    # C armed: the writers' first writes go in C until a reader's fence (then Python arms it again)
    until(lambda: st.stats()["first_writes"] > before, "first writes in C")
    for t in readers:
        t.start()
    for t in threads:
        t.join(WAIT * 4)
    stop.set()
    for t in readers:
        t.join(WAIT)
    assert not errors and not any(t.is_alive() for t in threads + readers)
    assert seen and all(view == _origin_bytes()[: (NCHUNKS - 2) * CB] for view in seen)
    _check_after(st, chunks)


@pytest.mark.parametrize("device", ["s0-cow", "vol-real"])
def test_a_suspended_cow_or_origin_holds_them(exposed_engine: Engine, tmp_path: Path, lib: Any, device: str) -> None:
    st = _Stack(exposed_engine, tmp_path)
    _warm(st)
    st.write(2, b"a" * CB)
    cow_before = st.cows[0].read_bytes()
    first = st.stats()["first_writes"]
    lib.first_trace(True)
    exposed_engine.suspend(device)
    writer = threading.Thread(target=st.write, args=(11, b"b" * CB), daemon=True)
    writer.start()
    writer.join(0.5)
    held = writer.is_alive()
    unchanged = st.cows[0].read_bytes() == cow_before and st.img.read_bytes()[11 * CB : 12 * CB] == \
        _origin_bytes()[11 * CB : 12 * CB]
    traced = lib.first_ops()
    exposed_engine.resume(device)
    writer.join(WAIT)
    assert held and unchanged and traced == "", f"a first write was served while {device} was suspended"
    assert not writer.is_alive() and st.stats()["first_writes"] == first  # (it went to Python)
    st.write(12, b"c" * CB)  # (Python: the held write's Python path fenced C; armed again here)
    st.write(13, b"d" * CB)
    assert st.stats()["first_writes"] == first + 1  # in C again
    assert st.read("s0") == _origin_bytes()
    assert st.read("vol", 11, 3) == b"b" * CB + b"c" * CB + b"d" * CB


def test_a_handover_and_a_removed_snapshot_withdraw_the_c_states(exposed_engine: Engine, tmp_path: Path,
                                                                 lib: Any) -> None:
    st = _Stack(exposed_engine, tmp_path, 2)
    _warm(st)
    st.write(2, b"a" * CB)
    first = st.stats()["first_writes"]
    table = exposed_engine.table("s1")
    exposed_engine.suspend("s1")
    exposed_engine.load("s1", table)
    exposed_engine.resume("s1")  # handover: the new table's snapshot, with a new C state
    # the old table's snapshot destroyed: the C states withdrawn with it; the next write, in
    # Python, hands C the new ones
    lib.first_trace(True)
    st.write(3, b"b" * CB)
    st.write(4, b"c" * CB)
    assert st.stats()["first_writes"] == first + 1 and lib.first_ops() == "rwfwf.rwfwfw."
    for i in range(2):
        assert st.read(f"s{i}") == _origin_bytes()
    # its C state withdrawn (its memory kept until then by the descriptor's reference); the
    # origin's table reloaded without it: the new map's first writes installed with it
    st.mgr.remove("s0")
    lib.first_trace(True)
    st.write(5, b"d" * CB)
    st.write(6, b"e" * CB)
    assert st.stats()["first_writes"] == first + 3 and lib.first_ops() == "rwfwfw." * 2
    assert st.read("s1") == _origin_bytes()
    assert {2, 3, 4, 5, 6} <= {old for old, _ in st.records(1)}
    assert st.read("vol", 2, 5) == b"a" * CB + b"b" * CB + b"c" * CB + b"d" * CB + b"e" * CB


@pytest.mark.parametrize("nsnaps", [1, 3])
def test_a_write_over_several_chunks_commits_them_together(exposed_engine: Engine, tmp_path: Path, lib: Any,
                                                           python_writes: list[int], nsnaps: int) -> None:
    """A writer's neighbouring pages merged into one request: each snapshot's chunks under it
    allocated together, copied with one read and one write, their records committed with one
    PREFLUSH, one area write and one FUA, then the origin written once; a request over a chunk
    with its exception and one without, or over more than 16 chunks, goes to Python."""
    st = _Stack(exposed_engine, tmp_path, nsnaps)
    _warm(st)
    calls = len(python_writes)
    lib.first_trace(True)
    st.write(20, b"p" * 2 * CB)
    st.write(100, b"s" * 16 * CB)
    assert lib.first_ops() == ("rwfwf." * (nsnaps - 1) + "rwfwfw.") * 2 and len(python_writes) == calls
    snap = st.snap()
    snap.sync()
    new = snap.table.lookup(100)
    assert new is not None and all(snap.table.lookup(100 + i) == new + i for i in range(16))
    lib.first_fault(5)  # the origin write fails once both are committed: Python writes it
    st.write(40, b"q" * 2 * CB)
    assert python_writes[calls:] == [40 * CB]
    st.write(41, b"m" * 2 * CB)  # chunk 41 copied, 42 not: Python
    st.write(60, b"t" * 17 * CB)  # 17 chunks: Python
    assert python_writes[calls:] == [40 * CB, 41 * CB, 60 * CB]
    for i in range(nsnaps):
        assert st.read(f"s{i}") == _origin_bytes()
        assert {20, 21, 40, 41, 42, *range(60, 77), *range(100, 116)} <= {old for old, _ in st.records(i)}
    written = {20: b"p", 21: b"p", 40: b"q", 41: b"m", 42: b"m", **{c: b"t" for c in range(60, 77)},
               **{c: b"s" for c in range(100, 116)}}
    assert st.read("vol") == _expected({c: v * CB for c, v in written.items()})


def test_writers_through_suspends_and_a_handover(exposed_engine: Engine, tmp_path: Path, lib: Any) -> None:
    """Eight writers' first writes while the COW, the origin's ``-real`` and the origin are
    suspended and resumed in turn, and the snapshot is reloaded (a handover): while each is
    suspended its file does not change (nor either file for the origin) and C makes no first
    write; at the end every write landed, the snapshot holds each copy once and shows the
    origin as it was."""
    st = _Stack(exposed_engine, tmp_path)
    _warm(st)
    chunks = random.Random(3).sample(range(NCHUNKS - 2), 400)
    errors: list[BaseException] = []

    threads = _writers(st, chunks, 8, errors)
    for t in threads:
        t.start()
    still: list[str] = []
    # what a suspended device holds: its own file's I/O, and the C first writes (which need it)
    held = {"s0-cow": ("COW", "C"), "vol-real": ("origin", "C"), "vol": ("COW", "origin", "C")}
    for device in ("s0-cow", "vol-real", "vol", "s0-cow", "vol-real"):
        until(lambda: st.stats()["writes"] > 0, "writes under way")
        exposed_engine.suspend(device)
        files = st.cows[0].read_bytes(), st.img.read_bytes(), st.stats()["first_writes"]
        for t in threads:
            t.join(0.05)
        now = st.cows[0].read_bytes(), st.img.read_bytes(), st.stats()["first_writes"]
        changed = [what for what, a, b in zip(("COW", "origin", "C"), files, now) if a != b and what in held[device]]
        if changed:
            still.append(f"{device}: {changed}")
        exposed_engine.resume(device)
    table = exposed_engine.table("s0")
    exposed_engine.suspend("s0")
    exposed_engine.load("s0", table)
    exposed_engine.resume("s0")
    for t in threads:
        t.join(WAIT * 4)
    assert not errors and not any(t.is_alive() for t in threads)
    assert not still, f"written while suspended: {still}"
    _check_after(st, chunks)
