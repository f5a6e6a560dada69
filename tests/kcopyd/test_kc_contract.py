"""Contract tests: data equal at every destination, notify exactly once, over several endpoint kinds."""

from __future__ import annotations

import pytest

import kcopyd
from dmtools.endpoint import NullEndpoint
from dmtools.testing.faults import MemoryEndpoint

from kc_helpers import TIMEOUT, pattern

KINDS = ["memory", "file", "path", pytest.param("loop", marks=pytest.mark.root)]
SIZE = 256 * 1024  # 16 pieces of 16 KiB with the test client


@pytest.mark.parametrize("src_kind", KINDS)
@pytest.mark.parametrize("dst_kind", KINDS)
def test_copy_one_destination(kc, make_dev, recorder, src_kind, dst_kind):
    data = pattern(SIZE)
    src = make_dev(src_kind, SIZE, data)
    dst = make_dev(dst_kind, SIZE)
    job = kc.copy(kcopyd.Region(src.dev, 0, SIZE // 512), [kcopyd.Region(dst.dev, 0, SIZE // 512)],
                  notify=recorder, context="ctx")
    assert job.wait(TIMEOUT)
    assert recorder.calls == [(False, 0, "ctx")]
    assert dst.read() == data
    assert job.ok and job.progress.done == SIZE


@pytest.mark.parametrize("flags", [0, kcopyd.IGNORE_ERROR, kcopyd.WRITE_SEQ], ids=["plain", "ignore", "seq"])
@pytest.mark.parametrize("kind", KINDS)
def test_copy_three_destinations_at_offsets(kc, make_dev, recorder, kind, flags):
    data = pattern(SIZE, seed=7)
    src = make_dev(kind, SIZE + 4096, bytes(4096) + data)
    dests = [make_dev(kind, SIZE + 8192) for _ in range(3)]
    offsets = [0, 3, 16]  # sectors
    job = kc.copy(kcopyd.Region(src.dev, 8, SIZE // 512),
                  [kcopyd.Region(d.dev, off, SIZE // 512) for d, off in zip(dests, offsets)], flags=flags,
                  notify=recorder)
    assert job.wait(TIMEOUT)
    assert recorder.calls == [(False, 0, None)]
    for d, off in zip(dests, offsets):
        content = d.read()
        assert content[off * 512 : off * 512 + SIZE] == data
        assert content[: off * 512] == bytes(off * 512)
        assert content[off * 512 + SIZE :] == bytes(len(content) - off * 512 - SIZE)


@pytest.mark.parametrize("kind", KINDS)
def test_null_source_gives_zeros(kc, make_dev, kind):
    dst = make_dev(kind, SIZE, pattern(SIZE))
    job = kc.copy(kcopyd.Region(NullEndpoint(SIZE), 0, SIZE // 512), [kcopyd.Region(dst.dev, 0, SIZE // 512)])
    assert job.wait(TIMEOUT) and job.ok
    assert dst.read() == bytes(SIZE)


@pytest.mark.parametrize("kind", KINDS)
def test_null_destination_reads_everything(kc, make_dev, kind):
    src = make_dev(kind, SIZE, pattern(SIZE))
    sink = NullEndpoint(SIZE)
    job = kc.copy(kcopyd.Region(src.dev, 0, SIZE // 512), [kcopyd.Region(sink, 0, SIZE // 512)])
    assert job.wait(TIMEOUT) and job.ok
    assert kc.progress.done == SIZE


@pytest.mark.parametrize("kind", KINDS)
def test_zero_job(kc, make_dev, recorder, kind):
    data = pattern(SIZE)
    d1, d2 = make_dev(kind, SIZE, data), make_dev(kind, SIZE, data)
    job = kc.zero([kcopyd.Region(d1.dev, 8, 64), kcopyd.Region(d2.dev, 0, 64)], notify=recorder, context=3)
    assert job.wait(TIMEOUT)
    assert recorder.calls == [(False, 0, 3)]
    assert d1.read() == data[:4096] + bytes(64 * 512) + data[4096 + 64 * 512 :]
    assert d2.read() == bytes(64 * 512) + data[64 * 512 :]


def test_zero_length_jobs_complete(kc, recorder):
    src, dst = MemoryEndpoint(4096), MemoryEndpoint(4096)
    jobs = [
        kc.copy(kcopyd.Region(src, 0, 0), [kcopyd.Region(dst, 0, 0)], notify=recorder, context=1),
        kc.zero([kcopyd.Region(dst, 8, 0)], notify=recorder, context=2),
    ]
    for job in jobs:
        assert job.wait(TIMEOUT)
        assert job.ok
    assert sorted(c[2] for c in recorder.calls) == [1, 2]


def test_job_and_client_progress(kc):
    src, dst = MemoryEndpoint(pattern(SIZE)), MemoryEndpoint(SIZE)
    job = kc.copy(kcopyd.Region(src, 0, SIZE // 512), [kcopyd.Region(dst, 0, SIZE // 512)])
    assert job.wait(TIMEOUT)
    assert job.progress == kcopyd.Progress(SIZE, SIZE)
    assert job.progress.percent == 100
    assert bytes(dst.data) == bytes(src.data), "what the progress counts was read and written"
    job2 = kc.zero([kcopyd.Region(dst, 0, 8)])
    assert job2.wait(TIMEOUT)
    assert kc.progress == kcopyd.Progress(SIZE + 4096, SIZE + 4096)
    assert bytes(dst.data[:4096]) == bytes(4096) and bytes(dst.data[4096:]) == bytes(src.data[4096:])


def test_many_concurrent_jobs_share_the_pool(make_dev):
    with kcopyd.Client(num_pages=8, sub_job_size=8192, threads=3) as client:
        srcs = [MemoryEndpoint(pattern(64 * 1024, seed=i)) for i in range(20)]
        dsts = [MemoryEndpoint(64 * 1024) for _ in range(20)]
        jobs = [client.copy(kcopyd.Region(s, 0, 128), [kcopyd.Region(d, 0, 128)]) for s, d in zip(srcs, dsts)]
        for job in jobs:
            assert job.wait(TIMEOUT) and job.ok
        assert all(bytes(d.data) == bytes(s.data) for s, d in zip(srcs, dsts))
        assert 0 < client.pool.peak <= 8
        assert client.pool.in_use == 0


def test_piece_larger_than_pool_is_cut_to_the_pool():
    with kcopyd.Client(num_pages=2, threads=2) as client:  # 8 KiB of pages, 512 KiB sub-jobs
        src, dst = MemoryEndpoint(pattern(100 * 1024 + 512)), MemoryEndpoint(100 * 1024 + 512)
        job = client.copy(kcopyd.Region(src, 0, 201), [kcopyd.Region(dst, 0, 201)])
        assert job.wait(TIMEOUT) and job.ok
        assert dst.data == src.data
        assert client.pool.peak <= 2
