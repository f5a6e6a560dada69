"""Dumps of thin metadata: thin_dump's XML (0.9.0, byte for byte) and a JSON form of the same content.

The XML shape is thin-provisioning-tools' ``xml_format.cc``: one ``superblock`` element, devices in
id order, mappings in virtual-block order as runs. A run continues while the virtual and data
blocks both advance by one and the time is equal; a run of one is a ``single_mapping``.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import groupby
from operator import sub
from typing import Any, TextIO

from . import btree
from .ondisk import TIME_MASK, DeviceDetails
from .pool import ThinMetadata

__all__ = ["device_runs", "dump_json", "dump_xml"]

Run = tuple[int, int, int, int]  # origin_begin, data_begin, length, time


def device_runs(md: ThinMetadata, dev_id: int) -> Iterator[Run]:
    """A device's mappings as ``(origin_begin, data_begin, length, time)`` runs.

    Within a leaf, entry i continues the run of entry i-1 exactly when ``key - i`` and
    ``value - i * 2**24`` are both unchanged (a ``block_time`` one data block further with the same
    time is 2**24 larger), so the runs are ``groupby`` groups computed at C speed; a run may go on
    across leaves.
    """
    pending: Run | None = None
    for keys, values in btree.walk(md.tm, md.device_root(dev_id), md.mapping):
        n = len(keys)
        i = 0
        for (k0, v0), group in groupby(zip(map(sub, keys, range(n)), map(sub, values, range(0, n << 24, 1 << 24)))):
            count = len(list(group))
            vb = k0 + i
            v = v0 + (i << 24)
            db, t = v >> 24, v & TIME_MASK
            i += count
            if pending is not None:
                pv, pd, pn, pt = pending
                if vb == pv + pn and db == pd + pn and t == pt:
                    pending = (pv, pd, pn + count, pt)
                    continue
                yield pending
            pending = (vb, db, count, t)
    if pending is not None:
        yield pending


def _superblock_line(md: ThinMetadata) -> str:
    return (f'<superblock uuid="" time="{md.time}" transaction="{md.trans_id}" flags="{md.flags}" '
            f'version="{md.version}" data_block_size="{md.data_block_size}" nr_data_blocks="{md.nr_data_blocks}">\n')


def _device_line(dev_id: int, d: DeviceDetails) -> str:
    return (f'  <device dev_id="{dev_id}" mapped_blocks="{d.mapped_blocks}" transaction="{d.transaction_id}" '
            f'creation_time="{d.creation_time}" snap_time="{d.snapshotted_time}">\n')


def dump_xml(md: ThinMetadata, out: TextIO, *, dev_ids: set[int] | None = None, skip_mappings: bool = False) -> None:
    """Write thin_dump's XML for ``md`` to ``out`` (``--dev-id`` and ``--skip-mappings`` as thin_dump)."""
    out.write(_superblock_line(md))
    for dev_id, det in md.devices().items():
        if dev_ids is not None and dev_id not in dev_ids:
            continue
        out.write(_device_line(dev_id, det))
        if not skip_mappings:
            lines: list[str] = []
            for vb, db, n, t in device_runs(md, dev_id):
                if n == 1:
                    lines.append(f'    <single_mapping origin_block="{vb}" data_block="{db}" time="{t}"/>\n')
                else:
                    lines.append(f'    <range_mapping origin_begin="{vb}" data_begin="{db}" length="{n}" time="{t}"/>\n')
                if len(lines) >= 4096:
                    out.write("".join(lines))
                    lines.clear()
            out.write("".join(lines))
        out.write("  </device>\n")
    out.write("</superblock>\n")


def dump_json(md: ThinMetadata, *, dev_ids: set[int] | None = None, skip_mappings: bool = False) -> dict[str, Any]:
    """The same content as ``dump_xml`` as a JSON-ready dict (runs as lists)."""
    devices = []
    for dev_id, det in md.devices().items():
        if dev_ids is not None and dev_id not in dev_ids:
            continue
        entry: dict[str, Any] = {"dev_id": dev_id, "mapped_blocks": det.mapped_blocks,
                                 "transaction": det.transaction_id, "creation_time": det.creation_time,
                                 "snap_time": det.snapshotted_time}
        if not skip_mappings:
            entry["mappings"] = [{"origin_begin": vb, "data_begin": db, "length": n, "time": t}
                                 for vb, db, n, t in device_runs(md, dev_id)]
        devices.append(entry)
    return {"superblock": {"uuid": "", "time": md.time, "transaction": md.trans_id, "flags": md.flags,
                           "version": md.version, "data_block_size": md.data_block_size,
                           "nr_data_blocks": md.nr_data_blocks},
            "devices": devices}
