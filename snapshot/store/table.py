"""A compact completed-exception table: origin chunk -> COW chunk.

The kernel keeps a hash table that coalesces consecutive chunks (dm-exception-store.h). In Python a
dict of a million ints costs about 100 MiB, so the bulk of the table is one sorted array of packed
keys ``old << shift | new`` (8 bytes per exception) searched with ``bisect``; exceptions added or
removed since the last compaction live in a small dict overlay folded in when it grows.

Packed keys below 2**53 are held as floats (``array('d')``), which are exact there and which
``list.sort`` compares several times faster than multi-digit ints; larger keys use ``array('Q')``
(or a list past 64 bits).
"""

from __future__ import annotations

import operator
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import filterfalse, repeat
from operator import itemgetter
from typing import Union

#: floats represent every integer below this exactly.
FLOAT_EXACT = 1 << 53
#: an overlay value meaning "removed since the last compaction".
_REMOVED = -1
#: how many fully mapped ranges ``unmapped`` remembers before it starts over (~1 MiB of memory;
#: as 1 MiB writes' ranges they cover 8 GiB of a volume).
MAPPED_RANGES = 8192
#: the overlay is folded into the sorted array once it holds more than this many entries and an
#: eighth of the array.
OVERLAY_MIN = 4096

Keys = Union["array[float]", "array[int]", list[int]]


def _pack_array(keys: list[int] | list[float]) -> Keys:
    """The most compact container for sorted keys."""
    if keys and isinstance(keys[0], float):
        return array("d", keys)
    try:
        return array("Q", keys)
    except OverflowError:  # an origin chunk too large to pack in 64 bits: keep the list
        return list(map(int, keys))


