"""A metadata checker with thin_check's rules (thin-provisioning-tools ``thin_check``, the Rust 1.x rules).

It validates the superblock, every btree node (checksum, location, flags, ``max_entries``, fill,
key order and ranges, value sizes), the space maps' bitmaps and index, then recounts every
metadata and data block reference from the trees and compares the counts with both space maps.
A block counted by a space map but referenced by nothing is a leak (reported, not fatal, as
thin_check does); every other difference is an error. Device details must agree with the trees.
"""

from __future__ import annotations

import os

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from dmtools.errors import DMError

from . import btree
from .btree import DETAILS, INDEX, U32, U64, Node, ValueType
from .ondisk import ENTRIES_PER_BITMAP, Superblock
from .transaction import MetadataDevice, TransactionManager

__all__ = ["CheckReport", "check"]

_MAX_LISTED = 20


@dataclass
class CheckReport:
    """What ``check`` found. ``ok`` is false when there is any error.

    Leaked blocks and space-map summaries (``nr_allocated``, an index's ``nr_free``) that disagree
    with the bitmaps are reported but not errors: thin_check accepts them, and so does the kernel,
    which recounts nothing from them that could lose data.
    """

    path: str
    errors: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # space-map summaries that disagree (non-fatal)
    transaction_id: int | None = None
    devices: int = 0
    mappings: int = 0
    metadata_blocks: int = 0
    metadata_free: int = 0
    data_blocks: int = 0
    data_free: int = 0
    needs_check: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class _Counts:
    """Expected reference counts, kept as a space map keeps them (2-bit values + overflow)."""

    def __init__(self, nr_blocks: int) -> None:
        self.low = bytearray(nr_blocks)
        self.over: dict[int, int] = {}

    def add(self, block: int) -> None:
        c = self.low[block]
        if c < 2:
            self.low[block] = c + 1
        elif c == 2:
            self.low[block] = 3
            self.over[block] = 3
        else:
            self.over[block] += 1

    def get(self, block: int) -> int:
        c = self.low[block]
        return self.over[block] if c == 3 else c


