"""Write lanes: a buffered regular-file destination takes one write at a time, in read order.

Buffered writers of one file serialise on its inode lock, so kcopyd hands a page-cache file
destination one write at a time (the others wait in its lane); direct and block-device
destinations keep several writes in flight. Errors keep the kernel's exact bits either way.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import kcopyd
from dmtools.blockdev import BlockDevice
from dmtools.testing.faults import FaultyEndpoint, MemoryEndpoint, SlowEndpoint, WrappedEndpoint
from kc_helpers import TIMEOUT, Recorder, pattern

KiB = 1024
MiB = 1024 * KiB
SUB = 64 * KiB


class FileLike(FaultyEndpoint):
    """A fault-injecting wrapper that says it is a buffered regular file (so it gets a lane) and
    records how many writes overlap and in which order they arrive."""

    def __init__(self, inner: Any, **kw: Any) -> None:
        super().__init__(inner, **kw)
        self.active = 0
        self.max_active = 0
        self.order: list[int] = []
        self._count_lock = threading.Lock()

    @property
    def is_regular_file(self) -> bool:
        return True

    def write(self, buf: Any, offset: int) -> int:
        with self._count_lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.order.append(offset)
        try:
            time.sleep(0.002)  # long enough for other pieces' reads to finish meanwhile
            return super().write(buf, offset)
        finally:
            with self._count_lock:
                self.active -= 1


def _client() -> kcopyd.Client:
    return kcopyd.Client(num_pages=64, sub_job_size=SUB, threads=8)


def _copy_ok(src: Any, dests: list[FileLike], size: int, flags: int = 0) -> None:
    """Copy ``size`` bytes of ``src`` to every destination; the job must succeed."""
    with _client() as kc:
        job = kc.copy(kcopyd.Region(src, 0, size // 512), [kcopyd.Region(d, 0, size // 512) for d in dests],
                      flags=flags)
        assert job.wait(TIMEOUT) and job.ok


class HeldRead(WrappedEndpoint):
    """A source whose read at ``held`` waits until a destination has started writing a piece
    after it (``later``): that piece's read then finishes after later ones, whatever the
    machine's load."""

    def __init__(self, inner: Any, held: int) -> None:
        super().__init__(inner)
        self.held = held
        self.later = threading.Event()

    def readinto(self, buf: Any, offset: int) -> int:
        if offset == self.held:
            assert self.later.wait(TIMEOUT), "no later piece was written"
        return self.inner.readinto(buf, offset)


class LaterSeen(FileLike):
    """A :class:`FileLike` that tells ``source`` when a piece after its held one is written."""

    def __init__(self, inner: Any, source: HeldRead) -> None:
        super().__init__(inner)
        self.source = source

    def write(self, buf: Any, offset: int) -> int:
        if offset > self.source.held:
            self.source.later.set()
        return super().write(buf, offset)


def _one_at_a_time_in_one_order(dests: list[FileLike], data: bytes) -> list[int]:
    """Every destination holds ``data``, took one write at a time and every piece once, and all
    took them in the same order (the order their reads finished: a piece is queued in every lane
    at once); returns that order."""
    for d in dests:
        assert bytes(d.inner.data) == data
        assert d.max_active == 1
        assert sorted(d.order) == list(range(0, len(data), SUB))
    assert all(d.order == dests[0].order for d in dests)
    return dests[0].order


def test_file_destinations_take_one_write_at_a_time_in_read_order():
    size = 2 * MiB
    data = pattern(size, seed=3)
    dests = [FileLike(MemoryEndpoint(size)) for _ in range(3)]
    _copy_ok(MemoryEndpoint(data), dests, size)
    _one_at_a_time_in_one_order(dests, data)


def test_a_piece_read_late_is_written_late_not_waited_for():
    """Without WRITE_SEQ a lane writes pieces as their reads finish, not in offset order (it does
    not stall on a slow read): the second piece, read last, is written after later ones."""
    size = 2 * MiB
    data = pattern(size, seed=3)
    src = HeldRead(MemoryEndpoint(data), held=SUB)
    dests: list[FileLike] = [LaterSeen(MemoryEndpoint(size), src) for _ in range(3)]
    _copy_ok(src, dests, size)
    order = _one_at_a_time_in_one_order(dests, data)
    assert order.index(SUB) > min(order.index(o) for o in order if o > SUB)


