"""Thin-pool metadata: devices, mappings and transactions, as drivers/md/dm-thin-metadata.c keeps them.

``ThinMetadata`` is the whole metadata device: ``format`` lays out a new one (the kernel's layout
for a zeroed device), ``open`` reads an existing one. Changes (``create_thin``, ``create_snap``,
``delete``, ``insert``/``remove`` of mappings, data allocation, metadata snapshots) stay in memory
until ``commit``, which writes them in the kernel's order; ``abort`` drops them.

New mappings of unmapped blocks (``map_new``, what a first write to a block inserts) wait in a
dict until something needs the trees: lookups find them there, and they go into the btrees, in
the order they came, before any other change of the trees and at the commit (``fold``). A
mapping is durable only after a commit in either case (dm-thin.c ``process_prepared_mapping``
inserts into in-core btree nodes that reach the disk at the commit), and the trees come out
block for block as inserting each mapping at once leaves them.
"""

from __future__ import annotations

import errno
import os
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from dataclasses import replace
from typing import NamedTuple

from dmtools.closing import Closing
from dmtools.errors import CorruptMetadata, DeviceBusy, DeviceExists, DeviceIOError, DeviceNotFound, InvalidArgument

from . import btree
from .btree import DETAILS, ValueType
from .ondisk import (BLOCK_SECTORS, MAX_DATA_BLOCK, MAX_DATA_BLOCK_SECTORS, MAX_DEV_ID, MAX_METADATA_SECTORS,
                     METADATA_VERSION, MIN_DATA_BLOCK_SECTORS, NEEDS_CHECK_FLAG, TIME_MASK, DeviceDetails,
                     SpaceMapRoot, Superblock)
from .transaction import MetadataDevice, TransactionManager

__all__ = ["Lookup", "ThinMetadata", "check_data_block_size"]


#: keys of a run that go into a mapping leaf between two splits of it, at least: a split leaves
#: the half that takes the next key with ``max_entries // 2`` keys (126 of 252), the key goes
#: in, and the half is full again 125 keys later; two fewer, to be safe.
RUN_SPLIT_EVERY = btree.calc_max_entries(8) // 2 - 2


def _run_inserts(n: int) -> int:
    """How many general inserts a run of ``n`` consecutive unmapped blocks may cost in a fold
    (:attr:`ThinMetadata.pending_inserts`): the first key's (it may shadow its whole path and
    split a node at every level), then, the path changed in place from there on, one split of
    the leaf (and of a node at each level above it) per :data:`RUN_SPLIT_EVERY` keys."""
    return 1 + (n - 1 + RUN_SPLIT_EVERY - 1) // RUN_SPLIT_EVERY


def _spread(entries: Iterable[tuple[int, int]], runs: dict[int, int]) -> tuple[list[int], list[int]]:
    """The virtual blocks and packed values of waiting ``(vblock, packed)`` entries, a run's
    entry (its first block, in ``runs`` with its length) giving each of its blocks."""
    keys: list[int] = []
    values: list[int] = []
    for vblock, packed in entries:
        n = runs.get(vblock)
        if n is None:
            keys.append(vblock)
            values.append(packed)
        else:
            keys.extend(range(vblock, vblock + n))
            values.extend(range(packed, packed + (n << 24), 1 << 24))
    return keys, values


class Lookup(NamedTuple):
    """One mapping: where a virtual block lives, when it was written, whether a snapshot shares it.

    ``shared`` is the kernel's test (dm-thin-metadata.c ``__snapshotted_since``): the device was
    snapshotted after the mapping was written.
    """

    data_block: int
    time: int
    shared: bool


class MappingValue(ValueType):
    """Level-1 leaf values (``block_time``): each holds a reference to its data block."""

    name = "block_time"

    def __init__(self, tm: TransactionManager) -> None:
        self.tm = tm

    def inc(self, value: int) -> None:
        self.tm.dsm.inc(value >> 24)

    def dec(self, value: int) -> None:
        self.tm.dsm.dec(value >> 24)

    def equal(self, a: int, b: int) -> bool:  # the same data block, whatever the time
        return a >> 24 == b >> 24


class SubtreeValue(ValueType):
    """Top-level leaf values: the root of a device's mapping tree, a metadata block reference."""

    name = "subtree root"

    def __init__(self, tm: TransactionManager, mapping: MappingValue) -> None:
        self.tm = tm
        self.mapping = mapping

    def inc(self, value: int) -> None:
        self.tm.inc(value)

    def dec(self, value: int) -> None:
        btree.delete_tree(self.tm, value, self.mapping)


def check_data_block_size(sectors: int) -> None:
    """dm-thin.c ``pool_ctr``: 128..2097152 sectors, a multiple of 128."""
    if not MIN_DATA_BLOCK_SECTORS <= sectors <= MAX_DATA_BLOCK_SECTORS or sectors % MIN_DATA_BLOCK_SECTORS:
        raise InvalidArgument(f"invalid data block size {sectors} sectors: it must be a multiple of 128 "
                              f"between 128 and {MAX_DATA_BLOCK_SECTORS}")


