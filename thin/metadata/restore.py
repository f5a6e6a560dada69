"""Restore thin metadata from thin_dump's XML (as thin-provisioning-tools' ``thin_restore``).

The whole document is read and validated before anything is written: an unknown element or
attribute, overlapping or unsorted mappings, a data block beyond ``nr_data_blocks`` or a
``mapped_blocks`` that disagrees with the mappings is a one-line ``InvalidArgument`` and the output
is untouched. The trees are then built bottom-up and committed in one transaction (superblock last).
Besides the 0.9.0 shape, the Rust tools' ``<def name>``/``<ref name>`` shared runs are accepted.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from dmtools.errors import InvalidArgument

from . import btree
from .btree import DETAILS, U64
from .ondisk import MAX_DEV_ID, METADATA_VERSION, TIME_MASK, DeviceDetails
from .pool import ThinMetadata, check_data_block_size

__all__ = ["PoolImage", "parse_xml", "restore"]

_SUPERBLOCK = {"uuid", "time", "transaction", "flags", "version", "data_block_size", "nr_data_blocks", "metadata_snap"}
_DEVICE = {"dev_id", "mapped_blocks", "transaction", "creation_time", "snap_time"}
_RANGE = {"origin_begin", "data_begin", "length", "time"}
_SINGLE = {"origin_block", "data_block", "time"}


@dataclass
class DeviceImage:
    """One device of a parsed dump: details and its mappings as parallel arrays."""

    dev_id: int
    details: DeviceDetails
    vblocks: array = field(default_factory=lambda: array("Q"))
    values: array = field(default_factory=lambda: array("Q"))  # block_time values


@dataclass
class PoolImage:
    """A parsed dump: superblock fields and devices in id order."""

    time: int
    transaction: int
    flags: int
    version: int
    data_block_size: int
    nr_data_blocks: int
    devices: list[DeviceImage]


def _int(elem: ET.Element, name: str, *, default: int | None = None, limit: int = (1 << 64) - 1) -> int:
    text = elem.get(name)
    if text is None:
        if default is not None:
            return default
        raise InvalidArgument(f"<{elem.tag}> lacks the attribute {name!r}")
    try:
        value = int(text, 10)
    except ValueError:
        raise InvalidArgument(f"<{elem.tag} {name}={text!r}> is not a decimal number") from None
    if not 0 <= value <= limit:
        raise InvalidArgument(f"<{elem.tag} {name}={value}> is out of range (0..{limit})")
    return value


def _attrs(elem: ET.Element, allowed: set[str]) -> None:
    extra = set(elem.attrib) - allowed
    if extra:
        raise InvalidArgument(f"<{elem.tag}> has unknown attributes {sorted(extra)}")


def _events(source: IO[bytes]) -> Iterator[tuple[str, ET.Element]]:
    try:
        yield from ET.iterparse(source, events=("start", "end"))
    except ET.ParseError as err:
        raise InvalidArgument(f"XML is not well formed: {err}") from None


def parse_xml(source: str | os.PathLike[str] | IO[bytes]) -> PoolImage:
    """Read and validate a thin_dump XML document."""
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                return parse_xml(f)
        except OSError as err:
            raise InvalidArgument(f"cannot read {os.fspath(source)}: {err.strerror}") from err
    image: PoolImage | None = None
    device: DeviceImage | None = None
    defs: dict[str, tuple[array, array]] = {}
    current: tuple[array, array] | None = None  # where mappings go: a device or a <def>
    ids: set[int] = set()
    for event, elem in _events(source):
        tag = elem.tag
        if event == "end":
            if tag == "device":
                assert device is not None and image is not None
                _finish_device(device)
                image.devices.append(device)
                device, current = None, None
            elif tag == "def":
                current = (device.vblocks, device.values) if device is not None else None
            elem.clear()
            continue
        if tag == "superblock":
            if image is not None:
                raise InvalidArgument("more than one <superblock>")
            _attrs(elem, _SUPERBLOCK)
            bs = _int(elem, "data_block_size")
            check_data_block_size(bs)
            image = PoolImage(time=_int(elem, "time", limit=TIME_MASK), transaction=_int(elem, "transaction"),
                              flags=_int(elem, "flags", default=0, limit=1),
                              version=_int(elem, "version", default=METADATA_VERSION, limit=(1 << 32) - 1),
                              data_block_size=bs, nr_data_blocks=_int(elem, "nr_data_blocks", limit=1 << 40),
                              devices=[])
            continue
        if image is None:
            raise InvalidArgument(f"<{tag}> outside <superblock>")
        if tag == "device":
            if device is not None:
                raise InvalidArgument("<device> inside <device>")
            _attrs(elem, _DEVICE)
            dev_id = _int(elem, "dev_id", limit=MAX_DEV_ID)
            if dev_id in ids:
                raise InvalidArgument(f"device {dev_id} appears twice")
            ids.add(dev_id)
            details = DeviceDetails(_int(elem, "mapped_blocks"), _int(elem, "transaction"),
                                    _int(elem, "creation_time", limit=TIME_MASK),
                                    _int(elem, "snap_time", limit=TIME_MASK))
            device = DeviceImage(dev_id, details)
            current = (device.vblocks, device.values)
        elif tag == "def":
            if device is not None:
                raise InvalidArgument("<def> inside <device>")
            name = elem.get("name")
            if not name or set(elem.attrib) != {"name"} or name in defs:
                raise InvalidArgument(f"<def> needs one new 'name' attribute, got {dict(elem.attrib)}")
            current = defs[name] = (array("Q"), array("Q"))
        elif tag == "ref":
            name = elem.get("name", "")
            if device is None or name not in defs or set(elem.attrib) != {"name"}:
                raise InvalidArgument(f"<ref name={name!r}> outside a device or naming no earlier <def>")
            device.vblocks.extend(defs[name][0])
            device.values.extend(defs[name][1])
        elif tag in ("range_mapping", "single_mapping"):
            if current is None:
                raise InvalidArgument(f"<{tag}> outside a device")
            if tag == "range_mapping":
                _attrs(elem, _RANGE)
                v0, d0, n = _int(elem, "origin_begin"), _int(elem, "data_begin"), _int(elem, "length")
                if n == 0:
                    raise InvalidArgument("<range_mapping> of length 0")
            else:
                _attrs(elem, _SINGLE)
                v0, d0, n = _int(elem, "origin_block"), _int(elem, "data_block"), 1
            t = _int(elem, "time", limit=TIME_MASK)
            if d0 + n > image.nr_data_blocks:
                raise InvalidArgument(f"<{tag}> maps data blocks {d0}..{d0 + n - 1}, beyond nr_data_blocks="
                                      f"{image.nr_data_blocks}")
            current[0].extend(range(v0, v0 + n))
            current[1].extend(range((d0 << 24) | t, ((d0 + n) << 24) | t, 1 << 24))
        else:
            raise InvalidArgument(f"unsupported element <{tag}>")
    if image is None:
        raise InvalidArgument("no <superblock> element")
    return image


def _finish_device(device: DeviceImage) -> None:
    keys = device.vblocks
    if any(a >= b for a, b in zip(keys, keys[1:])):
        order = sorted(range(len(keys)), key=keys.__getitem__)
        device.vblocks = array("Q", (keys[i] for i in order))
        device.values = array("Q", (device.values[i] for i in order))
        keys = device.vblocks
        dup = next((a for a, b in zip(keys, keys[1:]) if a == b), None)
        if dup is not None:
            raise InvalidArgument(f"device {device.dev_id} maps virtual block {dup} twice")
    if device.details.mapped_blocks != len(keys):
        raise InvalidArgument(f"device {device.dev_id}: mapped_blocks=\"{device.details.mapped_blocks}\" but "
                              f"it has {len(keys)} mappings")


def restore(source: str | os.PathLike[str] | IO[bytes], out: str | os.PathLike[str]) -> PoolImage:
    """Write the metadata a thin_dump XML describes onto ``out`` (an existing file or device)."""
    image = parse_xml(source)
    md = ThinMetadata.format(out, data_block_size=image.data_block_size, nr_data_blocks=image.nr_data_blocks,
                             commit=False)
    try:
        tm = md.tm
        roots: list[int] = []
        for dev in image.devices:
            for v in dev.values:
                tm.dsm.inc(v >> 24)
            roots.append(btree.build(tm, dev.vblocks, dev.values, md.mapping))
        ids = [d.dev_id for d in image.devices]
        btree.delete_tree(tm, md.mapping_root, md.subtree)
        btree.delete_tree(tm, md.details_root, DETAILS)
        md.mapping_root = btree.build(tm, ids, roots, U64)
        md.details_root = btree.build(tm, ids, [d.details for d in image.devices], DETAILS)
        md.time, md.trans_id, md.flags, md.version = image.time, image.transaction, image.flags, image.version
        md.commit()
    finally:
        md.close()
    return image
