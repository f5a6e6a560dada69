"""``BackingDevice.write``: large aligned writes go out with ``O_DIRECT`` from the caller's buffer
when its address is aligned, through a bounce buffer when it is not, and buffered otherwise; the
data on disk is the caller's in every case."""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from dmtools.blockdev import aligned_buffer, buffer_address
from dmtools.engine import backing
from dmtools.engine.backing import DIRECT_MIN, BackingDevice

MiB = 1 << 20


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[BackingDevice]:
    path = tmp_path / "backing.img"
    path.write_bytes(b"")
    os.truncate(path, 4 * MiB)
    d = BackingDevice(str(path), writable=True)
    assert d.direct_fileno() is not None, "the test file system must support O_DIRECT"
    yield d
    d.close()


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the bounce copies ``write`` makes (the copy itself still runs)."""
    seen: list[int] = []
    real = backing._copy

    def counting(dst: mmap.mmap, src: memoryview, n: int) -> None:
        seen.append(n)
        real(dst, src, n)

    monkeypatch.setattr(backing, "_copy", counting)
    return seen


@pytest.fixture
def direct_writes(monkeypatch: pytest.MonkeyPatch, dev: BackingDevice) -> list[tuple[int, int]]:
    """``(address, length)`` of every request sent to the ``O_DIRECT`` descriptor."""
    seen: list[tuple[int, int]] = []
    direct_fd = dev.direct_fileno()
    assert direct_fd is not None
    real = os.pwritev

    def recording(fd: int, bufs: Any, offset: int, *rest: Any) -> int:
        if fd == direct_fd[0]:
            for b in bufs:
                mv = memoryview(b).cast("B")
                seen.append((buffer_address(mv), len(mv)))
        return real(fd, bufs, offset, *rest)

    monkeypatch.setattr(os, "pwritev", recording)
    return seen


def _on_disk(dev: BackingDevice, offset: int, length: int) -> bytes:
    with open(dev.path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


def test_an_aligned_buffer_goes_to_the_disk_without_a_copy(dev: BackingDevice, copies: list[int],
                                                            direct_writes: list[tuple[int, int]]) -> None:
    buf = aligned_buffer(MiB, huge=True)
    data = _pattern(MiB, 1)
    buf[:MiB] = data
    view = memoryview(buf)[:MiB]
    assert dev.write(view, MiB) == MiB
    assert copies == []
    assert direct_writes == [(buffer_address(view), MiB)]
    assert _on_disk(dev, MiB, MiB) == data


def test_a_read_only_aligned_buffer_goes_without_a_copy(dev: BackingDevice, tmp_path: Path, copies: list[int],
                                                        direct_writes: list[tuple[int, int]]) -> None:
    src = tmp_path / "src"
    data = _pattern(DIRECT_MIN, 2)
    src.write_bytes(data)
    with open(src, "rb") as f, mmap.mmap(f.fileno(), DIRECT_MIN, prot=mmap.PROT_READ) as m:
        view = memoryview(m)
        assert view.readonly
        assert dev.write(view, 0) == DIRECT_MIN
        address = buffer_address(view)
        view.release()
    assert copies == []
    assert direct_writes == [(address, DIRECT_MIN)]
    assert _on_disk(dev, 0, DIRECT_MIN) == data


@pytest.mark.parametrize("readonly", [False, True])
def test_a_misaligned_buffer_is_copied_to_an_aligned_one(dev: BackingDevice, copies: list[int],
                                                         direct_writes: list[tuple[int, int]], readonly: bool) -> None:
    data = _pattern(MiB, 3)
    holder = bytearray(MiB + 8)
    holder[8:] = data
    view = memoryview(holder)[8:]
    if readonly:
        view = view.toreadonly()
    assert buffer_address(view) % dev.logical_block_size
    assert dev.write(view, 2 * MiB) == MiB
    assert copies == [MiB]
    assert len(direct_writes) == 1
    address, length = direct_writes[0]
    assert length == MiB and address % dev.logical_block_size == 0 and address != buffer_address(view)
    assert _on_disk(dev, 2 * MiB, MiB) == data


@pytest.mark.parametrize("size, offset", [(DIRECT_MIN - 4096, 0), (DIRECT_MIN + 100, 0), (DIRECT_MIN, 100)],
                         ids=["below DIRECT_MIN", "length unaligned", "offset unaligned"])
def test_small_or_unaligned_requests_stay_buffered(dev: BackingDevice, copies: list[int],
                                                   direct_writes: list[tuple[int, int]], size: int, offset: int) -> None:
    buf = aligned_buffer(size)
    data = bytes((i * 13) & 0xFF for i in range(size))
    buf[:size] = data
    assert dev.write(memoryview(buf)[:size], offset) == size
    assert copies == [] and direct_writes == []
    assert _on_disk(dev, offset, size) == data


def test_short_direct_writes_are_completed(dev: BackingDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may take part of a request; the rest follows from where it stopped."""
    real = os.pwritev
    calls: list[int] = []

    def short(fd: int, bufs: Any, offset: int, *rest: Any) -> int:
        mv = memoryview(bufs[0]).cast("B")
        calls.append(len(mv))
        return real(fd, [mv[:DIRECT_MIN // 2]], offset, *rest)

    monkeypatch.setattr(os, "pwritev", short)
    buf = aligned_buffer(MiB)
    data = _pattern(MiB, 4)
    buf[:MiB] = data
    assert dev.write(memoryview(buf)[:MiB], 0) == MiB
    assert len(calls) == MiB // (DIRECT_MIN // 2)
    assert _on_disk(dev, 0, MiB) == data


def test_a_direct_write_past_the_end_grows_the_file(dev: BackingDevice) -> None:
    buf = aligned_buffer(MiB)
    data = _pattern(MiB, 5)
    buf[:MiB] = data
    assert dev.write(memoryview(buf)[:MiB], 4 * MiB) == MiB
    assert os.path.getsize(dev.path) == 5 * MiB
    assert _on_disk(dev, 4 * MiB, MiB) == data


def test_a_file_system_without_o_direct_writes_buffered(tmp_path: Path, copies: list[int]) -> None:
    path = tmp_path / "plain.img"
    path.write_bytes(bytes(MiB))
    dev = BackingDevice(str(path), writable=True)
    try:
        assert dev._direct is not None
        dev._direct.close()
        dev._direct = None  # as when opening with O_DIRECT failed
        buf = aligned_buffer(MiB)
        data = _pattern(MiB, 6)
        buf[:MiB] = data
        assert dev.write(memoryview(buf)[:MiB], 0) == MiB
        assert copies == []
        assert _on_disk(dev, 0, MiB) == data
    finally:
        dev.close()


def test_direct_fileno_passes_only_plain_forwarding(dev: BackingDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``O_DIRECT`` twin is offered through forwarding handles, and never past a wrapper's own
    I/O (a subclass's or a probe's on the instance), as ``plain_fd`` is."""
    from dmtools.endpoint import ForwardingEndpoint
    from dmtools.testing.faults import FaultyEndpoint, WrappedEndpoint

    twin = dev.direct_fileno()
    assert twin is not None and twin[0] not in (dev.fileno(), -1) and twin[1] in (512, 1024, 2048, 4096)
    assert ForwardingEndpoint(ForwardingEndpoint(dev)).direct_fileno() == twin

    class Counting(ForwardingEndpoint):
        def readinto(self, buf: Any, offset: int) -> int:
            return self.inner.readinto(buf, offset)

    assert Counting(dev).direct_fileno() is None
    assert WrappedEndpoint(dev).direct_fileno() is None and FaultyEndpoint(dev).direct_fileno() is None
    probed = ForwardingEndpoint(dev)
    monkeypatch.setattr(probed, "readinto", dev.readinto)
    assert probed.direct_fileno() is None
    ro = BackingDevice(dev.path, writable=False)
    try:
        assert ro.direct_fileno() is None  # no twin for a read-only table: buffered reads
    finally:
        ro.close()
