"""Reference counts of metadata or data blocks: the in-core side of a persistent-data space map.

On disk (drivers/md/persistent-data/dm-space-map-common.c) a space map is a set of bitmap blocks
holding 2 bits per block (0, 1, 2, or 3 = "look in the overflow btree"), an index of those bitmaps
and an overflow btree of true counts >= 3. ``RefCounts`` keeps exactly that shape in memory: one
byte per block with the 2-bit value, and a dict of the overflow counts, so loading and saving are
bulk translations and a free-block search is ``bytearray.find``.

Allocation follows ``sm_ll_find_common_free_block``: a block freed in the current transaction is
not handed out again before the next commit, so the last committed trees stay intact on disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dmtools.errors import CorruptMetadata, NoSpace

from .ondisk import BLOCK_SIZE, ENTRIES_PER_BITMAP

__all__ = ["RefCounts", "decode_bitmap", "encode_bitmap"]

_BITMAP_BYTES = BLOCK_SIZE - 16

# Entry k of a byte sits at bit 2k (the HIGH bit of the count) and 2k+1 (the LOW bit):
# dm-space-map-common.c sm_lookup_bitmap / sm_set_bitmap.
_DECODE = [bytes((((b >> (2 * k)) & 1) << 1) | ((b >> (2 * k + 1)) & 1) for b in range(256)) for k in range(4)]
_ENCODE = [bytes(((((c >> 1) & 1) | ((c & 1) << 1)) << (2 * k)) if c < 4 else 0 for c in range(256)) for k in range(4)]


def decode_bitmap(block: bytes | bytearray | memoryview) -> bytearray:
    """The 16320 2-bit counts of a bitmap block, one byte each."""
    raw = bytes(block[16:BLOCK_SIZE])
    out = bytearray(ENTRIES_PER_BITMAP)
    for k in range(4):
        out[k::4] = raw.translate(_DECODE[k])
    return out


def encode_bitmap(counts: bytes | bytearray) -> bytes:
    """The 4080 bitmap bytes (after the header) for up to 16320 counts of 0..3 (the counts past
    them encode as zero bytes: only the given ones are translated, a pool's last bitmap being
    mostly past its end)."""
    padded = bytes(counts).ljust(-(-len(counts) // 4) * 4, b"\0")
    word = 0
    for k in range(4):
        word |= int.from_bytes(padded[k::4].translate(_ENCODE[k]), "little")
    return word.to_bytes(_BITMAP_BYTES, "little")


class RefCounts:
    """Counts of ``nr_blocks`` blocks with the kernel's allocation rules.

    ``dirty_bitmaps`` collects the bitmap indexes whose 2-bit values changed and
    ``overflow_dirty`` the blocks whose overflow-tree entry must be written or removed;
    the transaction manager drains both at commit.
    """

    def __init__(self, nr_blocks: int, what: str) -> None:
        self.what = what
        self.counts = bytearray(nr_blocks)
        self.overflow: dict[int, int] = {}
        self.nr_allocated = 0
        self.cursor = 0
        self.freed: set[int] = set()  # freed this transaction: not reusable before the commit
        self.new: set[int] = set()  # allocated this transaction
        self.dirty_bitmaps: set[int] = set()
        self.overflow_dirty: set[int] = set()
        self.allocated_this_transaction = 0

    @property
    def nr_blocks(self) -> int:
        return len(self.counts)

    @property
    def nr_free(self) -> int:
        return self.nr_blocks - self.nr_allocated

    def load_bitmap(self, index: int, block: bytes | bytearray | memoryview) -> None:
        """Fill the counts of bitmap ``index`` from its on-disk block (no dirtiness)."""
        start = index * ENTRIES_PER_BITMAP
        end = min(start + ENTRIES_PER_BITMAP, self.nr_blocks)
        if start >= end:
            return
        self.counts[start:end] = decode_bitmap(block)[: end - start]

    def finish_load(self, overflow: Iterable[tuple[int, int]]) -> None:
        """Take the overflow btree's entries and check they agree with the bitmaps."""
        for block, count in overflow:
            if block >= self.nr_blocks or self.counts[block] != 3:
                raise CorruptMetadata(f"{self.what} space map: overflow count for block {block} "
                                      "whose bitmap entry is not 3")
            if count < 3:
                raise CorruptMetadata(f"{self.what} space map: overflow count {count} < 3 for block {block}")
            self.overflow[block] = count
        threes = self.counts.count(3)
        if threes != len(self.overflow):
            raise CorruptMetadata(f"{self.what} space map: {threes - len(self.overflow)} bitmap entries say "
                                  "'overflow' with no count in the overflow btree")
        self.nr_allocated = self.nr_blocks - self.counts.count(0)

    def get(self, block: int) -> int:
        c = self.counts[block]
        return self.overflow[block] if c == 3 else c

    def _check(self, block: int) -> None:
        if not 0 <= block < self.nr_blocks:
            raise CorruptMetadata(f"{self.what} block {block} is outside the space map ({self.nr_blocks} blocks)")

    def inc(self, block: int, n: int = 1) -> None:
        """Add ``n`` references to ``block``."""
        self._check(block)
        c = self.counts[block]
        if c == 0:
            self.nr_allocated += 1
            self.freed.discard(block)
        total = (self.overflow[block] if c == 3 else c) + n
        self._set(block, c, total)

    def dec(self, block: int) -> None:
        """Drop one reference to ``block``; a count that reaches 0 frees it."""
        self._check(block)
        c = self.counts[block]
        if c == 0:
            raise CorruptMetadata(f"{self.what} block {block}: reference count would go below zero")
        total = (self.overflow[block] if c == 3 else c) - 1
        self._set(block, c, total)
        if total == 0:
            self.nr_allocated -= 1
            if block in self.new:
                self.new.discard(block)
                self.allocated_this_transaction -= 1
            else:
                self.freed.add(block)

    def _set(self, block: int, old2: int, total: int) -> None:
        new2 = min(total, 3)
        if new2 != old2:
            self.counts[block] = new2
            self.dirty_bitmaps.add(block // ENTRIES_PER_BITMAP)
        if new2 == 3:
            self.overflow[block] = total
            self.overflow_dirty.add(block)
        elif old2 == 3:
            del self.overflow[block]
            self.overflow_dirty.add(block)

    def find_free(self) -> int | None:
        """The next allocatable block from the cursor (wrapping), or ``None``."""
        counts, freed = self.counts, self.freed
        for lo, hi in ((self.cursor, self.nr_blocks), (0, self.cursor)):
            b = counts.find(0, lo, hi)
            while b != -1 and b in freed:
                b = counts.find(0, b + 1, hi)
            if b != -1:
                return b
        return None

    def alloc(self) -> int:
        """Allocate one block (count 1); raise ``NoSpace`` when none is free."""
        b: int | None = self.counts.find(0, self.cursor)  # find_free's first step, inline
        if b == -1 or b in self.freed:
            b = self.find_free()
        if b is None:
            raise NoSpace(f"out of {self.what} space ({self.nr_blocks} blocks, "
                          f"{len(self.freed)} freed in this transaction)")
        # inc(b) of a free block (find_free gives none freed in this transaction), inline
        self.counts[b] = 1
        self.nr_allocated += 1
        self.dirty_bitmaps.add(b // ENTRIES_PER_BITMAP)
        self.new.add(b)
        self.allocated_this_transaction += 1
        self.cursor = b + 1
        return b

    def alloc_many(self, n: int) -> Sequence[int]:
        """Up to ``n`` blocks, the ones ``n`` calls of :meth:`alloc` would give, taken a run of
        free blocks at a time; fewer when no more are free. A ``range`` when they are ``n``
        consecutive blocks from the cursor (the commonest case, taken at once), else a list."""
        counts, freed = self.counts, self.freed
        at = counts.find(0, self.cursor)
        end = at + n
        if at >= 0 and not freed and end <= len(counts) and counts.count(0, at, end) == n:
            # the commonest case, at once: ``n`` free blocks from the first one past the cursor
            # (nothing freed in this transaction for alloc to skip)
            counts[at:end] = b"\1" * n
            self.new.update(range(at, end))
            self.dirty_bitmaps.update(range(at // ENTRIES_PER_BITMAP, (end - 1) // ENTRIES_PER_BITMAP + 1))
            self.cursor = end
            self.nr_allocated += n
            self.allocated_this_transaction += n
            return range(at, end)
        out: list[int] = []
        while len(out) < n:
            b = self.find_free()
            if b is None:
                break
            limit = min(len(counts), b + n - len(out))
            end = limit - len(counts[b:limit].lstrip(b"\0"))  # the run of free blocks from b
            if freed:  # none freed in this transaction (find_free skips them)
                end = min([f for f in freed if b < f < end], default=end)
            counts[b:end] = b"\1" * (end - b)
            self.new.update(range(b, end))
            self.dirty_bitmaps.update(range(b // ENTRIES_PER_BITMAP, (end - 1) // ENTRIES_PER_BITMAP + 1))
            self.cursor = end
            out.extend(range(b, end))
        self.nr_allocated += len(out)
        self.allocated_this_transaction += len(out)
        return out

    def extend(self, extra: int) -> None:
        """Manage ``extra`` more blocks (all free)."""
        first_new_bitmap = (self.nr_blocks + ENTRIES_PER_BITMAP - 1) // ENTRIES_PER_BITMAP
        if self.nr_blocks % ENTRIES_PER_BITMAP:
            self.dirty_bitmaps.add(self.nr_blocks // ENTRIES_PER_BITMAP)
        self.counts.extend(bytes(extra))
        last = (self.nr_blocks + ENTRIES_PER_BITMAP - 1) // ENTRIES_PER_BITMAP
        self.dirty_bitmaps.update(range(first_new_bitmap, last))

    @property
    def nr_bitmaps(self) -> int:
        return (self.nr_blocks + ENTRIES_PER_BITMAP - 1) // ENTRIES_PER_BITMAP

    def bitmap_counts(self, index: int) -> bytes:
        start = index * ENTRIES_PER_BITMAP
        return bytes(self.counts[start:start + ENTRIES_PER_BITMAP])

    def index_fields(self, index: int) -> tuple[int, int]:
        """``(nr_free, none_free_before)`` of bitmap ``index``, as dm-space-map-common.c keeps them.

        Entries past ``nr_blocks`` in the last bitmap count as free (sm_ll_extend gives every new
        bitmap 16320 free entries).
        """
        start = index * ENTRIES_PER_BITMAP
        end = min(start + ENTRIES_PER_BITMAP, self.nr_blocks)
        used = (end - start) - self.counts.count(0, start, end)
        first = self.counts.find(0, start, end)
        return ENTRIES_PER_BITMAP - used, (first - start) if first != -1 else end - start

    def end_transaction(self) -> None:
        """Forget the transaction's bookkeeping after a commit."""
        self.freed.clear()
        self.new.clear()
        self.allocated_this_transaction = 0
