"""I/O paths: copy_file_range and its fallback, holes of sparse sources, O_DIRECT on block devices."""

from __future__ import annotations

import errno
import os

import pytest

import kcopyd
import kcopyd.offload
from kcopyd.fastpath import plan_segments
from kcopyd.offload import OFFLOAD_DEPTH, OFFLOAD_PIECE_SIZE
from dmtools.testing.faults import MemoryEndpoint
from kc_helpers import TIMEOUT, make_writable, pattern

MiB = 1 << 20


def test_plan_segments_rounds_holes_inwards():
    ep = MemoryEndpoint(64 * 1024)
    ep.set_extents([(0, 5000), (20000, 100)])
    segs = plan_segments(ep, 0, 32768, 4096)
    # data [0,5000) -> hole from 8192 (rounded up) to 16384 (20000 rounded down); data to 20100; hole
    # from 20480 to the end
    assert segs == [(0, 8192, True), (8192, 8192, False), (16384, 4096, True), (20480, 12288, False)]
    assert sum(n for _, n, _ in segs) == 32768
    assert plan_segments(None, 0, 4096, 4096) == [(0, 4096, False)]
    ep.set_extents(None)
    assert plan_segments(ep, 512, 1024, 4096) == [(0, 1024, True)]
    ep.set_extents([])
    assert plan_segments(ep, 0, 3072, 4096) == [(0, 3072, False)], "a hole may end at the piece end"
    ep.set_extents([(1024, 512)])
    assert plan_segments(ep, 0, 6144, 4096) == [(0, 4096, True), (4096, 2048, False)]
    ep.set_extents([(512, 512), (0, 4608)])  # unsorted and overlapping (found by the property test)
    assert plan_segments(ep, 0, 4608, 4096) == [(0, 4608, True)]


def _sparse_source(path, size=4 * MiB):
    data = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in (0, 2 * MiB + 8192):
            chunk = pattern(64 * 1024, seed=off)
            f.seek(off)
            f.write(chunk)
            data[off : off + len(chunk)] = chunk
    return bytes(data)


def _allocated(path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture(params=[True, False], ids=["offload", "buffers"])
def client(request):
    with kcopyd.Client(num_pages=256, offload=request.param) as kc:
        yield kc


def test_several_file_destinations_share_one_read(tmp_path, monkeypatch):
    calls = []
    real = os.copy_file_range

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", spy)
    src = tmp_path / "s.img"
    src.write_bytes(pattern(2 * MiB))
    dsts = [tmp_path / f"d{i}.img" for i in range(3)]
    for d in dsts:
        d.write_bytes(bytes(2 * MiB))
    with kcopyd.Client() as kc:
        job = kc.copy(kcopyd.Region(str(src), 0, 4096), [kcopyd.Region(str(d), 0, 4096) for d in dsts])
        assert job.wait(TIMEOUT) and job.ok
    assert calls == [], "one buffered read serves every destination"
    assert all(d.read_bytes() == src.read_bytes() for d in dsts)


def test_copy_file_range_is_used_between_files(tmp_path, monkeypatch):
    calls = []
    real = os.copy_file_range

    def spy(*args):
        calls.append(args[2])
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", spy)
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    src.write_bytes(pattern(3 * MiB))
    dst.write_bytes(bytes(3 * MiB))
    with kcopyd.Client() as kc:
        job = kc.copy(kcopyd.Region(str(src), 0, 6144), [kcopyd.Region(str(dst), 0, 6144)])
        assert job.wait(TIMEOUT) and job.ok
    assert calls and sum(calls) >= 3 * MiB
    assert dst.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("err", [errno.EXDEV, errno.EIO, errno.EINVAL])
def test_copy_file_range_failure_falls_back_to_buffers(tmp_path, monkeypatch, err):
    def refuse(*args):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    src.write_bytes(pattern(20 * MiB))
    dst.write_bytes(bytes(20 * MiB))
    with kcopyd.Client(num_pages=64) as kc:  # 256 KiB of pages: the 8 MiB pieces are cut up
        job = kc.copy(kcopyd.Region(str(src), 0, 40960), [kcopyd.Region(str(dst), 0, 40960)])
        assert job.wait(TIMEOUT)
        assert kc.pool.peak <= 64
    assert job.ok, "copy_file_range errors are retried with buffers, which succeed"
    assert dst.read_bytes() == src.read_bytes()


def test_copy_file_range_failing_later_while_buffered_writes_run(tmp_path, monkeypatch):
    """The first offload piece fails at once, the others only once buffered writes are under way.
    The job's write lanes are made once, at the first failure: a later failure that replaced them
    could strand a piece waiting in the old lane, and the job never finished."""
    import threading

    writing = threading.Event()
    calls = [0]
    jobs: list[kcopyd.Job] = []
    lanes_seen: set[int] = set()
    real_pwritev = os.pwritev

    def pwritev(*args):
        if jobs:
            lanes_seen.add(id(jobs[0].lanes))
        writing.set()
        return real_pwritev(*args)

    def refuse(*args):
        calls[0] += 1
        if calls[0] > 1:
            assert writing.wait(TIMEOUT)
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "copy_file_range", refuse)
    # a source read from disk: several pieces in flight (one at a time when it is in the page cache)
    monkeypatch.setattr(kcopyd.offload, "cached_bytes", lambda fd, offset, length: 0)
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    src.write_bytes(pattern(24 * MiB))
    dst.write_bytes(bytes(24 * MiB))
    with kcopyd.Client(num_pages=64) as kc:
        jobs.append(kc.copy(kcopyd.Region(str(src), 0, 49152), [kcopyd.Region(str(dst), 0, 49152)]))
        assert jobs[0].wait(TIMEOUT) and jobs[0].ok
    assert calls[0] == 3, "three 8 MiB pieces were offered to copy_file_range, and each failed"
    assert len(lanes_seen) == 1, "the lanes made at the first failure served every write"
    assert dst.read_bytes() == src.read_bytes()


