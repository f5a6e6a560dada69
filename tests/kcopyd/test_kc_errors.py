"""Error semantics as the kernel's (dm-kcopyd.c): exact read_err/write_err for each fault case."""

from __future__ import annotations

import os
import threading

import pytest

import kcopyd
from dmtools.errors import DeviceIOError, InvalidArgument
from dmtools.testing.faults import FaultyEndpoint, MemoryEndpoint, SlowEndpoint
from kc_helpers import TIMEOUT, Recorder, pattern

SIZE = 256 * 1024
PIECE = 16 * 1024
SECTORS = SIZE // 512


def client(threads: int = 4) -> kcopyd.Client:
    return kcopyd.Client(num_pages=64, sub_job_size=PIECE, threads=threads)


def run(kc, src, dests, flags=0):
    rec = Recorder()
    job = kc.copy(kcopyd.Region(src, 0, SECTORS), [kcopyd.Region(d, 0, SECTORS) for d in dests],
                  flags=flags, notify=rec, context="c")
    assert job.wait(TIMEOUT)
    assert len(rec.calls) == 1, "notify must run exactly once"
    return job, rec.calls[0]


def test_read_error_stops_handing_out_pieces():
    data = pattern(SIZE)
    src = FaultyEndpoint(MemoryEndpoint(data), read_errors=[0])
    dst = MemoryEndpoint(SIZE)
    # One worker runs the tasks in order: piece 0 fails before any other piece completes, so the
    # 7 pieces in flight are written and nothing after them is handed out.
    with client(threads=1) as kc:
        job, call = run(kc, src, [dst])
    assert call == (True, 0, "c")
    assert job.read_err and job.write_err == 0 and not job.ok
    out = bytes(dst.data)
    assert out[:PIECE] == bytes(PIECE)
    assert out[PIECE : 8 * PIECE] == data[PIECE : 8 * PIECE]
    assert out[8 * PIECE :] == bytes(SIZE - 8 * PIECE)
    assert not any(op == "read" and off >= 8 * PIECE for op, off, _, _ in src.ops)


