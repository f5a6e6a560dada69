"""The on-disk structures of dm-thin metadata, byte for byte.

Constants and layouts come from drivers/md/dm-thin-metadata.c (superblock, device details,
block_time), drivers/md/persistent-data/dm-btree-internal.h (node header),
dm-space-map-common.h (space-map root, index entry, bitmap) and dm-block-manager.c (checksum).
Every integer is little-endian; a metadata block is 4096 bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import crc32c as _crc32c

from dmtools.errors import CorruptMetadata

BLOCK_SIZE = 4096  # THIN_METADATA_BLOCK_SIZE / DM_SM_METADATA_BLOCK_SIZE (bytes)
BLOCK_SECTORS = BLOCK_SIZE // 512
SUPERBLOCK_LOCATION = 0
SUPERBLOCK_MAGIC = 27022010  # THIN_SUPERBLOCK_MAGIC
METADATA_VERSION = 2  # THIN_VERSION, what the kernel writes
NEEDS_CHECK_FLAG = 1  # THIN_METADATA_NEEDS_CHECK_FLAG

# Checksum XOR of each block type (dm-thin-metadata.c, dm-btree-spine.c, dm-space-map-common.c).
SUPERBLOCK_CSUM_XOR = 160774
BTREE_CSUM_XOR = 121107
BITMAP_CSUM_XOR = 240779
INDEX_CSUM_XOR = 160478

ENTRIES_PER_BITMAP = (BLOCK_SIZE - 16) * 4  # 2 bits per entry after the 16-byte bitmap header
MAX_METADATA_BITMAPS = 255  # dm-space-map-common.h
MAX_METADATA_BLOCKS = MAX_METADATA_BITMAPS * ENTRIES_PER_BITMAP  # DM_SM_METADATA_MAX_BLOCKS
MAX_METADATA_SECTORS = MAX_METADATA_BLOCKS * BLOCK_SECTORS  # THIN_METADATA_MAX_SECTORS
MAX_DEV_ID = (1 << 24) - 1  # dm-thin.c MAX_DEV_ID
MIN_DATA_BLOCK_SECTORS = 128  # DATA_DEV_BLOCK_SIZE_MIN_SECTORS (64 KiB)
MAX_DATA_BLOCK_SECTORS = 2097152  # DATA_DEV_BLOCK_SIZE_MAX_SECTORS (1 GiB)
TIME_BITS = 24  # dm-thin-metadata.c pack_block_time
TIME_MASK = (1 << TIME_BITS) - 1
MAX_DATA_BLOCK = (1 << 40) - 1

# Superblock field layout (struct thin_disk_superblock, 364 bytes packed).
_SB_HEAD = struct.Struct("<IIQ16sQIIQQ")  # csum flags blocknr uuid magic version time trans_id held_root
_SB_TAIL = struct.Struct("<QQIIQIII")  # mapping root, details root, data bs, meta bs, nr blocks, 3 flag words
_SB_DATA_SM = 64
_SB_META_SM = 192
_SB_TAIL_AT = 320
SM_ROOT_AREA = 128  # SPACE_MAP_ROOT_SIZE

_SM_ROOT = struct.Struct("<QQQQ")
_INDEX_ENTRY = struct.Struct("<QII")
_DETAILS = struct.Struct("<QQII")


def checksum(block: bytes | bytearray | memoryview, xor: int) -> int:
    """The stored checksum of a block: crc32c(~0, block[4:4096]) with no final inversion, XOR ``xor``.

    dm-block-manager.c ``dm_bm_checksum``; the crc32c module returns the inverted (standard) value.
    """
    return (_crc32c.crc32c(memoryview(block)[4:BLOCK_SIZE]) ^ 0xFFFFFFFF ^ xor) & 0xFFFFFFFF


def seal(block: bytearray, blocknr: int, xor: int) -> None:
    """Fill in a block's own location (offset 8) and its checksum (offset 0) before writing."""
    struct.pack_into("<Q", block, 8, blocknr)
    struct.pack_into("<I", block, 0, checksum(block, xor))


def verify(block: bytes | bytearray | memoryview, blocknr: int, xor: int, what: str) -> None:
    """Check a block's location and checksum as the kernel's validators do; raise ``CorruptMetadata``."""
    stored, = struct.unpack_from("<I", block, 0)
    where, = struct.unpack_from("<Q", block, 8)
    if where != blocknr:
        raise CorruptMetadata(f"{what} block {blocknr} says it is block {where}")
    want = checksum(block, xor)
    if stored != want:
        raise CorruptMetadata(f"bad checksum in {what} block {blocknr} (stored {stored:#010x}, computed {want:#010x})")


@dataclass(frozen=True)
class SpaceMapRoot:
    """``disk_sm_root``: the 32 bytes a space map is opened from."""

    nr_blocks: int
    nr_allocated: int
    bitmap_root: int
    ref_count_root: int

    def pack(self) -> bytes:
        return _SM_ROOT.pack(self.nr_blocks, self.nr_allocated, self.bitmap_root, self.ref_count_root)

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview, offset: int = 0) -> SpaceMapRoot:
        return cls(*_SM_ROOT.unpack_from(raw, offset))


