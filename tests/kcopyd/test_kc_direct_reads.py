"""O_DIRECT reads of a file source opened by path, where its pages are not in the page cache,
when every destination bypasses the cache too (here: files opened with O_DIRECT).

Cached ranges (dirty ones included) are read through the cache, and so is the source of a copy to
page-cache destinations; a failed direct read is retried through the cache, so only a range
unreadable both ways is a read error, with the exact bits.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

import kcopyd
import kcopyd.client as kclient
from dmtools.blockdev import BlockDevice
from dmtools.endpoint import NullEndpoint
from dmtools.errors import DeviceIOError
from kc_helpers import TIMEOUT, Recorder, evict_file, pattern
from kcopyd.fastpath import cached_bytes

MiB = 1 << 20


def _evict(path: Any) -> None:
    """Drop the file's pages; skip the test where cachestat(2) cannot tell (no direct reads then)."""
    evict_file(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        if cached_bytes(fd, 0, os.fstat(fd).st_size) is None:
            pytest.skip("cachestat(2) is missing here (Linux < 6.5): direct reads are never chosen")
    finally:
        os.close(fd)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, int]]:
    """Record every source read kcopyd makes as ``(direct, offset)``."""
    seen: list[tuple[bool, int]] = []
    real = kclient.read_exact

    def spy(ep: Any, views: Any, offset: int) -> None:
        seen.append((bool(getattr(ep, "direct", False)), offset))
        real(ep, views, offset)

    monkeypatch.setattr(kclient, "read_exact", spy)
    return seen


def _files(tmp_path: Any, size: int, ndest: int = 2) -> tuple[Any, bytes, list[Any]]:
    src = tmp_path / "src.img"
    data = pattern(size, seed=11)
    src.write_bytes(data)
    dsts = [tmp_path / f"d{i}.img" for i in range(ndest)]
    for d in dsts:
        d.write_bytes(bytes(size))
    return src, data, dsts


def _copy(src: Any, dsts: list[Any], size: int, flags: int = 0, *, cached_dests: bool = False,
          **kw: Any) -> tuple[kcopyd.Job, Recorder]:
    """Copy the source file to the destination files, opened with O_DIRECT unless ``cached_dests``."""
    rec = Recorder()
    eps = [BlockDevice(d, writable=True, direct=not cached_dests) for d in dsts]
    try:
        with kcopyd.Client(num_pages=256, sub_job_size=MiB, **kw) as kc:
            job = kc.copy(kcopyd.Region(str(src), 0, size // 512), [kcopyd.Region(e, 0, size // 512) for e in eps],
                          flags=flags, notify=rec, context="c")
            assert job.wait(TIMEOUT)
    finally:
        for e in eps:
            e.close()
    return job, rec


def test_cachestat_counts_cached_pages(tmp_path):
    p = tmp_path / "f.img"
    p.write_bytes(pattern(MiB))
    fd = os.open(p, os.O_RDONLY)
    try:
        cached = cached_bytes(fd, 0, MiB)
        if cached is None:
            pytest.skip("cachestat(2) is missing here (Linux < 6.5): direct reads are never chosen")
        assert cached == MiB  # just written: every page is in the cache (dirty)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert cached_bytes(fd, 0, MiB) == 0
    finally:
        os.close(fd)


def test_uncached_source_is_read_direct(tmp_path, reads):
    size = 4 * MiB
    src, data, dsts = _files(tmp_path, size)
    _evict(src)
    job, rec = _copy(src, dsts, size)
    assert rec.calls == [(False, 0, "c")] and job.ok
    assert all(d.read_bytes() == data for d in dsts)
    assert reads and all(direct for direct, _ in reads)


@pytest.mark.parametrize("case", ["cached-source", "direct-reads-off", "page-cache-destinations"])
def test_read_through_the_cache(tmp_path, reads, case):
    """A cached (here: dirty) source, a client with direct_reads=False, or a copy to page-cache
    destinations reads the source through the cache."""
    size = 2 * MiB
    src, data, dsts = _files(tmp_path, size)  # just written: dirty in the page cache
    if case != "cached-source":
        _evict(src)
    job, _ = _copy(src, dsts, size, direct_reads=case != "direct-reads-off",
                   cached_dests=case == "page-cache-destinations")
    assert job.ok and all(d.read_bytes() == data for d in dsts)
    assert reads and not any(direct for direct, _ in reads)


def test_failed_direct_read_is_retried_through_the_cache(tmp_path, monkeypatch):
    size = 2 * MiB
    src, data, dsts = _files(tmp_path, size)
    _evict(src)
    real = kclient.read_exact

    def direct_fails(ep: Any, views: Any, offset: int) -> None:
        if getattr(ep, "direct", False):
            raise DeviceIOError("injected", errno=errno.EIO, operation="read")
        real(ep, views, offset)

    monkeypatch.setattr(kclient, "read_exact", direct_fails)
    job, rec = _copy(src, dsts, size)
    assert rec.calls == [(False, 0, "c")]
    assert all(d.read_bytes() == data for d in dsts)


@pytest.mark.parametrize("flags", [0, kcopyd.IGNORE_ERROR])
def test_range_unreadable_both_ways_is_a_read_error(tmp_path, monkeypatch, flags):
    size = 4 * MiB
    src, data, dsts = _files(tmp_path, size, ndest=3)
    _evict(src)
    real = kclient.read_exact
    bad = MiB  # the second piece fails direct and buffered

    def fails_at(ep: Any, views: Any, offset: int) -> None:
        if offset == bad:
            raise DeviceIOError("injected", errno=errno.EIO, operation="read")
        real(ep, views, offset)

    monkeypatch.setattr(kclient, "read_exact", fails_at)
    job, rec = _copy(src, dsts, size, flags)
    assert rec.calls == [(True, 0, "c")]
    if flags & kcopyd.IGNORE_ERROR:
        # the salvage pass reads block by block through the cache: this file is readable
        assert all(d.read_bytes() == data for d in dsts)
    else:
        assert job.progress.done < size


def test_null_destination_reads_direct(tmp_path, reads):
    size = 2 * MiB
    src, _, _ = _files(tmp_path, size, ndest=0)
    _evict(src)
    with kcopyd.Client(num_pages=256, sub_job_size=MiB) as kc:
        job = kc.copy(kcopyd.Region(str(src), 0, size // 512), kcopyd.Region(NullEndpoint(size), 0, size // 512))
        assert job.wait(TIMEOUT) and job.ok
    assert reads and all(direct for direct, _ in reads)


def _cached(path: Any) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        n = cached_bytes(fd, 0, os.fstat(fd).st_size)
        assert n is not None
        return n
    finally:
        os.close(fd)


@pytest.mark.parametrize("was_cached", [False, True], ids=["uncached-dropped-behind", "cached-kept"])
def test_page_cache_destinations_drop_an_uncached_source_behind(tmp_path, was_cached):
    """With page-cache destinations an uncached source is read through the cache and its pages are
    dropped once read (dd iflag=nocache); a source that was cached stays cached."""
    size = 4 * MiB
    src, data, dsts = _files(tmp_path, size, ndest=3)
    _evict(src)
    if was_cached:
        src.read_bytes()
    job, rec = _copy(src, dsts, size, cached_dests=True)
    assert rec.calls == [(False, 0, "c")]
    assert all(d.read_bytes() == data for d in dsts)
    if was_cached:
        assert _cached(src) == size
    else:
        assert _cached(src) < size // 2, "the source's pages were dropped behind the copy"
