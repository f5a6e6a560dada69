"""An export copied to an uncached file is written with O_DIRECT (kcopyd.directwrite).

Streamed pieces land in the pool's aligned pages and go to the file from there, not through the
page cache: no page of the destination is left cached. What is not aligned (a destination offset,
a job's tail) and a destination someone has cached go through the page cache as before; a direct
write the file system refuses is redone through it; any other error of a direct write is exactly
that destination's ``write_err`` bit.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any, Callable

import pytest

import kcopyd
import kcopyd.directwrite as dw
from dmtools.nbd import NbdEndpoint
from dmtools.testing.nbdserver import NbdServer
from kcopyd.fastpath import cached_bytes

MiB = 1 << 20
S = 512
SIZE = 24 * MiB


@pytest.fixture(autouse=True)
def _direct_io(tmp_path: Path) -> None:
    """Skip where the test directory's file system refuses O_DIRECT (copies there stay buffered)."""
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError as err:
        pytest.skip(f"O_DIRECT is refused here: {err.strerror}")


@pytest.fixture
def direct_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """Every direct write that reached the file: (file, offset, bytes)."""
    calls: list[tuple[str, int, int]] = []
    real = dw.DirectWriter.write

    def recording(self: dw.DirectWriter, views: Any, offset: int) -> None:
        real(self, views, offset)
        calls.append((os.readlink(f"/proc/self/fd/{self.fd}"), offset, sum(len(v) for v in views)))

    monkeypatch.setattr(dw.DirectWriter, "write", recording)
    return calls


