"""Loop devices: structure layouts (unit tier) and real attach/detach (root tier)."""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmtools import linux, loop
from dmtools.blockdev import BlockDevice, aligned_buffer, device_number, resolve_devno
from dmtools.cli import loop_cmd
from dmtools.errors import DeviceNotFound, DMError, InvalidArgument, LoopError
from dmtools.testing.loops import LoopTracker, no_leaked_loops, sweep  # noqa: F401 (autouse fixture)

MiB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Unit tier: the uapi structures, byte for byte


class _Info64(ctypes.Structure):
    """struct loop_info64 as include/uapi/linux/loop.h declares it (natural C alignment)."""

    _fields_ = [
        ("lo_device", ctypes.c_uint64),
        ("lo_inode", ctypes.c_uint64),
        ("lo_rdevice", ctypes.c_uint64),
        ("lo_offset", ctypes.c_uint64),
        ("lo_sizelimit", ctypes.c_uint64),
        ("lo_number", ctypes.c_uint32),
        ("lo_encrypt_type", ctypes.c_uint32),
        ("lo_encrypt_key_size", ctypes.c_uint32),
        ("lo_flags", ctypes.c_uint32),
        ("lo_file_name", ctypes.c_uint8 * 64),
        ("lo_crypt_name", ctypes.c_uint8 * 64),
        ("lo_encrypt_key", ctypes.c_uint8 * 32),
        ("lo_init", ctypes.c_uint64 * 2),
    ]


class _Config(ctypes.Structure):
    """struct loop_config from include/uapi/linux/loop.h."""

    _fields_ = [
        ("fd", ctypes.c_uint32),
        ("block_size", ctypes.c_uint32),
        ("info", _Info64),
        ("reserved", ctypes.c_uint64 * 8),
    ]


def test_struct_sizes_match_uapi() -> None:
    assert loop.INFO64.size == ctypes.sizeof(_Info64) == 232
    assert len(loop.pack_config(3, bytes(loop.INFO64.size))) == ctypes.sizeof(_Config) == 304
    assert _Config.info.offset == 8


def test_pack_info64_places_every_field_at_its_uapi_offset() -> None:
    data = loop.pack_info64(offset=4096, sizelimit=MiB, flags=loop.LO_FLAGS_AUTOCLEAR, file_name="/img")
    s = _Info64.from_buffer_copy(data)
    assert (s.lo_offset, s.lo_sizelimit, s.lo_flags) == (4096, MiB, 4)
    assert bytes(s.lo_file_name).rstrip(b"\0") == b"/img"
    expected = bytearray(232)
    expected[24:32] = (4096).to_bytes(8, "little")
    expected[32:40] = MiB.to_bytes(8, "little")
    expected[52:56] = (4).to_bytes(4, "little")
    expected[56:60] = b"/img"
    assert data == bytes(expected)


def test_pack_info64_truncates_long_names_keeping_the_nul() -> None:
    data = loop.pack_info64(file_name="x" * 200)
    name = bytes(_Info64.from_buffer_copy(data).lo_file_name)
    assert name == b"x" * 63 + b"\0"


def test_unpack_info64_round_trip_and_length_check() -> None:
    raw = bytearray(loop.pack_info64(offset=512, sizelimit=1024, flags=17, file_name="/a/b"))
    raw[40:44] = (9).to_bytes(4, "little")  # lo_number
    raw[8:16] = (1234).to_bytes(8, "little")  # lo_inode
    st = loop.unpack_info64(raw)
    assert (st.offset, st.sizelimit, st.flags, st.number, st.inode) == (512, 1024, 17, 9, 1234)
    assert st.file_name == "/a/b"
    with pytest.raises(InvalidArgument):
        loop.unpack_info64(b"\0" * 231)


def test_pack_config_layout() -> None:
    info = loop.pack_info64(offset=8192, flags=loop.LO_FLAGS_READ_ONLY | loop.LO_FLAGS_DIRECT_IO)
    data = loop.pack_config(7, info, block_size=4096)
    cfg = _Config.from_buffer_copy(data)
    assert (cfg.fd, cfg.block_size) == (7, 4096)
    assert (cfg.info.lo_offset, cfg.info.lo_flags) == (8192, 17)
    assert data[8:240] == info and data[240:] == bytes(64)
    with pytest.raises(InvalidArgument):
        loop.pack_config(7, info[:-1])


# ---------------------------------------------------------------------------------------------
# Unit tier: bad input is refused before anything is touched


def test_attach_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DeviceNotFound) as exc:
        loop.attach(tmp_path / "nope.img")
    assert exc.value.errno == errno.ENOENT and exc.value.operation == "attach"


