"""Offline resync on file legs: one kcopyd job at a time (the next one started from the finished
one's callback), copied ranges handed to writeback early, the log's order kept, errors raised."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

import kcopyd
import kcopyd.writebehind
from dmtools.blockdev import BlockDevice
from dmtools.errors import InvalidArgument
from mirror.format import LogImage, format_log
from mirror.resync import OfflineResync

REGION = 128  # 64 KiB regions
SIZE = 4 << 20
JOB = 512 << 10  # 8 regions per kcopyd job: 8 jobs


@pytest.fixture
def legs(tmp_path: Path) -> Iterator[list[BlockDevice]]:
    (tmp_path / "leg0").write_bytes(random.Random(5).randbytes(SIZE))
    (tmp_path / "leg1").write_bytes(b"")
    os.truncate(tmp_path / "leg1", SIZE)
    (tmp_path / "log").write_bytes(bytes(8192))
    eps = [BlockDevice(tmp_path / name, writable=True) for name in ("leg0", "leg1", "log")]
    yield eps
    for ep in eps:
        ep.close()


class _Spy:
    """Jobs in flight on the resync's kcopyd client, and the ranges handed to writeback."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = 0
        self.most = 0
        self.jobs = 0
        self.submitters: set[str] = set()
        self.writeback: list[tuple[int, int, int]] = []
        self.fail_at: int | None = None
        self._lock = threading.Lock()
        real_copy = kcopyd.Client.copy
        real_sync = kcopyd.writebehind.sync_range
        spy = self

        def copy(client: Any, src: Any, dests: Any, flags: int = 0, notify: Any = None, context: Any = None,
                 **kw: Any) -> Any:
            with spy._lock:
                spy.jobs += 1
                if spy.fail_at == spy.jobs:
                    raise InvalidArgument("refused by the test", operation="copy")
                spy.active += 1
                spy.most = max(spy.most, spy.active)
                spy.submitters.add(threading.current_thread().name)

            def done(read_err: bool, write_err: int, ctx: Any) -> None:
                with spy._lock:
                    spy.active -= 1
                notify(read_err, write_err, ctx)

            return real_copy(client, src, dests, flags, done, context, **kw)

        def sync_range(fd: int, offset: int, length: int, flags: int) -> None:
            spy.writeback.append((fd, offset, length))
            real_sync(fd, offset, length, flags)

        monkeypatch.setattr(kcopyd.Client, "copy", copy)
        monkeypatch.setattr(kcopyd.writebehind, "sync_range", sync_range)


def test_file_legs_get_one_job_at_a_time_chained_from_the_callback(legs: list[BlockDevice],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch)
    src, dst, log = legs
    format_log(log, SIZE // (REGION * 512), in_sync=False)
    res = OfflineResync([src, dst], log, region_size=REGION, job_bytes=JOB).run()
    assert res.ok and res.bytes_copied == SIZE
    assert spy.jobs == SIZE // JOB
    assert spy.most == 1
    assert "kcopyd-cb" in spy.submitters  # jobs after the first start from the callback
    with open(src.path, "rb") as a, open(dst.path, "rb") as b:
        assert a.read() == b.read()
    assert LogImage.read(log).out_of_sync() == []


def test_an_in_flight_given_by_the_caller_keeps_several_jobs(legs: list[BlockDevice],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch)
    src, dst, _ = legs
    rs = OfflineResync([src, dst], None, region_size=REGION, job_bytes=JOB, in_flight=4 * JOB // (REGION * 512))
    assert rs._jobs_in_flight() == 4
    assert rs.run().ok
    assert spy.jobs == SIZE // JOB
    with open(src.path, "rb") as a, open(dst.path, "rb") as b:
        assert a.read() == b.read()


def test_every_copied_range_of_the_destination_goes_to_writeback(legs: list[BlockDevice],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch)
    src, dst, log = legs
    format_log(log, SIZE // (REGION * 512), in_sync=False)
    assert OfflineResync([src, dst], log, region_size=REGION, job_bytes=JOB).run().ok
    assert sorted(spy.writeback) == [(dst.fileno(), off, JOB) for off in range(0, SIZE, JOB)]


def test_the_clean_bits_follow_the_flush_of_the_legs(legs: list[BlockDevice], monkeypatch: pytest.MonkeyPatch) -> None:
    """Writeback started early is no flush: the log's clean bits are written after the legs'
    flush, as before (dirty mark, copy, flush, clean)."""
    src, dst, log = legs
    format_log(log, SIZE // (REGION * 512), in_sync=False)
    events: list[str] = []
    real_flush, real_write = BlockDevice.flush, BlockDevice.write

    def flush(self: BlockDevice) -> None:
        events.append(f"flush {self.name}")
        real_flush(self)

    def write(self: BlockDevice, buf: Any, offset: int) -> int:
        if self is log:
            events.append("log write")
        return real_write(self, buf, offset)

    monkeypatch.setattr(BlockDevice, "flush", flush)
    monkeypatch.setattr(BlockDevice, "write", write)
    assert OfflineResync([src, dst], log, region_size=REGION, job_bytes=JOB).run().ok
    assert "log write" in events
    since = 0
    for i, e in enumerate(events):
        if e == "log write":
            assert f"flush {dst.name}" in events[since:i]  # this commit's clean bits follow a flush
            since = i + 1


def test_a_job_refused_in_the_callback_is_raised(legs: list[BlockDevice], monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch)
    spy.fail_at = 3
    src, dst, log = legs
    format_log(log, SIZE // (REGION * 512), in_sync=False)
    with pytest.raises(InvalidArgument, match="refused by the test"):
        OfflineResync([src, dst], log, region_size=REGION, job_bytes=JOB).run()
    assert spy.active == 0
    # the regions that were copied may be clean; the rest stay out of sync for the next run
    assert LogImage.read(log).out_of_sync()
