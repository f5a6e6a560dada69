"""Offline thin-pool tools: no device-mapper needed.

``ls`` reports each thin device's mapped, exclusive and shared blocks as thin-provisioning-tools'
``thin_ls`` does; ``export`` rebuilds one thin volume (or snapshot) from a pool's metadata and data
devices into a file or block device, e.g. to recover a volume of an LVM thin pool on a machine
without dm-thin. Both open the pool read-only and check everything before writing a byte.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dmtools.blockdev import open_endpoint
from dmtools.claims import Holder
from dmtools.endpoint import Endpoint
from dmtools.errors import CorruptMetadata, InvalidArgument
from dmtools.inputs import check_devices
from dmtools.output import discard_output, open_output
from dmtools.units import SECTOR
from kcopyd.progress import CopyTally, ProgressFn

from thin.metadata import btree
from thin.metadata.dump import device_runs
from thin.metadata.ondisk import Superblock
from thin.metadata.pool import ThinMetadata

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.backend import DeviceMapper

__all__ = ["DeviceUsage", "ExportResult", "LS_FIELDS", "export", "format_ls", "ls"]

@dataclass(frozen=True)
class DeviceUsage:
    """One row of ``ls``: a thin device's details and how many of its blocks it alone maps."""

    dev_id: int
    mapped_blocks: int
    exclusive_blocks: int
    transaction: int
    creation_time: int
    snap_time: int
    block_sectors: int

    @property
    def shared_blocks(self) -> int:
        return self.mapped_blocks - self.exclusive_blocks

    def to_dict(self) -> dict[str, int]:
        return {"dev_id": self.dev_id, "mapped_blocks": self.mapped_blocks,
                "exclusive_blocks": self.exclusive_blocks, "shared_blocks": self.shared_blocks,
                "mapped_bytes": self.mapped_blocks * self.block_sectors * SECTOR,
                "transaction": self.transaction, "creation_time": self.creation_time, "snap_time": self.snap_time}


def ls(path: str | os.PathLike[str], *, snapshot: bool = False) -> list[DeviceUsage]:
    """Every device of the pool with its usage (thin_ls's two passes over all mappings).

    A data block is exclusive to a device when exactly one mapping in the whole pool points at it.
    """
    with ThinMetadata.open(path, snapshot=snapshot) as md:
        devices = md.devices()
        nr = md.nr_data_blocks
        if snapshot:  # a held snapshot has no space-map roots: the live superblock knows the size
            nr = Superblock.unpack(md.dev.read(0)).data_sm.nr_blocks
        seen = bytearray(nr)  # 0 unmapped, 1 mapped once, 2 mapped more often
        roots = {dev_id: md.device_root(dev_id) for dev_id in devices}
        for root in roots.values():
            for _keys, values in btree.walk(md.tm, root, md.mapping):
                for v in values:
                    b = v >> 24
                    if b >= len(seen):
                        raise CorruptMetadata(f"a mapping points at data block {b}, beyond the pool's "
                                              f"{len(seen)} blocks", device=os.fspath(path))
                    if seen[b] < 2:
                        seen[b] += 1
        rows = []
        for dev_id, det in devices.items():
            exclusive = 0
            for _keys, values in btree.walk(md.tm, roots[dev_id], md.mapping):
                exclusive += sum(1 for v in values if seen[v >> 24] == 1)
            rows.append(DeviceUsage(dev_id, det.mapped_blocks, exclusive, det.transaction_id,
                                    det.creation_time, det.snapshotted_time, md.data_block_size))
        return rows


