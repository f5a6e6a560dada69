"""Unit tier: the exposure's read replies (``dmtools.engine.fuse_io``) on in-process devices.

``read_buf`` is called as libfuse calls it, with a ``struct fuse_bufvec **``; the reply is read
back from the pipe or buffer it names. No FUSE mount is needed: the root tier drives the same code
through a loop device (``test_expose_reads_root.py``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from pathlib import Path
from typing import Iterator

import pytest

from dmtools.engine import Engine
from dmtools.engine import fuse_io
from dmtools.engine.basic_targets import LinearTarget, StripedTarget
from dmtools.engine.device import Device
from dmtools.errors import DeviceIOError
from dmtools.testing.trip import TripTarget

MiB = 1 << 20


@pytest.fixture
def eng() -> Iterator[Engine]:
    engine = Engine()
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def pipes() -> Iterator[fuse_io.ReadPipes]:
    p = fuse_io.ReadPipes()
    try:
        yield p
    finally:
        p.close()


def _image(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _device(eng: Engine, name: str) -> Device:
    info = eng.info(name)
    dev = eng.device_by_devno(info.major, info.minor)
    assert dev is not None
    return dev


def _drain(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        assert chunk, "the pipe holds less than the reply says"
        out += chunk
    return out


def _read(dev: Device, pipes: fuse_io.ReadPipes, size: int, offset: int) -> tuple[str, bytes]:
    """``read_buf`` as libfuse calls it; returns ("pipe" | "buffer", the reply's bytes) and frees
    what libfuse would free."""
    out = ctypes.c_void_p()
    assert fuse_io.read_buf(dev, pipes, ctypes.pointer(out), size, offset) == 0
    assert out.value
    bufv = fuse_io.FuseBufvec.from_address(out.value)
    assert (bufv.count, bufv.idx, bufv.off) == (1, 0, 0)
    buf = bufv.buf[0]
    try:
        if buf.flags & fuse_io.FUSE_BUF_IS_FD:
            return "pipe", _drain(buf.fd, buf.size)
        return "buffer", ctypes.string_at(buf.mem, buf.size)
    finally:
        if not buf.flags & fuse_io.FUSE_BUF_IS_FD:
            fuse_io._free(buf.mem)
        fuse_io._free(out.value)


def _no_buffer_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: object, buf: memoryview, offset: int) -> None:
        raise AssertionError("read through a Python buffer")

    monkeypatch.setattr(LinearTarget, "read", refuse)
    monkeypatch.setattr(StripedTarget, "read", refuse)


def test_linear_reads_are_spliced_into_the_pipe(eng, pipes, tmp_path, monkeypatch):
    data = os.urandom(4 * MiB)
    img = _image(tmp_path / "a.img", data)
    eng.create("lin-dmtt", f"0 4096 linear {img} 2048")  # starts 1 MiB into the file
    dev = _device(eng, "lin-dmtt")
    _no_buffer_reads(monkeypatch)
    for size, offset in ((512 << 10, 0), (8192, 12288), (MiB, MiB), (9728, 1024)):
        assert _read(dev, pipes, size, offset) == ("pipe", data[MiB + offset : MiB + offset + size])
    monkeypatch.undo()
    # Under two pages libfuse would copy the pipe into memory: those are read into a buffer.
    assert _read(dev, pipes, 4096, 512) == ("buffer", data[MiB + 512 : MiB + 4608])


def test_striped_reads_cross_chunks_and_stripes(eng, pipes, tmp_path, monkeypatch):
    a, b = os.urandom(2 * MiB), os.urandom(2 * MiB)
    ia, ib = _image(tmp_path / "a.img", a), _image(tmp_path / "b.img", b)
    eng.create("str-dmtt", f"0 8192 striped 2 16 {ia} 0 {ib} 0")  # 8 KiB chunks
    dev = _device(eng, "str-dmtt")
    chunk = 8192
    logical = b"".join(
        (a if c % 2 == 0 else b)[(c // 2) * chunk : (c // 2 + 1) * chunk] for c in range(4 * MiB // chunk)
    )
    _no_buffer_reads(monkeypatch)
    for size, offset in ((512 << 10, 4096), (MiB, 3 * MiB), (12288, 2048)):  # all >= 2 pages
        assert _read(dev, pipes, size, offset) == ("pipe", logical[offset : offset + size])


def test_ranges_with_other_targets_are_read_into_a_buffer(eng, pipes, tmp_path):
    data = os.urandom(MiB)
    img = _image(tmp_path / "a.img", data)
    eng.create("mix-dmtt", f"0 2048 linear {img} 0\n2048 2048 zero")
    dev = _device(eng, "mix-dmtt")
    assert _read(dev, pipes, 256 << 10, MiB - (128 << 10)) == ("buffer", data[-(128 << 10):] + bytes(128 << 10))
    assert _read(dev, pipes, 64 << 10, 0) == ("pipe", data[: 64 << 10])  # linear alone: spliced


def test_a_subclass_changing_read_is_not_bypassed(eng, pipes, tmp_path):
    assert LinearTarget.pipe_io and StripedTarget.pipe_io
    assert not TripTarget.pipe_io  # overrides read, not read_to: the pipe path would skip it


def test_a_full_pipe_falls_back_to_a_buffer_and_the_pipe_is_replaced(eng, pipes, tmp_path, monkeypatch):
    data = os.urandom(MiB)
    img = _image(tmp_path / "a.img", data)
    eng.create("lin-dmtt", f"0 2048 linear {img} 0")
    dev = _device(eng, "lin-dmtt")
    monkeypatch.setattr(fuse_io, "PIPE_BYTES", 64 << 10)  # 16 pages
    assert _read(dev, pipes, 256 << 10, 0) == ("buffer", data[: 256 << 10])
    first = pipes.get()
    pipes.put()
    assert first is not None
    assert fuse_io._pending(first[0]) == 0  # the half-filled pipe was replaced by an empty one
    assert _read(dev, pipes, 32 << 10, 4096) == ("pipe", data[4096 : 4096 + (32 << 10)])


def test_reads_at_and_past_the_end_are_short(eng, pipes, tmp_path):
    data = os.urandom(MiB)
    img = _image(tmp_path / "a.img", data)
    eng.create("lin-dmtt", f"0 2048 linear {img} 0")
    dev = _device(eng, "lin-dmtt")
    assert _read(dev, pipes, 64 << 10, MiB - 8192) == ("pipe", data[-8192:])
    assert _read(dev, pipes, 4096, MiB) == ("buffer", b"")


def test_a_failing_stripe_is_eio_and_counted(eng, pipes, tmp_path):
    img = _image(tmp_path / "a.img", os.urandom(MiB))
    eng.create("bad-dmtt", "0 2048 error")
    eng.create("str-dmtt", f"0 4096 striped 2 16 {img} 0 {eng.device_ref('bad-dmtt')} 0")
    dev = _device(eng, "str-dmtt")
    assert _read(dev, pipes, 8192, 0)[0] == "pipe"  # the first chunk lives on the good stripe
    with pytest.raises(DeviceIOError) as exc:
        _read(dev, pipes, 16384, 0)
    assert exc.value.errno == errno.EIO
    assert eng.status("str-dmtt")[0].params.endswith(" 1 AD")
    assert pipes.get() is not None and fuse_io._pending(pipes.get()[0]) == 0  # type: ignore[index]
    pipes.put()


def test_a_read_waits_for_resume_and_reads_the_new_table(eng, pipes, tmp_path):
    old, new = os.urandom(MiB), os.urandom(MiB)
    io, inew = _image(tmp_path / "old.img", old), _image(tmp_path / "new.img", new)
    eng.create("sus-dmtt", f"0 2048 linear {io} 0")
    dev = _device(eng, "sus-dmtt")
    eng.suspend("sus-dmtt")
    got: list[tuple[str, bytes]] = []
    reader = threading.Thread(target=lambda: got.append(_read(dev, pipes, 64 << 10, 4096)))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive() and not got  # held by the suspended device
    eng.load("sus-dmtt", f"0 2048 linear {inew} 0")
    eng.resume("sus-dmtt")
    reader.join(10)
    assert got == [("pipe", new[4096 : 4096 + (64 << 10)])]


def test_sweep_closes_only_pipes_nobody_uses(eng, pipes, tmp_path):
    data = os.urandom(MiB)
    img = _image(tmp_path / "a.img", data)
    eng.create("lin-dmtt", f"0 2048 linear {img} 0")
    dev = _device(eng, "lin-dmtt")
    out = ctypes.c_void_p()
    fuse_io.read_buf(dev, pipes, ctypes.pointer(out), 8192, 0)  # a reply libfuse has not sent
    fd = fuse_io.FuseBufvec.from_address(out.value).buf[0].fd
    fuse_io._free(out.value)
    pipes.sweep()
    assert len(pipes) == 1  # it holds the reply
    assert _drain(fd, 8192) == data[:8192]
    pipes.sweep()
    assert len(pipes) == 0
    busy = pipes.get()
    assert busy is not None
    pipes.sweep()
    assert len(pipes) == 1  # its thread is in a callback
    pipes.put()
    pipes.sweep()
    assert len(pipes) == 0