def test_attach_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="directory"):
        loop.attach(tmp_path)


@pytest.mark.parametrize(
    "options",
    [
        {"offset": -512},
        {"offset": 100},
        {"sizelimit": 1000},
        {"offset": 4 * MiB},  # the file is 1 MiB
        {"block_size": 1000},
        {"block_size": 256},
        {"offset": True},
    ],
)
def test_attach_bad_options(tmp_path: Path, options: dict[str, Any]) -> None:
    img = tmp_path / "dmtt-opts.img"
    img.write_bytes(b"")
    os.truncate(img, MiB)
    with pytest.raises(InvalidArgument):
        loop.attach(img, **options)


def test_detach_refuses_what_is_not_a_loop_device(tmp_path: Path) -> None:
    f = tmp_path / "plain"
    f.write_bytes(b"x")
    with pytest.raises(InvalidArgument):
        loop.detach(f)
    with pytest.raises(DeviceNotFound):
        loop.detach(tmp_path / "loop-missing-dir" / "x")
    with pytest.raises(InvalidArgument):
        loop.info(-1)


def test_info_of_unbound_number_is_not_found() -> None:
    with pytest.raises(DeviceNotFound):
        loop.info(1 << 19)


def test_loop_device_helpers() -> None:
    dev = loop.LoopDevice(path="/dev/loop3", number=3, backing_file="/x", major=7, minor=3)
    assert os.fspath(dev) == "/dev/loop3"
    assert dev.devno == "7:3"
    assert not dev.held_open
    assert dev.to_dict()["backing_file"] == "/x"
    dev.close()  # nothing held: no-op


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmtools")
    parser.add_argument("--json", action="store_true")
    loop_cmd.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_parses_attach_options() -> None:
    args = _parser().parse_args(
        ["loop", "attach", "f.img", "--read-only", "--direct-io", "--offset", "1M", "--sizelimit", "2048s"]
    )
    assert args.func is loop_cmd.cmd_attach
    assert (args.file, args.read_only, args.direct_io, args.offset,
            args.sizelimit) == ("f.img", True, True, "1M", "2048s")


def test_cli_json_flag_on_either_side() -> None:
    p = _parser()
    assert p.parse_args(["--json", "loop", "list"]).json is True
    assert p.parse_args(["loop", "list", "--json"]).json is True
    assert p.parse_args(["loop", "list"]).json is False


def test_cli_attach_errors_are_dmerrors(tmp_path: Path) -> None:
    p = _parser()
    with pytest.raises(DeviceNotFound):
        loop_cmd.cmd_attach(p.parse_args(["loop", "attach", str(tmp_path / "missing.img")]))
    img = tmp_path / "dmtt-cli.img"
    img.write_bytes(bytes(4096))
    with pytest.raises(InvalidArgument):
        loop_cmd.cmd_attach(p.parse_args(["loop", "attach", str(img), "--offset", "12x"]))


def test_cli_table_format() -> None:
    devs = [
        loop.LoopDevice(path="/dev/loop0", number=0, backing_file="/tmp/a b.img", offset=512, read_only=True),
        loop.LoopDevice(path="/dev/loop12", number=12, backing_file="/b", sizelimit=MiB, direct_io=True),
    ]
    lines = loop_cmd.format_table(devs).splitlines()
    assert lines[0].split() == ["NAME", "SIZELIMIT", "OFFSET", "AUTOCLEAR", "RO", "DIO", "BACK-FILE"]
    assert lines[1].split(maxsplit=6) == ["/dev/loop0", "0", "512", "0", "1", "0", "/tmp/a b.img"]
    assert lines[2].split() == ["/dev/loop12", str(MiB), "0", "0", "0", "1", "/b"]
    assert (
        len(
            {
                line.index("BACK-FILE") if i == 0 else len(line) - len(line.split()[-1])
                for i, line in enumerate(lines[:1] + lines[2:])
            }
        )
        == 1
    )


# ---------------------------------------------------------------------------------------------
# Root tier: real loop devices on sparse files


