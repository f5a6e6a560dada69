"""A partial write to a shared block on a data file the engine opened: the old block read once
(``O_DIRECT`` where the file takes it), the write's bytes put in, one write of the new block
(``ThinTarget._break_sharing``); anything else goes kcopyd's way."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from dmtools.engine.backing import BackingDevice
from dmtools.errors import DMError
from target_rig import BB, PoolRig, file_bytes, read


def _bytes(seed: int, n: int) -> bytes:
    """``n`` bytes that differ from one 512-byte sector to the next (a misplaced piece shows)."""
    return b"".join(bytes([(seed * 31 + i) % 251 + 1]) * 512 for i in range(n // 512))


def _record_reads(monkeypatch: pytest.MonkeyPatch, fail: dict[int, OSError] | None = None) -> list[tuple[int, int, int]]:
    """``(fd, length, offset)`` of every ``os.preadv`` from now on; one at an offset in ``fail``
    raises that error."""
    calls: list[tuple[int, int, int]] = []
    real = os.preadv

    def preadv(fd: int, buffers: Any, offset: int, *rest: Any) -> int:
        calls.append((fd, sum(len(memoryview(b)) for b in buffers), offset))
        if fail and offset in fail:
            raise fail[offset]
        return real(fd, buffers, offset, *rest)

    monkeypatch.setattr(os, "preadv", preadv)
    return calls


def _record_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """``(offset, length)`` of every ``os.pwrite`` from now on."""
    calls: list[tuple[int, int]] = []
    real = os.pwrite

    def pwrite(fd: int, buf: Any, offset: int) -> int:
        calls.append((offset, len(memoryview(buf))))
        return real(fd, buf, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return calls


def _kcopyd_jobs(pool: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The source of every job the pool's kcopyd client runs from now on."""
    jobs: list[Any] = []
    real = pool.kc.run

    def run(src: Any, dests: Any, *a: Any, **k: Any) -> Any:
        jobs.append(src)
        return real(src, dests, *a, **k)

    monkeypatch.setattr(pool.kc, "run", run)
    return jobs


def _shared(rig: PoolRig) -> tuple[Any, Any, bytes]:
    """Thin device 1 with two written blocks, snapshot 2 of it: (origin, snapshot, their bytes)."""
    t = rig.thin(1, "origin")
    old = _bytes(1, 2 * BB)
    t.write(old, 0)
    rig.snapshot(2, 1, "origin")
    return t, rig.thin(2, "snap", create=False), old


def _backing(pool: Any) -> BackingDevice:
    data = pool.data.inner
    assert isinstance(data, BackingDevice)
    return data


