"""Offline ``inspect`` and ``export`` on COW files written in the kernel's format."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from dmtools.blockdev import BlockDevice
from dmtools.errors import CorruptMetadata, DeviceIOError, InvalidArgument, SnapshotInvalid
from dmtools.testing.faults import FaultyEndpoint
from snapshot.offline import chunk_runs, export, inspect
from snapshot.store import PersistentStore

C = 8
CB = C * 512


def snapshot_by_hand(tmp_path: Path, chunks: list[int], origin_chunks: int = 64, tail: int = 0) -> tuple[Path, Path, bytes]:
    """Origin + COW where ``chunks`` were copied on write, then the origin overwritten there.

    Returns (origin, cow, the origin's content at snapshot time).
    """
    rng = random.Random(7)
    before = rng.randbytes(origin_chunks * CB + tail)
    origin = tmp_path / "origin.img"
    origin.write_bytes(before)
    cow = tmp_path / "cow.img"
    with open(cow, "wb") as f:
        f.truncate((len(chunks) + 4) * CB)
    with BlockDevice(cow, writable=True) as cdev:
        store = PersistentStore(cdev, C)
        store.read_metadata()
        news = [store.prepare_exception() for _ in chunks]
        for old, new in zip(chunks, news):
            cdev.write(before[old * CB : (old + 1) * CB], new * CB)
        for old, new in zip(chunks, news):
            store.commit_exception(old, new, True, lambda ok: None)
    after = bytearray(before)
    for old in chunks:
        after[old * CB : (old + 1) * CB] = b"\xee" * len(after[old * CB : (old + 1) * CB])
    origin.write_bytes(bytes(after))
    return origin, cow, before


def test_export_rebuilds_the_snapshot_view(tmp_path: Path) -> None:
    chunks = [3, 4, 5, 10, 40, 41, 63]
    origin, cow, before = snapshot_by_hand(tmp_path, chunks)
    seen: list[tuple[int, int]] = []
    result = export(origin, cow, tmp_path / "out.img", progress=lambda d, t: seen.append((d, t)))
    assert (tmp_path / "out.img").read_bytes() == before
    assert result.exceptions == 7 and result.runs == 4
    assert seen and seen[-1][0] == seen[-1][1]


def test_export_partial_last_chunk(tmp_path: Path) -> None:
    origin, cow, before = snapshot_by_hand(tmp_path, [0, 64], origin_chunks=64, tail=1024)
    export(origin, cow, tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == before


def test_inspect_reports_header_and_usage(tmp_path: Path) -> None:
    origin, cow, _ = snapshot_by_hand(tmp_path, [1, 2, 9])
    info = inspect(cow)
    assert info.initialised and info.valid and info.chunk_size == C and info.exceptions == 3
    assert info.status == f"{5 * C}/{7 * C} {2 * C}"
    assert info.to_dict()["status"] == info.status
    assert "exceptions:     3" in info.format()


def test_inspect_new_cow_writes_nothing(tmp_path: Path) -> None:
    cow = tmp_path / "cow.img"
    cow.write_bytes(bytes(8 * CB))
    info = inspect(cow)
    assert not info.initialised and info.exceptions == 0
    assert cow.read_bytes() == bytes(8 * CB)


def test_export_refuses_invalid_snapshot(tmp_path: Path) -> None:
    origin, cow, _ = snapshot_by_hand(tmp_path, [1])
    with open(cow, "r+b") as f:
        f.seek(4)
        f.write(struct.pack("<I", 0))
    assert inspect(cow).status == "Invalid"
    with pytest.raises(SnapshotInvalid):
        export(origin, cow, tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()


@pytest.mark.parametrize(
    "offset, raw, message",
    [(0, b"XXXX", "Invalid or corrupt snapshot"), (CB, struct.pack("<QQ", 1, 99999), "past the end")],
)
def test_corrupt_cow_is_refused_and_nothing_written(tmp_path: Path, offset: int, raw: bytes, message: str) -> None:
    origin, cow, _ = snapshot_by_hand(tmp_path, [1, 2])
    with open(cow, "r+b") as f:
        f.seek(offset)
        f.write(raw)
    before = cow.read_bytes()
    with pytest.raises(CorruptMetadata, match=message):
        inspect(cow)
    with pytest.raises(CorruptMetadata, match=message):
        export(origin, cow, tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists() and cow.read_bytes() == before


def test_wrong_origin_is_detected(tmp_path: Path) -> None:
    origin, cow, _ = snapshot_by_hand(tmp_path, [60])
    small = tmp_path / "small.img"
    small.write_bytes(bytes(10 * CB))
    with pytest.raises(CorruptMetadata, match="wrong origin"):
        export(small, cow, tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()


def test_output_must_differ(tmp_path: Path) -> None:
    origin, cow, _ = snapshot_by_hand(tmp_path, [1])
    before = origin.read_bytes()
    with pytest.raises(InvalidArgument):
        export(origin, cow, origin)
    assert origin.read_bytes() == before
    os.link(cow, tmp_path / "cowlink.img")
    cow_before = cow.read_bytes()
    with pytest.raises(InvalidArgument):
        export(origin, tmp_path / "cowlink.img", cow)
    assert cow.read_bytes() == cow_before


@pytest.mark.parametrize("failing", ["origin", "cow"])
def test_a_failed_copy_is_raised_with_what_it_copied(tmp_path: Path, failing: str) -> None:
    """A read error on the origin stops the export before the exceptions are copied; one on the
    COW's data chunks is raised after them, naming the chunks (kcopyd.progress.CopyTally). The
    output file the export created is removed: no partial image is left to pass for a whole one."""
    origin, cow, _ = snapshot_by_hand(tmp_path, [10, 11, 40])
    with BlockDevice(origin) as odev, BlockDevice(cow) as cdev:
        if failing == "origin":
            odev = FaultyEndpoint(odev, read_errors=[(0, 64 * C)])
        else:  # the data chunks follow the header (chunk 0) and the first metadata area (chunk 1)
            cdev = FaultyEndpoint(cdev, read_errors=[(2 * C, 3 * C)])
        with pytest.raises(DeviceIOError) as info:
            export(odev, cdev, tmp_path / "out.img")
    want = "copying the origin failed" if failing == "origin" else "copying exception chunks 10..11 failed"
    assert want in str(info.value) and info.value.operation == "export"
    if failing == "origin":
        assert "exception" not in str(info.value)
    assert not (tmp_path / "out.img").exists()


def test_open_endpoints_are_compared_by_what_they_are_open_on(tmp_path: Path) -> None:
    """Endpoints given as objects skip the path checks: they are compared once open, by the device
    or file under them (``kcopyd.overlap.device_key``), whatever object or spelling."""
    origin, cow, _ = snapshot_by_hand(tmp_path, [1])
    before = origin.read_bytes(), cow.read_bytes()
    with BlockDevice(origin) as odev, BlockDevice(cow) as cdev, BlockDevice(tmp_path / "cow.img") as again:
        with pytest.raises(InvalidArgument, match="origin and COW are the same device"):
            export(cdev, again, tmp_path / "out.img")  # two descriptors of the COW file
        with BlockDevice(cow, writable=True) as wcow, pytest.raises(InvalidArgument, match="must differ"):
            export(odev, cdev, wcow)
        with pytest.raises(InvalidArgument, match="must differ"):
            export(odev, cdev, tmp_path / "cow.img", force=True)
    assert (origin.read_bytes(), cow.read_bytes()) == before and not (tmp_path / "out.img").exists()


def test_chunk_runs() -> None:
    assert list(chunk_runs([(1, 5), (2, 6), (3, 8), (7, 9)])) == [(1, 5, 2), (3, 8, 1), (7, 9, 1)]