def test_other_destinations_keep_several_writes_in_flight():
    size = 1 * MiB
    src = MemoryEndpoint(pattern(size))
    gate = threading.Event()
    dest = SlowEndpoint(MemoryEndpoint(size), gate=gate)
    with _client() as kc:
        job = kc.copy(kcopyd.Region(src, 0, size // 512), kcopyd.Region(dest, 0, size // 512))
        deadline = time.monotonic() + TIMEOUT
        while dest.in_flight < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert dest.in_flight >= 2
        gate.set()
        assert job.wait(TIMEOUT) and job.ok


def test_real_files_several_destinations(tmp_path):
    size = 3 * MiB + 4 * KiB
    data = pattern(size, seed=5)
    src = tmp_path / "src.img"
    src.write_bytes(data)
    paths = [tmp_path / f"d{i}.img" for i in range(3)]
    for i, p in enumerate(paths):
        p.write_bytes(b"\xff" * (size + i * 512))
    regions = [kcopyd.Region(str(p), i, size // 512) for i, p in enumerate(paths)]
    with _client() as kc:
        job = kc.copy(kcopyd.Region(str(src), 0, size // 512), regions)
        assert job.wait(TIMEOUT) and job.ok
        assert job._lanes.count(None) == 0, "buffered file destinations get lanes"
    for i, p in enumerate(paths):
        assert p.read_bytes()[i * 512 : i * 512 + size] == data


@pytest.mark.parametrize("flags", [0, kcopyd.IGNORE_ERROR])
def test_lane_write_errors_set_exact_bits(flags):
    size = 2 * MiB
    data = pattern(size, seed=9)
    src = MemoryEndpoint(data)
    bad = 700  # sector inside the 6th piece
    dests = [FileLike(MemoryEndpoint(size)), FileLike(MemoryEndpoint(size), write_errors=[bad]),
             FileLike(MemoryEndpoint(size), write_errors=[bad, 3000])]
    rec = Recorder()
    with _client() as kc:
        job = kc.copy(kcopyd.Region(src, 0, size // 512), [kcopyd.Region(d, 0, size // 512) for d in dests],
                      flags=flags, notify=rec, context="ctx")
        assert job.wait(TIMEOUT)
    assert rec.calls == [(False, 0b110, "ctx")]
    assert all(d.max_active == 1 for d in dests)
    if flags & kcopyd.IGNORE_ERROR:
        # the copy went on: everything but the failed pieces reached every destination
        assert bytes(dests[0].inner.data) == data
        failed = {(o, n) for op, o, n, ok in dests[2].ops if op == "write" and not ok}
        assert len(failed) == 2
        for o, n in dests[2].written():
            assert dests[2].inner.data[o : o + n] == data[o : o + n]
    else:
        # stopped handing out pieces: destination 0 did not get the whole source
        assert job.progress.done < size


def test_lane_read_error_reported_once():
    size = 1 * MiB
    src = FaultyEndpoint(MemoryEndpoint(pattern(size)), read_errors=[1000])
    dests = [FileLike(MemoryEndpoint(size)) for _ in range(2)]
    rec = Recorder()
    with _client() as kc:
        kc.copy(kcopyd.Region(src, 0, size // 512), [kcopyd.Region(d, 0, size // 512) for d in dests],
                notify=rec, context=1)
        rec.wait()
    assert rec.calls == [(True, 0, 1)]


def test_write_seq_with_lanes_writes_in_offset_order():
    size = 2 * MiB
    data = pattern(size, seed=4)
    src = MemoryEndpoint(data)
    dests = [FileLike(MemoryEndpoint(size)) for _ in range(2)]
    _copy_ok(src, dests, size, kcopyd.WRITE_SEQ)
    for d in dests:
        assert d.order == sorted(d.order) and bytes(d.inner.data) == data


def test_real_file_destination_blockdev_endpoint_is_a_lane(tmp_path):
    p = tmp_path / "f.img"
    p.write_bytes(bytes(8192))
    with BlockDevice(p, writable=True) as ep:
        from kcopyd.lanes import one_writer

        assert one_writer(ep)
        assert not one_writer(MemoryEndpoint(512))


def _slow_pwritev(monkeypatch: pytest.MonkeyPatch, fail_batches: bool = False) -> list[int]:
    """Make every ``pwritev`` slow (so lanes queue pieces up) and record its iovec counts;
    ``fail_batches`` fails every call with more than one buffer."""
    import errno
    import os

    calls: list[int] = []
    real = os.pwritev

    def spy(fd: int, bufs: Any, offset: int, *a: Any) -> int:
        calls.append(len(bufs))
        time.sleep(0.003)
        if fail_batches and len(bufs) > 1:
            raise OSError(errno.EIO, "injected")
        return real(fd, bufs, offset, *a)

    monkeypatch.setattr(os, "pwritev", spy)
    return calls


@pytest.mark.parametrize("fail_batches", [False, True], ids=["batched", "batch-fails-then-per-piece"])
def test_waiting_pieces_are_written_together(tmp_path, monkeypatch, fail_batches):
    size = 4 * MiB
    data = pattern(size, seed=6)
    src = tmp_path / "src.img"
    src.write_bytes(data)
    paths = [tmp_path / f"d{i}.img" for i in range(2)]
    for p in paths:
        p.write_bytes(bytes(size))
    calls = _slow_pwritev(monkeypatch, fail_batches)
    rec = Recorder()
    with _client() as kc:
        kc.copy(kcopyd.Region(str(src), 0, size // 512), [kcopyd.Region(str(p), 0, size // 512) for p in paths],
                notify=rec, context=0)
        rec.wait()
    assert rec.calls == [(False, 0, 0)]
    assert max(calls) > 1, "pieces waiting in a lane went out in one vectored write"
    assert all(p.read_bytes() == data for p in paths)
