"""Persistent-data btrees: node format, lookups, and copy-on-write updates.

Node layout and rules from drivers/md/persistent-data/dm-btree-internal.h, dm-btree.c,
dm-btree-remove.c and dm-btree-spine.c: a 32-byte header (csum, flags, blocknr, nr_entries,
max_entries, value_size, padding), ``max_entries`` u64 keys, then ``max_entries`` values.
Every update shadows the nodes on its path (``TransactionManager.shadow``); a node that was shared
(reference count > 1) is copied and its children gain a reference, as ``inc_children`` does.

The shapes written keep what ``thin_check`` demands: keys ascending, every non-root node at least a
third full, ``max_entries`` from the kernel's ``calc_max_entries``.
"""

from __future__ import annotations

import struct
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from operator import le
from typing import TYPE_CHECKING, Any

from dmtools.errors import CorruptMetadata

from .ondisk import BLOCK_SIZE, BTREE_CSUM_XOR, DeviceDetails, IndexEntry, seal, verify

if TYPE_CHECKING:
    from .transaction import TransactionManager

INTERNAL_NODE = 1
LEAF_NODE = 2
NODE_HEADER = 32
_HEADER = struct.Struct("<IIQIIII")  # csum flags blocknr nr_entries max_entries value_size padding


def calc_max_entries(value_size: int) -> int:
    """dm-btree.c ``calc_max_entries``: as many as fit, rounded down to a multiple of 3."""
    total = (BLOCK_SIZE - NODE_HEADER) // (8 + value_size)
    return 3 * (total // 3)


class ValueType:
    """How a tree's values are stored and counted (``struct dm_btree_value_type``)."""

    size = 8
    name = "u64"

    def unpack(self, raw: bytes | bytearray | memoryview, offset: int, n: int) -> list[Any]:
        return list(struct.unpack_from(f"<{n}Q", raw, offset))

    def pack(self, values: Sequence[Any]) -> bytes:
        return struct.pack(f"<{len(values)}Q", *values)

    def inc(self, value: Any) -> None:
        """A new reference to ``value`` (a shared leaf was copied)."""

    def dec(self, value: Any) -> None:
        """``value`` lost a reference (removed, overwritten, or its leaf freed)."""

    def equal(self, a: Any, b: Any) -> bool:
        return bool(a == b)


class U32Value(ValueType):
    size = 4
    name = "u32"

    def unpack(self, raw: bytes | bytearray | memoryview, offset: int, n: int) -> list[Any]:
        return list(struct.unpack_from(f"<{n}I", raw, offset))

    def pack(self, values: Sequence[Any]) -> bytes:
        return struct.pack(f"<{len(values)}I", *values)


class _StructValue(ValueType):
    cls: Any = None

    def unpack(self, raw: bytes | bytearray | memoryview, offset: int, n: int) -> list[Any]:
        size, unpack = self.size, self.cls.unpack
        return [unpack(raw, offset + i * size) for i in range(n)]

    def pack(self, values: Sequence[Any]) -> bytes:
        return b"".join(v.pack() for v in values)


class IndexValue(_StructValue):
    size = IndexEntry.SIZE
    name = "index entry"
    cls = IndexEntry


class DetailsValue(_StructValue):
    size = DeviceDetails.SIZE
    name = "device details"
    cls = DeviceDetails


U64 = ValueType()
U32 = U32Value()
INDEX = IndexValue()
DETAILS = DetailsValue()
CHILD = U64  # internal nodes: child block numbers


class Node:
    """One decoded btree node. Nodes read from committed blocks are never modified in place."""

    __slots__ = ("blocknr", "leaf", "max_entries", "value_size", "keys", "values")

    def __init__(self, blocknr: int, leaf: bool, max_entries: int, value_size: int,
                 keys: list[int], values: list[Any]) -> None:
        self.blocknr = blocknr
        self.leaf = leaf
        self.max_entries = max_entries
        self.value_size = value_size
        self.keys = keys
        self.values = values

    def copy(self, blocknr: int) -> Node:
        return Node(blocknr, self.leaf, self.max_entries, self.value_size, list(self.keys), list(self.values))

    @property
    def full(self) -> bool:
        return len(self.keys) >= self.max_entries

    @classmethod
    def decode(cls, block: bytes | bytearray | memoryview, blocknr: int, vtype: ValueType) -> Node:
        """Parse and validate a node (dm-btree-spine.c ``node_check``, plus thin_check's shape rules).

        ``vtype`` is the value type the tree's leaves must hold.
        """
        verify(block, blocknr, BTREE_CSUM_XOR, "btree node")
        _c, flags, _b, nr, max_entries, value_size, _p = _HEADER.unpack_from(block, 0)
        if flags not in (INTERNAL_NODE, LEAF_NODE):
            raise CorruptMetadata(f"btree node {blocknr}: bad flags {flags}")
        if NODE_HEADER + (8 + value_size) * max_entries > BLOCK_SIZE or nr > max_entries:
            raise CorruptMetadata(f"btree node {blocknr}: {nr} entries, max {max_entries}, "
                                  f"value size {value_size} do not fit a block")
        if max_entries % 3:
            raise CorruptMetadata(f"btree node {blocknr}: max entries {max_entries} is not divisible by 3")
        leaf = flags == LEAF_NODE
        vt = vtype if leaf else CHILD
        if value_size != vt.size:
            raise CorruptMetadata(f"btree node {blocknr}: value size {value_size}, expected {vt.size} "
                                  f"for {'a ' + vt.name + ' leaf' if leaf else 'an internal node'}")
        keys = list(struct.unpack_from(f"<{nr}Q", block, NODE_HEADER))
        values = vt.unpack(block, NODE_HEADER + 8 * max_entries, nr)
        return cls(blocknr, leaf, max_entries, value_size, keys, values)

    def encode(self, vtype: ValueType) -> bytearray:
        """The sealed 4096-byte block."""
        block = bytearray(BLOCK_SIZE)
        nr = len(self.keys)
        _HEADER.pack_into(block, 0, 0, LEAF_NODE if self.leaf else INTERNAL_NODE, self.blocknr, nr,
                          self.max_entries, self.value_size, 0)
        struct.pack_into(f"<{nr}Q", block, NODE_HEADER, *self.keys)
        vals = (vtype if self.leaf else CHILD).pack(self.values)
        at = NODE_HEADER + 8 * self.max_entries
        block[at:at + len(vals)] = vals
        seal(block, self.blocknr, BTREE_CSUM_XOR)
        return block


def empty_tree(tm: TransactionManager, vtype: ValueType) -> int:
    """A new empty tree (one empty leaf); returns its root (dm-btree.c ``dm_btree_empty``)."""
    return tm.new_node(True, vtype).blocknr


def lookup(tm: TransactionManager, root: int, key: int, vtype: ValueType) -> Any | None:
    """The value stored under ``key``, or ``None``."""
    # tm.read_node's two dictionaries, read here first: a lookup per I/O finds its nodes there
    dirty, cache = tm.dirty_nodes, tm.cache
    blocknr = root
    while True:
        entry = dirty.get(blocknr)
        node = entry[0] if entry is not None else cache.get(blocknr) or tm.read_node(blocknr, vtype)
        keys = node.keys
        i = bisect_right(keys, key) - 1
        if node.leaf:
            return node.values[i] if i >= 0 and keys[i] == key else None
        if i < 0:
            return None
        blocknr = node.values[i]


def walk(tm: TransactionManager, root: int, vtype: ValueType,
         lo: int = 0, hi: int | None = None) -> Iterator[tuple[list[int], list[Any]]]:
    """Every leaf's ``(keys, values)``, in key order (read-only); only leaves that may hold [lo, hi)."""
    stack = [root]
    while stack:
        node = tm.read_node(stack.pop(), vtype, cache=False)
        if node.leaf:
            yield node.keys, node.values
            continue
        keys, kids = node.keys, node.values
        first = max(bisect_right(keys, lo) - 1, 0)
        last = len(keys) if hi is None else bisect_right(keys, hi - 1)
        stack.extend(reversed(kids[first:last]))


def has_key_in(tm: TransactionManager, root: int, vtype: ValueType, lo: int, hi: int) -> bool:
    """Whether the tree holds a key in ``[lo, hi)`` (read-only; the leaves :func:`walk` visits,
    up to the first that holds one)."""
    stack = [root]
    while stack:
        node = tm.read_node(stack.pop(), vtype, cache=False)
        keys = node.keys
        if node.leaf:
            i = bisect_left(keys, lo)
            if i < len(keys) and keys[i] < hi:
                return True
            continue
        stack.extend(reversed(node.values[max(bisect_right(keys, lo) - 1, 0):bisect_right(keys, hi - 1)]))
    return False


def highest_key(tm: TransactionManager, root: int, vtype: ValueType) -> int | None:
    """The largest key in the tree, or ``None`` when it is empty (dm-btree.c
    ``dm_btree_find_highest_key``: down the last child of every node)."""
    node = tm.read_node(root, vtype)
    while not node.leaf:
        if not node.values:
            return None
        node = tm.read_node(node.values[-1], vtype)
    return node.keys[-1] if node.keys else None


def items(tm: TransactionManager, root: int, vtype: ValueType) -> Iterator[tuple[int, Any]]:
    """Every ``(key, value)`` in key order."""
    for keys, values in walk(tm, root, vtype):
        yield from zip(keys, values)


def _split_beneath(tm: TransactionManager, root: Node, vtype: ValueType) -> None:
    """dm-btree.c ``btree_split_beneath``: the root's entries go to two new children."""
    nr = len(root.keys)
    half = nr // 2
    left = tm.new_node(root.leaf, vtype, root.max_entries)
    right = tm.new_node(root.leaf, vtype, root.max_entries)
    left.keys, left.values = root.keys[:half], root.values[:half]
    right.keys, right.values = root.keys[half:], root.values[half:]
    root.leaf = False
    root.max_entries = calc_max_entries(8)
    root.value_size = 8
    root.keys = [left.keys[0], right.keys[0]]
    root.values = [left.blocknr, right.blocknr]


def _split_child(tm: TransactionManager, parent: Node, i: int, child: Node, vtype: ValueType) -> None:
    """Split a full child in two (``btree_split_sibling``); the parent has room."""
    half = len(child.keys) // 2
    right = tm.new_node(child.leaf, vtype, child.max_entries)
    right.keys, right.values = child.keys[half:], child.values[half:]
    del child.keys[half:], child.values[half:]
    parent.keys.insert(i + 1, right.keys[0])
    parent.values.insert(i + 1, right.blocknr)


def insert(tm: TransactionManager, root: int, key: int, value: Any, vtype: ValueType) -> tuple[int, bool]:
    """Insert or overwrite ``key``; returns ``(new root, whether the key is new)``.

    An overwritten value loses its reference (``vtype.dec``) unless ``vtype.equal`` says it is
    unchanged.
    """
    root, added, _leaf, _hi = _insert(tm, root, key, value, vtype)
    return root, added


def _insert(tm: TransactionManager, root: int, key: int, value: Any,
            vtype: ValueType) -> tuple[int, bool, Node | None, int]:
    """:func:`insert`, plus the leaf ``key`` went into and its upper bound (exclusive; ``2**64``
    for the last leaf), or ``None`` for the leaf when an internal node on the path is full (the
    next insert down it may split that node)."""
    # tm.shadow's first case, inline (a node this transaction made, referenced once, is changed
    # in place): most inserts find every node of their path so
    counts, new, dirty = tm.msm.counts, tm.msm.new, tm.dirty_nodes
    node = dirty[root][0] if counts[root] == 1 and root in new else tm.shadow(root, vtype)
    root = node.blocknr
    if len(node.keys) >= node.max_entries and not (node.leaf and _has(node, key)):  # full
        _split_beneath(tm, node, vtype)
    hi = 1 << 64
    room = True
    while not node.leaf:
        keys = node.keys
        i = bisect_right(keys, key) - 1
        if i < 0:
            i = 0
            keys[0] = key  # the lower bound drops to the new smallest key
        b = node.values[i]
        child = dirty[b][0] if counts[b] == 1 and b in new else tm.shadow(b, vtype)
        node.values[i] = child.blocknr
        if len(child.keys) >= child.max_entries and not (child.leaf and _has(child, key)):
            _split_child(tm, node, i, child, vtype)
            if key >= keys[i + 1]:
                i += 1
                child = tm.read_node(node.values[i], vtype)
        if i + 1 < len(keys) and keys[i + 1] < hi:
            hi = keys[i + 1]
        if len(keys) >= node.max_entries:
            room = False
        node = child
    leaf = node if room else None
    keys = node.keys
    i = bisect_right(keys, key) - 1
    if i >= 0 and keys[i] == key:
        old = node.values[i]
        node.values[i] = value
        if not vtype.equal(old, value):
            vtype.dec(old)
        return root, False, leaf, hi
    keys.insert(i + 1, key)
    node.values.insert(i + 1, value)
    return root, True, leaf, hi


def insert_run(tm: TransactionManager, root: int, keys_in: Sequence[int], values_in: Sequence[Any],
               vtype: ValueType) -> tuple[int, int]:
    """:func:`insert` of each key of ``keys_in`` with the value at the same place of
    ``values_in``, in order (a run going up goes into a leaf with a slice of each); returns
    ``(new root, how many keys are new)``. The tree comes out as the same inserts one by one leave it: a key above
    the previous one goes straight into the leaf that one reached while no internal node on that
    path is full, the leaf is not full and the key is below the leaf's upper bound (the full path
    would find that leaf, change every node of its path in place and split none), any other down
    the full path. In a tree of two levels whose root is changed in place and not full, any
    other key goes straight into its leaf too, found by one search of the root, when that leaf
    is changed in place and not full and the key is not below the root's first key (the full
    path would then split, shadow and change nothing on its way): a run in no order (the first
    writes of random blocks, folded) walks no path per key."""
    counts, fresh, dirty = tm.msm.counts, tm.msm.new, tm.dirty_nodes
    added = 0
    leaf: Node | None = None
    top: Node | None = None  # the root when changed in place and not a leaf (looked for after each full path)
    last = hi = 0
    at, n = 0, len(keys_in)
    while at < n:
        key = keys_in[at]
        at += 1
        if leaf is None or not last < key < hi or len(leaf.keys) >= leaf.max_entries:
            leaf = None
            if top is None and counts[root] == 1 and root in fresh and not dirty[root][0].leaf:
                top = dirty[root][0]
            if top is not None and len(top.keys) < top.max_entries:
                tk = top.keys
                i = bisect_right(tk, key) - 1
                if i >= 0:
                    b = top.values[i]
                    if counts[b] == 1 and b in fresh:
                        child = dirty[b][0]
                        if child.leaf and 0 < len(child.keys) < child.max_entries:
                            leaf, hi = child, tk[i + 1] if i + 1 < len(tk) else 1 << 64
            if leaf is None:
                root, new, leaf, hi = _insert(tm, root, key, values_in[at - 1], vtype)
                top = None
                added += new
                last = key
                continue
        keys = leaf.keys
        if key > keys[-1] and at < n and keys_in[at] > key:  # past the leaf's last key, a run going
            # up: it goes at the end, and so does each key after it while they go up, stay below
            # ``hi`` and the leaf has room (a key alone goes there by the search below)
            ks = keys_in[at - 1:at - 1 + leaf.max_entries - len(keys)]
            down = list(map(le, ks[1:], ks[:-1]))
            m = down.index(True) + 1 if True in down else len(ks)
            m = bisect_left(ks, hi, 1, m)  # ks[:m] goes up; ks[0] is below hi
            keys.extend(ks[:m])
            leaf.values.extend(values_in[at - 1:at - 1 + m])
            added += m
            last = ks[m - 1]
            at += m - 1
            continue
        last = key
        value = values_in[at - 1]
        i = bisect_right(keys, key) - 1
        if i >= 0 and keys[i] == key:
            old = leaf.values[i]
            leaf.values[i] = value
            if not vtype.equal(old, value):
                vtype.dec(old)
            continue
        keys.insert(i + 1, key)
        leaf.values.insert(i + 1, value)
        added += 1
    return root, added


def _has(node: Node, key: int) -> bool:
    i = bisect_right(node.keys, key) - 1
    return i >= 0 and node.keys[i] == key


def shadow_path(tm: TransactionManager, root: int, key: int, vtype: ValueType) -> tuple[int, Node, int] | None:
    """Shadow the path to an existing ``key``: ``(new root, writable leaf, index)``, or ``None``.

    The two-level mapping tree uses this to shadow the top level *before* the device's own tree,
    as dm-btree.c ``dm_btree_insert`` does across levels (shared top-level leaves give their
    subtree roots a reference first).
    """
    if lookup(tm, root, key, vtype) is None:
        return None
    node = tm.shadow(root, vtype)
    new_root = node.blocknr
    while not node.leaf:
        i = bisect_right(node.keys, key) - 1
        child = tm.shadow(node.values[i], vtype)
        node.values[i] = child.blocknr
        node = child
    return new_root, node, bisect_right(node.keys, key) - 1


def _rebalance(tm: TransactionManager, parent: Node, i: int, vtype: ValueType) -> None:
    """Make child ``i`` able to lose an entry (dm-btree-remove.c ``rebalance_children``).

    A child at the minimum (a third of ``max_entries``) is merged with a sibling when both fit in
    one node, or takes entries from it; the caller looks the key up in ``parent`` again.
    """
    child = tm.read_node(parent.values[i], vtype)
    if len(child.keys) > child.max_entries // 3 or len(parent.keys) < 2:
        return
    li = i - 1 if i > 0 else i
    left = tm.shadow(parent.values[li], vtype)
    parent.values[li] = left.blocknr
    right = tm.shadow(parent.values[li + 1], vtype)
    parent.values[li + 1] = right.blocknr
    if left.max_entries != right.max_entries:
        raise CorruptMetadata(f"btree nodes {left.blocknr} and {right.blocknr}: max_entries differ")
    total = len(left.keys) + len(right.keys)
    if total <= left.max_entries:
        left.keys.extend(right.keys)
        left.values.extend(right.values)
        right.keys, right.values = [], []
        del parent.keys[li + 1], parent.values[li + 1]
        tm.dec(right.blocknr)  # its children now belong to ``left``
        return
    target = total // 2
    if len(left.keys) > target:
        move = len(left.keys) - target
        right.keys[:0], right.values[:0] = left.keys[-move:], left.values[-move:]
        del left.keys[-move:], left.values[-move:]
    else:
        move = target - len(left.keys)
        left.keys.extend(right.keys[:move])
        left.values.extend(right.values[:move])
        del right.keys[:move], right.values[:move]
    parent.keys[li + 1] = right.keys[0]


def remove(tm: TransactionManager, root: int, key: int, vtype: ValueType) -> tuple[int, bool]:
    """Remove ``key`` (its value loses a reference); returns ``(new root, whether it was there)``."""
    if lookup(tm, root, key, vtype) is None:
        return root, False
    node = tm.shadow(root, vtype)
    root = node.blocknr
    while not node.leaf:
        _collapse_root(tm, node, vtype)
        if node.leaf:
            break
        i = bisect_right(node.keys, key) - 1
        _rebalance(tm, node, i, vtype)
        i = bisect_right(node.keys, key) - 1
        _collapse_root(tm, node, vtype)
        if node.leaf:
            break
        child = tm.shadow(node.values[i], vtype)
        node.values[i] = child.blocknr
        node = child
    i = bisect_right(node.keys, key) - 1
    value = node.values[i]
    del node.keys[i], node.values[i]
    vtype.dec(value)
    return root, True


def _collapse_root(tm: TransactionManager, node: Node, vtype: ValueType) -> None:
    """An internal node with one child takes the child's contents (the tree loses a level)."""
    while not node.leaf and len(node.keys) == 1:
        child = tm.shadow(node.values[0], vtype)
        node.leaf, node.max_entries, node.value_size = child.leaf, child.max_entries, child.value_size
        node.keys, node.values = child.keys, child.values
        child.keys, child.values = [], []
        tm.dec(child.blocknr)


def delete_tree(tm: TransactionManager, root: int, vtype: ValueType) -> None:
    """Drop a reference to a whole tree (dm-btree.c ``dm_btree_del``).

    A node still referenced elsewhere is only decremented; otherwise its children (or, for a
    leaf, its values) lose a reference and the node is freed.
    """
    stack = [root]
    while stack:
        b = stack.pop()
        if tm.count(b) > 1:
            tm.dec(b)
            continue
        node = tm.read_node(b, vtype, cache=False)
        if node.leaf:
            for v in node.values:
                vtype.dec(v)
        else:
            stack.extend(node.values)
        tm.dec(b)


def build(tm: TransactionManager, keys: Sequence[int], values: Sequence[Any], vtype: ValueType) -> int:
    """Write a new tree holding sorted ``keys``/``values`` bottom-up; returns its root.

    Nodes are filled completely except that the last two of a level share their entries evenly
    when the last would be under a third full, so every non-root node satisfies thin_check.
    The values' references are the caller's to count.
    """
    if not keys:
        return empty_tree(tm, vtype)
    level_keys, level_values = keys, values
    leaf = True
    while True:
        max_entries = calc_max_entries(vtype.size if leaf else 8)
        if len(level_keys) <= max_entries:
            node = tm.new_node(leaf, vtype, max_entries)
            node.keys, node.values = list(level_keys), list(level_values)
            return node.blocknr
        up_keys: list[int] = []
        up_values: list[int] = []
        at = 0
        for size in _chunks(len(level_keys), max_entries):
            node = tm.new_node(leaf, vtype, max_entries)
            node.keys, node.values = list(level_keys[at:at + size]), list(level_values[at:at + size])
            up_keys.append(node.keys[0])
            up_values.append(node.blocknr)
            at += size
        level_keys, level_values = up_keys, up_values
        leaf = False


def _chunks(n: int, max_entries: int) -> list[int]:
    """Sizes of full nodes for ``n`` entries, the last two evened out when the last is small."""
    sizes = [max_entries] * (n // max_entries)
    if n % max_entries:
        sizes.append(n % max_entries)
    if len(sizes) >= 2 and sizes[-1] < max_entries // 3:
        both = sizes[-1] + sizes[-2]
        sizes[-2:] = [both - both // 2, both // 2]
    return sizes
