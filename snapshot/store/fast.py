"""One snapshot's common first write whole in C (dms.c ``dms_snap_*``).

A random small first write to a snapshotted origin costs a copy, a commit and the origin write,
a few system calls; the Python around them (the exception table's lookup, the store's
allocation, the pending exception, the completion in order, the publication) cost several times
their instructions. :class:`FastWrites` keeps what that write needs in a C struct under one
mutex: a bitmap of the origin chunks with an exception, the store's next free chunk, the
metadata area's stride, the COW's size, the range zeroed ahead, the area buffer and its record
count. While it is *armed*, ``dms_snap_write`` does the whole write (lookup, allocation, copy,
the flushes and the record in the kernel's order, the origin write) and logs the exception.

Python stays the owner of the table and the store: :meth:`FastWrites.fence` disarms C (waiting
for a write in flight) and folds its log into them; the snapshot
(:class:`snapshot.targets.core.CopyOnWrite`) fences before any path of its own reads or changes
them, and arms C again only while nothing unusual is going on (no exception pending, no read of
the origin tracked, valid, active, not merging; the store with nothing pending and room in its
area). C zeroes ahead as the store does (the next range, where it is a hole) once the store
zeroed a range itself (a COW that can tell its holes), and commits the record that fills an area
as the store does (the next area zeroed first), going on in the next area; the fence hands the
range and the area back. C declines, the Python path then doing the write, where the COW is
full, the first zeroing ahead is due, a zeroing fails, a run crosses an area's end, a chunk is
past what the table's keys hold, or the log is full; a failure once the copy is in place disarms
C and the next fence goes on from it as :meth:`PersistentStore.commit_copied` does.
"""

from __future__ import annotations

import logging
from array import array
from typing import Any

from dmtools.engine.backing import DIRECT_MIN

from snapshot.route import DMS_AREA, DMS_FUA, DMS_PREFLUSH, c_library
from snapshot.store.format import DISK_EXCEPTION_SIZE, NUM_SNAPSHOT_HDR_CHUNKS
from snapshot.store.persistent import _RECORD, ZERO_AHEAD_BYTES, PersistentStore

log = logging.getLogger(__name__)

#: exceptions C commits between two fences at most (then it declines until the next fence).
LOG_MAX = 4096
#: words before the logged pairs in ``dms_snap_fence``'s answer (dms.c ``DMS_FENCE_HEAD``).
FENCE_HEAD = 9
#: the largest origin (in chunks) C keeps a bitmap of: 2**28 bits, 32 MiB (1 TiB of 4 KiB chunks).
MAX_CHUNKS = 1 << 28