def test_a_partial_write_is_one_read_of_the_old_block_and_one_write(rig: PoolRig,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    t, s, old = _shared(rig)
    pool = rig.in_core()
    shared = pool.md.find(1, 1)[0]
    direct = _backing(pool).direct_fileno()
    reads, writes, jobs = _record_reads(monkeypatch), _record_writes(monkeypatch), _kcopyd_jobs(pool, monkeypatch)
    piece = _bytes(9, 4096)
    t.write(piece, BB + 3 * 4096)
    new = pool.md.find(1, 1)[0]
    assert new != shared
    # the old block read once, bypassing the page cache where the file system allows it
    fd = direct[0] if direct is not None else _backing(pool).fileno()
    assert [r for r in reads if r[2] == shared * BB] == [(fd, BB, shared * BB)]
    assert [w for w in writes if w[0] // BB == new] == [(new * BB, BB)]
    assert jobs == []
    expect = old[BB:BB + 3 * 4096] + piece + old[BB + 4 * 4096:2 * BB]
    assert file_bytes(rig.data, new * BB, BB) == expect
    assert read(t, BB, BB) == expect
    assert read(s, 0, 2 * BB) == old
    assert rig.status().used_data == 3


def test_the_read_sees_pages_not_yet_written_back(rig: PoolRig) -> None:
    """A direct read of a block whose pages are dirty in the page cache reads them (the kernel
    writes them back first), as the buffered descriptor would."""
    t, _s, _old = _shared(rig)
    shared = rig.in_core().md.find(1, 0)[0]
    behind = _bytes(5, BB)
    with open(rig.data, "r+b") as f:  # the shared block changed in the page cache only
        f.seek(shared * BB)
        f.write(behind)
    t.write(_bytes(6, 512), 1024)
    assert read(t, 0, BB) == behind[:1024] + _bytes(6, 512) + behind[1536:]


def test_a_failed_read_of_the_old_block_fails_the_write_and_frees_the_new_block(
        rig: PoolRig, monkeypatch: pytest.MonkeyPatch) -> None:
    t, s, old = _shared(rig)
    pool = rig.in_core()
    shared = pool.md.find(1, 0)[0]
    used = rig.status().used_data
    reads = _record_reads(monkeypatch, {shared * BB: OSError(errno.EIO, "I/O error")})
    with pytest.raises(DMError) as err:
        t.write(_bytes(7, 4096), 4096)
    assert err.value.errno == errno.EIO
    # tried directly, then through the data device's own read, which reports the error
    assert len([r for r in reads if r[2] == shared * BB]) == 2
    monkeypatch.undo()
    assert pool.md.find(1, 0) == (shared, True)
    assert rig.status().used_data == used
    assert pool.prison.held() == 0 and not pool.prison._count
    assert read(t, 0, 2 * BB) == old and read(s, 0, 2 * BB) == old
    t.write(_bytes(8, 4096), 4096)  # the device writes on
    assert read(t, 0, BB) == old[:4096] + _bytes(8, 4096) + old[2 * 4096:BB]


def test_a_probe_on_the_data_device_sees_the_read_and_the_write(rig: PoolRig, monkeypatch: pytest.MonkeyPatch) -> None:
    t, _s, old = _shared(rig)
    pool = rig.in_core()
    data = pool.data
    seen: list[tuple[str, int, int]] = []
    readinto, write = data.readinto, data.write

    def probe_read(buf: Any, offset: int) -> int:
        seen.append(("read", offset, len(memoryview(buf))))
        return int(readinto(buf, offset))

    def probe_write(buf: Any, offset: int) -> int:
        seen.append(("write", offset, len(memoryview(buf))))
        return int(write(buf, offset))

    monkeypatch.setattr(data, "readinto", probe_read)
    monkeypatch.setattr(data, "write", probe_write)
    shared = pool.md.find(1, 0)[0]
    t.write(_bytes(3, 512), 512)
    new = pool.md.find(1, 0)[0]
    assert ("read", shared * BB, BB) in seen and ("write", new * BB, BB) in seen
    assert read(t, 0, BB) == old[:512] + _bytes(3, 512) + old[1024:BB]


def test_a_throttled_copy_goes_through_kcopyd(rig: PoolRig, monkeypatch: pytest.MonkeyPatch) -> None:
    t, s, old = _shared(rig)
    pool = rig.in_core()
    jobs = _kcopyd_jobs(pool, monkeypatch)
    pool.kc.throttle.percent = 50
    t.write(_bytes(4, 4096), 0)
    assert len(jobs) == 1 and jobs[0] is not None
    assert read(t, 0, BB) == _bytes(4, 4096) + old[4096:BB]
    assert read(s, 0, BB) == old[:BB]


def test_blocks_above_one_sub_job_go_through_kcopyd(engine: Any, tmp_path: Path, thin_tools: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    big = 4096  # sectors: 2 MiB blocks, more than kcopyd runs on the caller's thread
    rig = PoolRig(engine, tmp_path, data_blocks=8, block=big)
    bb = big * 512
    t = rig.thin(1, "origin", blocks=2)
    old = _bytes(2, bb)
    t.write(old, 0)
    rig.snapshot(2, 1, "origin")
    s = rig.thin(2, "snap", blocks=2, create=False)
    jobs = _kcopyd_jobs(rig.in_core(), monkeypatch)
    t.write(_bytes(5, 4096), 8192)
    assert len(jobs) == 1 and jobs[0] is not None
    assert read(t, 0, bb) == old[:8192] + _bytes(5, 4096) + old[8192 + 4096:]
    assert read(s, 0, bb) == old
    rig.close()
    thin_tools.check(rig.meta)


def test_copy_buffers_are_aligned_and_never_shared_while_taken() -> None:
    from dmtools.blockdev import buffer_address
    from thin.targets.thin import _give_buffer, _take_buffer

    n = 3 * BB  # a size no other test takes: a fresh queue
    taken = [_take_buffer(n) for _ in range(40)]  # more than one 2 MiB buffer holds
    spans = sorted((buffer_address(b), buffer_address(b) + len(b)) for b in taken)
    assert all(len(b) == n for b in taken)
    assert all(a % 4096 == 0 for a, _ in spans)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))  # no two overlap
    _give_buffer(taken[7])
    assert buffer_address(_take_buffer(n)) == buffer_address(taken[7])  # given back, taken again