def _wait_unbound(number: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/sys/block/loop{number}/loop"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.mark.root
def test_attach_read_write_through_device_and_file(make_image: Callable[..., Path]) -> None:
    img = make_image(4 * MiB)
    with open(img, "r+b") as f:
        f.seek(MiB)
        f.write(b"from-the-file")
    dev = loop.attach(img)
    try:
        assert dev.path == f"/dev/loop{dev.number}" and dev.backing_file == str(img.resolve())
        assert (dev.major, dev.minor) == device_number(dev.path)
        assert resolve_devno(dev.devno) == dev.path
        assert not (dev.read_only or dev.autoclear or dev.direct_io)
        with BlockDevice(dev, writable=True, direct=True) as bd:
            assert bd.size == 4 * MiB
            buf = aligned_buffer(4096)
            assert bd.readinto(buf, MiB) == 4096
            assert buf[:13] == b"from-the-file"
            buf[:12] = b"from-the-dev"
            bd.write(buf, 2 * MiB)
            bd.flush()
        with open(img, "rb") as f:
            f.seek(2 * MiB)
            assert f.read(12) == b"from-the-dev"
        assert [d.number for d in loop.find_by_backing_file(img)] == [dev.number]
        assert dev in loop.list_loops()
    finally:
        assert loop.detach(dev) is True
    assert loop.find_by_backing_file(img) == []
    with pytest.raises(DeviceNotFound):
        loop.detach(dev)
    with pytest.raises(DeviceNotFound):
        loop.info(dev)


@pytest.mark.root
def test_read_only(make_image: Callable[..., Path]) -> None:
    img = make_image(8 * MiB)
    with loop.attached(img, read_only=True) as dev:
        assert dev.read_only
        assert Path(f"/sys/block/loop{dev.number}/ro").read_text().strip() == "1"
        with pytest.raises(DMError) as exc:  # refused at open or (newer kernels) at write
            with BlockDevice(dev, writable=True) as bd:
                bd.write(b"x" * 512, 0)
        assert exc.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
        with BlockDevice(dev) as bd:
            assert bd.readinto(bytearray(512), 0) == 512


@pytest.mark.root
def test_offset_and_sizelimit(make_image: Callable[..., Path]) -> None:
    img = make_image(4 * MiB)
    with open(img, "r+b") as f:
        f.seek(MiB)
        f.write(b"start-of-window")
    with loop.attached(img, offset=MiB, sizelimit=2 * MiB) as dev:
        assert (dev.offset, dev.sizelimit) == (MiB, 2 * MiB)
        with BlockDevice(dev, direct=True) as bd:
            assert bd.size == 2 * MiB
            buf = aligned_buffer(512)
            bd.readinto(buf, 0)
            assert buf[:15] == b"start-of-window"


@pytest.mark.root
def test_autoclear_device_goes_when_released(make_image: Callable[..., Path]) -> None:
    img = make_image(8 * MiB)
    dev = loop.attach(img, autoclear=True)
    try:
        assert dev.autoclear and dev.held_open
        assert loop.info(dev.number).autoclear
        with BlockDevice(dev) as bd:  # another opener keeps it alive
            dev.close()
            assert loop.info(dev.number).backing_file == str(img.resolve())
            assert bd.readinto(bytearray(512), 0) == 512
        assert _wait_unbound(dev.number)
        assert loop.find_by_backing_file(img) == []
    finally:
        if loop.find_by_backing_file(img):
            loop.detach(dev)


@pytest.mark.root
def test_direct_io_on_and_off(make_image: Callable[..., Path]) -> None:
    img = make_image(8 * MiB)
    with loop.attached(img, direct_io=True) as dev:
        assert dev.direct_io
        assert Path(f"/sys/block/loop{dev.number}/loop/dio").read_text().strip() == "1"
        assert loop.set_direct_io(dev, False) is False
        assert loop.info(dev).direct_io is False
        assert loop.set_direct_io(dev, True) is True
        with BlockDevice(dev, writable=True) as bd:
            bd.write(b"dio" * 512, 0)
            bd.flush()
        assert img.read_bytes()[:1536] == b"dio" * 512


@pytest.mark.root
def test_block_size_and_capacity(make_image: Callable[..., Path]) -> None:
    img = make_image(MiB)
    with loop.attached(img, block_size=4096) as dev:
        with BlockDevice(dev) as bd:
            assert bd.logical_block_size == 4096
            assert bd.size == MiB
        os.truncate(img, 3 * MiB)
        assert loop.set_capacity(dev) == 3 * MiB
        with BlockDevice(dev) as bd:
            assert bd.size == 3 * MiB


@pytest.mark.root
@pytest.mark.parametrize("legacy", [False, True], ids=["LOOP_CONFIGURE", "LOOP_SET_FD"])
def test_both_attach_paths_honour_every_option(make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch,
                                               legacy: bool) -> None:
    called: list[str] = []
    real_configure, real_legacy = loop._configure, loop._legacy_configure

    def configure(*args: Any) -> None:
        called.append("configure")
        real_configure(*args)

    def legacy_configure(*args: Any) -> None:
        called.append("legacy")
        real_legacy(*args)

    monkeypatch.setattr(loop, "_configure", configure)
    monkeypatch.setattr(loop, "_legacy_configure", legacy_configure)
    if legacy:
        monkeypatch.setattr(loop, "_use_configure", False)
    img = make_image(4 * MiB)
    dev = loop.attach(img, read_only=True, autoclear=True, direct_io=True, partscan=True, offset=MiB, sizelimit=MiB,
                      block_size=4096)
    try:
        assert called == (["legacy"] if legacy else ["configure"])
        got = loop.info(dev)
        assert (got.read_only, got.autoclear, got.direct_io, got.partscan, got.offset,
                got.sizelimit) == (True, True, True, True, MiB, MiB)
        with BlockDevice(dev) as bd:
            assert (bd.size, bd.logical_block_size) == (MiB, 4096)
    finally:
        loop.detach(dev)
    assert loop.find_by_backing_file(img) == []


@pytest.mark.root
def test_retries_when_the_free_device_is_taken(make_image: Callable[..., Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process binds the device LOOP_CTL_GET_FREE gave us: EBUSY, then another one."""
    ours, theirs = make_image(8 * MiB, name="ours"), make_image(8 * MiB, name="theirs")
    real = loop._configure
    stolen: list[int] = []

    def racing(loop_fd: int, backing_fd: int, info64: bytes, block_size: int) -> None:
        if not stolen:
            other = os.open(theirs, os.O_RDWR)
            try:
                real(loop_fd, other, loop.pack_info64(file_name=str(theirs)), 0)
            finally:
                os.close(other)
            stolen.append(os.minor(os.fstat(loop_fd).st_rdev))
        real(loop_fd, backing_fd, info64, block_size)

    monkeypatch.setattr(loop, "_configure", racing)
    dev = None
    try:
        dev = loop.attach(ours)
        assert stolen and dev.minor != stolen[0]
        assert dev.backing_file == str(ours.resolve())
        assert [d.minor for d in loop.find_by_backing_file(theirs)] == stolen
    finally:
        if dev is not None:
            loop.detach(dev)
        for d in loop.find_by_backing_file(theirs):
            loop.detach(d)


@pytest.mark.root
def test_concurrent_attach_gives_distinct_devices(make_image: Callable[..., Path]) -> None:
    n = 8
    images = [make_image(MiB, name=f"race{i}") for i in range(n)]
    barrier = threading.Barrier(n, timeout=10)
    results: list[loop.LoopDevice | BaseException | None] = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = loop.attach(images[i])
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            results[i] = err

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in threads)
        devs = [r for r in results if isinstance(r, loop.LoopDevice)]
        assert len(devs) == n, [r for r in results if not isinstance(r, loop.LoopDevice)]
        assert len({d.number for d in devs}) == n
        for d, img in zip(devs, images, strict=True):
            assert loop.info(d).backing_file == str(img.resolve())
    finally:
        for r in results:
            if isinstance(r, loop.LoopDevice):
                loop.detach(r)


@pytest.mark.root
def test_attached_detaches_on_error(make_image: Callable[..., Path]) -> None:
    img = make_image(8 * MiB)
    with pytest.raises(RuntimeError):
        with loop.attached(img) as dev:
            assert loop.find_by_backing_file(img) == [loop.info(dev)]
            raise RuntimeError("boom")
    assert loop.find_by_backing_file(img) == []


@pytest.mark.root
def test_detach_while_open_elsewhere_is_deferred(make_image: Callable[..., Path]) -> None:
    img = make_image(8 * MiB)
    dev = loop.attach(img)
    try:
        bd = BlockDevice(dev)
        try:
            assert loop.detach(dev, timeout=0.05) is False
            assert loop.info(dev).autoclear  # goes on the last close
        finally:
            bd.close()
        assert _wait_unbound(dev.number)
    finally:
        if loop.find_by_backing_file(img):
            loop.detach(dev)


@pytest.mark.root
def test_tracker_and_sweep(make_image: Callable[..., Path], tmp_path: Path) -> None:
    a, b, c = make_image(8 * MiB, name="ta"), make_image(8 * MiB, name="tb"), make_image(8 * MiB, name="tc")
    tracker = LoopTracker()
    with tracker:
        d1 = tracker.attach(a)
        d2 = tracker(b, read_only=True)
        assert tracker.devices == [d1, d2]
        assert tracker.detach(d1) is True
        assert tracker.devices == [d2]
        loop.detach(d2)  # already gone at teardown: fine
        tracker.attach(b)
    assert loop.find_by_backing_file(a) == loop.find_by_backing_file(b) == []
    stray = loop.attach(c)
    try:
        assert sweep(under=tmp_path) == [stray.path]
    finally:
        if loop.find_by_backing_file(c):
            loop.detach(stray)


@pytest.mark.root
def test_cli_attach_list_detach(make_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    img = make_image(4 * MiB)
    p = _parser()
    assert loop_cmd.cmd_attach(p.parse_args(["loop", "attach", str(img), "--offset", "1M", "-r"])) == 0
    path = capsys.readouterr().out.strip()
    try:
        assert path.startswith("/dev/loop")
        assert loop_cmd.cmd_list(p.parse_args(["loop", "list", "--json"])) == 0
        listed = {d["path"]: d for d in json.loads(capsys.readouterr().out)}
        assert listed[path]["backing_file"] == str(img.resolve())
        assert listed[path]["offset"] == MiB and listed[path]["read_only"] is True
        assert loop_cmd.cmd_list(p.parse_args(["loop", "list"])) == 0
        assert any(line.startswith(path + " ") for line in capsys.readouterr().out.splitlines())
    finally:
        assert loop_cmd.cmd_detach(p.parse_args(["loop", "detach", path])) == 0
    assert loop.find_by_backing_file(img) == []
    with pytest.raises(DeviceNotFound):
        loop_cmd.cmd_detach(p.parse_args(["loop", "detach", path]))


def _refuse_open(monkeypatch: pytest.MonkeyPatch, refuse: Callable[[str, int], bool], code: int) -> None:
    """Make ``os.open`` fail with ``code`` for the (path, flags) that ``refuse`` picks."""
    real_open = os.open

    def fake_open(path: Any, flags: int, *a: Any) -> int:
        if refuse(os.fspath(path), flags):
            raise OSError(code, os.strerror(code))
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", fake_open)


def test_attach_without_write_permission_is_a_clear_error(make_image: Callable[..., Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    img = make_image(8 * MiB)
    _refuse_open(monkeypatch, lambda path, flags: path == str(img) and bool(flags & os.O_RDWR), errno.EACCES)
    with pytest.raises(LoopError, match="read-only") as exc:
        loop.attach(img)
    assert exc.value.errno == errno.EACCES


def test_root_cli_turns_loop_errors_into_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dmtools.cli.main import main

    missing = str(tmp_path / "missing.img")
    with pytest.raises(DeviceNotFound):
        main(["loop", "attach", missing], propagate=True)
    assert main(["loop", "attach", missing]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and missing in err


def test_attach_without_loop_control_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "dmtt-noctl.img"
    img.write_bytes(bytes(4096))
    monkeypatch.setattr(loop, "LOOP_CONTROL", str(tmp_path / "loop-control"))
    with pytest.raises(LoopError, match="load the loop module") as exc:
        loop.attach(img)
    assert exc.value.errno == errno.ENOENT


@pytest.mark.root
def test_attach_reports_a_missing_device_node(make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    img = make_image(MiB)
    _refuse_open(
        monkeypatch,
        lambda path, flags: path.startswith("/dev/loop") and path != loop.LOOP_CONTROL,
        errno.ENOENT,
    )
    with pytest.raises(LoopError, match="no device node"):
        loop.attach(img)
    monkeypatch.undo()
    assert loop.find_by_backing_file(img) == []


@pytest.mark.root
def test_attach_empty_file_gives_zero_sized_device(tmp_path) -> None:
    path = tmp_path / "dmtt-empty.img"
    path.touch()
    dev = loop.attach(str(path))
    try:
        with open(dev.path, "rb") as f:
            assert f.seek(0, os.SEEK_END) == 0
    finally:
        loop.detach(dev)
    with pytest.raises(InvalidArgument):
        loop.attach(str(path), offset=512)


@pytest.mark.root
def test_attach_clears_a_read_only_policy_left_by_an_earlier_user(tmp_path) -> None:
    import fcntl
    import struct

    path = tmp_path / "dmtt-rop.img"
    path.write_bytes(bytes(1 << 20))
    dev = loop.attach(str(path))
    number = dev.number
    fd = os.open(dev.path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, linux.BLKROSET, struct.pack("i", 1))
    finally:
        os.close(fd)
    loop.detach(dev)
    again = loop.attach(str(path))
    try:
        with open(again.path, "r+b", buffering=0) as f:
            assert f.write(b"x" * 512) == 512
        if again.number == number:
            assert not again.read_only
    finally:
        loop.detach(again)