def test_holes_skipped_when_destination_is_zeroed(tmp_path, client):
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    data = _sparse_source(src)
    with open(dst, "wb") as f:
        f.truncate(4 * MiB)
    job = client.copy(kcopyd.Region(str(src), 0, 8192), [kcopyd.Region(str(dst), 0, 8192)], flags=kcopyd.DEST_ZEROED)
    assert job.wait(TIMEOUT) and job.ok
    assert dst.read_bytes() == data
    assert _allocated(dst) <= 256 * 1024, "holes of the source stay holes"


def test_holes_written_as_zeros_otherwise(tmp_path, client):
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    data = _sparse_source(src)
    dst.write_bytes(pattern(4 * MiB, seed=5))
    job = client.copy(kcopyd.Region(str(src), 0, 8192), [kcopyd.Region(str(dst), 0, 8192)])
    assert job.wait(TIMEOUT) and job.ok
    assert dst.read_bytes() == data
    assert _allocated(dst) < 2 * MiB, "zeros are written by punching holes, not by writing data"


def test_zero_job_on_a_file_deallocates(tmp_path):
    dst = tmp_path / "d.img"
    dst.write_bytes(pattern(4 * MiB))
    with kcopyd.Client() as kc:
        job = kc.zero([kcopyd.Region(str(dst), 2048, 4096)])
        assert job.wait(TIMEOUT) and job.ok
    content = dst.read_bytes()
    assert content[MiB : 3 * MiB] == bytes(2 * MiB)
    assert content[:MiB] == pattern(4 * MiB)[:MiB]
    assert _allocated(dst) <= 2 * MiB + 64 * 1024


def _loop(tmp_path, make_loop, size, **options):
    """A loop device over a new sparse image of ``size`` bytes."""
    img = tmp_path / "dmtt-lo.img"
    with open(img, "wb") as f:
        f.truncate(size)
    lo = make_loop(img, **options)
    make_writable(lo.path)
    return lo