class ThinMetadata(Closing):
    """An open metadata device (see the module docstring)."""

    def __init__(self, dev: MetadataDevice, tm: TransactionManager, sb: Superblock, *, writable: bool) -> None:
        self.dev = dev
        self.tm = tm
        self.writable = writable
        self.mapping = MappingValue(tm)
        self.subtree = SubtreeValue(tm, self.mapping)
        #: details changed in this transaction (written to the details tree at commit).
        self._details: dict[int, DeviceDetails] = {}
        #: mappings inserts added to a device since its details were last taken (``_settle``
        #: adds them to ``mapped_blocks``: a new details value per insert costs more than the insert).
        self._added: dict[int, int] = {}
        #: committed details and each device's mapping-tree root, looked up once (the kernel keeps
        #: them in ``struct dm_thin_device`` for open devices); see ``_forget``.
        self._clean_details: dict[int, DeviceDetails] = {}
        self._roots: dict[int, int] = {}
        #: each device's shadowed top-level leaf, as ``_top_leaf`` found it last.
        self._top_leaves: dict[int, tuple[int, btree.Node, int]] = {}
        #: ``map_new`` mappings not in their device's tree yet: per device, vblock -> packed
        #: ``block_time``, in the order they came; ``_order`` holds the devices' turns as
        #: ``(dev_id, where its run starts in its dict)``, so that ``fold`` inserts them in
        #: that order across devices.
        self._pending: dict[int, dict[int, int]] = {}
        #: the runs among them (:meth:`map_run`): per device, first virtual block -> length (its
        #: entry in ``_pending`` holds the first block's packed value, block ``i`` of the run
        #: maps to that plus ``i << 24``), and each device's run starts in order (runs never
        #: overlap, so their ends are in order too).
        self._runs: dict[int, dict[int, int]] = {}
        self._starts: dict[int, list[int]] = {}
        self._order: list[tuple[int, int]] = []
        #: the device of the last run in ``_order``.
        self._last = -1
        #: how many mappings wait in ``_pending``.
        self.pending = 0
        #: how many inserts of the general kind the waiting mappings may cost when folded (what
        #: the pool bounds the metadata blocks of a fold with): one per mapping, but one for a
        #: run of consecutive blocks plus one per :data:`RUN_SPLIT_EVERY` more of it (see
        #: :meth:`map_run`).
        self.pending_inserts = 0
        #: ``(dev_id, end, length charged, next packed value, entry's first block, entry's
        #: length)`` of the run :meth:`map_run` added last, while nothing else was added after
        #: it: a run that continues it is charged as one longer run with it, and joins its
        #: entry in ``_pending`` when its data blocks continue it too.
        self._run: tuple[int, int, int, int, int, int] | None = None
        #: why a ``fold`` failed (the trees are half changed: only ``abort`` goes on from there).
        self._broken: str | None = None
        self._load_superblock(sb)

    def _load_superblock(self, sb: Superblock) -> None:
        self.superblock = sb
        self.flags = sb.flags
        self.uuid = sb.uuid
        self.version = sb.version
        self.time = sb.time
        self.trans_id = sb.trans_id
        self.held_root = sb.held_root
        self.mapping_root = sb.data_mapping_root
        self.details_root = sb.device_details_root
        self.data_block_size = sb.data_block_size
        self.metadata_nr_blocks = sb.metadata_nr_blocks
        self._in_service = False
        self._clean_details.clear()
        self._roots.clear()
        self._top_leaves.clear()

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def format(cls, path: str | os.PathLike[str] | MetadataDevice, *, data_block_size: int, nr_data_blocks: int = 0,
               commit: bool = True) -> ThinMetadata:
        """Write new, empty metadata on ``path`` (what the kernel writes on a zeroed device, §4.6
        of the reference: dm-thin-metadata.c ``__format_metadata``) and return it open for writing.

        ``nr_data_blocks`` extends the data space map at once, as the pool's first resume does.
        With ``commit`` false nothing is written yet: the caller fills the pool and commits once.
        """
        check_data_block_size(data_block_size)
        dev = path if isinstance(path, MetadataDevice) else MetadataDevice(path, writable=True)
        try:
            tm = TransactionManager.create(dev)
            sb = Superblock(flags=0, blocknr=0, uuid=bytes(16), version=METADATA_VERSION, time=0, trans_id=0,
                            held_root=0, data_sm_root=b"", metadata_sm_root=b"", data_mapping_root=0,
                            device_details_root=0, data_block_size=data_block_size, metadata_block_size=BLOCK_SECTORS,
                            metadata_nr_blocks=min(dev.size // 512, MAX_METADATA_SECTORS) // BLOCK_SECTORS)
            md = cls(dev, tm, sb, writable=True)
            md.mapping_root = btree.empty_tree(tm, md.subtree)
            md.details_root = btree.empty_tree(tm, DETAILS)
            md._in_service = True
            if commit:
                md.commit()
            if nr_data_blocks:
                md.resize_data(nr_data_blocks)
                if commit:
                    md.commit()
            return md
        except BaseException:
            dev.close()
            raise

    @classmethod
    def open(cls, path: str | os.PathLike[str] | MetadataDevice, *, writable: bool = False, snapshot: bool | int = False,
             data_block_size: int | None = None) -> ThinMetadata:
        """Open existing metadata, validating the superblock as the kernel does (``sb_check``).

        Read-only opens read the trees only; ``writable`` also loads both space maps.
        ``snapshot`` reads through the held metadata snapshot (its block number, or ``True`` for
        the one the superblock names), as ``thin_dump -m``. Raises ``CorruptMetadata``.
        """
        if writable and snapshot:
            raise InvalidArgument("a metadata snapshot is read-only")
        dev = path if isinstance(path, MetadataDevice) else MetadataDevice(path, writable=writable)
        try:
            sb = Superblock.unpack(dev.read(0), 0)
            if sb.incompat_flags:
                raise CorruptMetadata(f"unsupported incompatible features {sb.incompat_flags:#x}", device=dev.path)
            if writable and sb.compat_ro_flags:
                raise CorruptMetadata("could not access metadata read-write: unsupported optional features "
                                      f"{sb.compat_ro_flags:#x}", device=dev.path)
            if data_block_size is not None and sb.data_block_size != data_block_size:
                raise InvalidArgument(f"changing the data block size (from {sb.data_block_size} to "
                                      f"{data_block_size}) is not supported", device=dev.path)
            if snapshot:
                where = sb.held_root if snapshot is True else int(snapshot)
                if not where:
                    raise InvalidArgument("the metadata has no held metadata snapshot", device=dev.path)
                sb = Superblock.unpack(dev.read(where), where)
            tm = TransactionManager.open(dev, sb.metadata_sm, sb.data_sm, load=writable)
            return cls(dev, tm, sb, writable=writable)
        except BaseException:
            dev.close()
            raise

    def close(self) -> None:
        """Close the device; uncommitted changes are dropped."""
        self.dev.close()

    # -- sizes -------------------------------------------------------------------------------
    @property
    def nr_data_blocks(self) -> int:
        return self.tm.dsm.nr_blocks

    @property
    def nr_metadata_blocks(self) -> int:
        return self.tm.msm.nr_blocks

    @property
    def free_data_blocks(self) -> int:
        return self.tm.dsm.nr_free

    @property
    def free_metadata_blocks(self) -> int:
        return self.tm.msm.nr_free

    @property
    def needs_check(self) -> bool:
        return bool(self.flags & NEEDS_CHECK_FLAG)

    def _writing(self) -> None:
        if not self.writable:
            raise InvalidArgument("the metadata is open read-only", device=self.dev.path)
        self._in_service = True

    # -- devices -----------------------------------------------------------------------------
    def details(self, dev_id: int) -> DeviceDetails:
        """A device's details; raises ``DeviceNotFound`` (ENODATA) if it does not exist."""
        det = self._det(dev_id)
        pend = self._pending.get(dev_id)
        if not pend:
            return det
        runs = self._runs.get(dev_id)
        waiting = len(pend) + (sum(runs.values()) - len(runs) if runs else 0)
        return replace(det, mapped_blocks=det.mapped_blocks + waiting)

    def snapshotted_time(self, dev_id: int) -> int:
        """When the device was last snapshotted (a mapping older than that is shared)."""
        return self._det(dev_id).snapshotted_time

    def _det(self, dev_id: int) -> DeviceDetails:
        """:meth:`details` without the mappings waiting in core (what the details tree gets)."""
        if dev_id in self._added:
            self._settle(dev_id)
        det = self._details.get(dev_id) or self._clean_details.get(dev_id)
        if det is None:
            det = btree.lookup(self.tm, self.details_root, dev_id, DETAILS)
            if det is None:
                raise DeviceNotFound(f"thin device {dev_id} does not exist", errno=errno.ENODATA)
            self._clean_details[dev_id] = det
        return det

    def _settle(self, dev_id: int) -> None:
        """Count the mappings inserts added to ``dev_id`` in its details."""
        added = self._added.pop(dev_id)
        det = self._det(dev_id)
        self._details[dev_id] = replace(det, mapped_blocks=det.mapped_blocks + added)

    def devices(self) -> dict[int, DeviceDetails]:
        """Every device's details, by id, in id order."""
        self.fold()
        for dev_id in list(self._added):
            self._settle(dev_id)
        out = dict(btree.items(self.tm, self.details_root, DETAILS))
        out.update(self._details)
        return dict(sorted(out.items()))

    def exists(self, dev_id: int) -> bool:
        return dev_id in self._details or btree.lookup(self.tm, self.details_root, dev_id, DETAILS) is not None

    def device_root(self, dev_id: int) -> int:
        """The root of a device's mapping tree, every mapping in it (waiting ones folded in)."""
        if self.pending:
            self.fold()
        return self._root(dev_id)

    def _root(self, dev_id: int) -> int:
        root = self._roots.get(dev_id)
        if root is None:
            root = btree.lookup(self.tm, self.mapping_root, dev_id, self.subtree)
            if root is None:
                raise DeviceNotFound(f"thin device {dev_id} does not exist", errno=errno.ENODATA)
            root = self._roots[dev_id] = int(root)
        return root

    def _forget(self, dev_id: int) -> None:
        """Drop the cached details and root of a device whose entries change."""
        self._clean_details.pop(dev_id, None)
        self._roots.pop(dev_id, None)

    @staticmethod
    def _check_id(dev_id: int) -> None:
        if not 0 <= dev_id <= MAX_DEV_ID:
            raise InvalidArgument(f"invalid device id {dev_id} (0..{MAX_DEV_ID})")

    def create_thin(self, dev_id: int) -> None:
        """A new empty thin device (dm-thin-metadata.c ``__create_thin``); ``DeviceExists`` if taken."""
        self._check_id(dev_id)
        self._writing()
        if self.exists(dev_id):
            raise DeviceExists(f"thin device {dev_id} already exists")
        self.fold()
        root = btree.empty_tree(self.tm, self.mapping)
        self._forget(dev_id)
        self.mapping_root, _ = btree.insert(self.tm, self.mapping_root, dev_id, root, self.subtree)
        self._details[dev_id] = DeviceDetails(0, self.trans_id, self.time, self.time)

    def create_snap(self, dev_id: int, origin: int) -> None:
        """A snapshot of ``origin`` sharing its whole tree (``__create_snap``); the pool time advances."""
        self._check_id(dev_id)
        self._check_id(origin)
        self._writing()
        if self.exists(dev_id):
            raise DeviceExists(f"thin device {dev_id} already exists")
        self.fold()  # a waiting mapping is never shared (see map_new)
        origin_details = self._det(origin)
        root = self._root(origin)
        if self.time >= TIME_MASK:
            raise InvalidArgument("the pool's snapshot time is exhausted (2^24 snapshots)")
        self.tm.inc(root)
        self._forget(dev_id)
        self.mapping_root, _ = btree.insert(self.tm, self.mapping_root, dev_id, root, self.subtree)
        self.time += 1
        self._details[dev_id] = DeviceDetails(origin_details.mapped_blocks, self.trans_id, self.time, self.time)
        self._details[origin] = replace(origin_details, snapshotted_time=self.time)

    def delete(self, dev_id: int) -> None:
        """Remove a device and drop its mappings (``__delete_device``); ``DeviceNotFound`` if missing."""
        self._check_id(dev_id)
        self._writing()
        self.fold()
        self._det(dev_id)
        self._details.pop(dev_id, None)
        self._added.pop(dev_id, None)
        self._forget(dev_id)
        self.details_root, _ = btree.remove(self.tm, self.details_root, dev_id, DETAILS)
        self.mapping_root, found = btree.remove(self.tm, self.mapping_root, dev_id, self.subtree)
        if not found:
            raise CorruptMetadata(f"thin device {dev_id} has details but no mapping tree")

    def set_transaction_id(self, current: int, new: int) -> None:
        """Compare-and-swap of the userspace transaction id (``dm_pool_set_metadata_transaction_id``)."""
        self._writing()
        if current != self.trans_id:
            raise InvalidArgument(f"mismatched transaction id: pool has {self.trans_id}, not {current}")
        self.trans_id = new

    def mark_needs_check(self) -> None:
        """Set needs_check in the committed superblock at once, outside any transaction
        (dm-thin-metadata.c ``dm_pool_metadata_set_needs_check``, after an abort)."""
        if not self.writable:
            raise InvalidArgument("the metadata is open read-only", device=self.dev.path)
        self.flags |= NEEDS_CHECK_FLAG
        sb = replace(self.superblock, flags=self.superblock.flags | NEEDS_CHECK_FLAG)
        self.dev.write(0, sb.pack())
        self.dev.flush()
        self.superblock = sb

    def clear_needs_check(self) -> None:
        """Clear the needs_check flag (committed with the next commit), as
        ``thin_check --clear-needs-check-flag`` does once the metadata checked clean."""
        self._writing()
        self.flags &= ~NEEDS_CHECK_FLAG

    # -- mappings ----------------------------------------------------------------------------
    def lookup(self, dev_id: int, vblock: int) -> Lookup | None:
        """Where ``vblock`` of a device lives, or ``None`` when it is not provisioned."""
        pend = self._pending.get(dev_id)
        if pend:
            value = pend.get(vblock)
            if value is None and dev_id in self._starts:
                value = self._in_run(dev_id, vblock)
            if value is not None:
                return Lookup(value >> 24, value & TIME_MASK, False)
        root = self._roots.get(dev_id)
        value = btree.lookup(self.tm, self._root(dev_id) if root is None else root, vblock, self.mapping)
        if value is None:
            return None
        det = self._details.get(dev_id) or self._clean_details.get(dev_id) or self._det(dev_id)
        time = value & TIME_MASK
        return Lookup(value >> 24, time, det.snapshotted_time > time)

    def find(self, dev_id: int, vblock: int) -> tuple[int, bool] | None:
        """``(data block, shared)`` of ``vblock``'s mapping, or ``None``: :meth:`lookup` for the
        per-I/O path, which needs no ``Lookup`` (nor the time)."""
        pend = self._pending.get(dev_id)
        if pend:
            value = pend.get(vblock)
            if value is None and dev_id in self._starts:
                value = self._in_run(dev_id, vblock)
            if value is not None:  # mapped at the current time: not shared (see map_new)
                return value >> 24, False
        root = self._roots.get(dev_id)
        value = btree.lookup(self.tm, self._root(dev_id) if root is None else root, vblock, self.mapping)
        if value is None:
            return None
        det = self._details.get(dev_id) or self._clean_details.get(dev_id) or self._det(dev_id)
        return value >> 24, det.snapshotted_time > value & TIME_MASK

    def unmapped(self, dev_id: int, begin: int, end: int) -> bool:
        """Whether no block of ``[begin, end)`` is mapped, in the tree or waiting in core
        (:meth:`mappings` of the range would give nothing; no fold needed to tell)."""
        pend = self._pending.get(dev_id)
        if pend and self._waiting_in(dev_id, pend, begin, end):
            return False
        root = self._roots.get(dev_id)
        return not btree.has_key_in(self.tm, self._root(dev_id) if root is None else root, self.mapping, begin, end)

    def _in_run(self, dev_id: int, vblock: int) -> int | None:
        """The packed value of ``vblock`` in a run waiting for ``dev_id`` (:meth:`map_run`), or ``None``."""
        starts = self._starts.get(dev_id)
        if starts:
            i = bisect_right(starts, vblock) - 1
            if i >= 0:
                start = starts[i]
                if vblock - start < self._runs[dev_id][start]:
                    return self._pending[dev_id][start] + ((vblock - start) << 24)
        return None

    def _waiting_in(self, dev_id: int, pend: dict[int, int], begin: int, end: int) -> bool:
        """Whether a mapping of ``[begin, end)`` waits in core for ``dev_id`` (``pend``: its dict)."""
        starts = self._starts.get(dev_id)
        if starts:
            i = bisect_left(starts, end) - 1  # the last run starting before ``end`` ends last
            if i >= 0 and starts[i] + self._runs[dev_id][starts[i]] > begin:
                return True
        if end - begin <= len(pend):
            return not pend.keys().isdisjoint(range(begin, end))
        return any(begin <= v < end for v in pend)

    def _none_waiting(self, dev_id: int, pend: dict[int, int], vblocks: Iterable[int]) -> bool:
        """Whether no mapping of ``vblocks`` waits in core for ``dev_id`` (``pend``: its dict)."""
        if not pend.keys().isdisjoint(vblocks):
            return False
        return dev_id not in self._starts or all(self._in_run(dev_id, v) is None for v in vblocks)

    def highest_mapped(self, dev_id: int) -> int | None:
        """The highest mapped virtual block of a device, ``None`` when it maps nothing
        (dm-thin-metadata.c ``dm_thin_get_highest_mapped_block``)."""
        return btree.highest_key(self.tm, self.device_root(dev_id), self.mapping)

    def mappings(self, dev_id: int, begin: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int]]:
        """``(vblock, data_block, time)`` of a device's mappings in ``[begin, end)``, in order."""
        pend = self._pending.get(dev_id)
        if pend and (end is None or self._waiting_in(dev_id, pend, begin, end)):
            self.fold()  # waiting mappings in the range
        for keys, values in btree.walk(self.tm, self._root(dev_id), self.mapping, begin, end):
            lo = bisect_left(keys, begin)  # only the leaf's keys in the range
            hi = len(keys) if end is None else bisect_left(keys, end, lo)
            for k, v in zip(keys[lo:hi], values[lo:hi]):
                yield k, v >> 24, v & TIME_MASK

    def insert(self, dev_id: int, vblock: int, data_block: int) -> None:
        """Map ``vblock`` to ``data_block`` at the current time (the data block's reference passes to
        the mapping; an overwritten mapping drops its old block's)."""
        self.insert_many(dev_id, [(vblock, data_block)])

    def insert_many(self, dev_id: int, pairs: Sequence[tuple[int, int]]) -> None:
        """``insert`` of every ``(vblock, data_block)`` pair, the device's path shadowed once."""
        self._check_mapping(dev_id, pairs)
        self.fold()
        time = self.time
        self._insert_tree(dev_id, [v for v, _b in pairs], [(b << 24) | time for _v, b in pairs])  # pack_block_time

    def map_new(self, dev_id: int, pairs: Sequence[tuple[int, int]]) -> None:
        """:meth:`insert_many` of blocks the caller found unmapped (the thin target, under their
        cells): the mappings wait in core until :meth:`fold` puts them in the tree.

        Lookups find them meanwhile, as mapped at the current time and not shared: nothing that
        shares a tree (``create_snap``) or moves the time happens without a fold first. A block
        that is mapped after all (or twice) goes in at once, as ``insert_many``: a waiting
        mapping replaces no value, so no reference count changes later than it would at once."""
        time = self.time
        packed = {v: (b << 24) | time for v, b in pairs}  # pack_block_time
        pend = self._pending.get(dev_id)
        if (pend is not None and dev_id == self._last and self._in_service and packed
                and len(packed) == len(pairs) and min(packed.values()) >= 0
                and max(packed.values()) >> 24 < len(self.tm.dsm.counts) and self._none_waiting(dev_id, pend, packed)):
            # map_one's way for a run (a whole-block write's blocks): the device of the last
            # run, in service, every block inside the pool and no virtual block waiting already
            pend.update(packed)
            self.pending += len(packed)
            self.pending_inserts += len(packed)
            self._run = None
            return
        self._check_mapping(dev_id, pairs)
        if pend is None:
            pend = self._pending[dev_id] = {}
        if len(packed) != len(pairs) or not self._none_waiting(dev_id, pend, packed):
            self.insert_many(dev_id, pairs)
            return
        if dev_id != self._last:
            self._order.append((dev_id, len(pend)))
            self._last = dev_id
        pend.update(packed)
        self.pending += len(pairs)
        self.pending_inserts += len(pairs)
        self._run = None

    def map_run(self, dev_id: int, vblock: int, data_block: int, n: int) -> None:
        """:meth:`map_new` of ``n`` consecutive virtual blocks from ``vblock`` onto ``n``
        consecutive data blocks from ``data_block`` (a whole-block write's new run), without
        building the pairs: the run waits as one entry (its first block, length and first
        value), which grows when the next run continues it on both sides; :meth:`fold` gives
        each of its blocks.

        The caller found every block of the run unmapped (the thin target, under their cells),
        so the run's keys fall between the same two keys of the tree, and a fold inserts them
        one after the other: they count as :func:`_run_inserts` of the run in
        :attr:`pending_inserts`, not one each, and a run that continues the one added just
        before (same device, nothing added between) counts as one run with it."""
        pend = self._pending.get(dev_id)
        end = vblock + n
        if (n < 1 or vblock < 0 or not 0 <= data_block <= len(self.tm.dsm.counts) - n
                or (pend is not None and self._waiting_in(dev_id, pend, vblock, end))):
            self.map_new(dev_id, list(zip(range(vblock, end), range(data_block, data_block + n))))  # refused, or in now
            return
        if pend is None or dev_id != self._last or not self._in_service:  # map_new's checks, a turn of this device
            self._check_mapping(dev_id, ())
            if pend is None:
                pend = self._pending[dev_id] = {}
            if dev_id != self._last:
                self._order.append((dev_id, len(pend)))
                self._last = dev_id
        packed = (data_block << 24) | self.time  # pack_block_time
        self.pending += n
        last = self._run
        if last is not None and last[0] == dev_id and last[1] == vblock:  # it continues the last run
            length = last[2] + n
            self.pending_inserts += _run_inserts(length) - _run_inserts(last[2])
            if last[3] == packed:  # onto the data blocks after the last run's: its entry grows
                first, size = last[4], last[5] + n
                self._runs[dev_id][first] = size
                self._run = (dev_id, end, length, packed + (n << 24), first, size)
                return
        else:
            length = n
            self.pending_inserts += _run_inserts(n)
        pend[vblock] = packed
        runs = self._runs.get(dev_id)
        if runs is None:
            runs = self._runs[dev_id] = {}
        runs[vblock] = n
        insort(self._starts.setdefault(dev_id, []), vblock)
        self._run = (dev_id, end, length, packed + (n << 24), vblock, n)

    def map_one(self, dev_id: int, vblock: int, data_block: int) -> None:
        """:meth:`map_new` of one block (a first write's mapping)."""
        pend = self._pending.get(dev_id)
        if (pend is None or vblock in pend or dev_id != self._last or not self._in_service
                or not 0 <= data_block < len(self.tm.dsm.counts)
                or (dev_id in self._starts and self._in_run(dev_id, vblock) is not None)):
            self.map_new(dev_id, ((vblock, data_block),))
            return
        pend[vblock] = (data_block << 24) | self.time  # pack_block_time
        self.pending += 1
        self.pending_inserts += 1
        self._run = None

    def _check_mapping(self, dev_id: int, pairs: Sequence[tuple[int, int]]) -> None:
        """Refuse a data block outside the pool or a device that does not exist."""
        self._writing()
        limit = min(len(self.tm.dsm.counts), MAX_DATA_BLOCK + 1)
        for _v, data_block in pairs:
            if not 0 <= data_block < limit:
                raise InvalidArgument(f"data block {data_block} is outside the pool ({self.nr_data_blocks} blocks)")
        if dev_id not in self._details and dev_id not in self._clean_details:
            self._det(dev_id)  # DeviceNotFound

    def fold(self) -> None:
        """Put the mappings :meth:`map_new` keeps waiting into their trees, in the order they
        came (the trees come out as inserting each at once leaves them). A failure leaves the
        trees half changed: every later fold and commit refuses until :meth:`abort`."""
        if self._broken is not None:
            raise DeviceIOError(f"an earlier metadata update failed ({self._broken}): the transaction must be "
                                "aborted", errno=errno.EIO, device=self.dev.path)
        if not self.pending:
            return
        pending = self._pending
        runs = self._runs
        try:
            if len(self._order) == 1 and not runs:  # one device's turn of single mappings: its dict whole
                (dev_id, _begin), = self._order
                pend = pending[dev_id]
                self._insert_tree(dev_id, list(pend), list(pend.values()))
            else:
                items = {dev_id: iter(pend.items()) for dev_id, pend in pending.items()}
                end = {dev_id: len(pend) for dev_id, pend in pending.items()}
                turns = []
                for dev_id, begin in reversed(self._order):
                    turns.append((dev_id, end[dev_id] - begin))
                    end[dev_id] = begin
                for dev_id, n in reversed(turns):
                    self._insert_tree(dev_id, *_spread(islice(items[dev_id], n), runs.get(dev_id, {})))
        except BaseException as err:
            self._broken = str(err) or type(err).__name__  # the waiting mappings stay findable
            raise
        self._clear_pending()

    def _clear_pending(self) -> None:
        self._pending.clear()
        self._runs.clear()
        self._starts.clear()
        self._order.clear()
        self._last = -1
        self.pending = 0
        self.pending_inserts = 0
        self._run = None

    def _insert_tree(self, dev_id: int, vblocks: list[int], values: list[int]) -> None:
        """Insert each of ``vblocks`` with the packed value at the same place of ``values`` into
        the device's tree now (the new keys counted in its mapped blocks)."""
        leaf, i = self._top_leaf(dev_id)
        added = 0
        tm, mapping, root = self.tm, self.mapping, leaf.values[i]
        try:
            if len(vblocks) == 1:
                root, added = btree.insert(tm, root, vblocks[0], values[0], mapping)
            else:
                root, added = btree.insert_run(tm, root, vblocks, values, mapping)
        finally:
            leaf.values[i] = self._roots[dev_id] = root
            if added:
                self._added[dev_id] = self._added.get(dev_id, 0) + added

    def _top_leaf(self, dev_id: int) -> tuple[btree.Node, int]:
        """The writable top-level leaf holding ``dev_id``'s subtree root, and its index: the top
        level's path shadowed (``btree.shadow_path``), once a transaction. The leaf found last
        time is used again while it is still that: the same root, still this transaction's
        block referenced once, still a leaf holding ``dev_id`` at that index (a commit, an abort,
        a split, a merge or a metadata snapshot each break one of these)."""
        cached = self._top_leaves.get(dev_id)
        tm = self.tm
        if cached is not None:
            root, leaf, i = cached
            b = leaf.blocknr
            entry = tm.dirty_nodes.get(b)
            msm = tm.msm
            if (root == self.mapping_root and entry is not None and entry[0] is leaf and leaf.leaf
                    and b in msm.new and msm.counts[b] == 1 and i < len(leaf.keys) and leaf.keys[i] == dev_id):
                return leaf, i
        path = btree.shadow_path(tm, self.mapping_root, dev_id, self.subtree)
        if path is None:
            raise CorruptMetadata(f"thin device {dev_id} has details but no mapping tree")
        self.mapping_root, leaf, i = path
        self._top_leaves[dev_id] = (self.mapping_root, leaf, i)
        return leaf, i

    def remove(self, dev_id: int, vblock: int) -> bool:
        """Unmap ``vblock`` (its data block loses a reference); ``False`` if it was not mapped."""
        self._writing()
        self.fold()
        det = self._det(dev_id)
        if btree.lookup(self.tm, self._root(dev_id), vblock, self.mapping) is None:
            return False
        path = btree.shadow_path(self.tm, self.mapping_root, dev_id, self.subtree)
        assert path is not None
        self.mapping_root, leaf, i = path
        self._roots.pop(dev_id, None)
        leaf.values[i], _ = btree.remove(self.tm, leaf.values[i], vblock, self.mapping)
        self._details[dev_id] = replace(det, mapped_blocks=det.mapped_blocks - 1)
        return True

    def remove_range(self, dev_id: int, begin: int, end: int) -> int:
        """Unmap every block in ``[begin, end)``; returns how many were mapped."""
        keys = [k for k, _b, _t in self.mappings(dev_id, begin, end)]
        for k in keys:
            self.remove(dev_id, k)
        return len(keys)

    # -- data space --------------------------------------------------------------------------
    def alloc_data_block(self) -> int:
        """A free data block with one reference; ``NoSpace`` when the pool is full (blocks freed in
        this transaction count only after the next commit, as the kernel's allocator)."""
        if not self._in_service:
            self._writing()
        return self.tm.dsm.alloc()

    def alloc_data_blocks(self, n: int) -> Sequence[int]:
        """Up to ``n`` blocks as ``n`` calls of :meth:`alloc_data_block` would give them (fewer,
        without ``NoSpace``, when the pool has no more): a ``range`` when they are one run
        (``RefCounts.alloc_many``)."""
        self._writing()
        return self.tm.dsm.alloc_many(n)

    def data_ref_count(self, block: int) -> int:
        return self.tm.dsm.get(block)

    def data_inc(self, block: int) -> None:
        self._writing()
        self.tm.dsm.inc(block)

    def data_dec(self, block: int) -> None:
        self._writing()
        self.tm.dsm.dec(block)

    def resize_data(self, nr_blocks: int) -> None:
        """Grow the data space map to ``nr_blocks`` (it cannot shrink: dm-space-map-common.c)."""
        self._writing()
        if nr_blocks < self.nr_data_blocks:
            raise InvalidArgument(f"cannot reduce the data space map from {self.nr_data_blocks} to {nr_blocks} blocks")
        if nr_blocks > MAX_DATA_BLOCK + 1:
            raise InvalidArgument(f"{nr_blocks} data blocks is more than a mapping can address")
        self.tm.dsm.extend(nr_blocks - self.nr_data_blocks)

    def resize_metadata(self) -> int:
        """Grow the metadata space map to the device's current size, at most 4,161,600 blocks
        (dm-space-map-metadata.c ``sm_metadata_extend``; the superblock's ``metadata_nr_blocks``
        keeps its format-time value, as the kernel leaves it). Returns the new block count."""
        self._writing()
        self.fold()  # waiting mappings take the blocks they would have taken before the growth
        new = min(self.dev.refresh_size(), MAX_METADATA_SECTORS // BLOCK_SECTORS)
        if new < self.nr_metadata_blocks:
            raise InvalidArgument(f"metadata device ({new} blocks) too small: expected {self.nr_metadata_blocks}")
        self.tm.msm.extend(new - self.nr_metadata_blocks)
        return new

    # -- metadata snapshots ------------------------------------------------------------------
    def reserve_metadata_snap(self) -> int:
        """Commit, then keep a read-only copy of the superblock (``__reserve_metadata_snap``).

        Returns its block; ``DeviceBusy`` if one is held already.
        """
        self._writing()
        if self.held_root:
            raise DeviceBusy("pool metadata snapshot already exists: release this before taking another")
        self.commit()
        self._in_service = True
        b = self.tm.msm.alloc()
        copy = replace(self._superblock_now(), blocknr=b, held_root=0, data_sm_root=bytes(32),
                       metadata_sm_root=bytes(32))
        self.tm.dirty_raw[b] = bytes(copy.pack())
        self.tm.inc(self.mapping_root)
        self.tm.inc(self.details_root)
        self.held_root = b
        return b

    def release_metadata_snap(self) -> None:
        """Drop the held metadata snapshot (``__release_metadata_snap``)."""
        self._writing()
        b = self.held_root
        if not b:
            raise InvalidArgument("no pool metadata snapshot found: nothing to release")
        self.fold()
        raw = self.tm.dirty_raw.get(b)
        copy = Superblock.unpack(raw if raw is not None else self.dev.read(b), b)
        self.held_root = 0
        self._roots.clear()
        btree.delete_tree(self.tm, copy.data_mapping_root, self.subtree)
        btree.delete_tree(self.tm, copy.device_details_root, DETAILS)
        self.tm.dec(b)

    # -- transactions ------------------------------------------------------------------------
    def _superblock_now(self, data_root: SpaceMapRoot | None = None,
                        metadata_root: SpaceMapRoot | None = None) -> Superblock:
        sb = self.superblock
        return replace(sb, flags=self.flags, version=self.version, blocknr=0, time=self.time, trans_id=self.trans_id,
                       held_root=self.held_root, data_mapping_root=self.mapping_root,
                       device_details_root=self.details_root,
                       data_sm_root=data_root.pack() if data_root else sb.data_sm_root,
                       metadata_sm_root=metadata_root.pack() if metadata_root else sb.metadata_sm_root)

    @property
    def dirty(self) -> bool:
        """Whether anything changed since the last commit."""
        return self._in_service and (bool(self._details or self._added or self.pending) or self.tm.changed or
                                     self._superblock_now() != self.superblock)

    def commit(self, pre_commit: Callable[[], None] | None = None) -> bool:
        """Make the transaction durable (dm-thin-metadata.c ``__commit_transaction``).

        Nothing is written when nothing changed. Otherwise ``pre_commit`` runs first (the pool
        flushes its data device there), then the device details, the data and metadata space maps
        and every changed block are written and flushed, and the superblock last. Returns whether
        anything was written.
        """
        self.fold()
        if not self.dirty:
            return False
        if pre_commit is not None:
            pre_commit()
        for dev_id in list(self._added):
            self._settle(dev_id)
        for dev_id, det in sorted(self._details.items()):
            self.details_root, _ = btree.insert(self.tm, self.details_root, dev_id, det, DETAILS)
        details = dict(self._details)
        self._details.clear()
        written: list[Superblock] = []

        def superblock(data_root: SpaceMapRoot, metadata_root: SpaceMapRoot) -> bytearray:
            sb = self._superblock_now(data_root, metadata_root)
            written.append(sb)
            return sb.pack()

        roots = dict(self._roots)
        self.tm.commit(superblock)
        self._load_superblock(written[0])
        self._roots.update(roots)  # a commit moves no tree: the roots stay where they are
        self._clean_details.update(details)
        return True

    def abort(self) -> None:
        """Drop every uncommitted change and reread the last committed state (``dm_pool_abort_metadata``)."""
        sb = Superblock.unpack(self.dev.read(0), 0)
        self.tm = TransactionManager.open(self.dev, sb.metadata_sm, sb.data_sm, load=self.writable)
        self.mapping = MappingValue(self.tm)
        self.subtree = SubtreeValue(self.tm, self.mapping)
        self._details.clear()
        self._added.clear()
        self._clear_pending()
        self._broken = None
        self._load_superblock(sb)