class _Checker:
    def __init__(self, dev: MetadataDevice, report: CheckReport) -> None:
        self.dev = dev
        self.report = report
        self.tm: TransactionManager | None = None
        self.meta = _Counts(dev.nr_blocks)
        self.data: _Counts | None = None
        self.nr_data = 0
        self.seen: dict[int, str] = {}  # block -> tree kind, for nodes already validated
        self.subtree_sizes: dict[int, int] = {}
        self.structural = False

    def error(self, text: str) -> None:
        self.report.errors.append(text)

    def count_meta(self, block: int, what: str) -> bool:
        if not 0 <= block < len(self.meta.low):
            self.error(f"{what}: block {block} is beyond the metadata device")
            self.structural = True
            return False
        self.meta.add(block)
        return True

    # -- btrees ------------------------------------------------------------------------------
    def tree(self, root: int, vtype: ValueType, kind: str) -> int:
        """Count and validate a tree; returns its number of entries."""
        return self._node(root, vtype, kind, 0, None, True)

    def _node(self, b: int, vtype: ValueType, kind: str, lo: int, hi: int | None, is_root: bool) -> int:
        if not self.count_meta(b, kind):
            return 0
        prior = self.seen.get(b)
        if prior is not None:
            if prior != kind:
                self.error(f"block {b} is used as a {prior} node and as a {kind} node")
                self.structural = True
            return self.subtree_sizes.get(b, 0)
        self.seen[b] = kind
        assert self.tm is not None
        try:
            node = Node.decode(self.dev.read(b), b, vtype)
        except DMError as err:
            self.error(f"{kind} tree: {err}")
            self.structural = True
            return 0
        n = len(node.keys)
        if not is_root and n < node.max_entries // 3:
            self.error(f"{kind} tree: too few entries in btree node {b}: {n}, expected at least "
                       f"{node.max_entries // 3}")
        keys = node.keys
        if any(a >= c for a, c in zip(keys, keys[1:])):
            self.error(f"{kind} tree: keys out of order in btree node {b}")
        if keys and (keys[0] < lo or (hi is not None and keys[-1] >= hi)):
            self.error(f"{kind} tree: btree node {b} holds keys [{keys[0]}, {keys[-1]}] outside its parent's "
                       f"range [{lo}, {'-' if hi is None else hi})")
        if not node.leaf:
            total = 0
            for i, child in enumerate(node.values):
                total += self._node(child, vtype, kind, keys[i], keys[i + 1] if i + 1 < n else hi, False)
        else:
            total = n
            self.leaf(node, kind)
        self.subtree_sizes[b] = total
        return total

    def leaf(self, node: Node, kind: str) -> None:
        if kind == "mapping":
            data, nr = self.data, self.nr_data
            assert data is not None
            low, over = data.low, data.over
            for v in node.values:
                block = v >> 24
                if block >= nr:
                    self.error(f"mapping tree: block {node.blocknr} maps to data block {block} beyond the "
                               f"data device ({nr} blocks)")
                    self.structural = True
                    continue
                c = low[block]
                if c < 2:
                    low[block] = c + 1
                elif c == 2:
                    low[block] = 3
                    over[block] = 3
                else:
                    over[block] += 1
        elif kind == "top level":
            for v in node.values:
                self.tree(v, U64, "mapping")

    # -- space maps --------------------------------------------------------------------------
    def compare(self, what: str, expected: _Counts, actual_low: bytearray, actual_over: dict[int, int],
                nr_blocks: int) -> None:
        exp_low = expected.low[:nr_blocks]
        if bytes(exp_low) == bytes(actual_low) and {k: v for k, v in expected.over.items() if k < nr_blocks} \
                == actual_over:
            return
        diffs = leaks = 0
        listed: list[str] = []
        for b in self._differences(exp_low, actual_low, expected.over, actual_over):
            want = expected.get(b)
            have = actual_over[b] if actual_low[b] == 3 else actual_low[b]
            if want == have:
                continue
            if want == 0:
                leaks += 1
                if leaks <= _MAX_LISTED:
                    self.report.leaks.append(f"{what} block {b} is allocated (count {have}) but unused")
                continue
            diffs += 1
            if len(listed) < _MAX_LISTED:
                listed.append(f"{what} reference counts differ for block {b}, expected {want}, but got {have}")
        self.report.errors.extend(listed)
        if diffs > len(listed):
            self.error(f"... and {diffs - len(listed)} more {what} blocks with wrong reference counts")
        if leaks > _MAX_LISTED:
            self.report.leaks.append(f"... and {leaks - _MAX_LISTED} more leaked {what} blocks")

    @staticmethod
    def _differences(a: bytearray, b: bytearray, ao: dict[int, int], bo: dict[int, int]) -> Iterable[int]:
        step = 4096
        for start in range(0, len(a), step):
            if a[start:start + step] != b[start:start + step]:
                for i in range(start, min(start + step, len(a))):
                    if a[i] != b[i]:
                        yield i
        for k in sorted(set(ao) | set(bo)):
            if k < len(a) and a[k] == 3 and b[k] == 3 and ao.get(k) != bo.get(k):
                yield k


def check(path: str | os.PathLike[str] | MetadataDevice, *, skip_mappings: bool = False) -> CheckReport:
    """Check the metadata on ``path`` (or an open ``MetadataDevice``) and return a ``CheckReport``
    (it never writes)."""
    dev = path if isinstance(path, MetadataDevice) else MetadataDevice(path)
    report = CheckReport(dev.path)
    try:
        _check(dev, report, skip_mappings)
    finally:
        dev.close()
    return report


