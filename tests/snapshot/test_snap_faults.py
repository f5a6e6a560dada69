"""I/O errors on a COW invalidate only that snapshot; the origin and the other snapshots go on."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from snap_stack import Stack

from dmtools.errors import DeviceIOError
from snapshot.offline import inspect

CB = 4096
SIZE = 128 * 1024


@pytest.fixture
def data() -> bytes:
    return random.Random(11).randbytes(SIZE)


def faulty_cow(eng: Any, st: Stack, name: str, good_chunks: int, total_chunks: int) -> Path:
    """An engine device ``NAME-cow``: ``good_chunks`` chunks of a file, then the ``error`` target."""
    path = st.cow_file(name, total_chunks * CB)
    good = good_chunks * CB // 512
    rest = (total_chunks - good_chunks) * CB // 512
    eng.create(f"{name}-cow", f"0 {good} linear {path} 0\n{good} {rest} error")
    return path


def test_copy_error_invalidates_only_that_snapshot(engine: Any, tmp_path: Path, data: bytes) -> None:
    eng = engine
    st = Stack(eng, tmp_path, data)
    path = faulty_cow(eng, st, "bad", 2, 64)  # header and area 0 work, every data chunk fails
    st.add_snapshot("bad", 0, cow=eng.device_ref("bad-cow"))
    st.add_snapshot("good", 256 * 1024)
    ev = eng.info("bad").event_nr
    st.write(st.base, b"W" * 2 * CB, 4 * CB)
    assert st.status("bad") == "Invalid"
    assert eng.info("bad").event_nr > ev  # a dm event announces the invalidation
    with pytest.raises(DeviceIOError):
        st.read("bad", 0, 512)
    assert st.status("good").startswith("32/")
    assert st.read("good") == data
    assert st.read(st.base)[4 * CB : 6 * CB] == b"W" * 2 * CB
    st.write(st.base, b"V" * CB, 20 * CB)  # the origin keeps working, still COW into "good"
    assert st.read("good") == data
    assert not inspect(path).valid  # header rewritten with valid=0


def test_metadata_error_invalidates(engine: Any, tmp_path: Path, data: bytes) -> None:
    eng = engine
    st = Stack(eng, tmp_path, data)
    path = st.cow_file("m", 64 * CB)
    eng.create("m-cow", f"0 {64 * 8} linear {path} 0")
    st.add_snapshot("m", 0, cow=eng.device_ref("m-cow"))
    st.add_snapshot("good", 256 * 1024)
    # the COW dies after activation: copy and commit both fail
    eng.suspend("m-cow")
    eng.load("m-cow", f"0 {64 * 8} error")
    eng.resume("m-cow")
    st.write(st.base, b"E" * CB, 0)
    assert st.status("m") == "Invalid"
    assert st.read("good") == data and st.read(st.base)[:CB] == b"E" * CB


def test_origin_read_error_during_copy(engine: Any, tmp_path: Path, data: bytes) -> None:
    """A snapshot write whose origin read fails invalidates the snapshot and fails the write."""
    eng = engine
    st = Stack(eng, tmp_path, data)
    st.add_snapshot("s", 256 * 1024)
    eng.suspend(st.real)
    eng.load(st.real, f"0 {st.sectors} error")
    eng.resume(st.real)
    with pytest.raises(DeviceIOError):
        st.write("s", b"x" * 100, 0)
    assert st.status("s") == "Invalid"


def test_whole_chunk_snapshot_write_skips_the_origin_read(engine: Any, tmp_path: Path, data: bytes) -> None:
    eng = engine
    st = Stack(eng, tmp_path, data)
    st.add_snapshot("s", 256 * 1024)
    eng.suspend(st.real)
    eng.load(st.real, f"0 {st.sectors} error")  # any origin read now fails
    eng.resume(st.real)
    st.write("s", b"w" * CB, 5 * CB)  # a whole chunk: no origin read, so it succeeds
    assert st.read("s", 5 * CB, CB) == b"w" * CB
    assert st.status("s").startswith("24/")