def cached(path: Path) -> int:
    """Bytes of the file in the page cache (skips where cachestat(2) cannot tell)."""
    with open(path, "rb") as f:
        n = cached_bytes(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    if n is None:
        pytest.skip("cachestat(2) is missing here (Linux < 6.5)")
    return n


def _export(start_nbdkit: Callable[..., NbdServer], data: bytes) -> str:
    srv = start_nbdkit(["memory", str(len(data))])
    with NbdEndpoint(srv.uri, writable=True) as ep:
        ep.write(data, 0)
    return srv.uri


def _new_file(path: Path, size: int) -> Path:
    path.write_bytes(b"")
    os.truncate(path, size)  # sparse: nothing of it is cached
    return path


def _copy(uri: str, dests: list[tuple[Path, int]], nsectors: int, flags: int = 0) -> kcopyd.Job:
    with kcopyd.Client(num_pages=4096, threads=4, write_behind=True) as kc:
        job = kc.copy(kcopyd.Region(uri, 0, nsectors), [kcopyd.Region(str(p), sec, nsectors) for p, sec in dests],
                      flags=flags)
        assert job.wait(60)
    return job


def test_uncached_destination_is_written_direct(tmp_path: Path, start_nbdkit: Callable[..., NbdServer],
                                                direct_writes: list[tuple[str, int, int]]) -> None:
    data = os.urandom(SIZE)
    uri = _export(start_nbdkit, data)
    dst = _new_file(tmp_path / "dst.img", SIZE)
    job = _copy(uri, [(dst, 0)], SIZE // S)
    assert job.ok and job.plan.stream
    assert sorted((off, n) for _, off, n in direct_writes) == [(off, 4 * MiB) for off in range(0, SIZE, 4 * MiB)]
    left = cached(dst)
    assert left < SIZE // 2, f"{left} bytes of the destination are cached: it went through the page cache"
    assert dst.read_bytes() == data


def test_holes_of_the_export_are_zeroed_not_written(tmp_path: Path, start_nbdkit: Callable[..., NbdServer],
                                                    direct_writes: list[tuple[str, int, int]]) -> None:
    """An export with data at 1-3 MiB and 12-16 MiB, holes elsewhere, copied over an uncached
    file of 0xaa: only the data goes direct; the holes read as zeros."""
    srv = start_nbdkit(["memory", str(SIZE)])
    one, two = os.urandom(2 * MiB), os.urandom(4 * MiB)
    with NbdEndpoint(srv.uri, writable=True) as ep:
        ep.write(one, 1 * MiB)
        ep.write(two, 12 * MiB)
    dst = tmp_path / "dst.img"
    dst.write_bytes(b"\xaa" * SIZE)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if cached(dst):
        pytest.skip("the destination's pages could not be dropped from the cache")
    job = _copy(srv.uri, [(dst, 0)], SIZE // S)
    assert job.ok
    assert sorted((off, n) for _, off, n in direct_writes) == [(1 * MiB, 2 * MiB), (12 * MiB, 4 * MiB)]
    expect = bytearray(SIZE)
    expect[1 * MiB : 3 * MiB] = one
    expect[12 * MiB : 16 * MiB] = two
    assert dst.read_bytes() == expect


def test_cached_destination_is_written_through_its_pages(tmp_path: Path, start_nbdkit: Callable[..., NbdServer],
                                                         direct_writes: list[tuple[str, int, int]]) -> None:
    data = os.urandom(SIZE)
    uri = _export(start_nbdkit, data)
    dst = tmp_path / "dst.img"
    dst.write_bytes(bytes(SIZE))  # written just now: its pages are in the cache
    job = _copy(uri, [(dst, 0)], SIZE // S)
    assert job.ok
    assert direct_writes == []
    assert cached(dst) > SIZE // 2
    assert dst.read_bytes() == data


def test_unaligned_parts_go_through_the_cache(tmp_path: Path, start_nbdkit: Callable[..., NbdServer],
                                              direct_writes: list[tuple[str, int, int]]) -> None:
    """A job of 8 MiB and 3 sectors: its two whole 4 MiB pieces go direct, the tail through the
    cache; at a destination offset of one sector nothing is aligned: nothing goes direct."""
    n = 8 * MiB + 3 * S
    data = os.urandom(n)
    uri = _export(start_nbdkit, data)
    a = _new_file(tmp_path / "a.img", n)
    b = _new_file(tmp_path / "b.img", n + S)
    job = _copy(uri, [(a, 0)], n // S)
    assert job.ok
    assert sorted((off, size) for _, off, size in direct_writes) == [(0, 4 * MiB), (4 * MiB, 4 * MiB)]
    assert a.read_bytes() == data
    direct_writes.clear()
    job = _copy(uri, [(b, 1)], n // S)
    assert job.ok
    assert direct_writes == []
    assert b.read_bytes() == bytes(S) + data


def test_refused_direct_write_is_redone_through_the_cache(tmp_path: Path, start_nbdkit: Callable[..., NbdServer],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The file system refuses the first direct write (EINVAL): it and every later write go
    through the page cache, and the copy succeeds."""
    data = os.urandom(SIZE)
    uri = _export(start_nbdkit, data)
    dst = _new_file(tmp_path / "dst.img", SIZE)
    tries: list[int] = []

    def refusing(self: dw.DirectWriter, views: Any, offset: int) -> None:
        tries.append(offset)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(dw.DirectWriter, "write", refusing)
    job = _copy(uri, [(dst, 0)], SIZE // S)
    assert job.ok
    # writes on other workers may have been tried before the first refusal came back
    assert 1 <= len(tries) <= 4
    assert dst.read_bytes() == data


@pytest.mark.parametrize("flags", [0, kcopyd.IGNORE_ERROR], ids=["stop", "ignore-error"])
def test_direct_write_error_fails_exactly_that_destination(tmp_path: Path, start_nbdkit: Callable[..., NbdServer],
                                                           monkeypatch: pytest.MonkeyPatch, flags: int) -> None:
    """Direct writes to destination 1 fail with EIO: write_err is exactly 0b10; with
    IGNORE_ERROR destinations 0 and 2 are copied whole, without it the job stops."""
    data = os.urandom(SIZE)
    uri = _export(start_nbdkit, data)
    dests = [_new_file(tmp_path / f"d{i}.img", SIZE) for i in range(3)]
    real = dw.DirectWriter.write
    failed: list[int] = []

    def failing(self: dw.DirectWriter, views: Any, offset: int) -> None:
        if os.path.samefile(f"/proc/self/fd/{self.fd}", dests[1]):
            failed.append(offset)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(self, views, offset)

    monkeypatch.setattr(dw.DirectWriter, "write", failing)
    job = _copy(uri, [(d, 0) for d in dests], SIZE // S, flags)
    assert failed
    assert (job.read_err, job.write_err) == (False, 0b010)
    if flags:
        assert dests[0].read_bytes() == data and dests[2].read_bytes() == data
    else:
        assert job.progress.done < SIZE, "the job stopped after the error"
