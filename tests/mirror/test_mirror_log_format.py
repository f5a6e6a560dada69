"""The disk log's on-disk format, byte for byte (drivers/md/dm-log.c)."""

from __future__ import annotations

import struct

import pytest

from dmtools.errors import CorruptMetadata, InvalidArgument
from dmtools.testing.memory import MemoryEndpoint
from mirror.bitmap import Bitmap, bitmap_bytes
from mirror.format import LogImage, format_log, inspect, log_io_bytes

MAGIC_BYTES = bytes([0x72, 0x52, 0x69, 0x4D])


def test_header_bytes_and_io_size_match_the_kernel_example() -> None:
    # 1 GiB LV, 1024-sector regions -> 2048 regions -> 256-byte bitmap -> 3-sector I/O
    img = LogImage.new(2048, in_sync=True)
    buf = bytes(img.pack())
    assert len(buf) == 3 * 512
    assert buf[0:4] == MAGIC_BYTES
    assert buf[4:8] == b"\x02\x00\x00\x00"
    assert buf[8:16] == (2048).to_bytes(8, "little")
    assert buf[16:1024] == bytes(1008)
    assert buf[1024:1280] == b"\xff" * 256
    assert buf[1280:] == bytes(256)


def test_bitmap_bit_order_and_padding() -> None:
    img = LogImage.new(100, in_sync=True)
    img.clean.clear(9)
    img.clean.clear(0)
    buf = bytes(img.pack())
    assert bitmap_bytes(100) == 16
    assert buf[1024] == 0xFE  # region 0 = bit 0 of byte 0
    assert buf[1025] == 0xFD  # region 9 = bit 1 of byte 1
    assert buf[1026:1036] == b"\xff" * 10
    assert buf[1036] == 0x0F  # regions 96..99, padding bits clear
    assert buf[1037:1040] == bytes(3)
    assert len(buf) == 1536  # 1024 + 16 rounded up to a 512-byte block


def test_out_of_sync_new_log_is_all_zero_bits() -> None:
    img = LogImage.new(65, in_sync=False)
    buf = bytes(img.pack())
    assert buf[1024 : 1024 + 16] == bytes(16)
    assert img.out_of_sync() == list(range(65))


def test_io_size_rounds_to_logical_block_size() -> None:
    assert log_io_bytes(2048, 4096) == 4096
    assert log_io_bytes(64 * 8 * 1024, 512) == 1024 + 65536
    assert log_io_bytes(1, 512) == 1536


def test_bitmap_helpers() -> None:
    b = Bitmap(130)
    assert b.find_next_zero(0) == 0 and b.find_next_zero(129) == 129 and b.count() == 0
    b.fill(True)
    assert b.count() == 130 and b.data[-1] == 0 and b.data[16] == 0x03
    b.clear(77)
    b.clear(129)
    assert b.find_next_zero(0) == 77 and b.find_next_zero(78) == 129 and b.find_next_zero(130) == 130
    assert b.iter_zero() == [77, 129]


def _log_device(nr: int, *, in_sync: bool, size: int = 1 << 16, lbs: int = 512) -> MemoryEndpoint:
    ep = MemoryEndpoint(size, "log", logical_block_size=lbs)
    format_log(ep, nr, in_sync=in_sync)
    return ep


def test_inspect_reports_header_counts_and_out_of_sync_ranges() -> None:
    ep = _log_device(300, in_sync=True)
    img = LogImage.read(ep)
    for r in (3, 4, 5, 200, 299):
        img.clean.clear(r)
    img.write(ep)
    rep = inspect(ep, region_size=1024)
    assert rep.nr_regions == 300 and rep.version == 2 and rep.magic == 0x4D695272
    assert rep.in_sync == 295
    assert rep.out_of_sync == (3, 4, 5, 200, 299)
    assert rep.to_dict()["out_of_sync_ranges"] == [[3, 5], [200, 200], [299, 299]]
    assert "out of sync:    3-5, 200, 299" in str(rep)
    assert rep.io_bytes == 1536 and rep.bitmap_bytes == 40


def test_inspect_accepts_version_1_as_2() -> None:
    ep = _log_device(10, in_sync=True)
    ep.data[4:8] = struct.pack("<I", 1)
    assert inspect(ep).version == 2


@pytest.mark.parametrize(
    "mutate, exc, text",
    [
        (lambda d: d.__setitem__(slice(0, 4), b"XXXX"), CorruptMetadata, "magic"),
        (lambda d: d.__setitem__(slice(4, 8), struct.pack("<I", 3)), CorruptMetadata, "version 3"),
        (lambda d: d.__setitem__(slice(8, 16), struct.pack("<Q", 0)), CorruptMetadata, "0 regions"),
        (lambda d: d.__setitem__(slice(8, 16), struct.pack("<Q", 10**9)), CorruptMetadata, "needing"),
    ],
)
def test_inspect_rejects_corrupt_logs_without_writing(mutate, exc, text) -> None:  # type: ignore[no-untyped-def]
    ep = _log_device(10, in_sync=True)
    mutate(ep.data)
    before = bytes(ep.data)
    ep.journal.clear()
    with pytest.raises(exc, match=text):
        inspect(ep)
    assert bytes(ep.data) == before and ep.journal == []


def test_inspect_rejects_too_small_device() -> None:
    ep = MemoryEndpoint(512, "tiny")
    with pytest.raises(InvalidArgument, match="too small"):
        inspect(ep)
    assert ep.journal == []


def test_inspect_rejects_non_power_of_two_region_size() -> None:
    ep = _log_device(10, in_sync=True)
    with pytest.raises(InvalidArgument, match="power of two"):
        inspect(ep, region_size=1000)


def test_inspect_opens_paths_read_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "log.img"
    ep = _log_device(64, in_sync=False, size=4096)
    path.write_bytes(bytes(ep.data))
    rep = inspect(str(path))
    assert rep.nr_regions == 64 and rep.in_sync == 0
    assert path.read_bytes() == bytes(ep.data)
