"""A compact completed-exception table: origin chunk -> COW chunk.

The kernel keeps a hash table that coalesces consecutive chunks (dm-exception-store.h). In Python a
dict of a million ints costs about 100 MiB, so the bulk of the table is one sorted ``array('Q')`` of
packed keys ``old << shift | new`` (8 bytes per exception) searched with ``bisect``; exceptions added
or removed since the last compaction live in a small dict overlay that is folded in when it grows.
"""

from __future__ import annotations

import operator
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import repeat
from typing import Union

_U64 = 1 << 64
#: an overlay value meaning "removed since the last compaction".
_REMOVED = -1

Keys = Union["array[int]", list[int]]


class ExceptionTable:
    """Completed exceptions of one snapshot, looked up by origin chunk.

    ``shift`` is the number of bits the COW chunk numbers need (``cow_chunks.bit_length()``). Not
    thread-safe: the snapshot target serialises access with its own lock.
    """

    def __init__(self, shift: int, keys: Keys | None = None) -> None:
        self.shift = shift
        self._mask = (1 << shift) - 1
        self._keys: Keys = keys if keys is not None else array("Q")
        self._overlay: dict[int, int] = {}
        self._count = len(self._keys)

    # -- bulk construction ------------------------------------------------------------------------
    @classmethod
    def from_key_list(cls, shift: int, keys: list[int]) -> "ExceptionTable":
        """Build from packed keys (``old << shift | new``) in any order; ``keys`` is consumed."""
        keys.sort()
        packed: Keys
        try:
            packed = array("Q", keys)
        except OverflowError:  # an origin chunk too large to pack in 64 bits: keep the list
            packed = keys
        else:
            keys.clear()
        table = cls(shift, packed)
        table._dedupe_if_needed()
        return table

    @staticmethod
    def pack_keys(olds: Iterable[int], news: Iterable[int], shift: int) -> Iterator[int]:
        """Packed keys for parallel ``olds``/``news`` sequences, computed without a Python loop."""
        return map(operator.or_, map(operator.lshift, olds, repeat(shift)), news)

    def _dedupe_if_needed(self) -> None:
        # An origin chunk recorded twice (never written by the kernel, possible on a damaged COW)
        # keeps its last record, as a later callback would overwrite the earlier one.
        keys = self._keys
        shift = self.shift
        olds_a = map(operator.rshift, keys, repeat(shift))
        olds_b = map(operator.rshift, keys, repeat(shift))
        next(olds_b, None)
        dups = any(map(operator.eq, olds_a, olds_b))
        if not dups:
            return
        kept: list[int] = []
        for k in keys:
            if kept and kept[-1] >> shift == k >> shift:
                kept[-1] = k
            else:
                kept.append(k)
        self._keys = array("Q", kept) if isinstance(keys, array) else kept
        self._count = len(self._keys)

    # -- lookups ----------------------------------------------------------------------------------
    def _base_lookup(self, old: int) -> int | None:
        keys = self._keys
        probe = old << self.shift
        i = bisect_left(keys, probe)
        if i < len(keys) and keys[i] >> self.shift == old:
            return keys[i] & self._mask
        return None

    def lookup(self, old: int) -> int | None:
        """The COW chunk holding origin chunk ``old``, or ``None``."""
        if self._overlay:
            v = self._overlay.get(old)
            if v is not None:
                return None if v == _REMOVED else v
        return self._base_lookup(old)

    def __contains__(self, old: object) -> bool:
        return isinstance(old, int) and self.lookup(old) is not None

    def __len__(self) -> int:
        return self._count

    # -- updates ----------------------------------------------------------------------------------
    def insert(self, old: int, new: int) -> None:
        """Record ``old -> new`` (replacing any earlier mapping of ``old``)."""
        if new >> self.shift:
            raise ValueError(f"COW chunk {new} does not fit {self.shift} bits")
        had = self.lookup(old) is not None
        self._overlay[old] = new
        if not had:
            self._count += 1
        self._maybe_compact()

    def remove(self, old: int) -> None:
        """Forget origin chunk ``old`` (after it has been merged)."""
        if self.lookup(old) is None:
            return
        if self._base_lookup(old) is None:
            del self._overlay[old]
        else:
            self._overlay[old] = _REMOVED
        self._count -= 1
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        if len(self._overlay) > max(4096, len(self._keys) >> 3):
            self.compact()

    def compact(self) -> None:
        """Fold the overlay into the sorted array (timsort merges the two sorted runs)."""
        if not self._overlay:
            return
        shift = self.shift
        overlay = self._overlay
        merged = [k for k in self._keys if (k >> shift) not in overlay]
        added = sorted((o << shift) | n for o, n in overlay.items() if n != _REMOVED)
        merged.extend(added)
        merged.sort()
        try:
            self._keys = array("Q", merged)
        except OverflowError:
            self._keys = merged
        self._overlay = {}
        self._count = len(self._keys)

    # -- iteration --------------------------------------------------------------------------------
    def items(self) -> Iterator[tuple[int, int]]:
        """``(old, new)`` pairs in origin-chunk order."""
        self.compact()
        shift, mask = self.shift, self._mask
        for k in self._keys:
            yield k >> shift, k & mask

    def memory_bytes(self) -> int:
        """Approximate bytes held by the table."""
        base = self._keys.itemsize * len(self._keys) if isinstance(self._keys, array) else 40 * len(self._keys)
        return base + 100 * len(self._overlay)