def _disk_unit(nbytes: int) -> str:
    """thin_ls's sizes: whole KiB/MiB/... rounded half up once above 8 of the unit (base/disk_units.cc)."""
    units = ("", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while nbytes > 1024 * 1024:
        nbytes //= 1024
        i += 1
    if nbytes > 8 * 1024:
        nbytes = (nbytes + 512) // 1024
        i += 1
    return f"{nbytes}{units[i]}"


LS_FIELDS: dict[str, Callable[[DeviceUsage], str]] = {
    "DEV": lambda u: str(u.dev_id),
    "MAPPED_BLOCKS": lambda u: str(u.mapped_blocks),
    "EXCLUSIVE_BLOCKS": lambda u: str(u.exclusive_blocks),
    "SHARED_BLOCKS": lambda u: str(u.shared_blocks),
    "MAPPED_SECTORS": lambda u: str(u.mapped_blocks * u.block_sectors),
    "EXCLUSIVE_SECTORS": lambda u: str(u.exclusive_blocks * u.block_sectors),
    "SHARED_SECTORS": lambda u: str(u.shared_blocks * u.block_sectors),
    "MAPPED_BYTES": lambda u: str(u.mapped_blocks * u.block_sectors * SECTOR),
    "EXCLUSIVE_BYTES": lambda u: str(u.exclusive_blocks * u.block_sectors * SECTOR),
    "SHARED_BYTES": lambda u: str(u.shared_blocks * u.block_sectors * SECTOR),
    "MAPPED": lambda u: _disk_unit(u.mapped_blocks * u.block_sectors * SECTOR),
    "EXCLUSIVE": lambda u: _disk_unit(u.exclusive_blocks * u.block_sectors * SECTOR),
    "SHARED": lambda u: _disk_unit(u.shared_blocks * u.block_sectors * SECTOR),
    "TRANSACTION": lambda u: str(u.transaction),
    "CREATE_TIME": lambda u: str(u.creation_time),
    "SNAP_TIME": lambda u: str(u.snap_time),
}
DEFAULT_LS_FIELDS = ("DEV", "MAPPED", "CREATE_TIME", "SNAP_TIME")


def format_ls(rows: Sequence[DeviceUsage], fields: Sequence[str] = DEFAULT_LS_FIELDS, *, headers: bool = True) -> str:
    """thin_ls's table: right-aligned columns, each followed by one space."""
    unknown = [f for f in fields if f not in LS_FIELDS]
    if unknown:
        raise InvalidArgument(f"unknown field {unknown[0]!r} (fields: {', '.join(LS_FIELDS)})")
    grid = [list(fields)] if headers else []
    grid += [[LS_FIELDS[f](u) for f in fields] for u in rows]
    widths = [max((len(r[i]) for r in grid), default=0) for i in range(len(fields))]
    return "".join("".join(cell.rjust(w) + " " for cell, w in zip(r, widths)) + "\n" for r in grid)


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote."""

    bytes: int
    mapped_blocks: int
    runs: int
    #: what was done to the output ("created with N bytes", "truncated from A to B bytes"...)
    output: str = ""


def export(metadata: str | os.PathLike[str], data: str | os.PathLike[str], dev_id: int, out: str | os.PathLike[str], *,
           size: int | None = None, snapshot: bool = False, progress: ProgressFn | None = None, force: bool = False,
           backends: Sequence[DeviceMapper] = ()) -> ExportResult:
    """Write thin device ``dev_id`` of a pool to ``out``: a new or empty file; an existing non-empty
    file or a block device only with ``force`` (``dmtools.output``; ``ExportResult.output`` says
    what was done to it).

    Mapped blocks are copied from the data device with kcopyd; unmapped blocks read as zeros: they
    stay holes in a regular file and are zeroed on a block device. The volume is ``size`` bytes,
    else the block device's size, else up to its highest mapped block (a thin device's size lives in
    its table, not in the metadata). Mappings past ``size`` are left out, as a shorter table hides
    them. The metadata is checked first; ``out`` must not share bytes with either input
    (``DeviceConflict``) nor be used by a live table of one of ``backends`` (``DeviceBusy``);
    nothing is written before all of that holds.
    """
    import kcopyd

    check_devices({"--metadata": metadata, "--data": data, "the output": out}, backends=backends,
                  operation="export", in_use=["the output"], missing_ok=["the output"])
    with ThinMetadata.open(metadata, snapshot=snapshot) as md:
        bs = md.data_block_size
        runs = list(device_runs(md, dev_id))
    block_bytes = bs * SECTOR
    if size is not None and (size < 0 or size % SECTOR):
        raise InvalidArgument(f"size {size} is not a whole number of sectors", operation="export")
    if size is not None:
        limit = size // block_bytes if size % block_bytes == 0 else size // block_bytes + 1
        runs = [(vb, db, min(n, limit - vb), t) for vb, db, n, t in runs if vb < limit]
    needed = max((vb + n for vb, _db, n, _t in runs), default=0) * block_bytes
    if size is not None:
        needed = min(needed, size)
    src = open_endpoint(data)
    holder = Holder("dmtools thin export")
    dst: Endpoint | None = None
    try:
        top = max((db + n for _vb, db, n, _t in runs), default=0) * block_bytes
        if src.size < top:
            raise InvalidArgument(f"the data device holds {src.size} bytes but the mappings reach {top}",
                                  device=src.name, operation="export")
        dst, vol, is_block, action = open_output(out, size, needed, force=force, holder=holder)
        tally = CopyTally(sum(n for _vb, _db, n, _t in runs) * block_bytes, progress)
        vol_sectors = vol // SECTOR
        with kcopyd.Client() as kc:
            at = 0
            for vb, db, n, _t in runs:
                start, length = vb * bs, min(n * bs, vol_sectors - vb * bs)
                if is_block and start > at:
                    kc.zero(kcopyd.Region(dst, at, start - at), 0, tally, ("zeroing", 0))
                kc.copy(kcopyd.Region(src, db * bs, length), [kcopyd.Region(dst, start, length)], 0, tally,
                        (f"copying blocks {vb}..{vb + n - 1}", n * block_bytes))
                at = start + length
            if is_block and at < vol_sectors:
                kc.zero(kcopyd.Region(dst, at, vol_sectors - at), 0, tally, ("zeroing", 0))
        tally.check(dst.name, "export")
        dst.flush()
        return ExportResult(vol, sum(n for _vb, _db, n, _t in runs), len(runs), action)
    except BaseException:
        if dst is not None:
            discard_output(dst, out, action)
            dst = None
        raise
    finally:
        if dst is not None:
            dst.close()
        holder.close()
        src.close()