@dataclass(frozen=True)
class IndexEntry:
    """``disk_index_entry``: where a bitmap lives and how many free entries it holds."""

    blocknr: int
    nr_free: int
    none_free_before: int

    SIZE = 16

    def pack(self) -> bytes:
        return _INDEX_ENTRY.pack(self.blocknr, self.nr_free, self.none_free_before)

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview, offset: int = 0) -> IndexEntry:
        return cls(*_INDEX_ENTRY.unpack_from(raw, offset))


@dataclass(frozen=True)
class DeviceDetails:
    """``disk_device_details``: the value of the details btree, keyed by thin device id."""

    mapped_blocks: int
    transaction_id: int
    creation_time: int
    snapshotted_time: int

    SIZE = 24

    def pack(self) -> bytes:
        return _DETAILS.pack(self.mapped_blocks, self.transaction_id, self.creation_time, self.snapshotted_time)

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview, offset: int = 0) -> DeviceDetails:
        return cls(*_DETAILS.unpack_from(raw, offset))


def pack_block_time(data_block: int, time: int) -> int:
    """A mapping value: 40-bit data block and 24-bit time (dm-thin-metadata.c ``pack_block_time``)."""
    return (data_block << TIME_BITS) | time


def unpack_block_time(value: int) -> tuple[int, int]:
    """``(data_block, time)`` of a mapping value."""
    return value >> TIME_BITS, value & TIME_MASK


@dataclass(frozen=True)
class Superblock:
    """``thin_disk_superblock`` (block 0, or a held metadata-snapshot copy)."""

    flags: int
    blocknr: int
    uuid: bytes
    version: int
    time: int
    trans_id: int
    held_root: int
    data_sm_root: bytes  # the 128-byte areas as stored
    metadata_sm_root: bytes
    data_mapping_root: int
    device_details_root: int
    data_block_size: int
    metadata_block_size: int
    metadata_nr_blocks: int
    compat_flags: int = 0
    compat_ro_flags: int = 0
    incompat_flags: int = 0

    @property
    def data_sm(self) -> SpaceMapRoot:
        return SpaceMapRoot.unpack(self.data_sm_root)

    @property
    def metadata_sm(self) -> SpaceMapRoot:
        return SpaceMapRoot.unpack(self.metadata_sm_root)

    @property
    def needs_check(self) -> bool:
        return bool(self.flags & NEEDS_CHECK_FLAG)

    def pack(self) -> bytearray:
        """The whole 4096-byte block, sealed for ``self.blocknr``."""
        block = bytearray(BLOCK_SIZE)
        _SB_HEAD.pack_into(block, 0, 0, self.flags, self.blocknr, self.uuid.ljust(16, b"\0")[:16], SUPERBLOCK_MAGIC,
                           self.version, self.time, self.trans_id, self.held_root)
        block[_SB_DATA_SM:_SB_DATA_SM + SM_ROOT_AREA] = self.data_sm_root.ljust(SM_ROOT_AREA, b"\0")
        block[_SB_META_SM:_SB_META_SM + SM_ROOT_AREA] = self.metadata_sm_root.ljust(SM_ROOT_AREA, b"\0")
        _SB_TAIL.pack_into(block, _SB_TAIL_AT, self.data_mapping_root, self.device_details_root,
                           self.data_block_size, self.metadata_block_size, self.metadata_nr_blocks,
                           self.compat_flags, self.compat_ro_flags, self.incompat_flags)
        seal(block, self.blocknr, SUPERBLOCK_CSUM_XOR)
        return block

    @classmethod
    def unpack(cls, block: bytes | bytearray | memoryview, blocknr: int = SUPERBLOCK_LOCATION) -> Superblock:
        """Parse and validate a superblock (dm-thin-metadata.c ``sb_check``): location, magic, checksum."""
        if not any(bytes(block[:BLOCK_SIZE])):
            raise CorruptMetadata("the metadata is not formatted (superblock is all zeroes)")
        _csum, flags, where, uuid, magic, version, time, trans_id, held = _SB_HEAD.unpack_from(block, 0)
        if magic != SUPERBLOCK_MAGIC:
            raise CorruptMetadata(f"bad superblock magic {magic} at block {blocknr} (expected {SUPERBLOCK_MAGIC})")
        verify(block, blocknr, SUPERBLOCK_CSUM_XOR, "superblock")
        tail = _SB_TAIL.unpack_from(block, _SB_TAIL_AT)
        return cls(flags, where, bytes(uuid), version, time, trans_id, held,
                   bytes(block[_SB_DATA_SM:_SB_DATA_SM + SM_ROOT_AREA]),
                   bytes(block[_SB_META_SM:_SB_META_SM + SM_ROOT_AREA]), *tail)