class FastWrites:
    """The C state of one snapshot over ``store``, its origin ``nchunks`` chunks long."""

    __slots__ = ("ffi", "lib", "state", "store", "chunk_bytes", "armed", "failed_records", "_out", "_out_c",
                 "_area_c", "_zeroed")

    def __init__(self, ffi: Any, lib: Any, state: Any, store: PersistentStore) -> None:
        self.ffi, self.lib, self.state, self.store = ffi, lib, state, store
        #: the store's chunk size in bytes (a store's chunk size never changes)
        self.chunk_bytes: int = store.chunk_bytes
        #: C may be armed (changed under the snapshot's lock); False: every fence is a no-op.
        self.armed = False
        #: how many of the exceptions the last fence handed over were those of a write whose
        #: commit failed (the last ones; 0 for none)
        self.failed_records = 0
        self._out = array("q", bytes(8 * (FENCE_HEAD + 2 * LOG_MAX)))
        self._out_c = ffi.from_buffer("int64_t[]", self._out)
        self._area_c: Any = None  # (the store's area buffer, its cffi buffer)
        self._zeroed = (0, 0)  # the range zeroed ahead C was armed with

    @classmethod
    def create(cls, store: PersistentStore, length_bytes: int) -> "FastWrites | None":
        """The C state of ``store`` for an origin of ``length_bytes``, its bitmap filled from the
        store's table; ``None`` without C, for chunks too large for it (``DIRECT_MIN``: the
        routes write those through their handles), or where the table cannot be handed to it."""
        found = c_library()
        cb = store.chunk_bytes
        nchunks = -(-length_bytes // cb) if cb else 0
        if found is None or not 0 < nchunks <= MAX_CHUNKS or cb >= DIRECT_MIN:  # (route.first_write's limit)
            return None
        ffi, lib = found
        keys = store.table.packed_keys()
        if keys is None:
            return None
        state = lib.dms_snap_new(nchunks, cb, LOG_MAX)
        if state == ffi.NULL:
            return None
        state = ffi.gc(state, lib.dms_snap_free)
        if len(keys):
            lib.dms_snap_mark_keys(state, ffi.from_buffer(keys), len(keys), store.table.shift,
                                   int(keys.typecode == "d"))
        return cls(ffi, lib, state, store)

    def mark(self, old: int, count: int) -> None:
        """Origin chunks ``old..old+count-1`` got exceptions on the Python path."""
        self.lib.dms_snap_mark(self.state, old, count)

    def arm(self, slow_flush: float) -> bool:
        """Arm C from the store's state where the store allows it (nothing pending, valid,
        writable, room in the area); True once armed. The caller holds the snapshot's lock and
        has checked the snapshot's side. A write finding another in flight declines (the Python
        path then commits concurrent writers together) while the COW's flushes take
        ``slow_flush`` seconds or longer (or are not known yet), else waits for it."""
        cost = self.store.flush_cost
        slow = cost is None or cost >= slow_flush
        store = self.store
        cs = store.chunk_size
        cb = store.chunk_bytes
        epa = cb // DISK_EXCEPTION_SIZE
        with store._commit_lock:
            i = store.current_committed
            if not store.valid or store.readonly or store._callbacks or i + 1 >= epa:
                return False
            with store._lock:
                if store._pending:
                    return False
                area = store._area
                kept = self._area_c
                if kept is None or kept[0] is not area:
                    kept = self._area_c = (area, self.ffi.from_buffer(area))
                upto = store._zeroed_upto
                self._zeroed = (store._zeroed_from, upto)
                # (C allocates no chunk the table's packed keys are too narrow for: the Python
                # path's insert widens them, where the table is kept in step with the COW's size)
                self.lib.dms_snap_arm(self.state, store.next_free, epa + 1,
                                      min(store.cow_sectors // cs, 1 << store.table.shift),
                                      store._zeroed_from, upto, ZERO_AHEAD_BYTES if upto >= 0 and cb < ZERO_AHEAD_BYTES else 0,
                                      kept[1], len(area), (NUM_SNAPSHOT_HDR_CHUNKS + (epa + 1) * store.current_area) * cb,
                                      i, int(min(slow_flush, 1e9) * 1e9), int(slow))
        self.armed = True
        return True

    def fence(self) -> list[tuple[int, int]]:
        """Disarm C and fold what it did since the last fence into the store; the exceptions it
        committed, ``(old, new)``, in order, for the caller's table. A failure C reported is
        handled as :meth:`PersistentStore.commit_copied` does: the area written again, or the
        store invalid (the caller sees ``store.valid``)."""
        self.armed = False
        out = self._out
        self.lib.dms_snap_fence(self.state, self._out_c)
        n = out[2]
        self.failed_records = out[5]
        store = self.store
        if (out[6], out[7]) != self._zeroed:  # (C zeroed ahead: a range Python zeroed before continued)
            with store._lock:
                store._zeroed_from, store._zeroed_upto = out[6], out[7]
        if not n:
            return []
        pairs = list(zip(out[FENCE_HEAD : FENCE_HEAD + 2 * n : 2], out[FENCE_HEAD + 1 : FENCE_HEAD + 2 * n : 2]))
        failed = out[4]
        with store._commit_lock:
            with store._lock:
                store.next_free = out[0]
            store.current_committed = out[1]
            store.records += n
            if out[8]:  # C filled areas and went on: the area now written holds the last records
                store.current_area += out[8]
                store._area = area = bytearray(store.chunk_bytes)
                for i, (old, new) in enumerate(pairs[n - out[1] :]):
                    _RECORD.pack_into(area, i * DISK_EXCEPTION_SIZE, old, new)
            if out[3] >= 0:
                store._cow_route().note_flush(out[3] * 1e-9)
            if failed == DMS_PREFLUSH:  # (the records enter the area only after that flush)
                for i, (old, new) in enumerate(pairs[-out[5] :], out[1] - out[5]):
                    _RECORD.pack_into(store._area, i * DISK_EXCEPTION_SIZE, old, new)
            if failed == DMS_AREA:
                store._write_area_locked()
            elif failed == DMS_PREFLUSH or failed == DMS_FUA:
                log.warning("%s: metadata commit failed: flush failed", store.cow.name)
                store.valid = False
        return pairs
