"""The disk dirty log's on-disk format, byte for byte (drivers/md/dm-log.c).

Layout of a log device::

    byte 0     le32 magic       MIRROR_MAGIC 0x4D695272 (bytes 72 52 69 4D)
    byte 4     le32 version     MIRROR_DISK_VERSION 2 (1 is read as 2 on little-endian hosts)
    byte 8     le64 nr_regions  region count at the last resume
    byte 16    ... 1023         not interpreted, preserved as read
    byte 1024  clean bitmap     LOG_OFFSET = 2 sectors; round_up(nr_regions, 64) / 8 bytes;
                                region r is bit r % 8 of byte r // 8; 1 = clean / in sync

Header and bitmap always move in one I/O of ``round_up(1024 + bitmap_bytes, logical_block_size)``
bytes from sector 0 (``header_location`` in dm-log.c).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Any

from dmtools.endpoint import Endpoint
from dmtools.errors import CorruptMetadata, DeviceIOError, InvalidArgument
from dmtools.target_values import SyncMode
from dmtools.units import SECTOR

from mirror.bitmap import Bitmap, bitmap_bytes

#: "MiRr" (dm-log.c MIRROR_MAGIC).
MIRROR_MAGIC = 0x4D695272
#: dm-log.c MIRROR_DISK_VERSION.
MIRROR_DISK_VERSION = 2
#: Sectors before the clean bitmap (dm-log.c LOG_OFFSET).
LOG_OFFSET = 2
#: Byte offset of the clean bitmap.
BITMAP_OFFSET = LOG_OFFSET * SECTOR
#: ``struct log_header``: le32 magic, le32 version, le64 nr_regions (16 bytes, packed).
HEADER = struct.Struct("<IIQ")


def region_count(length_sectors: int, region_size: int) -> int:
    """``dm_sector_div_up(len, region_size)``: regions covering ``length_sectors``."""
    return -(-length_sectors // region_size)


def check_region_size(region_size: int, length_sectors: int | None = None) -> None:
    """Raise ``InvalidArgument`` unless ``region_size`` (sectors) is a power of two ≥ 2 and ≤ the length.

    dm-log.c ``_check_region_size``.
    """
    if region_size < 2 or region_size & (region_size - 1):
        raise InvalidArgument(
            f"invalid region size {region_size} sectors: must be a power of two of at least 2 sectors",
            operation="log",
        )
    if length_sectors is not None and region_size > length_sectors:
        raise InvalidArgument(
            f"invalid region size {region_size} sectors: larger than the mirror ({length_sectors} sectors)",
            operation="log",
        )


def check_log_regions(kept: int, length_sectors: int, region_size: int, device: str | None = None) -> None:
    """Refuse a kept disk log whose header counts ``kept`` regions when the mirror has
    ``region_count(length_sectors, region_size)``: its bits would be read against the wrong
    regions. dm-log.c's resume takes a new count as a resize (regions past the old count out of
    sync), which is right for a grown mirror with its old region size; with another region size
    (``--region-size`` left at its default for a mirror made with 2M regions) clean bits land on
    dirty regions, which are then never copied. Raises ``InvalidArgument`` naming the region size
    that gives ``kept`` regions, when one does."""
    want = region_count(length_sectors, region_size)
    if kept == want:
        return
    sizes = [1 << k for k in range(1, length_sectors.bit_length() + 1)]
    fits = [r for r in sizes if r <= length_sectors and region_count(length_sectors, r) == kept]
    hint = f" (--region-size {fits[0] * SECTOR // 1024}K gives {kept})" if fits else ""
    raise InvalidArgument(
        f"the log holds {kept} regions, but {length_sectors} sectors in regions of {region_size} sectors are "
        f"{want}: give the region size the log was made with{hint}, or copy every region "
        "(resync-offline --full)", operation="log", device=device)


def round_up(value: int, unit: int) -> int:
    """``value`` rounded up to a multiple of ``unit``."""
    return -(-value // unit) * unit


def log_io_bytes(nr_regions: int, logical_block_size: int = SECTOR) -> int:
    """Bytes of the single header + bitmap I/O: ``round_up(1024 + bitmap, logical_block_size)``."""
    return round_up(BITMAP_OFFSET + bitmap_bytes(nr_regions), max(logical_block_size, SECTOR))


@dataclass(frozen=True)
class LogHeader:
    """``struct log_header`` as stored on disk (little-endian)."""

    magic: int = MIRROR_MAGIC
    version: int = MIRROR_DISK_VERSION
    nr_regions: int = 0

    def pack(self) -> bytes:
        """The 16 header bytes."""
        return HEADER.pack(self.magic, self.version, self.nr_regions)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> "LogHeader":
        """Decode the first 16 bytes of ``buf``."""
        magic, version, nr = HEADER.unpack_from(buf, 0)
        return cls(magic, version, nr)


def drop_cache(ep: Endpoint) -> None:
    """Forget a block device's cached pages before reading it offline.

    The kernel's targets (a mirror's resync, its log writes) write to their devices below the page
    cache; pages cached earlier (udev probing, an earlier read) would show stale data. Our own
    writes are flushed first. Regular files are left alone (their page cache is coherent).
    """
    fd = ep.fileno()
    if fd is None:
        return
    with contextlib.suppress(OSError):
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            return
        if not ep.read_only:
            ep.flush()
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _read_exact(ep: Endpoint, size: int, what: str) -> bytearray:
    buf = bytearray(size)
    try:
        got = ep.readinto(buf, 0)
    except OSError as err:
        raise DeviceIOError(f"cannot read {what}: {err}", operation="read", device=ep.name) from err
    if got < size:
        raise InvalidArgument(f"log device too small: need {size} bytes, read {got}", operation="read", device=ep.name)
    return buf


@dataclass
class LogImage:
    """Header and clean bitmap of a log device, as read (or about to be written) in one I/O.

    ``buffer`` is the whole I/O buffer; bytes 16–1023 keep what was read, as the kernel does.
    """

    header: LogHeader
    clean: Bitmap
    buffer: bytearray
    logical_block_size: int = SECTOR

    @property
    def io_bytes(self) -> int:
        """Length of the header + bitmap I/O."""
        return len(self.buffer)

    @classmethod
    def new(cls, nr_regions: int, *, in_sync: bool, logical_block_size: int = SECTOR) -> "LogImage":
        """A freshly formatted log: every region clean (``in_sync``) or every region out of sync."""
        buf = bytearray(log_io_bytes(nr_regions, logical_block_size))
        clean = Bitmap(nr_regions, fill=in_sync)
        if in_sync:
            clean.clear_padding()
        img = cls(LogHeader(MIRROR_MAGIC, MIRROR_DISK_VERSION, nr_regions), clean, buf, logical_block_size)
        img.pack()
        return img

    @classmethod
    def read(cls, ep: Endpoint) -> "LogImage":
        """Read and validate a log device strictly (offline use).

        Raises ``InvalidArgument`` when the device is too small for a header or for the bitmap the
        header describes, ``CorruptMetadata`` for a wrong magic, an unknown version or a region count
        of zero, ``DeviceIOError`` when the read fails. Nothing is written.
        """
        drop_cache(ep)
        lbs = max(ep.logical_block_size, SECTOR)
        first = log_io_bytes(1, lbs)
        if ep.size < first:
            raise InvalidArgument(f"log device too small: {ep.size} bytes, a disk log needs at least {first}",
                                  operation="inspect", device=ep.name)
        head = LogHeader.unpack(_read_exact(ep, SECTOR, "log header"))
        if head.magic != MIRROR_MAGIC:
            raise CorruptMetadata(f"not a mirror disk log: magic 0x{head.magic:08x}, expected 0x{MIRROR_MAGIC:08x}",
                                  operation="inspect", device=ep.name)
        version = head.version
        if version == 1:  # dm-log.c: version 1 is read as 2 on little-endian hosts
            version = MIRROR_DISK_VERSION
        if version != MIRROR_DISK_VERSION:
            raise CorruptMetadata(f"incompatible disk log version {head.version}", operation="inspect", device=ep.name)
        if head.nr_regions == 0 or head.nr_regions >= 1 << 40:
            raise CorruptMetadata(
                f"disk log header names {head.nr_regions} regions", operation="inspect", device=ep.name
            )
        size = log_io_bytes(head.nr_regions, lbs)
        if size > ep.size:
            raise CorruptMetadata(
                f"disk log header names {head.nr_regions} regions, needing {size} bytes, "
                f"but the device has {ep.size}",
                operation="inspect",
                device=ep.name,
            )
        buf = _read_exact(ep, size, "log header and bitmap")
        clean = Bitmap(head.nr_regions, data=memoryview(buf)[BITMAP_OFFSET:])
        return cls(LogHeader(head.magic, version, head.nr_regions), clean, buf, lbs)

    def pack(self) -> bytearray:
        """Write header and bitmap into ``buffer`` and return it."""
        self.buffer[0 : HEADER.size] = self.header.pack()
        n = len(self.clean.data)
        self.buffer[BITMAP_OFFSET : BITMAP_OFFSET + n] = self.clean.data
        return self.buffer

    def write(self, ep: Endpoint, *, flush: bool = True) -> None:
        """Write header and bitmap in one I/O from sector 0, then flush the device (``flush``)."""
        if len(self.buffer) > ep.size:
            raise InvalidArgument(
                f"log device too small: need {len(self.buffer)} bytes", operation="write", device=ep.name
            )
        ep.write(self.pack(), 0)
        if flush:
            ep.flush()

    def resize(self, nr_regions: int, sync: SyncMode = SyncMode.DEFAULT) -> None:
        """Apply dm-log.c's resume rules for a mirror of ``nr_regions`` regions.

        A ``sync``/``nosync`` argument makes the log count as new. Regions past the header's count
        (new or grown) become clean under ``nosync`` and out of sync otherwise; bits past the region
        count are cleared; the header takes the new count.
        """
        old = 0 if sync is not SyncMode.DEFAULT else self.header.nr_regions
        clean = Bitmap(nr_regions, data=self.clean.data + bytes(bitmap_bytes(nr_regions)))
        for r in range(min(old, nr_regions), nr_regions):
            clean.assign(r, sync is SyncMode.NOSYNC)
        clean.clear_padding()
        need = log_io_bytes(nr_regions, self.logical_block_size)
        if need > len(self.buffer):
            self.buffer.extend(bytes(need - len(self.buffer)))
        elif need < len(self.buffer):
            del self.buffer[need:]
        self.clean = clean
        self.header = LogHeader(MIRROR_MAGIC, MIRROR_DISK_VERSION, nr_regions)
        self.pack()

    def out_of_sync(self) -> list[int]:
        """Regions whose clean bit is 0."""
        return self.clean.iter_zero()


def format_log(ep: Endpoint, nr_regions: int, *, in_sync: bool) -> LogImage:
    """Write a fresh disk log for ``nr_regions`` regions, all clean or all out of sync, and flush it."""
    img = LogImage.new(nr_regions, in_sync=in_sync, logical_block_size=max(ep.logical_block_size, SECTOR))
    img.write(ep)
    return img


def ranges(regions: list[int]) -> list[tuple[int, int]]:
    """Collapse sorted region numbers into inclusive ``(first, last)`` runs."""
    out: list[tuple[int, int]] = []
    for r in regions:
        if out and out[-1][1] == r - 1:
            out[-1] = (out[-1][0], r)
        else:
            out.append((r, r))
    return out


@dataclass(frozen=True)
class LogReport:
    """What ``inspect`` finds on a log device."""

    device: str
    device_bytes: int
    magic: int
    version: int
    nr_regions: int
    bitmap_bytes: int
    io_bytes: int
    in_sync: int
    out_of_sync: tuple[int, ...] = field(default=())
    region_size: int | None = None

    @property
    def percent(self) -> float:
        """Share of regions in sync, 0–100."""
        return 100.0 * self.in_sync / self.nr_regions if self.nr_regions else 100.0

    @property
    def fully_in_sync(self) -> bool:
        """True when every region's clean bit is set."""
        return not self.out_of_sync

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary (out-of-sync regions as inclusive ranges)."""
        return {
            "device": self.device,
            "device_bytes": self.device_bytes,
            "magic": f"0x{self.magic:08x}",
            "version": self.version,
            "nr_regions": self.nr_regions,
            "region_size_sectors": self.region_size,
            "bitmap_bytes": self.bitmap_bytes,
            "io_bytes": self.io_bytes,
            "in_sync_regions": self.in_sync,
            "out_of_sync_regions": len(self.out_of_sync),
            "percent_in_sync": round(self.percent, 2),
            "out_of_sync_ranges": [list(r) for r in ranges(list(self.out_of_sync))],
        }

    def to_json(self) -> str:
        """``to_dict`` as JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        lines = [
            f"log device:     {self.device} ({self.device_bytes} bytes)",
            f"magic:          0x{self.magic:08x} (MiRr)",
            f"version:        {self.version}",
            f"regions:        {self.nr_regions}"
            + (f" of {self.region_size} sectors" if self.region_size else ""),
            f"bitmap:         {self.bitmap_bytes} bytes at byte {BITMAP_OFFSET} ({self.io_bytes}-byte I/O)",
            f"in sync:        {self.in_sync}/{self.nr_regions} ({self.percent:.2f}%)",
        ]
        if self.out_of_sync:
            text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges(list(self.out_of_sync)))
            lines.append(f"out of sync:    {text}")
        return "\n".join(lines)


def inspect(logdev: "str | Endpoint", *, region_size: int | None = None) -> LogReport:
    """Read a disk log offline and report header, region count and which regions are out of sync.

    ``logdev`` is a path (opened read-only) or an endpoint. ``region_size`` (sectors) is not stored in
    the log; when given it is checked (power of two) and echoed in the report. Raises
    ``InvalidArgument`` (too small, bad region size) or ``CorruptMetadata`` (not a log); never writes.
    """
    if region_size is not None:
        check_region_size(region_size)
    if isinstance(logdev, Endpoint):
        return _inspect(logdev, region_size)
    from dmtools.blockdev import BlockDevice

    with BlockDevice(str(logdev)) as ep:
        return _inspect(ep, region_size)


def _inspect(ep: Endpoint, region_size: int | None) -> LogReport:
    img = LogImage.read(ep)
    oos = tuple(img.out_of_sync())
    return LogReport(device=ep.name, device_bytes=ep.size, magic=img.header.magic, version=img.header.version,
                     nr_regions=img.header.nr_regions, bitmap_bytes=bitmap_bytes(img.header.nr_regions),
                     io_bytes=img.io_bytes, in_sync=img.header.nr_regions - len(oos), out_of_sync=oos,
                     region_size=region_size)
