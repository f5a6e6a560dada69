"""Root tier: reads of exposed devices spliced by the kernel (``dmtools.engine.fuse_io``), through
real loop devices and FUSE."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from dmtools.blockdev import aligned_buffer
from dmtools.engine import Engine, fuse_io
from dmtools.engine.basic_targets import LinearTarget, StripedTarget

pytestmark = pytest.mark.root

MiB = 1 << 20


@pytest.fixture(params=[False, True], ids=["python", "c"])
def fast(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether the exposure's C data path (``dmtools.engine.fastpath``) serves the devices."""
    if not request.param:
        monkeypatch.setenv("DMTOOLS_FAST_IO", "0")
    return bool(request.param)


@pytest.fixture
def xengine(fast: bool, exposed_engine: Engine) -> Engine:
    """The exposed engine, made once ``fast`` has set the C data path on or off."""
    return exposed_engine


def _read_direct(path: str, size: int, offset: int, piece: int) -> bytes:
    buf = aligned_buffer(piece)
    out = bytearray()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for off in range(offset, offset + size, piece):
            assert os.preadv(fd, [buf], off) == piece
            out += buf
    finally:
        os.close(fd)
    return bytes(out)


def test_linear_and_striped_reads_of_two_pages_or_more_never_pass_through_python(xengine, fast, tmp_path, monkeypatch):
    lin, a, b = os.urandom(8 * MiB), os.urandom(4 * MiB), os.urandom(4 * MiB)
    for name, data in (("lin", lin), ("a", a), ("b", b)):
        (tmp_path / f"{name}.img").write_bytes(data)
    xengine.create("lin-dmtt", f"0 16384 linear {tmp_path / 'lin.img'} 0")
    xengine.create("str-dmtt", f"0 16384 striped 2 128 {tmp_path / 'a.img'} 0 {tmp_path / 'b.img'} 0")
    striped = b"".join((a if c % 2 == 0 else b)[(c // 2) * 65536 : (c // 2 + 1) * 65536] for c in range(128))
    buffered: list[tuple[str, int, int]] = []  # reads through a Python buffer: (target, offset, length)
    for cls in (LinearTarget, StripedTarget):
        def record(self, buf, off, _read=cls.read):  # type: ignore[no-untyped-def]
            buffered.append((self.name, off, len(buf)))
            _read(self, buf, off)

        monkeypatch.setattr(cls, "read", record)
    for piece in (MiB, 8192, 65536):
        assert _read_direct(xengine.device_path("lin-dmtt"), 2 * MiB, 3 * MiB, piece) == lin[3 * MiB : 5 * MiB]
        assert _read_direct(xengine.device_path("str-dmtt"), 2 * MiB, MiB, piece) == striped[MiB : 3 * MiB]
    with open(xengine.device_path("str-dmtt"), "rb") as f:  # buffered, through the loop's cache
        f.seek(12345)
        assert f.read(300_000) == striped[12345 : 12345 + 300_000]
    # Others (udev, blkid) may probe the devices' first and last pages meanwhile, and the kernel
    # may split one of this test's reads so that a single page reaches FUSE as its own request
    # (bio segments follow the memory's layout): a single page is read into a buffer by design.
    # No request of two pages or more in this test's ranges may have gone through a buffer.
    ours = {"linear": (3 * MiB, 5 * MiB), "striped": (MiB, 3 * MiB)}
    assert [r for r in buffered
            if r[1] < ours[r[0]][1] and r[1] + r[2] > ours[r[0]][0] and r[2] >= fuse_io.PIPE_MIN_READ] == []
    assert _read_direct(xengine.device_path("lin-dmtt"), 64 << 10, 0, 4096) == lin[: 64 << 10]
    # single pages are read into a buffer: in C (fastio.c), or in Python (fuse_io.PIPE_MIN_READ)
    assert (("linear", 0, 4096) in buffered) is not fast


def test_other_targets_still_read_through_a_buffer(xengine, tmp_path):
    data = os.urandom(MiB)
    (tmp_path / "a.img").write_bytes(data)
    xengine.create("mix-dmtt", f"0 2048 linear {tmp_path / 'a.img'} 0\n2048 2048 zero\n4096 2048 error")
    dev = xengine.device_path("mix-dmtt")
    assert _read_direct(dev, 2 * MiB, 0, MiB) == data + bytes(MiB)
    with pytest.raises(OSError) as exc:
        _read_direct(dev, MiB, 2 * MiB, MiB)
    assert exc.value.errno == errno.EIO


def test_reads_held_by_suspend_see_the_reloaded_table(xengine, tmp_path):
    old, new = os.urandom(4 * MiB), os.urandom(4 * MiB)
    (tmp_path / "old.img").write_bytes(old)
    (tmp_path / "new.img").write_bytes(new)
    xengine.create("sus-dmtt", f"0 8192 linear {tmp_path / 'old.img'} 0")
    dev = xengine.device_path("sus-dmtt")
    before = os.stat(dev).st_rdev
    assert _read_direct(dev, MiB, 0, MiB) == old[:MiB]
    xengine.suspend("sus-dmtt")
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(_read_direct(dev, 2 * MiB, MiB, MiB)))
    reader.start()
    reader.join(0.5)
    assert reader.is_alive() and not got  # queued while the device is suspended
    xengine.load("sus-dmtt", f"0 8192 linear {tmp_path / 'new.img'} 0")
    xengine.resume("sus-dmtt")
    reader.join(20)
    assert got == [new[MiB : 3 * MiB]]
    assert os.stat(dev).st_rdev == before
