"""The persistent exception store's on-disk format (drivers/md/dm-snap-persistent.c).

Everything here is pure arithmetic on bytes: no I/O. Integers on disk are little-endian.

Layout of a COW device divided into chunks of ``C`` sectors:

* chunk 0: header ``{le32 magic, le32 valid, le32 version, le32 chunk_size}``, rest zero;
* metadata area ``k`` at chunk ``1 + (E + 1) * k`` where ``E = C * 512 / 16`` records
  ``{le64 old_chunk, le64 new_chunk}`` fit in one chunk; its ``E`` data chunks follow it;
* the table ends at the first record whose ``new_chunk`` is 0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dmtools.errors import CorruptMetadata
from dmtools.target_values import MAX_SNAPSHOT_CHUNK
from dmtools.units import SECTOR

#: "SnAp" read as a little-endian 32-bit word (dm-snap-persistent.c SNAP_MAGIC).
SNAP_MAGIC = 0x70416E53
#: dm-snap-persistent.c SNAPSHOT_DISK_VERSION; the kernel refuses any other value.
SNAPSHOT_DISK_VERSION = 1
#: dm-snap-persistent.c NUM_SNAPSHOT_HDR_CHUNKS.
NUM_SNAPSHOT_HDR_CHUNKS = 1
#: dm-snap-persistent.c DM_CHUNK_SIZE_DEFAULT_SECTORS (16 KiB), used when the table gives 0.
DM_CHUNK_SIZE_DEFAULT_SECTORS = 32
#: bytes in one ``struct disk_exception``.
DISK_EXCEPTION_SIZE = 16

_HEADER = struct.Struct("<IIII")
HEADER_SIZE = _HEADER.size


@dataclass(frozen=True)
class DiskHeader:
    """The 16-byte header in chunk 0."""

    magic: int
    valid: int
    version: int
    chunk_size: int

    @classmethod
    def new(cls, chunk_size: int, *, valid: bool = True) -> "DiskHeader":
        """The header the kernel writes for a new store (``write_header``)."""
        return cls(SNAP_MAGIC, 1 if valid else 0, SNAPSHOT_DISK_VERSION, chunk_size)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> "DiskHeader":
        """Decode the first 16 bytes of chunk 0."""
        if len(data) < HEADER_SIZE:
            raise CorruptMetadata(f"COW header is {len(data)} bytes, need {HEADER_SIZE}")
        return cls(*_HEADER.unpack_from(data, 0))

    def pack(self, chunk_bytes: int) -> bytes:
        """The whole header chunk: the 16 header bytes followed by zeros up to ``chunk_bytes``."""
        return _HEADER.pack(self.magic, self.valid, self.version, self.chunk_size) + bytes(chunk_bytes - HEADER_SIZE)

    @property
    def is_new(self) -> bool:
        """Magic 0 means "no store yet": the kernel initialises one."""
        return self.magic == 0


def chunk_size_error(chunk_sectors: int) -> str | None:
    """Why ``chunk_sectors`` is unusable (dm-exception-store.c checks), or ``None``.

    Block-size multiples are checked by the caller, who knows the devices.
    """
    if chunk_sectors <= 0:
        return "Chunk size not set"
    if chunk_sectors & (chunk_sectors - 1):
        return "Chunk size is not a power of 2"
    if chunk_sectors > MAX_SNAPSHOT_CHUNK:
        return "Chunk size is too high"
    return None


def exceptions_per_area(chunk_sectors: int) -> int:
    """Records in one metadata area: ``chunk bytes / 16``."""
    return chunk_sectors * SECTOR // DISK_EXCEPTION_SIZE


def area_location(area: int, chunk_sectors: int) -> int:
    """Chunk number of metadata area ``area`` (``area_location``)."""
    return NUM_SNAPSHOT_HDR_CHUNKS + (exceptions_per_area(chunk_sectors) + 1) * area


def skip_metadata(next_free: int, chunk_sectors: int) -> int:
    """Step ``next_free`` over a metadata area if it points at one (``skip_metadata``)."""
    stride = exceptions_per_area(chunk_sectors) + 1
    if next_free % stride == NUM_SNAPSHOT_HDR_CHUNKS:
        return next_free + 1
    return next_free