@pytest.mark.root
def test_block_devices_open_with_o_direct_when_aligned(tmp_path, make_loop):
    from kcopyd.region import _open_path

    lo = _loop(tmp_path, make_loop, 8 * MiB, block_size=4096)
    ep = _open_path(lo.path, writable=True, offset=4096, length=MiB)
    try:
        assert ep.direct and ep.logical_block_size == 4096
    finally:
        ep.close()
    ep = _open_path(lo.path, writable=True, offset=512, length=MiB)
    try:
        assert not ep.direct, "a range not aligned to the logical block size uses the page cache"
    finally:
        ep.close()


@pytest.mark.root
def test_copy_to_4k_loop_device_at_unaligned_sector(tmp_path, make_loop):
    lo = _loop(tmp_path, make_loop, 4 * MiB, block_size=4096)
    src = tmp_path / "s.img"
    src.write_bytes(pattern(MiB))
    with kcopyd.Client() as kc:
        for sector in (8, 1):
            job = kc.copy(kcopyd.Region(str(src), 0, 2048), [kcopyd.Region(lo.path, sector, 2048)])
            assert job.wait(TIMEOUT) and job.ok
            with open(lo.path, "rb") as f:
                f.seek(sector * 512)
                assert f.read(MiB) == src.read_bytes()


@pytest.mark.root
def test_region_by_device_number(tmp_path, make_loop):
    lo = _loop(tmp_path, make_loop, MiB)
    src = tmp_path / "s.img"
    src.write_bytes(pattern(MiB))
    with kcopyd.Client() as kc:
        job = kc.copy(kcopyd.Region(str(src), 0, 2048), [kcopyd.Region(f"{lo.major}:{lo.minor}", 0, 2048)])
        assert job.wait(TIMEOUT) and job.ok
    with open(lo.path, "rb") as f:
        assert f.read() == src.read_bytes()


@pytest.mark.parametrize("cached, depth", [("all", 1), (0, OFFLOAD_DEPTH), (None, OFFLOAD_DEPTH)],
                         ids=["in-cache", "not-cached", "cache-unknown"])
def test_copy_file_range_pieces_in_flight_follow_the_page_cache(tmp_path, monkeypatch, cached, depth):
    """A source all in the page cache is copied one piece at a time (each piece is a memory copy the
    others would wait behind); one read from disk, or whose cache state is unknown, several."""
    size = 3 * OFFLOAD_PIECE_SIZE
    asked = []

    def cachestat(fd, offset, length):
        asked.append((offset, length))
        return length if cached == "all" else cached

    monkeypatch.setattr(kcopyd.offload, "cached_bytes", cachestat)
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    src.write_bytes(pattern(size))
    dst.write_bytes(bytes(size))
    with kcopyd.Client() as kc:
        job = kc.copy(kcopyd.Region(str(src), 0, size // 512), [kcopyd.Region(str(dst), 0, size // 512)])
        assert job.wait(TIMEOUT) and job.ok
    assert asked == [(0, size)]
    assert job.plan.offload and job.plan.max_active == depth
    assert dst.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("live", [False, True], ids=["no-backend", "backend-may-be-live"])
def test_in_use_check_only_where_a_table_could_hold_the_files(tmp_path, monkeypatch, live):
    """Regular files are looked up in live tables (DeviceBusy) only where a backend could have one:
    with no /dev/mapper/control and no daemon socket, the lookup's machinery is not even loaded."""
    import dmtools.inputs
    import kcopyd.client

    asked = []

    def backends():
        asked.append(True)
        return []

    monkeypatch.setattr(kcopyd.client, "_backend_may_be_live", lambda: live)
    monkeypatch.setattr(dmtools.inputs, "live_backends", backends)
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    src.write_bytes(pattern(MiB))
    dst.write_bytes(bytes(MiB))
    with kcopyd.Client() as kc:
        for _ in range(2):  # the backends are found once per client
            job = kc.copy(kcopyd.Region(str(src), 0, 2048), [kcopyd.Region(str(dst), 0, 2048)])
            assert job.wait(TIMEOUT) and job.ok
    assert asked == ([True] if live else [])
    assert dst.read_bytes() == src.read_bytes()
