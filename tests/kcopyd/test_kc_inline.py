"""``Client.run``: small jobs on the caller's thread (kcopyd.inline), with copy()'s contract."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest

import kcopyd
from dmtools.blockdev import BlockDevice
from dmtools.errors import DeviceIOError, InvalidArgument
from dmtools.testing.faults import FaultyEndpoint, MemoryEndpoint
from kc_helpers import pattern
from kcopyd.inline import INLINE_MAX_BYTES

SIZE = 64 * 1024
SECTORS = SIZE // 512


class ThreadLog(FaultyEndpoint):
    """A faulty endpoint that also records the thread of every read, write and zero."""

    def __init__(self, inner: Any, **kw: Any) -> None:
        super().__init__(inner, **kw)
        self.threads: list[str] = []

    def readinto(self, buf: Any, offset: int) -> int:
        self.threads.append(threading.current_thread().name)
        return super().readinto(buf, offset)

    def write(self, buf: Any, offset: int) -> int:
        self.threads.append(threading.current_thread().name)
        return super().write(buf, offset)

    def zero(self, offset: int, length: int) -> None:
        self.threads.append(threading.current_thread().name)
        super().zero(offset, length)


@pytest.fixture
def kc():
    with kcopyd.Client(num_pages=64, threads=2) as client:
        yield client


def test_copy_runs_on_the_callers_thread_and_counts_in_progress(kc):
    data = pattern(SIZE)
    src, dst = ThreadLog(MemoryEndpoint(data)), ThreadLog(MemoryEndpoint(2 * SIZE))
    job = kc.run(kcopyd.Region(src, 0, SECTORS), [kcopyd.Region(dst, SECTORS, SECTORS)])
    assert job.done and job.ok and (job.read_err, job.write_err) == (False, 0)
    assert bytes(dst.inner.data) == bytes(SIZE) + data
    me = threading.current_thread().name
    assert src.threads and dst.threads and set(src.threads + dst.threads) == {me}
    assert kc.progress == kcopyd.Progress(SIZE, SIZE) and job.progress == kcopyd.Progress(SIZE, SIZE)
    assert kc.jobs_pending == 0


def test_zero_job_and_dest_zeroed(kc):
    dst = ThreadLog(MemoryEndpoint(pattern(SIZE)))
    job = kc.run(None, kcopyd.Region(dst, 8, 16))
    assert job.ok and dst.threads == [threading.current_thread().name]
    expected = bytearray(pattern(SIZE))
    expected[8 * 512:24 * 512] = bytes(16 * 512)
    assert bytes(dst.inner.data) == bytes(expected)
    # DEST_ZEROED: the destination reads as zeros already; nothing is written, as the workers do
    dst.ops.clear()
    job = kc.run(None, [kcopyd.Region(dst, 0, 8)], kcopyd.DEST_ZEROED)
    assert job.ok and dst.ops == []
    assert kc.progress == kcopyd.Progress(24 * 512, 24 * 512)


def test_read_error_writes_nothing_and_sets_read_err(kc):
    src = FaultyEndpoint(MemoryEndpoint(pattern(SIZE)), read_errors=[(10, 1)])
    old = pattern(SIZE, seed=5)
    dst = FaultyEndpoint(MemoryEndpoint(old))
    job = kc.run(kcopyd.Region(src, 0, SECTORS), [kcopyd.Region(dst, 0, SECTORS)])
    assert job.done and not job.ok and job.read_err and job.write_err == 0
    assert not any(op[0] == "write" for op in dst.ops) and bytes(dst.inner.data) == old
    with pytest.raises(DeviceIOError, match="read error"):
        job.raise_for_error()
    assert kc.progress == kcopyd.Progress(0, SIZE)  # submitted, not written


def test_read_error_with_ignore_error_zero_fills_the_bad_block(kc):
    data = pattern(SIZE)
    src = FaultyEndpoint(MemoryEndpoint(data), read_errors=[(10, 1)])
    dst = MemoryEndpoint(SIZE)
    job = kc.run(kcopyd.Region(src, 0, SECTORS), [kcopyd.Region(dst, 0, SECTORS)], kcopyd.IGNORE_ERROR)
    assert job.read_err and job.write_err == 0
    expected = bytearray(data)
    expected[4096:8192] = bytes(4096)  # sector 10 lies in the second 4 KiB block
    assert bytes(dst.data) == bytes(expected)
    # WRITE_SEQ clears IGNORE_ERROR (dm-kcopyd.c): the same fault writes nothing
    dst2 = FaultyEndpoint(MemoryEndpoint(SIZE))
    job = kc.run(kcopyd.Region(src, 0, SECTORS), [kcopyd.Region(dst2, 0, SECTORS)],
                 kcopyd.IGNORE_ERROR | kcopyd.WRITE_SEQ)
    assert job.read_err and not any(op[0] == "write" for op in dst2.ops)


def test_write_error_sets_the_destinations_bit_and_the_others_are_written(kc):
    data = pattern(SIZE)
    good, bad, good2 = MemoryEndpoint(SIZE), FaultyEndpoint(MemoryEndpoint(SIZE), write_errors=[3]), MemoryEndpoint(SIZE)
    job = kc.run(kcopyd.Region(MemoryEndpoint(data), 0, SECTORS),
                 [kcopyd.Region(d, 0, SECTORS) for d in (good, bad, good2)])
    assert not job.read_err and job.write_err == 0b010 and job.failed_dests == [1]
    assert bytes(good.data) == data and bytes(good2.data) == data
    with pytest.raises(DeviceIOError, match="write error on destination 1"):
        job.raise_for_error()
    zero_bad = FaultyEndpoint(MemoryEndpoint(pattern(SIZE)), write_errors=[0])
    assert kc.run(None, [kcopyd.Region(zero_bad, 0, 8)]).write_err == 1


def test_overlapping_source_and_destination_copy_as_memmove(kc):
    data = pattern(SIZE)
    dev = MemoryEndpoint(data)
    job = kc.run(kcopyd.Region(dev, 0, SECTORS // 2), [kcopyd.Region(dev, 16, SECTORS // 2)])
    assert job.ok
    expected = bytearray(data)
    expected[16 * 512:16 * 512 + SIZE // 2] = data[:SIZE // 2]
    assert bytes(dev.data) == bytes(expected)


def test_bad_input_is_refused_before_any_io(kc):
    src, dst = FaultyEndpoint(MemoryEndpoint(SIZE)), FaultyEndpoint(MemoryEndpoint(SIZE))
    cases = [
        ((kcopyd.Region(src, 0, SECTORS), [kcopyd.Region(dst, 1, SECTORS)]), {}, "beyond the device"),
        ((kcopyd.Region(dst, 0, 8), [kcopyd.Region(dst, SECTORS - 4, 8)]), {}, "beyond the device"),  # one device
        ((kcopyd.Region(dst, SECTORS - 4, 8), [kcopyd.Region(dst, 0, 8)]), {}, "beyond the device"),
        ((kcopyd.Region(src, 0, 8), [kcopyd.Region(dst, 0, 16)]), {}, "has 16 sectors"),
        ((kcopyd.Region(src, 0, 8), [kcopyd.Region(dst, 0, 8), kcopyd.Region(dst, 4, 8)]), {}, "share bytes"),
        ((kcopyd.Region(src, 0, 8), [kcopyd.Region(dst, 0, 8)]), {"flags": 1 << 20}, "unknown kcopyd flags"),
        ((kcopyd.Region(src, 0, 8), []), {}, "at least one destination"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(InvalidArgument, match=msg):
            kc.run(*args, **kw)
    assert src.ops == [] and dst.ops == []
    assert kc.progress == kcopyd.Progress(0, 0)


def test_a_job_above_the_limit_takes_the_workers(kc):
    n = INLINE_MAX_BYTES + 512
    data = pattern(n)
    src, dst = ThreadLog(MemoryEndpoint(data)), ThreadLog(MemoryEndpoint(n))
    job = kc.run(kcopyd.Region(src, 0, n // 512), [kcopyd.Region(dst, 0, n // 512)])
    assert job.done and job.ok and bytes(dst.inner.data) == data
    assert src.threads and all(t.startswith("kcopyd-io-") for t in src.threads + dst.threads)
    # a smaller limit sends a small job to the workers too, with the same result
    src.threads.clear()
    dst.threads.clear()
    job = kc.run(None, [kcopyd.Region(dst, 0, 8)], max_bytes=2048)
    assert job.ok and dst.threads and all(t.startswith("kcopyd-io-") for t in dst.threads)
    assert kc.progress == kcopyd.Progress(n + 4096, n + 4096)


def test_a_destroyed_client_refuses_jobs():
    kc = kcopyd.Client(num_pages=8, threads=1)
    kc.destroy()
    dst = FaultyEndpoint(MemoryEndpoint(SIZE))
    with pytest.raises(InvalidArgument, match="destroyed"):
        kc.run(None, [kcopyd.Region(dst, 0, 8)])
    assert dst.ops == []


class NestedCopy(MemoryEndpoint):
    """A destination whose write first runs another inline job on the same thread (a target
    below a kcopyd destination that copies a block itself: a snapshot origin under a thin pool)."""

    def __init__(self, data: Any, kc: Any, inner_job: tuple[Any, Any]) -> None:
        super().__init__(data)
        self.kc, self.inner_job = kc, inner_job

    def write(self, buf: Any, offset: int) -> int:
        if self.inner_job is not None:
            job, self.inner_job = self.inner_job, None
            self.kc.run(*job).raise_for_error()
        return super().write(buf, offset)


def test_nested_and_successive_jobs_each_copy_their_own_bytes(kc):
    # The read buffer a thread keeps between jobs: a job started by a destination's write while
    # the outer job's bytes are being written must not overwrite them, and a smaller job after a
    # larger one copies only its own bytes.
    a, b = pattern(SIZE, seed=1), pattern(SIZE, seed=2)
    side = MemoryEndpoint(SIZE)
    dst = NestedCopy(SIZE, kc, (kcopyd.Region(MemoryEndpoint(b), 0, SECTORS), [kcopyd.Region(side, 0, SECTORS)]))
    kc.run(kcopyd.Region(MemoryEndpoint(a), 0, SECTORS), [kcopyd.Region(dst, 0, SECTORS)]).raise_for_error()
    assert bytes(dst.data) == a and bytes(side.data) == b
    small = MemoryEndpoint(SIZE)
    kc.run(kcopyd.Region(MemoryEndpoint(b), 0, 8), [kcopyd.Region(small, 8, 8)]).raise_for_error()
    assert bytes(small.data) == bytes(4096) + b[:4096] + bytes(SIZE - 8192)
    # a read error with IGNORE_ERROR zero-fills the bad block whatever the kept buffer held
    src = FaultyEndpoint(MemoryEndpoint(b), read_errors=[(10, 1)])
    out = MemoryEndpoint(SIZE)
    kc.run(kcopyd.Region(src, 0, SECTORS), [kcopyd.Region(out, 0, SECTORS)], kcopyd.IGNORE_ERROR)
    expected = bytearray(b)
    expected[4096:8192] = bytes(4096)
    assert bytes(out.data) == bytes(expected)


def test_regions_given_by_path_are_opened_copied_and_closed(kc, tmp_path):
    # the general path: kcopyd opens the files, copies on this thread and closes them again
    data = pattern(SIZE)
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(data)
    dst.write_bytes(bytes(2 * SIZE))
    job = kc.run(kcopyd.Region(str(src), 0, SECTORS), [kcopyd.Region(str(dst), SECTORS, SECTORS)])
    assert job.done and job.ok and job.src == kcopyd.Region(str(src), 0, SECTORS)
    assert dst.read_bytes() == bytes(SIZE) + data
    assert _open_on(src, dst) == [], "the files kcopyd opened are closed"
    assert kc.progress == kcopyd.Progress(SIZE, SIZE)
    with pytest.raises(InvalidArgument, match="beyond the device"):
        kc.run(kcopyd.Region(str(src), 1, SECTORS), [kcopyd.Region(str(dst), 0, SECTORS)])
    assert _open_on(src, dst) == [] and kc.progress == kcopyd.Progress(SIZE, SIZE)


def _open_on(*paths: Any) -> list[str]:
    """This process's descriptors open on ``paths`` (counting all of them instead would also see
    an unrelated object of an earlier test closed by the garbage collector meanwhile)."""
    names = {os.path.realpath(p) for p in paths}
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") in names:
                found.append(fd)
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return found


def test_two_endpoints_on_one_file_are_checked_as_one_file(kc, tmp_path):
    # endpoints handed in by the caller are compared by the file they open, not by object: an
    # overlap that only a back-to-front copy could do is refused with WRITE_SEQ, before any I/O
    path = tmp_path / "one.img"
    path.write_bytes(pattern(SIZE))
    with BlockDevice(path, writable=True) as a, BlockDevice(path, writable=True) as b:
        for src_dev, dst_dev in ((a, b), (a, a)):
            with pytest.raises(InvalidArgument, match="WRITE_SEQ"):
                kc.run(kcopyd.Region(src_dev, 0, 16), [kcopyd.Region(dst_dev, 8, 16)], kcopyd.WRITE_SEQ)
        with pytest.raises(InvalidArgument, match="share bytes"):
            kc.run(None, [kcopyd.Region(a, 0, 16), kcopyd.Region(b, 8, 16)])
        assert path.read_bytes() == pattern(SIZE) and kc.progress == kcopyd.Progress(0, 0)
        # without WRITE_SEQ the same overlap is a memmove, whichever endpoint names the file
        kc.run(kcopyd.Region(a, 0, 16), [kcopyd.Region(b, 8, 16)]).raise_for_error()
    expected = bytearray(pattern(SIZE))
    expected[8 * 512:24 * 512] = pattern(SIZE)[:16 * 512]
    assert path.read_bytes() == bytes(expected)


def test_zoned_destination_forces_write_seq_here_too(kc):
    dst = MemoryEndpoint(8192)
    dst.zoned = True  # type: ignore[attr-defined]
    job = kc.run(kcopyd.Region(MemoryEndpoint(pattern(8192)), 0, 16), [kcopyd.Region(dst, 0, 16)],
                 kcopyd.IGNORE_ERROR)
    assert job.ok and job.flags & kcopyd.WRITE_SEQ and not job.flags & kcopyd.IGNORE_ERROR
    assert bytes(dst.data) == pattern(8192)


def test_a_finished_job_waits_awaits_and_cancels_as_any_done_job(kc):
    dst = MemoryEndpoint(SIZE)
    job = kc.run(kcopyd.Region(MemoryEndpoint(pattern(SIZE)), 0, 8), [kcopyd.Region(dst, 0, 8)])
    assert isinstance(job, kcopyd.Job) and job.wait(0) and job.done
    assert asyncio.run(_await(job)) is job
    job.cancel()  # finished: nothing to stop
    assert job.ok and not job.cancelled and job.progress == kcopyd.Progress(4096, 4096)
    assert job.dests == [kcopyd.Region(dst, 0, 8)] and job.failed_dests == [] and "done" in repr(job)


async def _await(job: Any) -> Any:
    return await job


class Halving(MemoryEndpoint):
    """Reads and writes at most half of what is asked the first time of each (as a signal can
    cut a pread or pwrite short), then all."""

    def __init__(self, data: Any) -> None:
        super().__init__(data)
        self.short_reads = self.short_writes = 1

    def readinto(self, buf: Any, offset: int) -> int:
        if self.short_reads:
            self.short_reads -= 1
            buf = memoryview(buf)[:len(buf) // 2]
        return super().readinto(buf, offset)

    def write(self, buf: Any, offset: int) -> int:
        if self.short_writes:
            self.short_writes -= 1
            buf = memoryview(buf)[:len(buf) // 2]
        return super().write(buf, offset)


def test_short_reads_and_writes_are_completed(kc):
    data = pattern(SIZE, seed=9)  # bytes no earlier job left in the thread's kept buffer
    src, dst = Halving(data), Halving(SIZE)
    job = kc.run(kcopyd.Region(src, 0, SECTORS), [kcopyd.Region(dst, 0, SECTORS)])
    assert job.ok and bytes(dst.data) == data
    assert src.short_reads == 0 and dst.short_writes == 0  # both were cut short once


@pytest.mark.parametrize("dests", [["x"], "x"], ids=["list", "string"])
def test_a_destination_that_is_no_region_is_refused_before_any_io(kc, dests):
    src = MemoryEndpoint(pattern(8192))
    with pytest.raises(InvalidArgument, match="not a Region"):
        kc.run(kcopyd.Region(src, 0, 16), dests)
