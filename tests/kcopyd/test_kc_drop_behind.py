"""An uncached file source's pages are dropped once read (``dd iflag=nocache``).

kcopyd asks ``cachestat(2)`` whether any of the job's source range is cached; when none is, the
pages the copy brings in are dropped behind it, so it does not push other data out of the cache.
A cached source keeps its pages; errors keep their exact bits either way.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any

import pytest

import kcopyd
import kcopyd.client as kclient
import kcopyd.mapped as kmapped
from dmtools.endpoint import NullEndpoint
from dmtools.errors import DeviceIOError
from kc_helpers import TIMEOUT, Recorder, cached, evict_file, pattern
from kcopyd.fastpath import cached_bytes

MiB = 1 << 20


def _files(tmp_path: Any, size: int, ndest: int = 2) -> tuple[Any, bytes, list[Any]]:
    src = tmp_path / "src.img"
    data = pattern(size, seed=11)
    src.write_bytes(data)
    dsts = [tmp_path / f"d{i}.img" for i in range(ndest)]
    for d in dsts:
        d.write_bytes(bytes(size))
    return src, data, dsts


def _copy(src: Any, dsts: list[Any], size: int, flags: int = 0, **kw: Any) -> tuple[kcopyd.Job, Recorder]:
    rec = Recorder()
    with kcopyd.Client(num_pages=256, sub_job_size=MiB, **kw) as kc:
        job = kc.copy(kcopyd.Region(str(src), 0, size // 512), [kcopyd.Region(str(d), 0, size // 512) for d in dsts],
                      flags=flags, notify=rec, context="c")
        assert job.wait(TIMEOUT)
    return job, rec


def test_cachestat_counts_cached_pages(tmp_path):
    p = tmp_path / "f.img"
    p.write_bytes(pattern(MiB))
    assert cached(p) == MiB  # just written: every page is in the cache (dirty)
    evict_file(p)
    assert cached(p) == 0
    fd = os.open(p, os.O_RDONLY)
    try:
        os.pread(fd, 4096, 0)
        assert cached_bytes(fd, 0, 4096) == 4096
    finally:
        os.close(fd)


@pytest.mark.parametrize("ndest", [3, 0], ids=["files", "null"])
def test_uncached_source_is_dropped_behind(tmp_path, ndest):
    size = 4 * MiB
    src, data, dsts = _files(tmp_path, size, ndest)
    evict_file(src)
    assert cached(src) == 0
    if ndest:
        job, rec = _copy(src, dsts, size)
        assert all(d.read_bytes() == data for d in dsts)
    else:
        rec = Recorder()
        with kcopyd.Client(num_pages=256, sub_job_size=MiB) as kc:
            job = kc.copy(kcopyd.Region(str(src), 0, size // 512), kcopyd.Region(NullEndpoint(size), 0, size // 512),
                          notify=rec, context="c")
            assert job.wait(TIMEOUT)
    assert rec.calls == [(False, 0, "c")] and job.ok
    assert cached(src) < size // 2, "the source's pages were dropped behind the copy"


@pytest.mark.parametrize("case", ["cached-source", "drop-behind-off"])
def test_source_pages_kept(tmp_path, case):
    """A source that was cached stays cached; so does any with ``drop_behind=False``."""
    size = 4 * MiB
    src, data, dsts = _files(tmp_path, size)
    evict_file(src)
    if case == "cached-source":
        src.read_bytes()
    job, _ = _copy(src, dsts, size, drop_behind=case != "drop-behind-off")
    assert job.ok and all(d.read_bytes() == data for d in dsts)
    assert cached(src) > size // 2, "the source's pages were kept"


def test_endpoint_source_is_never_dropped(tmp_path):
    """A caller's endpoint is used as given: its cache is the caller's business."""
    from dmtools.blockdev import BlockDevice

    size = 2 * MiB
    src, data, dsts = _files(tmp_path, size)
    evict_file(src)
    with BlockDevice(src) as ep, kcopyd.Client(num_pages=256, sub_job_size=MiB) as kc:
        job = kc.copy(kcopyd.Region(ep, 0, size // 512), [kcopyd.Region(str(d), 0, size // 512) for d in dsts])
        assert job.wait(TIMEOUT) and job.ok
    assert all(d.read_bytes() == data for d in dsts)
    assert cached(src) > size // 2, "the source's pages were kept"


@pytest.mark.parametrize("flags", [0, kcopyd.IGNORE_ERROR])
def test_read_error_bits_with_drop_behind(tmp_path, monkeypatch, flags):
    size = 4 * MiB
    src, data, dsts = _files(tmp_path, size, ndest=3)
    evict_file(src)
    real = kclient.read_exact
    bad = MiB  # the second piece's read fails; the salvage pass then reads it block by block

    def fails_at(ep: Any, views: Any, offset: int) -> None:
        if offset == bad:
            raise DeviceIOError("injected", errno=errno.EIO, operation="read")
        real(ep, views, offset)

    def fault_in_fails_at(smap: Any, start: int, length: int) -> None:
        if smap.offset + start == bad:  # a disk error fails the mapped source's fault-in too
            raise OSError(errno.EIO, "injected")
        real_populate(smap, start, length)

    real_populate = kmapped.SourceMap.populate
    monkeypatch.setattr(kclient, "read_exact", fails_at)
    monkeypatch.setattr(kmapped.SourceMap, "populate", fault_in_fails_at)
    job, rec = _copy(src, dsts, size, flags)
    assert rec.calls == [(True, 0, "c")]
    if flags & kcopyd.IGNORE_ERROR:
        assert all(d.read_bytes() == data for d in dsts)
    else:
        assert job.progress.done < size


@pytest.mark.parametrize("ndest", [2, 0], ids=["mapped", "buffered"])
def test_large_folios_across_pieces_are_dropped(tmp_path, ndest):
    """Readahead fills large folios (up to 2 MiB) that pieces of 512 KiB cut across; each is
    dropped once the later piece is done (DONTNEED skips a folio reaching outside its range)."""
    size = 16 * MiB
    src, data, dsts = _files(tmp_path, size, ndest)
    evict_file(src)
    if ndest:
        job, _ = _copy(src, dsts, size)
    else:
        with kcopyd.Client(num_pages=256, sub_job_size=MiB) as kc:
            job = kc.copy(kcopyd.Region(str(src), 0, size // 512), kcopyd.Region(NullEndpoint(size), 0, size // 512))
            assert job.wait(TIMEOUT)
    assert job.ok and all(d.read_bytes() == data for d in dsts)
    assert cached(src) == 0


def test_pages_read_again_after_the_drop_are_dropped(tmp_path, monkeypatch):
    """The kernel may take clean pages of pieces already read (reclaim; this host's DAMON
    pageout); a piece still reading then reads them again with its fault readahead (a 16 MiB
    window here: read_ahead_kb x2 for POSIX_FADV_SEQUENTIAL), and the job's last drop comes
    while those reads are in flight: DONTNEED skips a locked folio (mm/filemap.c
    find_lock_entries). The last drop waits for them and drops them too."""
    size, piece = 16 * MiB, 512 << 10
    src, _, _ = _files(tmp_path, size, 0)
    evict_file(src)
    real = kmapped.SourceMap.populate
    rest_read = threading.Event()

    def populate(smap: Any, start: int, length: int) -> None:
        if smap.offset == 0:  # the first piece reads last, after the others were taken back
            assert rest_read.wait(TIMEOUT)
            evict_file(src)
        real(smap, start, length)
        if smap.offset == size - piece:
            rest_read.set()

    monkeypatch.setattr(kmapped.SourceMap, "populate", populate)
    with kcopyd.Client(num_pages=256, sub_job_size=MiB) as kc:
        job = kc.copy(kcopyd.Region(str(src), 0, size // 512), kcopyd.Region(NullEndpoint(size), 0, size // 512))
        assert job.wait(TIMEOUT)
    assert job.ok and rest_read.is_set()
    assert cached(src) == 0