def _check(dev: MetadataDevice, report: CheckReport, skip_mappings: bool) -> None:
    c = _Checker(dev, report)
    try:
        sb = Superblock.unpack(dev.read(0), 0)
    except DMError as err:
        report.errors.append(f"superblock: {err}")
        return
    report.transaction_id = sb.trans_id
    report.needs_check = sb.needs_check
    if sb.incompat_flags:
        report.errors.append(f"superblock: unsupported incompatible features {sb.incompat_flags:#x}")
    msm_root, dsm_root = sb.metadata_sm, sb.data_sm
    try:
        tm = TransactionManager.open(dev, msm_root, dsm_root)
    except DMError as err:
        report.errors.append(f"space maps: {err}")
        return
    c.tm = tm
    c.nr_data = dsm_root.nr_blocks
    c.data = _Counts(c.nr_data)
    report.metadata_blocks, report.data_blocks = msm_root.nr_blocks, dsm_root.nr_blocks
    report.metadata_free = msm_root.nr_blocks - tm.msm.nr_allocated
    report.data_free = dsm_root.nr_blocks - tm.dsm.nr_allocated
    for what, root, sm in (("metadata", msm_root, tm.msm), ("data", dsm_root, tm.dsm)):
        if root.nr_allocated != sm.nr_allocated:
            report.warnings.append(f"{what} space map: root says {root.nr_allocated} blocks allocated, "
                                 f"the bitmaps {sm.nr_allocated}")
    # Space-map structures.
    c.count_meta(0, "superblock")
    c.count_meta(msm_root.bitmap_root, "metadata space map index")
    for b in tm.m_bitmaps:
        c.count_meta(b, "metadata space map bitmap")
    c.tree(msm_root.ref_count_root, U32, "metadata ref count")
    c.tree(dsm_root.bitmap_root, INDEX, "data space map index")
    for b in tm.d_bitmaps:
        c.count_meta(b, "data space map bitmap")
    for i, entry in btree.items(tm, dsm_root.bitmap_root, INDEX):
        nr_free, _ = tm.dsm.index_fields(i)
        # The kernel counts a partial last bitmap's missing entries as free; thin_restore does not.
        missing = ENTRIES_PER_BITMAP - min(ENTRIES_PER_BITMAP, dsm_root.nr_blocks - i * ENTRIES_PER_BITMAP)
        if entry.nr_free not in (nr_free, nr_free - missing):
            report.warnings.append(f"data space map: bitmap {i} index says {entry.nr_free} free, "
                                 f"the bitmap {nr_free}")
    c.tree(dsm_root.ref_count_root, U32, "data ref count")
    # Thin trees, live and held.
    roots = [(sb.device_details_root, sb.data_mapping_root, "")]
    if sb.held_root:
        try:
            held = Superblock.unpack(dev.read(sb.held_root), sb.held_root)
            c.count_meta(sb.held_root, "metadata snapshot")
            roots.append((held.device_details_root, held.data_mapping_root, " (metadata snapshot)"))
        except DMError as err:
            report.errors.append(f"metadata snapshot: {err}")
    for details_root, mapping_root, label in roots:
        c.tree(details_root, DETAILS, "details")
        if skip_mappings:
            continue
        c.tree(mapping_root, U64, "top level")
        if c.structural:
            continue
        details = dict(btree.items(tm, details_root, DETAILS))
        tops = dict(btree.items(tm, mapping_root, U64))
        if set(details) != set(tops):
            report.errors.append(f"devices{label}: details for {sorted(set(details) - set(tops))[:8]} have no "
                                 f"mapping tree; mapping trees {sorted(set(tops) - set(details))[:8]} have no details")
        for dev_id, det in details.items():
            dev_root = tops.get(dev_id)
            if dev_root is None:
                continue
            n = c.subtree_sizes.get(dev_root, 0)
            if det.mapped_blocks != n:
                report.errors.append(f"device {dev_id}{label}: mapped_blocks is {det.mapped_blocks} but its "
                                     f"tree maps {n} blocks")
            if det.creation_time > sb.time or det.snapshotted_time > sb.time:
                report.errors.append(f"device {dev_id}{label}: times {det.creation_time}/{det.snapshotted_time} "
                                     f"are after the pool time {sb.time}")
        if not label:
            report.devices = len(details)
            report.mappings = sum(c.subtree_sizes.get(r, 0) for r in tops.values())
    if c.structural or skip_mappings:
        return
    c.compare("metadata", c.meta, tm.msm.counts, tm.msm.overflow, msm_root.nr_blocks)
    assert c.data is not None
    c.compare("data", c.data, tm.dsm.counts, tm.dsm.overflow, dsm_root.nr_blocks)



