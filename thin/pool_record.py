"""The pool record: what LVM keeps in its VG metadata, kept at the start of the metadata device.

The kernel stores no names and no sizes for thin devices (thin.md §1.2, §4.3), only ids. LVM keeps
them, with the pool's transaction id and its queue of pending messages, in the volume group's
metadata area at the start of each physical volume (thin.md §10.2). A pool made by
:class:`thin.manager.ThinPoolManager` keeps the same facts in the same kind of place: the first
:data:`RECORD_SECTORS` of the ``--metadata`` device hold this record, and ``NAME-tmeta`` maps the
rest of the device (so the kernel's metadata starts at sector :data:`RECORD_SECTORS`). The record
moves with the disks, and ``thin activate`` needs nothing but the two devices.

Layout: two slots of :data:`SLOT_BYTES`; a write goes to the slot the newest valid record does not
occupy, so a torn write leaves the previous record readable. Each slot is a 32-byte header
(``magic`` 16 bytes, ``seq`` u64, ``length`` u32, ``crc32`` u32 of the body, little-endian)
followed by the body: UTF-8 JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from dmtools.blockdev import BlockDevice
from dmtools.errors import CorruptMetadata, InvalidArgument
from dmtools.locks import range_lock
from dmtools.units import SECTOR

__all__ = ["RECORD_SECTORS", "SLOT_BYTES", "ThinVolume", "PoolRecord", "read_record", "write_record", "has_record",
           "record_lock"]

#: Sectors reserved for the record at the start of the metadata device (256 KiB).
RECORD_SECTORS = 512
#: Each of the two record slots.
SLOT_BYTES = RECORD_SECTORS * SECTOR // 2
_MAGIC = b"dmtools-thinpool"
_HEADER = struct.Struct("<16sQII")
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ThinVolume:
    """A thin volume: its pool device id, its size in sectors, and what it was snapshotted from."""

    dev_id: int
    size: int
    origin: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"dev_id": self.dev_id, "size": self.size, "origin": self.origin}


@dataclass(frozen=True)
class PoolRecord:
    """Everything about a pool that the kernel does not keep.

    ``transaction_id`` is the id the pool must report (LVM's VG transaction id); ``pending`` the
    messages of the change that moved it there, replayed at the next use when the kernel still
    reports ``transaction_id - 1`` (thin.md §10.2). Sizes are sectors.
    """

    name: str
    block_size: int
    features: tuple[str, ...]
    low_water_mark: int
    data_sectors: int
    metadata_sectors: int
    transaction_id: int = 0
    volumes: dict[str, ThinVolume] = field(default_factory=dict)
    pending: tuple[str, ...] = ()
    seq: int = 0

    def to_json(self) -> bytes:
        """The record body."""
        body = {
            "format": "dmtools-thin-pool",
            "version": _FORMAT_VERSION,
            "name": self.name,
            "block_size": self.block_size,
            "features": list(self.features),
            "low_water_mark": self.low_water_mark,
            "data_sectors": self.data_sectors,
            "metadata_sectors": self.metadata_sectors,
            "transaction_id": self.transaction_id,
            "volumes": {n: v.to_dict() for n, v in sorted(self.volumes.items())},
            "pending": list(self.pending),
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, seq: int) -> PoolRecord:
        """Parse a record body; raises :class:`CorruptMetadata`."""
        try:
            body = json.loads(data)
            if body.get("format") != "dmtools-thin-pool" or body.get("version") != _FORMAT_VERSION:
                raise CorruptMetadata(f"unknown pool record format {body.get('format')!r} "
                                      f"version {body.get('version')!r}")
            volumes = {
                str(n): ThinVolume(int(v["dev_id"]), int(v["size"]), v.get("origin"))
                for n, v in body["volumes"].items()
            }
            return cls(name=str(body["name"]), block_size=int(body["block_size"]), features=tuple(body["features"]),
                       low_water_mark=int(body["low_water_mark"]), data_sectors=int(body["data_sectors"]),
                       metadata_sectors=int(body["metadata_sectors"]), transaction_id=int(body["transaction_id"]),
                       volumes=volumes, pending=tuple(body["pending"]), seq=seq)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptMetadata(f"pool record is unreadable: {err}") from err

    def with_changes(self, **changes: Any) -> PoolRecord:
        """A copy with fields replaced."""
        return replace(self, **changes)

    def next_dev_id(self) -> int:
        """LVM's choice of a new device id (lib/metadata/thin_manip.c ``get_free_pool_device_id``):
        one above the highest in use, starting at 1; holes are not reused."""
        return max((v.dev_id for v in self.volumes.values()), default=0) + 1


def _slots(dev: BlockDevice) -> list[PoolRecord]:
    found = []
    for slot in range(2):
        raw = bytearray(SLOT_BYTES)
        dev.readinto(raw, slot * SLOT_BYTES)
        magic, seq, length, crc = _HEADER.unpack_from(raw)
        if magic != _MAGIC or length > SLOT_BYTES - _HEADER.size:
            continue
        body = bytes(raw[_HEADER.size:_HEADER.size + length])
        if zlib.crc32(body) != crc:
            continue
        found.append(PoolRecord.from_json(body, seq))
    return found


def has_record(device: str) -> bool:
    """True when ``device`` starts with a readable pool record."""
    with BlockDevice(device) as dev:
        if dev.size < RECORD_SECTORS * SECTOR:
            return False
        try:
            return bool(_slots(dev))
        except CorruptMetadata:
            return True


def read_record(device: str) -> PoolRecord:
    """The newest valid record on ``device``; raises :class:`CorruptMetadata` when there is none."""
    with BlockDevice(device) as dev:
        if dev.size < RECORD_SECTORS * SECTOR:
            raise CorruptMetadata(f"{device} is too small to hold a pool record", device=device)
        records = _slots(dev)
    if not records:
        raise CorruptMetadata("no dmtools thin-pool record at the start of this device "
                              "(not a pool made by 'dmtools thin pool create')", device=device)
    return max(records, key=lambda r: r.seq)


def write_record(device: str, record: PoolRecord) -> PoolRecord:
    """Write ``record`` as the newest, into the slot the current newest does not use; flushed.

    Returns the record with its new sequence number. Raises :class:`InvalidArgument` when it does
    not fit in a slot.
    """
    seq = record.seq + 1
    body = record.to_json()
    if len(body) > SLOT_BYTES - _HEADER.size:
        raise InvalidArgument(f"the pool record ({len(body)} bytes) does not fit its "
                              f"{SLOT_BYTES - _HEADER.size}-byte slot: too many volumes", device=device)
    raw = bytearray(SLOT_BYTES)
    _HEADER.pack_into(raw, 0, _MAGIC, seq, len(body), zlib.crc32(body))
    raw[_HEADER.size:_HEADER.size + len(body)] = body
    with BlockDevice(device, writable=True) as dev:
        dev.write(raw, (seq % 2) * SLOT_BYTES)
        dev.flush()
    return record.with_changes(seq=seq)


@contextlib.contextmanager
def record_lock(device: str) -> Iterator[None]:
    """Hold the record area of ``device`` while a change reads and rewrites the record: two
    managers of one pool take turns, as LVM's commands take the volume group's lock. Waits for
    the holder.

    The lock is :func:`dmtools.locks.range_lock` on the record's bytes of the device node or file
    the pool's ``-tmeta`` table names. Raises ``DeviceNotFound`` and ``DMError`` from the open.
    """
    with range_lock(device, 0, RECORD_SECTORS * SECTOR):
        yield