class ExceptionTable:
    """Completed exceptions of one snapshot, looked up by origin chunk.

    ``shift`` is the number of bits the COW chunk numbers need (``cow_chunks.bit_length()``). Not
    thread-safe: the snapshot target serialises access with its own lock.
    """

    def __init__(self, shift: int, keys: Keys | None = None) -> None:
        self.shift = shift
        self._mask = (1 << shift) - 1
        self._keys: Keys = keys if keys is not None else array("d")
        self._float = isinstance(self._keys, array) and self._keys.typecode == "d"
        self._overlay: dict[int, int] = {}
        self._count = len(self._keys)
        #: no origin chunk appears twice in the sorted array: true of a table grown by inserts;
        #: one loaded from a COW is not checked (the kernel never writes a chunk twice, but a
        #: damaged COW may)
        self._unique = not self._count
        #: overlay entries put over a mapping of the sorted array (removals, replacements) since
        #: the last compaction; an upper bound. While 0, the overlay only adds origin chunks.
        self._hiding = 0
        #: ``(lo, hi)`` ranges ``unmapped`` found fully mapped: a rewrite of one costs a set
        #: lookup. Only ``remove`` (a merge) unmaps a chunk, and it forgets them all.
        self._mapped: set[tuple[int, int]] = set()

    # -- bulk construction ------------------------------------------------------------------------
    @classmethod
    def from_key_list(cls, shift: int, keys: list[int] | list[float]) -> "ExceptionTable":
        """Build from packed keys in any order (all floats or all ints); ``keys`` is consumed."""
        keys.sort()
        packed = _pack_array(keys)
        keys.clear()
        return cls(shift, packed)

    @staticmethod
    def pack_keys(olds: Iterable[int], news: Iterable[int], shift: int) -> Iterator[int]:
        """Packed int keys for parallel ``olds``/``news`` sequences, without a Python loop."""
        return map(operator.or_, map(operator.lshift, olds, repeat(shift)), news)

    @staticmethod
    def pack_float_keys(olds: Iterable[int], news: Iterable[int], shift: int) -> Iterator[float]:
        """Packed keys as floats; the caller guarantees every key is below ``FLOAT_EXACT``."""
        return map(float, map(operator.or_, map(operator.lshift, olds, repeat(shift)), news))

    # -- lookups ----------------------------------------------------------------------------------
    def _base_lookup(self, old: int) -> int | None:
        # An origin chunk recorded twice (the kernel never writes that) resolves to its lowest
        # COW chunk; loading does not pay for a duplicate scan.
        keys = self._keys
        probe = old << self.shift
        i = bisect_left(keys, float(probe) if self._float else probe)  # type: ignore[arg-type]
        if i < len(keys):
            k = int(keys[i])
            if k >> self.shift == old:
                return k & self._mask
        return None

    def lookup(self, old: int) -> int | None:
        """The COW chunk holding origin chunk ``old``, or ``None``."""
        if self._overlay:
            v = self._overlay.get(old)
            if v is not None:
                return None if v == _REMOVED else v
        # (_base_lookup, inline: every origin write of a snapshot asks this once)
        keys = self._keys
        shift = self.shift
        i = bisect_left(keys, float(old << shift) if self._float else old << shift)  # type: ignore[arg-type]
        if i < len(keys):
            k = int(keys[i])
            if k >> shift == old:
                return k & self._mask
        return None

    def unmapped(self, lo: int, hi: int) -> list[int]:
        """The origin chunks of ``[lo, hi)`` without a mapping, in order (one probe per range
        of the sorted array instead of one lookup per chunk; a range found fully mapped before
        answers from a cache)."""
        if (lo, hi) in self._mapped:
            return []
        out = self._unmapped(lo, hi)
        if not out and hi - lo > 1:  # (one chunk costs a probe anyway)
            if len(self._mapped) >= MAPPED_RANGES:
                self._mapped.clear()
            self._mapped.add((lo, hi))
        return out

    def _unmapped(self, lo: int, hi: int) -> list[int]:
        chunks = range(lo, hi)
        if self._hiding:
            return [c for c in chunks if self.lookup(c) is None]
        keys, shift = self._keys, self.shift
        if self._float:
            i = bisect_left(keys, float(lo << shift))  # type: ignore[arg-type]
            j = bisect_left(keys, float(hi << shift))  # type: ignore[arg-type]
        else:
            i = bisect_left(keys, lo << shift)  # type: ignore[arg-type]
            j = bisect_left(keys, hi << shift)  # type: ignore[arg-type]
        overlay = self._overlay
        if i == j:
            return list(filterfalse(overlay.__contains__, chunks)) if overlay else list(chunks)
        if j - i == hi - lo and self._unique:  # as many distinct chunks as the range holds: all
            return []
        base = {int(k) >> shift for k in keys[i:j]}
        return [c for c in chunks if c not in overlay and c not in base]

    def __contains__(self, old: object) -> bool:
        return isinstance(old, int) and self.lookup(old) is not None

    def __len__(self) -> int:
        return self._count

    # -- updates ----------------------------------------------------------------------------------
    def _reshift(self, bits: int) -> None:
        """Re-pack every key for COW chunk numbers of ``bits`` bits (the COW grew)."""
        pairs = list(self.items())
        shift = max(bits, self.shift)
        keys = [(o << shift) | n for o, n in pairs]
        self.shift = shift
        self._mask = (1 << shift) - 1
        self._keys = array("d", keys) if not keys or keys[-1] < FLOAT_EXACT else _pack_array(keys)
        self._float = isinstance(self._keys, array) and self._keys.typecode == "d"
        self._count = len(self._keys)

    def insert(self, old: int, new: int) -> None:
        """Record ``old -> new`` (replacing any earlier mapping of ``old``)."""
        if new >> self.shift:
            self._reshift(new.bit_length() + 2)
        had = self.lookup(old) is not None
        if self._base_lookup(old) is not None:
            self._hiding += 1
        self._overlay[old] = new
        if not had:
            self._count += 1
        self._maybe_compact()

    def insert_new(self, pairs: list[tuple[int, int]]) -> None:
        """Record several ``old -> new`` for origin chunks that have no mapping yet."""
        top = max(map(itemgetter(1), pairs), default=0)
        if top >> self.shift:
            self._reshift(top.bit_length() + 2)
        self._overlay.update(pairs)
        self._count += len(pairs)
        self._maybe_compact()

    def remove(self, old: int) -> None:
        """Forget origin chunk ``old`` (after it has been merged)."""
        if self.lookup(old) is None:
            return
        self._mapped.clear()
        if self._base_lookup(old) is None:
            del self._overlay[old]
        else:
            self._overlay[old] = _REMOVED
            self._hiding += 1
        self._count -= 1
        self._maybe_compact()

    def insert_one(self, old: int, new: int) -> None:
        """``insert_new([(old, new)])`` without building a list (the one-chunk first write)."""
        if new >> self.shift:
            self._reshift(new.bit_length() + 2)
        overlay = self._overlay
        overlay[old] = new
        self._count += 1
        if len(overlay) > max(OVERLAY_MIN, len(self._keys) >> 3):  # (_maybe_compact, inline)
            self.compact()

    def _maybe_compact(self) -> None:
        if len(self._overlay) > max(OVERLAY_MIN, len(self._keys) >> 3):
            self.compact()

    def compact(self) -> None:
        """Fold the overlay into the sorted array (timsort merges the two sorted runs)."""
        if not self._overlay:
            return
        shift = self.shift
        overlay = self._overlay
        keys = self._keys
        if not self._hiding:  # only new origin chunks: keep every key, add the overlay's
            added = list(self.pack_keys(overlay.keys(), overlay.values(), shift))
            merged: list = []
            if self._float and max(added) < FLOAT_EXACT:  # floats sort fastest
                merged.extend(keys)
                merged.extend(map(float, added))
            else:
                merged.extend(map(int, keys))
                merged.extend(added)
            merged.sort()
        else:
            merged = [k for k in map(int, keys) if (k >> shift) not in overlay]
            merged.extend((o << shift) | n for o, n in overlay.items() if n != _REMOVED)
            merged.sort()
        if not merged or merged[-1] < FLOAT_EXACT:
            self._keys = array("d", merged)
        else:
            self._keys = _pack_array(merged)
        self._float = isinstance(self._keys, array) and self._keys.typecode == "d"
        self._overlay = {}
        self._hiding = 0
        self._count = len(self._keys)

    # -- iteration --------------------------------------------------------------------------------
    def items(self) -> Iterator[tuple[int, int]]:
        """``(old, new)`` pairs in origin-chunk order."""
        self.compact()
        shift, mask = self.shift, self._mask
        for k in map(int, self._keys):
            yield k >> shift, k & mask

    def packed_keys(self) -> "array[float] | array[int] | None":
        """Every mapping as a packed key ``old << shift | new``, sorted (the overlay folded in
        first): an array of doubles (typecode ``d``) or of 64-bit words (``Q``); ``None`` where
        the keys need more than 64 bits."""
        self.compact()
        keys = self._keys
        return keys if isinstance(keys, array) else None

    def last(self) -> tuple[int, int] | None:
        """The mapping with the highest origin chunk, or ``None`` when empty."""
        self.compact()
        if not self._keys:
            return None
        k = int(self._keys[-1])
        return k >> self.shift, k & self._mask

    def memory_bytes(self) -> int:
        """Approximate bytes held by the table."""
        keys = self._keys
        base = keys.itemsize * len(keys) if isinstance(keys, array) else 40 * len(keys)
        return base + 100 * len(self._overlay)
