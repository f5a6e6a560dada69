"""Mapped sources: a file source's pieces are written from its page cache (``kcopyd.mapped``).

Used when kcopyd opened the source file itself, nothing overlaps and every destination writes by
a system call (``Endpoint.writes_by_kernel``); the data, the exact error bits and drop-behind are
those of the buffered path. A source truncated between the fault-in and the writes is the
source's error, and the process gets no SIGBUS.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import kcopyd
import kcopyd.mapped as kmapped
from dmtools.blockdev import BlockDevice
from dmtools.endpoint import NullEndpoint
from dmtools.testing.faults import MemoryEndpoint
from kc_helpers import TIMEOUT, cached, evict_file, pattern

MiB = 1 << 20


@pytest.fixture
def populated(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every ``SourceMap.populate`` call's (start, length), the real call made."""
    calls: list[tuple[int, int]] = []
    real = kmapped.SourceMap.populate

    def spy(self: kmapped.SourceMap, start: int, length: int) -> None:
        calls.append((start, length))
        real(self, start, length)

    monkeypatch.setattr(kmapped.SourceMap, "populate", spy)
    return calls


def _copy(src: Path, dests: list[Any], size: int, flags: int = 0, **kw: Any) -> kcopyd.Job:
    with kcopyd.Client(num_pages=256, sub_job_size=MiB, **kw) as kc:
        job = kc.copy(kcopyd.Region(str(src), 0, size // 512),
                      [kcopyd.Region(d if not isinstance(d, Path) else str(d), 0, size // 512) for d in dests],
                      flags=flags)
        assert job.wait(TIMEOUT)
    return job


@pytest.mark.parametrize("evicted", [True, False], ids=["uncached", "cached"])
def test_file_to_files_and_null_from_the_mapping(tmp_path: Path, populated: list[tuple[int, int]],
                                                 evicted: bool) -> None:
    size = 8 * MiB + 4096  # a last piece shorter than the others
    src = tmp_path / "src.img"
    data = pattern(size, seed=5)
    src.write_bytes(data)
    if evicted:
        evict_file(src)
    dsts = [tmp_path / "a.img", tmp_path / "b.img"]
    for d in dsts:
        d.write_bytes(bytes(size))
    job = _copy(src, [*dsts, NullEndpoint(size)], size)
    assert job.ok and job.progress.done == size
    for d in dsts:
        assert d.read_bytes() == data
    assert sum(n for _, n in populated) == size  # every byte came through a mapping
    # drop-behind still applies to an uncached source (after the mapping is gone); a cached one stays
    assert (cached(src) < size // 2) if evicted else (cached(src) > size // 2)


def test_sparse_source_maps_only_its_data(tmp_path: Path, populated: list[tuple[int, int]]) -> None:
    size = 4 * MiB
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(size)
        f.seek(MiB + 8192)
        f.write(pattern(64 << 10, seed=2))
    dsts = [tmp_path / "a.img", tmp_path / "b.img"]
    for d in dsts:
        d.write_bytes(b"\xff" * size)  # holes must be written as zeros
    job = _copy(src, dsts, size)
    assert job.ok
    for d in dsts:
        assert d.read_bytes() == src.read_bytes()
    assert 0 < sum(n for _, n in populated) < size


def test_destination_reading_buffers_is_never_given_a_mapping(tmp_path: Path, populated: list[tuple[int, int]]) -> None:
    size = 2 * MiB
    src = tmp_path / "src.img"
    data = pattern(size, seed=3)
    src.write_bytes(data)
    mem = MemoryEndpoint(size)
    assert not mem.writes_by_kernel
    other = tmp_path / "b.img"
    other.write_bytes(bytes(size))
    job = _copy(src, [other, mem], size)
    assert job.ok and bytes(mem.data) == data and other.read_bytes() == data
    assert populated == []  # buffered: the memory endpoint reads what it is given in Python


def test_caller_endpoint_source_is_buffered(tmp_path: Path, populated: list[tuple[int, int]]) -> None:
    size = 2 * MiB
    src = tmp_path / "src.img"
    data = pattern(size, seed=4)
    src.write_bytes(data)
    dst = tmp_path / "d.img"
    dst.write_bytes(bytes(size))
    with BlockDevice(src) as ep:  # an endpoint the caller opened: its fd is not kcopyd's to map
        with kcopyd.Client(num_pages=256, sub_job_size=MiB) as kc:
            job = kc.copy(kcopyd.Region(ep, 0, size // 512),
                          [kcopyd.Region(str(dst), 0, size // 512), kcopyd.Region(NullEndpoint(size), 0, size // 512)])
            assert job.wait(TIMEOUT)
    assert job.ok and dst.read_bytes() == data
    assert populated == []


def test_unreadable_source_falls_back_to_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault-in that fails (what a disk error gives) reads the piece into buffers instead."""
    size = 4 * MiB
    src = tmp_path / "src.img"
    data = pattern(size, seed=6)
    src.write_bytes(data)
    failed: list[int] = []

    def fail(self: kmapped.SourceMap, start: int, length: int) -> None:
        failed.append(length)
        raise OSError(14, "Bad address")

    monkeypatch.setattr(kmapped.SourceMap, "populate", fail)
    dsts = [tmp_path / "a.img", tmp_path / "b.img"]
    for d in dsts:
        d.write_bytes(bytes(size))
    job = _copy(src, dsts, size)
    assert job.ok and failed
    for d in dsts:
        assert d.read_bytes() == data


@pytest.mark.parametrize("ndest", [1, 2])
def test_source_truncated_after_fault_in_is_a_read_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         ndest: int) -> None:
    """The kernel's copy from a mapping of a truncated file fails (EFAULT, no SIGBUS): the job
    reports the source's read error and no destination's write error."""
    size = 4 * MiB
    src = tmp_path / "src.img"
    src.write_bytes(pattern(size, seed=7))
    real = kmapped.SourceMap.populate
    state = {"n": 0}

    def populate_then_truncate(self: kmapped.SourceMap, start: int, length: int) -> None:
        real(self, start, length)
        state["n"] += 1
        if state["n"] == 2:  # the second piece: mapped and faulted in, then the file ends inside it
            os.truncate(src, self.offset + start + 64 * 1024)

    monkeypatch.setattr(kmapped.SourceMap, "populate", populate_then_truncate)
    dsts: list[Any] = [tmp_path / f"d{i}.img" for i in range(ndest)] + [NullEndpoint(size)]
    for d in dsts[:-1]:
        d.write_bytes(bytes(size))
    job = _copy(src, dsts, size, threads=1)
    assert state["n"] >= 2
    assert job.read_err and job.write_err == 0


def test_kernel_without_populate_read_uses_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kmapped, "_unsupported", True)
    size = 2 * MiB
    src = tmp_path / "src.img"
    src.write_bytes(pattern(size, seed=8))
    with BlockDevice(src) as ep:
        assert not kmapped.can_map(ep, [NullEndpoint(size)])


def test_loop_device_destination_written_directly_from_the_mapping(tmp_path: Path, make_dev: Any,
                                                                   populated: list[tuple[int, int]]) -> None:
    """O_DIRECT writes to a block device take the page-cache pages of the mapping as they are."""
    size = 4 * MiB
    src = tmp_path / "src.img"
    data = pattern(size, seed=9)
    src.write_bytes(data)
    evict_file(src)
    loop = make_dev("loop", size)
    other = tmp_path / "b.img"
    other.write_bytes(bytes(size))
    job = _copy(src, [loop.dev, other], size)
    assert job.ok
    assert loop.read() == data and other.read_bytes() == data
    assert sum(n for _, n in populated) == size
