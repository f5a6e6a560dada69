"""The on-disk format, byte for byte: checksums, bitmaps, and what a format writes (thin.md §4–§6)."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from thin.metadata import ThinMetadata, dump_xml
from thin.metadata.check import check
from thin.metadata.ondisk import (BITMAP_CSUM_XOR, BTREE_CSUM_XOR, INDEX_CSUM_XOR, SUPERBLOCK_CSUM_XOR,
                                  Superblock, checksum, pack_block_time, unpack_block_time)
from thin.metadata.space_map import decode_bitmap, encode_bitmap


def test_checksum_vectors() -> None:
    # thin.md §4.1: for an all-zero block the stored checksums are these.
    block = bytes(4096)
    assert checksum(block, SUPERBLOCK_CSUM_XOR) == 0x58CFD397
    assert checksum(block, BTREE_CSUM_XOR) == 0x58CC7E82
    assert checksum(block, BITMAP_CSUM_XOR) == 0x58CE0B1A
    assert checksum(block, INDEX_CSUM_XOR) == 0x58CFD54F


def test_bitmap_bit_order() -> None:
    # thin.md §6.3: the bit at 2k is the HIGH bit of entry k's count.
    counts = bytearray(16320)
    counts[0:8] = b"\x01" * 8
    assert encode_bitmap(counts)[:2] == b"\xaa\xaa"
    counts = bytearray(16320)
    counts[10] = counts[11] = 2
    counts[12] = 2
    counts[500] = 1
    raw = encode_bitmap(counts)
    assert raw[2] == 0x50 and raw[3] == 0x01 and raw[125] == 0x02
    block = bytes(16) + raw
    assert decode_bitmap(block) == counts


@pytest.mark.parametrize("n", [0, 1, 5, 3072, 16319, 16320])
def test_a_short_bitmap_encodes_as_its_counts_padded_with_free_entries(n: int) -> None:
    """A pool's last bitmap holds fewer than 16320 counts: the entries past them are free."""
    rng = random.Random(n)
    counts = bytearray(rng.randrange(4) for _ in range(n))
    raw = encode_bitmap(counts)
    assert len(raw) == 4080
    assert raw == encode_bitmap(counts + bytes(16320 - n))
    assert decode_bitmap(bytes(16) + raw) == counts + bytes(16320 - n)


def test_block_time_packing() -> None:
    assert pack_block_time(5, 3) == (5 << 24) | 3
    assert unpack_block_time(pack_block_time((1 << 40) - 1, (1 << 24) - 1)) == ((1 << 40) - 1, (1 << 24) - 1)


def test_format_writes_the_kernels_layout(meta_image: Callable[..., Path]) -> None:
    path = meta_image(4 << 20)
    ThinMetadata.format(path, data_block_size=128).close()
    raw = path.read_bytes()
    sb = Superblock.unpack(raw[:4096])
    # thin.md §4.6: index 1, overflow 2, bitmap 3, data index 4, data overflow 5, mapping 6, details 7.
    assert (sb.metadata_sm.nr_blocks, sb.metadata_sm.nr_allocated, sb.metadata_sm.bitmap_root,
            sb.metadata_sm.ref_count_root) == (1024, 8, 1, 2)
    assert (sb.data_sm.nr_blocks, sb.data_sm.nr_allocated, sb.data_sm.bitmap_root,
            sb.data_sm.ref_count_root) == (0, 0, 4, 5)
    assert (sb.data_mapping_root, sb.device_details_root) == (6, 7)
    assert (sb.version, sb.time, sb.trans_id, sb.flags, sb.held_root) == (2, 0, 0, 0, 0)
    assert (sb.data_block_size, sb.metadata_block_size, sb.metadata_nr_blocks) == (128, 8, 1024)
    assert struct.unpack_from("<Q", raw, 32)[0] == 27022010
    assert raw[3 * 4096 + 16:3 * 4096 + 18] == b"\xaa\xaa"  # blocks 0..7 counted once
    # the index entry of bitmap 0: at block 3, 16320 - 8 free, none free before 8
    assert struct.unpack_from("<QII", raw, 4096 + 16) == (3, 16312, 8)
    # node headers: value sizes and max entries of calc_max_entries
    for block, value_size, max_entries in ((2, 4, 336), (4, 16, 168), (5, 4, 336), (6, 8, 252), (7, 24, 126)):
        flags, nr, mx, vs = struct.unpack_from("<I8xIII", raw, block * 4096 + 4)
        assert (flags, nr, mx, vs) == (2, 0, max_entries, value_size), block


