"""Write-behind: a destination file not in the cache is written back and dropped during the copy.

With ``Client(write_behind=True)`` (``dmtools copy`` without ``--keep-cache``) each range written
to such a destination is handed to writeback at once and, once more than ``WINDOW`` bytes are
behind, waited for and dropped from the cache (as nbdcopy does). A destination that was cached
keeps its pages; a writeback error fails exactly that destination's ``write_err`` bit.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

import kcopyd
import kcopyd.writebehind as wb
from dmtools.endpoint import NullEndpoint
from kc_helpers import TIMEOUT, Recorder, cached, evict_file, pattern

MiB = 1 << 20
WINDOW = 4 * MiB
SIZE = 24 * MiB


@pytest.fixture(autouse=True)
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """A small window; every ``sync_file_range`` call, recorded. (The cache is shared with every
    other program, which may drop pages too: a destination left alone is told by the calls.)"""
    monkeypatch.setattr(wb, "WINDOW", WINDOW)
    calls: list[tuple[int, int, int]] = []
    real = wb.sync_range

    def recording(fd: int, offset: int, length: int, flags: int) -> None:
        calls.append((offset, length, flags))
        real(fd, offset, length, flags)

    monkeypatch.setattr(wb, "sync_range", recording)
    return calls


def _copy(src: Any, dests: list[Any], flags: int = 0, **kw: Any) -> tuple[kcopyd.Job, Recorder]:
    rec = Recorder()
    regions = [kcopyd.Region(d if isinstance(d, NullEndpoint) else str(d), 0, SIZE // 512) for d in dests]
    with kcopyd.Client(num_pages=1024, sub_job_size=MiB, **kw) as kc:
        job = kc.copy(kcopyd.Region(str(src), 0, SIZE // 512), regions, flags=flags, notify=rec, context="c")
        assert job.wait(TIMEOUT)
    return job, rec


def _source(tmp_path: Any) -> tuple[Any, bytes]:
    src = tmp_path / "src.img"
    data = pattern(SIZE, seed=5)
    src.write_bytes(data)
    evict_file(src)
    return src, data


def _new_dest(path: Any) -> Any:
    path.write_bytes(b"")
    os.truncate(path, SIZE)  # sparse: nothing of it is cached
    return path


@pytest.mark.parametrize("write_behind", [True, False], ids=["on", "off"])
def test_uncached_destination_is_written_behind(tmp_path, syncs, write_behind):
    src, data = _source(tmp_path)
    dst = _new_dest(tmp_path / "dst.img")
    assert cached(dst) == 0
    job, rec = _copy(src, [dst, NullEndpoint(SIZE)], write_behind=write_behind)
    assert rec.calls == [(False, 0, "c")] and job.ok
    if write_behind:
        # every byte handed to writeback once; waited for and dropped until at most the window
        # is behind (less by under one write: a write joins at most the pool's 4 MiB of pieces)
        started = sorted((o, n) for o, n, f in syncs if f == wb.SYNC_FILE_RANGE_WRITE)
        assert sum(n for _, n in started) == SIZE and started[0][0] == 0
        waited = sum(n for _, n, f in syncs if f & wb.SYNC_FILE_RANGE_WAIT_AFTER)
        assert SIZE - WINDOW <= waited < SIZE - WINDOW + 4 * MiB
        left = cached(dst)
        assert left <= WINDOW, f"{left} bytes of the destination still cached"
    else:
        assert syncs == []
    assert dst.read_bytes() == data


def test_cached_destination_keeps_its_pages(tmp_path, syncs):
    src, data = _source(tmp_path)
    dst = tmp_path / "dst.img"
    dst.write_bytes(bytes(SIZE))  # written just now: every page is in the cache
    assert cached(dst) > 0
    job, _ = _copy(src, [dst, NullEndpoint(SIZE)], write_behind=True)
    assert job.ok
    assert syncs == [], "a cached destination is neither written back early nor dropped"
    assert dst.read_bytes() == data


@pytest.mark.parametrize("flags", [0, kcopyd.IGNORE_ERROR], ids=["stop", "ignore-error"])
def test_writeback_error_fails_exactly_that_destination(tmp_path, monkeypatch, syncs, flags):
    """The wait reports a writeback error of destination 1: bit 1 only. Without IGNORE_ERROR the
    job stops handing out pieces (as after any write error); with it 0 and 2 are copied whole."""
    src, data = _source(tmp_path)
    dests = [_new_dest(tmp_path / f"d{i}.img") for i in range(3)]
    bad_fd = []
    real = wb.sync_range  # the recording one

    def failing(fd: int, offset: int, length: int, flags: int) -> None:
        if flags & wb.SYNC_FILE_RANGE_WAIT_AFTER and os.path.samefile(f"/proc/self/fd/{fd}", dests[1]):
            bad_fd.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd, offset, length, flags)

    monkeypatch.setattr(wb, "sync_range", failing)
    job, rec = _copy(src, dests, flags, write_behind=True)
    assert len(bad_fd) == 1, "the failed destination's write-behind stopped at its first error"
    assert rec.calls == [(False, 0b010, "c")]
    assert job.failed_dests == [1]
    if flags:
        assert dests[0].read_bytes() == data and dests[2].read_bytes() == data
    else:
        assert job.progress.done < SIZE, "the job stopped after the error"


def test_pieces_are_handed_to_writeback_in_chunk_steps(tmp_path, monkeypatch, syncs):
    """Each ``CHUNK`` written goes to writeback at once, not once its piece (or the batch of waiting
    pieces joined to it) is all written: every range started is one chunk, in order."""
    monkeypatch.setattr(wb, "CHUNK", 256 << 10)
    src, data = _source(tmp_path)
    dst = _new_dest(tmp_path / "dst.img")
    job, rec = _copy(src, [dst, NullEndpoint(SIZE)], write_behind=True)  # two: no copy_file_range
    assert rec.calls == [(False, 0, "c")] and job.ok
    started = sorted((o, n) for o, n, f in syncs if f == wb.SYNC_FILE_RANGE_WRITE)
    assert started == [(o, 256 << 10) for o in range(0, SIZE, 256 << 10)]
    assert dst.read_bytes() == data


def test_failed_chunk_write_is_redone_piece_by_piece(tmp_path, monkeypatch, syncs):
    """A write that fails in the middle of a piece fails that piece only (IGNORE_ERROR: the job goes
    on): the destination's bit is set, and every other piece is written and handed to writeback."""
    import kcopyd.client

    real = kcopyd.client.write_exact
    bad = 5 * MiB + (512 << 10)  # inside the sixth 1 MiB piece

    def failing(ep, views, offset):
        if ep.name.endswith("dst.img") and offset <= bad < offset + sum(len(v) for v in views):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(ep, views, offset)

    monkeypatch.setattr(kcopyd.client, "write_exact", failing)
    src, data = _source(tmp_path)
    dst = _new_dest(tmp_path / "dst.img")
    job, rec = _copy(src, [dst, NullEndpoint(SIZE)], kcopyd.IGNORE_ERROR, write_behind=True)
    assert rec.calls == [(False, 0b1, "c")]
    got = dst.read_bytes()
    assert got[: 5 * MiB] == data[: 5 * MiB] and got[6 * MiB :] == data[6 * MiB :]
    started = {(o, n) for o, n, f in syncs if f == wb.SYNC_FILE_RANGE_WRITE}
    assert not any(o <= bad < o + n for o, n in started), "the failed piece was not handed over"
    assert sum(n for _, n in started) >= SIZE - 4 * MiB - MiB, "the rest was"