@pytest.mark.parametrize("kind", ["memory", "file", pytest.param("loop", marks=pytest.mark.root)])
def test_read_error_with_ignore_error_zero_fills_only_bad_blocks(make_ep, kind):
    data = pattern(SIZE)
    src = FaultyEndpoint(make_ep(kind, SIZE, data).dev, read_errors=[(100, 2)])
    dst = make_ep(kind, SIZE, pattern(SIZE, seed=9))
    with client() as kc:
        job, call = run(kc, src, [dst.dev], flags=kcopyd.IGNORE_ERROR)
    assert call == (True, 0, "c")
    bad = slice(100 * 512 // 4096 * 4096, 100 * 512 // 4096 * 4096 + 4096)
    expected = bytearray(data)
    expected[bad] = bytes(4096)
    assert dst.read() == bytes(expected)


def test_write_error_single_destination():
    data = pattern(SIZE)
    dst = FaultyEndpoint(MemoryEndpoint(SIZE), write_errors=[range(64, 96)])
    with client() as kc:
        job, call = run(kc, MemoryEndpoint(data), [dst])
    assert call == (False, 1, "c")
    assert job.failed_dests == [0]
    with pytest.raises(DeviceIOError, match="destination 0"):
        job.raise_for_error()


KINDS = ["memory", "file", pytest.param("loop", marks=pytest.mark.root)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flags", [0, kcopyd.IGNORE_ERROR])
def test_write_errors_on_two_of_three_destinations(make_ep, kind, flags):
    data = pattern(SIZE)
    src = make_ep(kind, SIZE, data)
    e0, e1, e2 = (make_ep(kind, SIZE) for _ in range(3))
    # both faults lie in the first piece, so both show even when the first error stops the job
    d0 = FaultyEndpoint(e0.dev, write_errors=[5])
    d2 = FaultyEndpoint(e2.dev, write_errors=[0])
    with client() as kc:
        job, call = run(kc, src.dev, [d0, e1.dev, d2], flags)
    assert call == (False, 0b101, "c")
    if flags & kcopyd.IGNORE_ERROR:
        # the copy went on: the healthy destination is complete, the others miss only their bad piece
        assert e1.read() == data
        assert e0.read()[PIECE:] == data[PIECE:]
        assert e2.read()[PIECE:] == data[PIECE:]


def test_error_on_destination_zero_with_ignore_error_others_complete():
    data = pattern(SIZE)
    d0 = FaultyEndpoint(MemoryEndpoint(SIZE), write_errors=[(0, SECTORS)])
    others = [MemoryEndpoint(SIZE), MemoryEndpoint(SIZE)]
    with client() as kc:
        job, call = run(kc, MemoryEndpoint(data), [d0, *others], kcopyd.IGNORE_ERROR)
    assert call == (False, 0b001, "c")
    assert all(bytes(o.data) == data for o in others)


def test_read_and_write_errors_accumulate_with_ignore_error():
    data = pattern(SIZE)
    src = FaultyEndpoint(MemoryEndpoint(data), read_errors=[300])
    d1 = FaultyEndpoint(MemoryEndpoint(SIZE), write_errors=[10])
    with client() as kc:
        job, call = run(kc, src, [MemoryEndpoint(SIZE), d1], kcopyd.IGNORE_ERROR)
    assert call == (True, 0b10, "c")


def test_enospc_sets_the_destination_bit():
    dst = FaultyEndpoint(MemoryEndpoint(SIZE), nospace_from=SIZE // 2)
    with client() as kc:
        job, call = run(kc, MemoryEndpoint(pattern(SIZE)), [MemoryEndpoint(SIZE), dst])
    assert call == (False, 0b10, "c")


def test_short_reads_are_completed():
    data = pattern(SIZE)
    src = FaultyEndpoint(MemoryEndpoint(data), short_reads=1000)
    dst = MemoryEndpoint(SIZE)
    with client() as kc:
        job, call = run(kc, src, [dst])
    assert call == (False, 0, "c")
    assert bytes(dst.data) == data


def test_rate_faults_with_ignore_error_match_reference():
    data = pattern(SIZE)
    src = FaultyEndpoint(MemoryEndpoint(data), read_error_rate=0.1, seed=3)
    expected = bytearray(data)
    for off in range(0, SIZE, 4096):
        if src._fails("read", off, 4096):
            expected[off : off + 4096] = bytes(4096)
    assert bytes(expected) != data, "the seed must produce some faults"
    dst = MemoryEndpoint(SIZE)
    with client() as kc:
        job, call = run(kc, src, [dst], kcopyd.IGNORE_ERROR)
    assert call == (True, 0, "c")
    assert bytes(dst.data) == bytes(expected)


def test_write_seq_writes_in_offset_order():
    data = pattern(SIZE)
    dst = FaultyEndpoint(MemoryEndpoint(SIZE))
    src = SlowEndpoint(MemoryEndpoint(data), delay=0.001)
    with kcopyd.Client(num_pages=64, sub_job_size=8192, threads=6) as kc:
        job, call = run(kc, src, [dst], kcopyd.WRITE_SEQ)
    assert call == (False, 0, "c")
    offsets = [off for off, _ in dst.written()]
    assert offsets == sorted(offsets) and len(offsets) == SIZE // 8192
    assert bytes(dst.inner.data) == data


def test_write_seq_clears_ignore_error_and_stops_after_a_write_error():
    data = pattern(SIZE)
    dst = FaultyEndpoint(MemoryEndpoint(SIZE), write_errors=[3 * PIECE // 512])
    with client() as kc:
        job, call = run(kc, MemoryEndpoint(data), [dst], kcopyd.WRITE_SEQ | kcopyd.IGNORE_ERROR)
    assert not job.flags & kcopyd.IGNORE_ERROR
    assert call == (False, 1, "c")
    written = dst.written()
    assert [o for o, _ in written] == [0, PIECE, 2 * PIECE], "nothing is written after the failed piece"


def test_notify_exception_is_logged_and_client_survives(caplog):
    def bad(read_err, write_err, ctx):
        raise RuntimeError("boom in callback")

    with client() as kc:
        src, dst = MemoryEndpoint(pattern(8192)), MemoryEndpoint(8192)
        j1 = kc.copy(kcopyd.Region(src, 0, 16), [kcopyd.Region(dst, 0, 16)], notify=bad)
        assert j1.wait(TIMEOUT)
        rec = Recorder()
        j2 = kc.copy(kcopyd.Region(src, 0, 16), [kcopyd.Region(dst, 0, 16)], notify=rec, context=2)
        assert j2.wait(TIMEOUT)
        assert rec.calls == [(False, 0, 2)]
    assert "boom in callback" in caplog.text


def test_callbacks_are_serialised_on_one_thread():
    active = [0]
    peak = [0]
    threads: set[int] = set()
    lock = threading.Lock()
    calls = []

    def cb(read_err, write_err, ctx):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        threads.add(threading.get_ident())
        threading.Event().wait(0.002)
        calls.append(ctx)
        with lock:
            active[0] -= 1

    with client() as kc:
        src = MemoryEndpoint(pattern(64 * 1024))
        jobs = [kc.copy(kcopyd.Region(src, 0, 8), [kcopyd.Region(MemoryEndpoint(4096), 0, 8)], notify=cb, context=i)
                for i in range(40)]
        for j in jobs:
            assert j.wait(TIMEOUT)
    assert sorted(calls) == list(range(40))
    assert peak[0] == 1 and len(threads) == 1 and threading.get_ident() not in threads


def test_destroy_waits_for_jobs_in_flight():
    gate = threading.Event()
    src = SlowEndpoint(MemoryEndpoint(pattern(SIZE)), gate=gate)
    dst = MemoryEndpoint(SIZE)
    rec = Recorder()
    kc = client()
    job = kc.copy(kcopyd.Region(src, 0, SECTORS), [kcopyd.Region(dst, 0, SECTORS)], notify=rec)
    assert src.started.wait(TIMEOUT)
    destroyer = threading.Thread(target=kc.destroy)
    destroyer.start()
    destroyer.join(0.2)
    assert destroyer.is_alive(), "destroy returned while I/O was held"
    assert not rec.calls
    with pytest.raises(InvalidArgument):
        kc.copy(kcopyd.Region(src, 0, 8), [kcopyd.Region(dst, 0, 8)])
    gate.set()
    destroyer.join(TIMEOUT)
    assert not destroyer.is_alive()
    assert rec.calls == [(False, 0, None)] and job.done
    assert bytes(dst.data) == bytes(src.inner.data)


def test_cancel_stops_the_job_and_notifies_once():
    gate = threading.Event()
    src = SlowEndpoint(MemoryEndpoint(pattern(SIZE)), gate=gate)
    dst = FaultyEndpoint(MemoryEndpoint(SIZE))
    rec = Recorder()
    with client() as kc:
        job = kc.copy(kcopyd.Region(src, 0, SECTORS), [kcopyd.Region(dst, 0, SECTORS)], notify=rec)
        assert src.started.wait(TIMEOUT)
        job.cancel()
        gate.set()
        assert job.wait(TIMEOUT)
    assert job.cancelled and not job.ok
    assert job.progress.done == 0, "nothing was written"
    assert rec.calls == [(False, 0, None)]
    assert dst.written() == [], "a cancelled job writes nothing more"
    assert src.requests <= 8


def test_await_job_from_asyncio():
    import asyncio

    async def main(kc):
        src, dst = MemoryEndpoint(pattern(SIZE)), MemoryEndpoint(SIZE)
        job = kc.copy(kcopyd.Region(src, 0, SECTORS), [kcopyd.Region(dst, 0, SECTORS)])
        done = await asyncio.wait_for(job, TIMEOUT)
        again = await job  # awaiting a finished job returns at once
        return done, again, bytes(dst.data) == bytes(src.data)

    with client() as kc:
        done, again, equal = asyncio.run(main(kc))
    assert done is again and done.ok and equal


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda s, d: (kcopyd.Region(s, 0, 8), [kcopyd.Region(d, 0, 8)] * 9), "at most 8"),
        (lambda s, d: (kcopyd.Region(s, 0, 8), [kcopyd.Region(d, 0, 16)]), "has 16 sectors"),
        (lambda s, d: (kcopyd.Region(s, 0, 8), [kcopyd.Region(d, 0, 8), kcopyd.Region(d, 10, 8)]), "ends beyond"),
        (lambda s, d: (kcopyd.Region(s, 12, 8), [kcopyd.Region(d, 0, 8)]), "ends beyond"),
        (lambda s, d: (kcopyd.Region(s, 0, 8), []), "at least one"),
    ],
)
def test_bad_regions_raise_before_any_io(make_args, message):
    src = FaultyEndpoint(MemoryEndpoint(pattern(8192)))
    dst = FaultyEndpoint(MemoryEndpoint(8192))
    with client() as kc:
        with pytest.raises(InvalidArgument, match=message):
            kc.copy(*make_args(src, dst))
        assert kc.jobs_pending == 0
    assert src.ops == [] and dst.ops == [] and bytes(dst.inner.data) == bytes(8192)


def test_bad_arguments_raise():
    m = MemoryEndpoint(4096)
    with pytest.raises(InvalidArgument):
        kcopyd.Region(m, -1, 8)
    with pytest.raises(InvalidArgument):
        kcopyd.Region(m, 0, 1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        kcopyd.Client(num_pages=0)
    with pytest.raises(InvalidArgument):
        kcopyd.Client(sub_job_size=1000)
    with client() as kc:
        with pytest.raises(InvalidArgument, match="flags"):
            kc.copy(kcopyd.Region(m, 0, 8), [kcopyd.Region(MemoryEndpoint(4096), 0, 8)], flags=1 << 20)
        with pytest.raises(InvalidArgument, match="callable"):
            kc.copy(kcopyd.Region(m, 0, 8), [kcopyd.Region(MemoryEndpoint(4096), 0, 8)], notify=3)  # type: ignore[arg-type]


def test_paths_closed_after_validation_failure(tmp_path):
    import os

    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(pattern(8192))
    b.write_bytes(bytes(4096))
    before = len(os.listdir("/proc/self/fd"))
    with client() as kc:
        with pytest.raises(InvalidArgument, match="ends beyond"):
            kc.copy(kcopyd.Region(str(a), 0, 16), [kcopyd.Region(str(b), 0, 16)])
        with pytest.raises(InvalidArgument, match="cannot open|no such"):
            kc.copy(kcopyd.Region(str(tmp_path / "missing"), 0, 16), [kcopyd.Region(str(b), 0, 16)])
        after = len(os.listdir("/proc/self/fd"))
    assert after == before
    assert b.read_bytes() == bytes(4096)


def test_submissions_beyond_max_jobs_wait_their_turn():
    gate = threading.Event()
    src = SlowEndpoint(MemoryEndpoint(pattern(8192)), gate=gate)
    with kcopyd.Client(num_pages=8, max_jobs=2) as kc:
        jobs = [kc.copy(kcopyd.Region(src, 0, 16), [kcopyd.Region(MemoryEndpoint(8192), 0, 16)]) for _ in range(2)]
        third: list[kcopyd.Job] = []
        submitter = threading.Thread(
            target=lambda: third.append(kc.copy(kcopyd.Region(src, 0, 16), [kcopyd.Region(MemoryEndpoint(8192), 0, 16)]))
        )
        submitter.start()
        submitter.join(0.2)
        assert submitter.is_alive() and not third, "the third job waits while two are outstanding"
        gate.set()
        submitter.join(TIMEOUT)
        assert third and third[0].wait(TIMEOUT) and all(j.wait(TIMEOUT) for j in jobs)


def test_zoned_destination_forces_write_seq():
    dst = MemoryEndpoint(8192)
    dst.zoned = True  # type: ignore[attr-defined]
    with client() as kc:
        job = kc.copy(kcopyd.Region(MemoryEndpoint(pattern(8192)), 0, 16), [kcopyd.Region(dst, 0, 16)],
                      flags=kcopyd.IGNORE_ERROR)
        assert job.wait(TIMEOUT) and job.ok
    assert job.flags & kcopyd.WRITE_SEQ and not job.flags & kcopyd.IGNORE_ERROR


def _tally_batch(tally, sources):
    """One job per source, each copying its own ``PIECE`` of it to the same place of one destination."""
    dst = MemoryEndpoint(SIZE)
    with client() as kc:
        for i, src in enumerate(sources):
            region = (i * PIECE // 512, PIECE // 512)
            kc.copy(kcopyd.Region(src, *region), [kcopyd.Region(dst, *region)], 0, tally, (f"job {i}", PIECE))
    return dst


def test_copy_tally_adds_up_jobs_and_raises_the_failed_ones():
    """The notify of a batch of jobs (the offline exports'): the bytes of every job that succeeded
    reach ``progress``, a failed job's never (an export whose last job fails must not show
    ``100/100``); ``check`` raises the failed jobs, naming five at most, and nothing when none failed."""
    from kcopyd.progress import CopyTally, ProgressReporter, reporting

    data = pattern(SIZE)
    seen: list[tuple[int, int]] = []
    tally = CopyTally(8 * PIECE, lambda done, total: seen.append((done, total)))
    dst = _tally_batch(tally, [MemoryEndpoint(data)] * 8)
    assert seen == [(k * PIECE, 8 * PIECE) for k in range(1, 9)] and bytes(dst.data[:8 * PIECE]) == data[:8 * PIECE]
    tally.check("out", "export")
    bad = FaultyEndpoint(MemoryEndpoint(data), read_errors=[(0, SECTORS)])
    tally = CopyTally(8 * PIECE)
    _tally_batch(tally, [bad] * 7 + [MemoryEndpoint(data)])
    assert tally.done == PIECE and len(tally.errors) == 7
    r, w = os.pipe()  # through a --progress=FD reporter, as an export reports: the last job fails
    try:
        with pytest.raises(DeviceIOError), reporting(ProgressReporter(fd=w)) as progress:
            tally = CopyTally(8 * PIECE, progress)
            _tally_batch(tally, [MemoryEndpoint(data)] * 7 + [bad])
            tally.check("out", "export")
        os.close(w)
        assert os.read(r, 4096).decode().split()[-1] == "87/100"
    finally:
        os.close(r)
    tally = CopyTally(8 * PIECE)
    _tally_batch(tally, [bad] * 7 + [MemoryEndpoint(data)])
    with pytest.raises(DeviceIOError) as info:
        tally.check("out", "export")
    assert str(info.value).count("failed (read_err=1, write_err=0x0)") == 5 and "job 7" not in str(info.value)
    assert info.value.device == "out" and info.value.operation == "export"