def test_format_passes_thin_check(thin_tools, meta_image: Callable[..., Path], tmp_path: Path) -> None:
    path = meta_image(16 << 20)
    ThinMetadata.format(path, data_block_size=256, nr_data_blocks=40000).close()
    thin_tools.check(path)
    ours = tmp_path / "ours.xml"
    with ThinMetadata.open(path) as md, open(ours, "w") as f:
        dump_xml(md, f)
    assert ours.read_text() == thin_tools.dump(path)
    assert 'nr_data_blocks="40000"' in ours.read_text()
    assert check(path).ok


def test_large_metadata_device_has_several_bitmaps(thin_tools, meta_image: Callable[..., Path]) -> None:
    path = meta_image(300 << 20)  # 76800 blocks: 5 metadata bitmaps
    with ThinMetadata.format(path, data_block_size=128, nr_data_blocks=100000) as md:
        assert md.nr_metadata_blocks == 76800
        md.create_thin(1)
        for v in range(3000):
            md.insert(1, v, md.alloc_data_block())
        md.commit()
    thin_tools.check(path)
    report = check(path)
    assert report.ok and not report.leaks and not report.warnings, (report.errors, report.warnings)


def test_metadata_device_grows(thin_tools, meta_image: Callable[..., Path]) -> None:
    path = meta_image(1 << 20)  # 256 blocks
    with ThinMetadata.format(path, data_block_size=128, nr_data_blocks=200000) as md:
        md.create_thin(1)
        for v in range(0, 20000, 2):
            md.insert(1, v, md.alloc_data_block())
        md.commit()
        with open(path, "r+b") as f:
            f.truncate(100 << 20)  # 25600 blocks: a second metadata bitmap
        assert md.resize_metadata() == 25600
        md.commit()
        assert md.nr_metadata_blocks == 25600
        for v in range(1, 200000, 2):  # more nodes than the old device held
            md.insert(1, v, md.alloc_data_block())
        md.commit()
        assert md.free_metadata_blocks < 25600 - 256
    thin_tools.check(path)
    report = check(path)
    assert report.ok and not report.leaks and not report.warnings, (report.errors, report.warnings)
    with ThinMetadata.open(path) as md:
        assert md.details(1).mapped_blocks == 110000


def test_data_space_map_index_of_two_levels(thin_tools, meta_image: Callable[..., Path]) -> None:
    path = meta_image(32 << 20)
    nr = 200 * 16320  # 200 bitmaps: more index entries than one leaf holds (168)
    with ThinMetadata.format(path, data_block_size=128, nr_data_blocks=nr) as md:
        md.create_thin(1)
        for v in range(0, nr, 16320 * 7):  # blocks in many bitmaps
            md.insert(1, v, v)
            md.data_inc(v)
        md.commit()
        with open(path, "rb") as f:
            f.seek(md.superblock.data_sm.bitmap_root * 4096 + 4)
            assert f.read(4) == b"\x01\x00\x00\x00"  # the index root is an internal node
    thin_tools.check(path)
    report = check(path)
    assert report.ok and not report.warnings and not report.leaks, (report.errors, report.warnings, report.leaks)
    assert report.data_blocks == nr and report.data_free == nr - len(range(0, nr, 16320 * 7))



def test_a_run_of_blocks_is_one_write_and_one_past_the_end_is_refused(tmp_path: Path) -> None:
    """``MetadataDevice.write`` of consecutive blocks (a commit writes each run of its blocks so)."""
    from dmtools.errors import InvalidArgument
    from thin.metadata.transaction import MetadataDevice

    path = tmp_path / "meta.img"
    path.write_bytes(bytes(4 * 4096))
    dev = MetadataDevice(str(path), writable=True)
    try:
        dev.write(1, b"\1" * 4096 + b"\2" * 4096)
        assert dev.read(1) == b"\1" * 4096 and dev.read(2) == b"\2" * 4096
        for blocknr, data in ((3, bytes(2 * 4096)), (0, bytes(100)), (4, bytes(4096))):
            with pytest.raises(InvalidArgument):
                dev.write(blocknr, data)
    finally:
        dev.close()
    assert path.read_bytes() == bytes(4096) + b"\1" * 4096 + b"\2" * 4096 + bytes(4096)
