"""Root tier: a snapshot origin in the exposure's C data path (``dmtools.engine.passthrough``).

Through real loop devices and FUSE: a rewrite of chunks every snapshot holds is moved in C (its
counters) without a Python callback and lands the bytes; a first write still copies on write (the
snapshot keeps the old bytes); reads are served in C; a snapshot taken while C writes run gets
the copies of every write begun after it (threads, no sleeps); suspending the origin's ``-real``
device holds C writes.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from dmtools._ffi import fastio
from dmtools.engine import Engine
from dmtools.testing.blockio import read_direct as _pread
from dmtools.testing.blockio import write_direct as _pwrite
from dmtools.testing.wait import wait_until
from snapshot import SnapshotManager

pytestmark = pytest.mark.root

MiB = 1 << 20
SIZE = 8 * MiB
CHUNK = 8  # sectors


@pytest.fixture(autouse=True)
def _built() -> None:
    if fastio.load() is None:
        pytest.skip(f"the C fast path cannot be built here: {fastio.unavailable()} "
                    "(scripts/setup-env installs gcc)")


@pytest.fixture
def xengine(exposed_engine: Engine) -> Engine:
    return exposed_engine


def _stats(eng: Engine, name: str) -> dict[str, int]:
    assert eng.exposure is not None
    return eng.exposure.fast_stats(name)


def _stack(eng: Engine, tmp_path: Path, tag: str, nsnaps: int = 1) -> tuple[SnapshotManager, bytes]:
    """``{tag}-dmtt`` over a file of random bytes, with ``nsnaps`` snapshots; its first bytes."""
    data = os.urandom(SIZE)
    img = tmp_path / f"{tag}.img"
    img.write_bytes(data)
    eng.create(f"{tag}-dmtt", f"0 {SIZE // 512} linear {img} 0")
    mgr = SnapshotManager(eng)
    for i in range(nsnaps):
        cow = tmp_path / f"{tag}{i}.cow"
        with open(cow, "wb") as f:
            f.truncate(2 * SIZE)
        mgr.create(f"{tag}-dmtt", str(cow), f"{tag}s{i}-dmtt", chunk_size=CHUNK)
    return mgr, data


def test_rewrite_is_served_in_c_and_a_first_write_still_copies(xengine, tmp_path, python_writes):
    _, data = _stack(xengine, tmp_path, "rw", nsnaps=2)
    node = xengine.device_path("rw-dmtt")
    first = os.urandom(MiB)
    _pwrite(node, first, MiB)  # first writes: Python copies on write
    assert python_writes, "a first write went around the copy-on-write"
    for i in range(2):
        assert _pread(xengine.device_path(f"rws{i}-dmtt"), MiB, MiB) == data[MiB : 2 * MiB]
    before, calls = _stats(xengine, "rw-dmtt"), len(python_writes)
    again = os.urandom(MiB)
    _pwrite(node, again, MiB)  # every snapshot holds these chunks now
    after = _stats(xengine, "rw-dmtt")
    assert len(python_writes) == calls, "a rewrite ran the Python callback"
    assert after["writes"] > before["writes"] and after["fallbacks"] == before["fallbacks"]
    assert _pread(node, MiB, MiB) == again
    assert _stats(xengine, "rw-dmtt")["reads"] > after["reads"]  # the origin read, in C too
    for i in range(2):
        assert _pread(xengine.device_path(f"rws{i}-dmtt"), MiB, MiB) == data[MiB : 2 * MiB]
    # a chunk next to them was never written: Python, and the snapshots keep the old bytes
    _pwrite(node, os.urandom(4096), 2 * MiB)
    assert python_writes[-1] == 2 * MiB
    assert _pread(xengine.device_path("rws0-dmtt"), 4096, 2 * MiB) == data[2 * MiB : 2 * MiB + 4096]


def test_a_write_partly_over_uncopied_chunks_goes_to_python(xengine, tmp_path, python_writes):
    _, data = _stack(xengine, tmp_path, "part")
    node = xengine.device_path("part-dmtt")
    _pwrite(node, os.urandom(64 << 10), 0)
    calls = len(python_writes)
    _pwrite(node, os.urandom(128 << 10), 0)  # the second half was never copied
    assert len(python_writes) == calls + 1
    assert _pread(xengine.device_path("parts0-dmtt"), 64 << 10, 64 << 10) == data[64 << 10 : 128 << 10]


@pytest.mark.parametrize("origin_suspended", [True, False], ids=["manager", "origin-live"])
def test_a_snapshot_taken_while_c_writes_run_gets_their_copies(xengine, tmp_path, origin_suspended):
    """Writers rewrite (in C) blocks stamped with a sequence number while a snapshot is taken:
    the new snapshot must show no write begun after its creation returned, and every write done
    before it began."""
    mgr, _ = _stack(xengine, tmp_path, "race")
    node = xengine.device_path("race-dmtt")
    blocks = 64
    for b in range(blocks):  # every block copied into the first snapshot: rewrites run in C
        _pwrite(node, b"%8d%8d" % (b, 0) * 256, b * 4096)
    base = _stats(xengine, "race-dmtt")["writes"]
    snapping, taken = threading.Event(), threading.Event()
    #: per writer: the last round done before the snapshot began, the first begun after it was taken
    done_before: dict[int, int] = {}
    first_after: dict[int, int] = {}

    def writer(w: int) -> None:
        seq = 0
        while w not in first_after or seq < first_after[w] + 3:
            seq += 1
            if taken.is_set() and w not in first_after:
                first_after[w] = seq
            for b in range(w, blocks, 4):
                _pwrite(node, b"%8d%8d" % (b, seq) * 256, b * 4096)
            if not snapping.is_set():
                done_before[w] = seq

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: _stats(xengine, "race-dmtt")["writes"] > base + 64, "C writes under way")
    snapping.set()
    cow = tmp_path / "race-new.cow"
    with open(cow, "wb") as f:
        f.truncate(2 * SIZE)
    if origin_suspended:
        mgr.create("race-dmtt", str(cow), "racenew-dmtt", chunk_size=CHUNK)
    else:  # the kernel allows it: a snapshot resumed while its origin takes writes
        real = xengine.device_path("race-dmtt-real")
        xengine.create("racenew-dmtt", f"0 {SIZE // 512} snapshot {real} {cow} P {CHUNK}")
    taken.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert _stats(xengine, "race-dmtt")["writes"] > base + 64
    snap = _pread(xengine.device_path("racenew-dmtt"), blocks * 4096, 0)
    for b in range(blocks):
        w = b % 4
        piece = snap[b * 4096 : b * 4096 + 16]
        assert int(piece[:8]) == b
        seq = int(piece[8:16])
        assert seq < first_after[w], f"block {b}: write {seq} begun after the snapshot is in it"
        assert seq >= done_before.get(w, 0), f"block {b}: write {done_before[w]} done before it is lost"


def test_suspending_the_real_device_holds_c_writes(xengine, tmp_path, python_writes):
    _stack(xengine, tmp_path, "sus")
    node = xengine.device_path("sus-dmtt")
    _pwrite(node, os.urandom(MiB), 0)
    _pwrite(node, os.urandom(MiB), 0)
    assert _stats(xengine, "sus-dmtt")["writes"] >= 1
    xengine.suspend("sus-dmtt-real")
    calls = len(python_writes)
    pattern = os.urandom(MiB)
    writer = threading.Thread(target=_pwrite, args=(node, pattern, 0))
    writer.start()
    # the request found the -real device's map withdrawn and went to Python, held at its gate
    wait_until(lambda: len(python_writes) > calls, "the held write")
    assert writer.is_alive()
    xengine.resume("sus-dmtt-real")
    writer.join(20)
    assert not writer.is_alive()
    assert _pread(node, MiB, 0) == pattern


def test_invalidation_and_resume_empty_the_c_set(xengine, tmp_path):
    mgr, _ = _stack(xengine, tmp_path, "inv")
    node = xengine.device_path("inv-dmtt")
    _pwrite(node, os.urandom(MiB), 0)
    origin: Any = xengine._devices["inv-dmtt"].live.targets[0]  # noqa: SLF001 - the live target
    assert origin._writes.count() == MiB // 4096  # noqa: SLF001
    xengine.suspend("invs0-dmtt")
    xengine.resume("invs0-dmtt")
    assert origin._writes.count() == 0  # noqa: SLF001
    _pwrite(node, os.urandom(MiB), 0)
    assert origin._writes.count() == MiB // 4096  # noqa: SLF001
    snap = xengine._devices["invs0-dmtt"].live.targets[0].snap  # noqa: SLF001
    snap.invalidate("test")
    assert origin._writes.count() == 0  # noqa: SLF001
    mgr.remove("invs0-dmtt")
