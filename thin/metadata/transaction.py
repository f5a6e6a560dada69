"""The transaction manager: block I/O, copy-on-write shadowing and both space maps' persistence.

drivers/md/persistent-data/dm-transaction-manager.c (shadowing), dm-space-map-metadata.c (the
metadata space map: a single index block, bootstrap allocation, recursive updates settled at
commit), dm-space-map-disk.c (the data space map: a btree index of bitmaps) and
dm-space-map-common.c (bitmaps, index entries, overflow ref-count btrees).

Changed blocks stay in memory until ``commit``: every node, bitmap and index block is written and
flushed first, and only then the superblock, which publishes the new roots (the order of
dm-thin-metadata.c ``__commit_transaction``). A block freed in a transaction is not reused before
the commit, so the previous transaction stays intact on disk until the superblock moves.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from dmtools.endpoint import Endpoint
from dmtools.errors import CorruptMetadata, DeviceIOError, InvalidArgument

from . import btree
from .btree import INDEX, U32, Node, ValueType
from .ondisk import (BITMAP_CSUM_XOR, BLOCK_SIZE, ENTRIES_PER_BITMAP, INDEX_CSUM_XOR, MAX_METADATA_BITMAPS,
                     MAX_METADATA_BLOCKS, IndexEntry, SpaceMapRoot, seal, verify)
from .space_map import RefCounts

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from dmtools.claims import Holder

__all__ = ["EndpointMetadataDevice", "MetadataDevice", "TransactionManager"]

_CACHE_LIMIT = 1 << 16  # decoded clean nodes kept (each a few KiB)


class MetadataDevice:
    """A metadata device or image file, read and written in 4096-byte blocks."""

    _holder: Holder | None = None  # the claim of a writable open

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = False) -> None:
        """Open ``path``; ``writable`` also claims it (``dmtools.claims``) until :meth:`close`,
        as thin-provisioning-tools open what they write ``O_EXCL``: a live pool's metadata (its
        engine or the kernel holds it), a mounted device or one another tool holds is refused with
        ``DeviceBusy`` before a byte is written."""
        self.path = os.fspath(path)
        self._holder: Holder | None = None
        if writable:
            from dmtools.claims import Holder

            self._holder = Holder("dmtools thin metadata")
            try:
                self._holder.claim(self.path)
            except BaseException:
                self._holder.close()
                raise
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except OSError as err:
            self._release()
            raise DeviceIOError(f"cannot open metadata: {err.strerror}", device=self.path,
                                operation="open", errno=err.errno) from err
        self.writable = writable
        try:
            st = os.fstat(self.fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise InvalidArgument("metadata must be a regular file or a block device", device=self.path)
            if stat.S_ISBLK(st.st_mode):
                # A live pool writes its metadata below this block device's page cache (the kernel's
                # dm-thin, or our engine, writes the device the -tmeta device maps), so cached pages
                # may be stale: drop them, and read what is on the device now, as
                # thin-provisioning-tools do by reading with O_DIRECT.
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self.fd)
            self._release()
            raise
        self.nr_blocks = self.size // BLOCK_SIZE

    def _release(self) -> None:
        if self._holder is not None:
            self._holder.close()
            self._holder = None

    # The device's primitives; ``EndpointMetadataDevice`` puts them on an Endpoint.
    def _size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    def _pread(self, offset: int) -> bytes:
        return os.pread(self.fd, BLOCK_SIZE, offset)

    def _pwrite(self, data: bytes | bytearray, offset: int) -> int:
        return os.pwrite(self.fd, data, offset)

    def _sync(self) -> None:
        os.fsync(self.fd)

    def refresh_size(self) -> int:
        """Re-read the device's size (after it grew); returns the number of blocks."""
        self.size = self._size()
        self.nr_blocks = self.size // BLOCK_SIZE
        return self.nr_blocks

    def read(self, blocknr: int) -> bytes:
        if not 0 <= blocknr < self.nr_blocks:
            raise CorruptMetadata(f"block {blocknr} is beyond the end of the metadata device "
                                  f"({self.nr_blocks} blocks)", device=self.path)
        try:
            data = self._pread(blocknr * BLOCK_SIZE)
        except OSError as err:
            raise DeviceIOError(f"reading metadata block {blocknr}: {err.strerror}", device=self.path,
                                operation="read", errno=err.errno) from err
        if len(data) != BLOCK_SIZE:
            raise DeviceIOError(f"short read of metadata block {blocknr}", device=self.path, operation="read")
        return data

    def write(self, blocknr: int, data: bytes | bytearray) -> None:
        """Write ``data``, one block or several consecutive ones, at block ``blocknr``."""
        if not 0 <= blocknr <= self.nr_blocks - max(1, len(data) // BLOCK_SIZE) or len(data) % BLOCK_SIZE:
            raise InvalidArgument(f"block {blocknr} is beyond the end of the metadata device", device=self.path)
        try:
            done = self._pwrite(data, blocknr * BLOCK_SIZE)
        except OSError as err:
            raise DeviceIOError(f"writing metadata block {blocknr}: {err.strerror}", device=self.path,
                                operation="write", errno=err.errno) from err
        if done != len(data):
            raise DeviceIOError(f"short write of metadata block {blocknr}", device=self.path, operation="write")

    def flush(self) -> None:
        try:
            self._sync()
        except OSError as err:
            raise DeviceIOError(f"flushing metadata: {err.strerror}", device=self.path, operation="flush",
                                errno=err.errno) from err

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._release()


class EndpointMetadataDevice(MetadataDevice):
    """Metadata blocks on an ``Endpoint``: the device handle a thin-pool table opened.

    The endpoint belongs to its opener (the engine closes a table's handles): ``close`` leaves it
    open.
    """

    def __init__(self, endpoint: Endpoint, *, writable: bool = False) -> None:
        self.endpoint = endpoint
        self.path = endpoint.name
        self.fd = -1
        self.writable = writable
        self.size = endpoint.size
        self.nr_blocks = self.size // BLOCK_SIZE

    def _size(self) -> int:
        return self.endpoint.size

    def _pread(self, offset: int) -> bytes:
        buf = bytearray(BLOCK_SIZE)
        got = self.endpoint.readinto(buf, offset)
        return bytes(buf[:got])

    def _pwrite(self, data: bytes | bytearray, offset: int) -> int:
        if not self.writable:
            raise InvalidArgument("the metadata device is open read-only", device=self.path)
        self.endpoint.write(data, offset)
        return len(data)

    def _sync(self) -> None:
        self.endpoint.flush()

    def close(self) -> None:
        """Nothing to do: the endpoint's opener closes it."""


class TransactionManager:
    """Nodes, reference counts and commits of one metadata device.

    ``msm`` counts metadata blocks, ``dsm`` data blocks. Build one with ``create`` (a fresh
    format) or ``open`` (from the space-map roots of a superblock).
    """

    def __init__(self, dev: MetadataDevice, msm: RefCounts, dsm: RefCounts) -> None:
        self.dev = dev
        self.msm = msm
        self.dsm = dsm
        self.m_bitmaps: list[int] = []
        self.m_index_block = 0
        self.m_ref_root = 0
        self.d_bitmaps: list[int] = []
        self.d_index_root = 0
        self.d_ref_root = 0
        self.dirty_nodes: dict[int, tuple[Node, ValueType]] = {}
        self.dirty_raw: dict[int, bytes] = {}
        self.cache: dict[int, Node] = {}

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, dev: MetadataDevice) -> TransactionManager:
        """Lay out empty space maps on a device (dm-space-map-metadata.c ``sm_metadata_create``
        in bootstrap mode, then dm-space-map-disk.c ``dm_sm_disk_create`` with no blocks)."""
        nr_blocks = min(dev.nr_blocks, MAX_METADATA_BLOCKS)
        nr_bitmaps = (nr_blocks + ENTRIES_PER_BITMAP - 1) // ENTRIES_PER_BITMAP
        if nr_blocks < 3 + nr_bitmaps + 8:
            raise InvalidArgument(f"metadata device of {dev.nr_blocks} blocks is too small", device=dev.path)
        tm = cls(dev, RefCounts(nr_blocks, "metadata"), RefCounts(0, "data"))
        m = tm.msm
        # Bootstrap: superblock, index block, overflow-tree root, bitmaps, in that order.
        tm.m_index_block = 1
        tm.m_ref_root = 2
        tm.m_bitmaps = list(range(3, 3 + nr_bitmaps))
        begin = 3 + nr_bitmaps
        for b in range(begin):
            m.inc(b)
            m.new.add(b)
        m.cursor = begin
        m.dirty_bitmaps.update(range(nr_bitmaps))  # every bitmap is written, empty ones too
        tm.dirty_nodes[2] = (Node(2, True, btree.calc_max_entries(4), 4, [], []), U32)
        tm.d_index_root = btree.empty_tree(tm, INDEX)
        tm.d_ref_root = btree.empty_tree(tm, U32)
        return tm

    @classmethod
    def open(cls, dev: MetadataDevice, metadata_root: SpaceMapRoot, data_root: SpaceMapRoot, *,
             load: bool = True) -> TransactionManager:
        """Load both space maps from their roots, validating every block read.

        With ``load`` false only the sizes are taken (enough to read trees, not to change them).
        """
        tm = cls(dev, RefCounts(metadata_root.nr_blocks, "metadata"), RefCounts(data_root.nr_blocks, "data"))
        tm.m_index_block = metadata_root.bitmap_root
        tm.m_ref_root = metadata_root.ref_count_root
        tm.d_index_root = data_root.bitmap_root
        tm.d_ref_root = data_root.ref_count_root
        if not load:
            return tm
        if not 0 < metadata_root.nr_blocks <= MAX_METADATA_BLOCKS:
            raise CorruptMetadata(f"metadata space map has {metadata_root.nr_blocks} blocks")
        if metadata_root.nr_blocks > dev.nr_blocks:
            raise CorruptMetadata(f"metadata space map has {metadata_root.nr_blocks} blocks but the device "
                                  f"holds {dev.nr_blocks}", device=dev.path)
        raw = tm.dev.read(tm.m_index_block)
        verify(raw, tm.m_index_block, INDEX_CSUM_XOR, "metadata space map index")
        for i in range(tm.msm.nr_bitmaps):
            entry = IndexEntry.unpack(raw, 16 + i * IndexEntry.SIZE)
            tm.m_bitmaps.append(entry.blocknr)
            tm.msm.load_bitmap(i, tm.read_bitmap(entry.blocknr))
        tm.msm.finish_load(btree.items(tm, tm.m_ref_root, U32))
        entries = list(btree.items(tm, tm.d_index_root, INDEX))
        if [k for k, _ in entries] != list(range(tm.dsm.nr_bitmaps)):
            raise CorruptMetadata(f"data space map index holds bitmaps {[k for k, _ in entries][:8]}..., "
                                  f"expected 0..{tm.dsm.nr_bitmaps - 1}")
        for i, entry in entries:
            tm.d_bitmaps.append(entry.blocknr)
            tm.dsm.load_bitmap(i, tm.read_bitmap(entry.blocknr))
        tm.dsm.finish_load(btree.items(tm, tm.d_ref_root, U32))
        tm.msm.cursor = tm.dsm.cursor = 0
        return tm

    def read_bitmap(self, blocknr: int) -> bytes:
        raw = self.dev.read(blocknr)
        verify(raw, blocknr, BITMAP_CSUM_XOR, "space map bitmap")
        return raw

    # -- nodes -------------------------------------------------------------------------------
    def read_node(self, blocknr: int, vtype: ValueType, *, cache: bool = True) -> Node:
        """The node at ``blocknr`` (the transaction's own copy when it changed)."""
        dirty = self.dirty_nodes.get(blocknr)
        if dirty is not None:
            return dirty[0]
        node = self.cache.get(blocknr)
        if node is not None:
            return node
        node = Node.decode(self.dev.read(blocknr), blocknr, vtype)
        if cache:
            if len(self.cache) >= _CACHE_LIMIT:
                self.cache.clear()
            self.cache[blocknr] = node
        return node

    def new_node(self, leaf: bool, vtype: ValueType, max_entries: int | None = None) -> Node:
        """A fresh empty node in a newly allocated block (``dm_tm_new_block``)."""
        size = vtype.size if leaf else 8
        b = self.msm.alloc()
        node = Node(b, leaf, max_entries or btree.calc_max_entries(size), size, [], [])
        self.dirty_nodes[b] = (node, vtype)
        return node

    def shadow(self, blocknr: int, vtype: ValueType) -> Node:
        """A writable version of a node (dm-transaction-manager.c ``dm_tm_shadow_block``).

        A node made in this transaction and referenced once is changed in place; any other is
        copied to a new block and the original loses a reference. When the original was shared its
        children (or leaf values) gain one, as dm-btree-spine.c ``inc_children`` does.
        """
        msm = self.msm
        count = msm.counts[blocknr]  # msm.get, inline: the per-insert path
        if count == 3:
            count = msm.overflow[blocknr]
        if count == 1 and blocknr in msm.new:
            return self.dirty_nodes[blocknr][0]
        node = self.read_node(blocknr, vtype)
        copy = node.copy(self.msm.alloc())
        self.dirty_nodes[copy.blocknr] = (copy, vtype)
        self.dec(blocknr)
        if count > 1:
            if copy.leaf:
                for v in copy.values:
                    vtype.inc(v)
            else:
                for child in copy.values:
                    self.inc(child)
        return copy

    def count(self, blocknr: int) -> int:
        return self.msm.get(blocknr)

    def inc(self, blocknr: int) -> None:
        self.msm.inc(blocknr)

    def dec(self, blocknr: int) -> None:
        self.msm.dec(blocknr)
        if self.msm.counts[blocknr] == 0:
            self.dirty_nodes.pop(blocknr, None)
            self.dirty_raw.pop(blocknr, None)
            self.cache.pop(blocknr, None)

    # -- commit ------------------------------------------------------------------------------
    @property
    def changed(self) -> bool:
        return bool(self.dirty_nodes or self.dirty_raw or self.msm.dirty_bitmaps or self.dsm.dirty_bitmaps
                    or self.msm.overflow_dirty or self.dsm.overflow_dirty)

    def _relocate(self, old: int | None) -> int:
        """Where a bitmap or index block is written this transaction (shadowed unless new)."""
        if old is not None and old in self.msm.new and self.msm.get(old) == 1:
            return old
        b = self.msm.alloc()
        if old is not None:
            self.dec(old)
        return b

    def _sync_overflow(self, sm: RefCounts, root: int) -> int:
        while sm.overflow_dirty:
            pending = sorted(sm.overflow_dirty)
            sm.overflow_dirty.clear()
            for b in pending:
                if b in sm.overflow:
                    root, _ = btree.insert(self, root, b, sm.overflow[b], U32)
                else:
                    root, _ = btree.remove(self, root, b, U32)
        return root

    def _commit_data_sm(self) -> None:
        """dm-space-map-disk.c ``sm_disk_commit``: overflow tree, bitmaps, and the index btree."""
        d = self.dsm
        self.d_ref_root = self._sync_overflow(d, self.d_ref_root)
        for i in sorted(d.dirty_bitmaps):
            b = self._relocate(self.d_bitmaps[i] if i < len(self.d_bitmaps) else None)
            if i < len(self.d_bitmaps):
                self.d_bitmaps[i] = b
            else:
                self.d_bitmaps.append(b)
            self.dirty_raw[b] = self._bitmap_block(b, d.bitmap_counts(i))
            nr_free, none_free_before = d.index_fields(i)
            self.d_index_root, _ = btree.insert(self, self.d_index_root, i, IndexEntry(b, nr_free, none_free_before),
                                                INDEX)
        d.dirty_bitmaps.clear()

    def _commit_metadata_sm(self) -> None:
        """dm-space-map-metadata.c ``sm_metadata_commit``: settle the recursion, then encode.

        Writing the overflow tree, moving bitmaps and moving the index block all change metadata
        counts; repeat until an iteration allocates nothing.
        """
        m = self.msm
        placed: set[int] = set()
        while True:
            before = m.allocated_this_transaction, len(m.freed)
            self.m_ref_root = self._sync_overflow(m, self.m_ref_root)
            for i in sorted(m.dirty_bitmaps - placed):
                if i < len(self.m_bitmaps):
                    self.m_bitmaps[i] = self._relocate(self.m_bitmaps[i])
                else:  # a bitmap for a grown device (sm_metadata_extend)
                    self.m_bitmaps.append(self._relocate(None))
                placed.add(i)
            if m.dirty_bitmaps:
                self.m_index_block = self._relocate(self.m_index_block)
            if (m.allocated_this_transaction, len(m.freed)) == before and not m.overflow_dirty \
                    and not (m.dirty_bitmaps - placed):
                break
        if len(self.m_bitmaps) > MAX_METADATA_BITMAPS:
            raise CorruptMetadata(f"{len(self.m_bitmaps)} metadata bitmaps (at most {MAX_METADATA_BITMAPS})")
        for i in m.dirty_bitmaps:
            self.dirty_raw[self.m_bitmaps[i]] = self._bitmap_block(self.m_bitmaps[i], m.bitmap_counts(i))
        if m.dirty_bitmaps:
            index = bytearray(BLOCK_SIZE)
            for i, b in enumerate(self.m_bitmaps):
                nr_free, none_free_before = m.index_fields(i)
                index[16 + i * IndexEntry.SIZE:16 + (i + 1) * IndexEntry.SIZE] = \
                    IndexEntry(b, nr_free, none_free_before).pack()
            seal(index, self.m_index_block, INDEX_CSUM_XOR)
            self.dirty_raw[self.m_index_block] = bytes(index)
        m.dirty_bitmaps.clear()

    @staticmethod
    def _bitmap_block(blocknr: int, counts: bytes) -> bytes:
        from .space_map import encode_bitmap

        block = bytearray(BLOCK_SIZE)
        block[16:] = encode_bitmap(counts)
        seal(block, blocknr, BITMAP_CSUM_XOR)
        return bytes(block)

    def space_map_roots(self) -> tuple[SpaceMapRoot, SpaceMapRoot]:
        """``(data, metadata)`` roots as they stand (valid after ``prepare_commit``)."""
        d, m = self.dsm, self.msm
        return (SpaceMapRoot(d.nr_blocks, d.nr_allocated, self.d_index_root, self.d_ref_root),
                SpaceMapRoot(m.nr_blocks, m.nr_allocated, self.m_index_block, self.m_ref_root))

    def commit(self, superblock: Callable[[SpaceMapRoot, SpaceMapRoot], bytes | bytearray]) -> None:
        """Write the transaction: space maps settled, every block but the superblock written and
        flushed, then ``superblock(data_root, metadata_root)`` written to block 0 and flushed."""
        self._commit_data_sm()
        self._commit_metadata_sm()
        dev = self.dev
        blocks: dict[int, bytes | bytearray] = {b: node.encode(vtype) for b, (node, vtype) in self.dirty_nodes.items()}
        blocks.update(self.dirty_raw)
        order = sorted(blocks)
        start = 0
        for i, b in enumerate(order):  # one write per run of consecutive blocks
            if i + 1 == len(order) or order[i + 1] != b + 1:
                first = order[start]
                dev.write(first, blocks[first] if i == start else b"".join(blocks[c] for c in order[start:i + 1]))
                start = i + 1
        dev.flush()
        dev.write(0, superblock(*self.space_map_roots()))
        dev.flush()
        for b, (node, _vt) in self.dirty_nodes.items():
            if len(self.cache) < _CACHE_LIMIT:
                self.cache[b] = node
        self.dirty_nodes.clear()
        self.dirty_raw.clear()
        self.msm.end_transaction()
        self.dsm.end_transaction()
