"""BlockDevice endpoints on regular files (unit tier) and on loop devices (root tier)."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from dmtools import blockdev, loop
from dmtools import endpoint as endpoint_mod
from dmtools.blockdev import BlockDevice, aligned_buffer, device_number, open_endpoint, resolve_devno
from dmtools.endpoint import NullEndpoint
from dmtools.errors import DeviceBusy, DeviceIOError, DeviceNotFound, InvalidArgument, NoSpace
from dmtools.linux import parse_devno
from dmtools.loop import LoopDevice
from dmtools.testing.loops import no_leaked_loops  # noqa: F401 (autouse fixture)

KiB, MiB = 1 << 10, 1 << 20


def _direct(path: Path, **kw: bool) -> BlockDevice:
    """Open with O_DIRECT, skipping where the file system under tmp_path cannot do it."""
    try:
        return BlockDevice(path, direct=True, **kw)
    except InvalidArgument as err:
        if "O_DIRECT" in str(err):
            pytest.skip(f"the file system under {path.parent} has no O_DIRECT")
        raise


# ---------------------------------------------------------------------------------------------
# Unit tier: regular files


def test_file_properties(make_image: Callable[..., Path]) -> None:
    img = make_image(3 * MiB)
    with BlockDevice(img) as bd:
        assert bd.size == 3 * MiB
        assert bd.logical_block_size == 512
        assert bd.physical_block_size >= 512
        assert bd.is_regular_file and not bd.is_block_device
        assert bd.devno is None
        assert bd.read_only and not bd.direct
        assert isinstance(bd.fileno(), int)
        assert bd.name == str(img)
    assert bd.closed
    with pytest.raises(InvalidArgument):
        bd.fileno()
    bd.close()  # idempotent


class _Numbered(NullEndpoint):
    """A null endpoint that says it is block device 7:0 and counts how often it is asked."""

    asked = 0

    @property
    def devno(self) -> tuple[int, int] | None:
        self.asked += 1
        return (7, 0)


def test_zoned_is_read_once_per_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    # kcopyd asks every destination of every job; the answer cannot change while it is open
    reads: list[tuple[int, int] | None] = []
    monkeypatch.setattr(endpoint_mod, "_sysfs_zoned", lambda devno: reads.append(devno) or devno == (7, 0))
    a, b = _Numbered(4096), _Numbered(4096)
    assert [a.zoned, a.zoned, a.zoned] == [True, True, True]
    assert a.asked == 1 and reads == [(7, 0)]
    assert b.zoned and b.asked == 1 and len(reads) == 2  # each endpoint reads its own
    assert not NullEndpoint(4096).zoned and reads[-1] is None  # no device number: not zoned


def test_read_write_into_caller_buffers(make_image: Callable[..., Path]) -> None:
    img = make_image(MiB)
    with BlockDevice(img, writable=True) as bd:
        data = bytes(range(256)) * 16
        assert bd.write(data, 4096) == 4096
        assert bd.write(memoryview(data)[:100], 10) == 100
        buf = bytearray(4096)
        assert bd.readinto(buf, 4096) == 4096 and bytes(buf) == data
        view = memoryview(buf)[10:20]
        assert bd.readinto(view, 4096) == 10 and bytes(buf[10:20]) == data[:10]
        words = memoryview(bytearray(16)).cast("I")  # multi-byte formats are read as bytes
        assert bd.readinto(words, 10) == 16 and words.tobytes() == data[:16]
    assert img.read_bytes()[4096:8192] == data


def test_short_read_only_at_end_of_file(make_image: Callable[..., Path]) -> None:
    img = make_image(10_000)
    with BlockDevice(img, writable=True) as bd:
        buf = bytearray(4096)
        assert bd.readinto(buf, 8192) == 10_000 - 8192
        assert bd.readinto(buf, 10_000) == 0
        assert bd.readinto(buf, 1 << 40) == 0
        bd.write(b"tail", 20_000)  # files grow
        assert bd.size == 20_004


def test_bad_requests(make_image: Callable[..., Path]) -> None:
    img = make_image(MiB)
    with BlockDevice(img) as ro:
        with pytest.raises(DeviceIOError) as exc:
            ro.write(b"x", 0)
        assert exc.value.errno == errno.EBADF and exc.value.operation == "write"
        with pytest.raises(DeviceIOError):
            ro.zero(0, 512)
        with pytest.raises(InvalidArgument):
            ro.readinto(b"immutable", 0)
        with pytest.raises(InvalidArgument):
            ro.readinto(bytearray(8), -1)
        with pytest.raises(InvalidArgument):
            ro.readinto(object(), 0)
        with pytest.raises(InvalidArgument):
            ro.data_extents(0, -5)
    assert img.read_bytes() == bytes(MiB)


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(DeviceNotFound) as exc:
        BlockDevice(tmp_path / "missing")
    assert exc.value.errno == errno.ENOENT and exc.value.device == str(tmp_path / "missing")
    with pytest.raises(InvalidArgument, match="directory"):
        BlockDevice(tmp_path)
    with pytest.raises(InvalidArgument, match="regular file or block device"):
        BlockDevice("/dev/null")
    with pytest.raises(InvalidArgument):
        BlockDevice(tmp_path / "new", create=True)
    assert not (tmp_path / "new").exists()
    with BlockDevice(tmp_path / "new", writable=True, create=True) as bd:
        assert bd.size == 0
        bd.write(b"abc", 0)
    assert (tmp_path / "new").read_bytes() == b"abc"


def test_aligned_buffer() -> None:
    buf = aligned_buffer(3 * 4096 + 5)
    try:
        assert len(buf) == 3 * 4096 + 5
        assert buf[:] == bytes(len(buf))
        with memoryview(buf) as mv:
            assert blockdev.buffer_address(mv) % mmap.PAGESIZE == 0
            assert blockdev.buffer_address(mv.toreadonly()) % mmap.PAGESIZE == 0
    finally:
        buf.close()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidArgument):
            aligned_buffer(bad)  # type: ignore[arg-type]


def test_huge_aligned_buffer_is_whole_huge_pages_and_works_with_direct_io(make_image: Callable[..., Path]) -> None:
    buf = aligned_buffer(512 << 10, huge=True)
    try:
        assert len(buf) == blockdev.HUGE_PAGE
        assert buf[:] == bytes(len(buf))
        buf[: 512 << 10] = os.urandom(512 << 10)
        with memoryview(buf) as mv, _direct(make_image(MiB), writable=True) as bd:
            assert blockdev.buffer_address(mv) % mmap.PAGESIZE == 0
            assert bd.write(mv[: 512 << 10], 4096) == 512 << 10
            back = aligned_buffer(512 << 10)
            assert bd.readinto(back, 4096) == 512 << 10
            assert back[:] == buf[: 512 << 10]
    finally:
        buf.close()
    assert len(aligned_buffer(blockdev.HUGE_PAGE + 1, huge=True)) == 2 * blockdev.HUGE_PAGE


def test_direct_io_on_a_file(make_image: Callable[..., Path]) -> None:
    img = make_image(MiB)
    bd = _direct(img, writable=True)
    with bd:
        lbs = bd.logical_block_size
        assert lbs >= 512 and bd.direct
        buf = aligned_buffer(2 * lbs)
        buf[:7] = b"direct!"
        assert bd.write(buf, lbs) == 2 * lbs
        with memoryview(buf) as mv:
            assert bd.write(mv.toreadonly(), 4 * lbs) == 2 * lbs  # read-only but aligned buffer
            for bad_offset, bad_buf, what in ((lbs + 1, mv, "offset"), (0, mv[: lbs - 1], "length"),
                                              (0, mv[1 : lbs + 1], "buffer address")):
                with pytest.raises(InvalidArgument, match=what) as exc:
                    bd.readinto(bad_buf, bad_offset)
                assert exc.value.errno == errno.EINVAL and exc.value.operation == "read"
            with pytest.raises(InvalidArgument, match="buffer address"):
                bd.write(mv.toreadonly()[8 : lbs + 8], 0)  # read-only and misaligned
        out = aligned_buffer(lbs)
        assert bd.readinto(out, lbs) == lbs and out[:7] == b"direct!"
        with pytest.raises(InvalidArgument):
            bd.zero(1, lbs)
    assert img.read_bytes()[lbs : lbs + 7] == b"direct!"


def test_direct_read_at_unaligned_end_of_file(tmp_path: Path) -> None:
    img = tmp_path / "odd"
    img.write_bytes(b"z" * 1000)
    bd = _direct(img)
    with bd:
        buf = aligned_buffer(4 * bd.logical_block_size)
        assert bd.readinto(buf, 0) == 1000
        assert buf[:1000] == b"z" * 1000


def test_data_extents_on_sparse_file(make_image: Callable[..., Path]) -> None:
    img = make_image(8 * MiB)
    with BlockDevice(img, writable=True) as bd:
        bd.write(b"a" * 4096, 0)
        bd.write(b"b" * 4096, 3 * MiB)
        bd.flush()
        extents = bd.data_extents(0, 8 * MiB)
        if extents is None:
            pytest.skip("the file system under tmp_path cannot report holes")
        assert len(extents) == 2
        (s0, l0), (s1, l1) = extents
        assert s0 == 0 and l0 >= 4096 and l0 < MiB
        assert s1 <= 3 * MiB < s1 + l1 and s1 + l1 < 4 * MiB
        assert bd.data_extents(MiB, MiB) == []
        clipped = bd.data_extents(3 * MiB + 100, 50)
        assert clipped == [(3 * MiB + 100, 50)]
        assert bd.data_extents(8 * MiB, 4096) == []


def test_zero_and_discard_on_a_file(make_image: Callable[..., Path]) -> None:
    img = make_image(4 * MiB)
    with BlockDevice(img, writable=True) as bd:
        bd.write(b"\xff" * (2 * MiB), 0)
        bd.zero(4096, 8192)  # punches a hole
        bd.zero(MiB, 4096, unmap=False)  # zero range, stays allocated
        bd.zero(1000, 10)  # unaligned
        bd.discard(64 * KiB, 64 * KiB)
        bd.discard(3 * MiB, 2 * MiB)  # past EOF: ignored
        assert bd.size == 4 * MiB
        extents = bd.data_extents(0, 4 * MiB)
        bd.zero(4 * MiB - 512, 4096)  # extends the file
        assert bd.size == 4 * MiB + 3584
    data = img.read_bytes()
    expect = bytearray(b"\xff" * (2 * MiB) + bytes(2 * MiB + 3584))
    for off, n in ((4096, 8192), (MiB, 4096), (1000, 10), (64 * KiB, 64 * KiB)):
        expect[off : off + n] = bytes(n)
    assert data == bytes(expect)
    if extents is not None:  # the punched ranges are holes now
        holes = [(64 * KiB, 64 * KiB), (4096, 8192)]
        for off, n in holes:
            assert all(s + ln <= off or s >= off + n for s, ln in extents), (off, extents)


def test_zero_falls_back_to_writes(make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(*args: object) -> None:
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(blockdev, "_fallocate", unsupported)
    img = make_image(3 * MiB)
    with BlockDevice(img, writable=True) as bd:
        bd.write(b"\x01" * (3 * MiB), 0)
        bd.zero(512, 2 * MiB + 512)
        bd.discard(0, 512)  # unsupported discard is a no-op
    data = img.read_bytes()
    assert data[:512] == b"\x01" * 512
    assert data[512 : 2 * MiB + 1024] == bytes(2 * MiB + 512)
    assert data[2 * MiB + 1024 :] == b"\x01" * (MiB - 1024)


def test_exclusive_file_open(make_image: Callable[..., Path]) -> None:
    img = make_image(8 * MiB)
    with BlockDevice(img, writable=True, exclusive=True):
        with pytest.raises(DeviceBusy) as exc:
            BlockDevice(img, exclusive=True)
        assert exc.value.errno == errno.EBUSY
        with BlockDevice(img):  # a plain open is still allowed
            pass
    with BlockDevice(img, exclusive=True):
        pass
    forgotten = BlockDevice(img, exclusive=True)
    del forgotten  # collected: its descriptor and lock are released
    with BlockDevice(img, exclusive=True):
        pass


def test_open_endpoint_and_device_numbers(make_image: Callable[..., Path]) -> None:
    null = NullEndpoint(4096)
    assert open_endpoint(null) is null
    img = make_image(8 * MiB)
    with open_endpoint(img) as ep:
        assert isinstance(ep, BlockDevice) and ep.read_only
        with pytest.raises(InvalidArgument):
            open_endpoint(ep, writable=True)
    with open_endpoint(str(img), writable=True) as ep:
        assert not ep.read_only
    with pytest.raises(InvalidArgument):
        device_number(img)
    with pytest.raises(DeviceNotFound):
        device_number(img.parent / "missing")
    assert parse_devno("253:1") == (253, 1)
    assert parse_devno("4095:1048575") == (4095, 1048575)
    for bad in ("253", "a:b", "1:2:3", "-1:0", "5000:0", "1:2000000", " 253:1 ", "/dev/loop0"):
        assert parse_devno(bad) is None, bad
        with pytest.raises(InvalidArgument):
            resolve_devno(bad)
    with pytest.raises(DeviceNotFound):
        resolve_devno("4095:1048575")
    with pytest.raises(DeviceNotFound):
        open_endpoint("4095:1048575")


# ---------------------------------------------------------------------------------------------
# Root tier: block devices (loop devices on sparse files)


@pytest.mark.root
def test_block_device_properties(make_image: Callable[..., Path], make_loop: Callable[..., LoopDevice]) -> None:
    dev = make_loop(make_image(6 * MiB))
    with BlockDevice(dev) as bd:
        assert bd.is_block_device and not bd.is_regular_file
        assert bd.size == 6 * MiB
        assert bd.logical_block_size == 512 and bd.physical_block_size >= 512
        assert bd.devno == (dev.major, dev.minor) == device_number(dev.path)
        assert not bd.zoned  # a loop device is never zoned (sysfs queue/zoned: none)
        assert bd.data_extents(0, MiB) is None
    assert resolve_devno(f"{dev.major}:{dev.minor}") == dev.path
    with open_endpoint(dev.devno) as ep:
        assert ep.name == dev.path and ep.size == 6 * MiB
    big = make_loop(make_image(MiB, name="4k"), block_size=4096)
    with BlockDevice(big) as bd:
        assert bd.logical_block_size == 4096


@pytest.mark.root
def test_block_device_io_and_end_of_device(make_image: Callable[..., Path],
                                           make_loop: Callable[..., LoopDevice]) -> None:
    img = make_image(MiB)
    dev = make_loop(img)
    with BlockDevice(dev, writable=True) as bd:
        bd.write(b"edge" * 128, MiB - 512)
        buf = bytearray(4096)
        assert bd.readinto(buf, MiB - 512) == 512
        assert buf[:512] == b"edge" * 128
        assert bd.readinto(buf, MiB) == 0
        with pytest.raises(NoSpace) as exc:
            bd.write(bytes(1024), MiB - 512)
        assert exc.value.errno == errno.ENOSPC and exc.value.device == dev.path
        with pytest.raises(NoSpace):
            bd.zero(MiB - 512, 1024)
        bd.flush()
    assert img.read_bytes()[MiB - 512 :] == b"edge" * 128


@pytest.mark.root
def test_block_device_direct_io_alignment(make_image: Callable[..., Path],
                                          make_loop: Callable[..., LoopDevice]) -> None:
    dev = make_loop(make_image(MiB), block_size=4096)
    with BlockDevice(dev, writable=True, direct=True) as bd:
        buf = aligned_buffer(8192)
        buf[:4] = b"4k!!"
        assert bd.write(buf, 4096) == 8192
        for offset, length in ((512, 4096), (4096, 512)):
            with pytest.raises(InvalidArgument, match="4096-byte alignment"):
                bd.readinto(memoryview(buf)[:length], offset)
        out = aligned_buffer(4096)
        assert bd.readinto(out, 4096) == 4096 and out[:4] == b"4k!!"


@pytest.mark.root
def test_block_device_zero_and_discard(make_image: Callable[..., Path], make_loop: Callable[..., LoopDevice]) -> None:
    img = make_image(4 * MiB)
    dev = make_loop(img)
    with BlockDevice(dev, writable=True) as bd:
        bd.write(b"\xaa" * (4 * MiB), 0)
        bd.flush()
        bd.zero(4096, 64 * KiB)  # BLKZEROOUT
        bd.zero(100_000, 1000)  # unaligned edges written
        bd.discard(2 * MiB, MiB)  # BLKDISCARD: the loop driver punches a hole in the file
        bd.flush()
        buf = bytearray(4 * MiB)
        with BlockDevice(dev, direct=False) as reader:
            reader.readinto(buf, 0)
    expect = bytearray(b"\xaa" * (4 * MiB))
    expect[4096 : 4096 + 64 * KiB] = bytes(64 * KiB)
    expect[100_000:101_000] = bytes(1000)
    assert buf[: 2 * MiB] == expect[: 2 * MiB]
    assert buf[3 * MiB :] == expect[3 * MiB :]
    with BlockDevice(img) as f:
        extents = f.data_extents(0, 4 * MiB)
    if extents is not None:
        assert all(s + n <= 2 * MiB or s >= 3 * MiB for s, n in extents), extents


@pytest.mark.root
def test_exclusive_open_of_a_block_device(make_image: Callable[..., Path],
                                          make_loop: Callable[..., LoopDevice]) -> None:
    dev = make_loop(make_image(8 * MiB))
    with BlockDevice(dev, exclusive=True):
        with pytest.raises(DeviceBusy) as exc:
            BlockDevice(dev, writable=True, exclusive=True)
        assert exc.value.errno == errno.EBUSY and exc.value.operation == "open"
        with BlockDevice(dev):
            pass
    with BlockDevice(dev, writable=True, exclusive=True):
        pass


@pytest.mark.root
def test_exclusive_open_refused_while_mounted(make_image: Callable[..., Path], make_loop: Callable[..., LoopDevice],
                                              tmp_path: Path) -> None:
    mkfs = shutil.which("mkfs.ext4")
    if mkfs is None:
        pytest.skip("needs mkfs.ext4 (apt-get install e2fsprogs)")
    img = make_image(32 * MiB, name="fs")
    subprocess.run([mkfs, "-q", "-F", str(img)], check=True, timeout=60)
    dev = make_loop(img)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev.path, str(mnt)], check=True, timeout=60)
    try:
        with pytest.raises(DeviceBusy):
            BlockDevice(dev, writable=True, exclusive=True)
        with BlockDevice(dev) as bd:  # reading a mounted device is allowed
            assert bd.size == 32 * MiB
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    with BlockDevice(dev, writable=True, exclusive=True):
        pass
    assert loop.find_by_backing_file(img) == [loop.info(dev)]
