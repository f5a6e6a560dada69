"""The persistent exception store ``P``/``PO`` in the kernel's on-disk format (dm-snap-persistent.c).

Loading parses each metadata area as a whole (``array('Q')``) and packs the records into an
``ExceptionTable`` without a per-record Python loop, so a COW holding a million exceptions loads in
well under a second within a few tens of MiB.
"""

from __future__ import annotations

import logging
import operator
import struct
import sys
import threading
from array import array
from itertools import repeat
from typing import Any, Callable, Sequence

from dmtools.endpoint import Endpoint
from dmtools.engine.target_driver import ZEROS
from dmtools.errors import CorruptMetadata, DeviceIOError, InvalidTable, NoSpace
from dmtools.target_values import StoreMode

from snapshot.route import DMS_AREA, DMS_COPY, DMS_FUA, DMS_PREFLUSH, NOT_DONE, Route, last_flush_seconds
from snapshot.store.base import CommitCallback, ExceptionStore, Usage
from snapshot.store.format import (DISK_EXCEPTION_SIZE, DM_CHUNK_SIZE_DEFAULT_SECTORS, NUM_SNAPSHOT_HDR_CHUNKS,
                                   SECTOR, SNAP_MAGIC, SNAPSHOT_DISK_VERSION, DiskHeader, area_location,
                                   chunk_size_error, skip_metadata)
from snapshot.store.table import FLOAT_EXACT, ExceptionTable

log = logging.getLogger(__name__)

_BIG_ENDIAN = sys.byteorder == "big"

#: Unallocated space of a sparse COW file written with zeros ahead of small allocations, in one
#: write. Measured on ext4: a chunk copied into a hole allocates a block, so the flush before its
#: record commits a journal transaction too; into blocks already written, the flush only writes the
#: data back. Allocations of this size or more (sequential copies) are not zeroed first: they write
#: their whole range themselves, and writing it twice would cost more than the journal commit.
ZERO_AHEAD_BYTES = 1 << 20


#: :meth:`PersistentStore.commit_copied` counts the flush time of the first and then every so
#: many of its commits in ``flush_cost`` (a power of two): a moving average needs no more.
C_FLUSH_SAMPLE = 16


def _read_exact(dev: Endpoint, size: int, offset: int, what: str) -> bytearray:
    buf = bytearray(size)
    try:
        n = dev.readinto(buf, offset)
    except OSError as err:
        raise DeviceIOError(f"cannot read {what}: {err}", operation="read", device=dev.name) from err
    if n != size:
        raise CorruptMetadata(f"{what} at byte {offset} lies past the end of the COW ({dev.size} bytes)",
                              device=dev.name)
    return buf


def area_records(buf: bytes | bytearray | memoryview) -> list[int]:
    """All 64-bit words of one area, decoded little-endian: ``[old0, new0, old1, new1, ...]``."""
    words = array("Q")
    words.frombytes(bytes(buf) if isinstance(buf, memoryview) else buf)
    if _BIG_ENDIAN:  # pragma: no cover - the project runs on little-endian hosts
        words.byteswap()
    return words.tolist()


class PersistentStore(ExceptionStore):
    """Exceptions recorded on the COW so that the snapshot survives a restart.

    ``chunk_size`` 0 takes the size from an existing header (or the kernel's default for a new
    store). ``overflow`` is the ``PO`` option: a snapshot write that finds the COW full fails
    without invalidating the snapshot (handled by the target; the store only records the flag).
    ``readonly`` loads without ever writing: a new store (magic 0) is set up in memory only.
    """

    def __init__(self, cow: Endpoint, chunk_size: int = 0, *, overflow: bool = False, readonly: bool = False) -> None:
        super().__init__(cow, chunk_size)
        self.readonly = readonly
        self.overflow = overflow
        self.chunk_size_supplied = chunk_size != 0
        self.version = SNAPSHOT_DISK_VERSION
        self.next_free = NUM_SNAPSHOT_HDR_CHUNKS + 1
        self.current_area = 0
        self.current_committed = 0
        self.records = 0  # committed records read at load time plus those committed since
        self.new_store = False
        self._area = bytearray()
        self._pending = 0
        self._callbacks: list[CommitCallback] = []
        #: chunks below this were zeroed ahead (or found written, or zeroing is off: -1)
        self._zeroed_upto = 0
        #: the last range zeroed ahead is ``[_zeroed_from, _zeroed_upto)``
        self._zeroed_from = 0
        self._commit_lock = threading.Lock()
        self._route: Route | None = None
        #: commits made by :meth:`commit_copied` (each ``C_FLUSH_SAMPLE``-th one's flush time is
        #: counted in ``flush_cost``)
        self._c_commits = 0
        if chunk_size:
            err = chunk_size_error(chunk_size)
            if err:
                raise InvalidTable(err, operation="snapshot")

    @property
    def mode(self) -> StoreMode:
        """``P``, or ``PO`` with ``overflow``."""
        return StoreMode.PERSISTENT_OVERFLOW if self.overflow else StoreMode.PERSISTENT

    @property
    def exceptions_per_area(self) -> int:
        """Records per metadata area (``chunk bytes / 16``)."""
        return self.chunk_size * SECTOR // 16

    @property
    def can_merge(self) -> bool:
        """Persistent stores support snapshot-merge."""
        return True

    # -- loading ----------------------------------------------------------------------------------
    def read_header(self) -> DiskHeader:
        """Read and check chunk 0; sets ``chunk_size`` from the header (``read_header``)."""
        if not self.chunk_size:
            self.chunk_size = max(DM_CHUNK_SIZE_DEFAULT_SECTORS, self.cow.logical_block_size // SECTOR)
        if self.cow.size < 16:
            raise CorruptMetadata("COW device is too small to hold a header", device=self.cow.name)
        header = DiskHeader.unpack(_read_exact(self.cow, 16, 0, "COW header"))
        if header.is_new:
            self.new_store = True
            return header
        if header.magic != SNAP_MAGIC:
            raise CorruptMetadata(
                f"Invalid or corrupt snapshot: header magic 0x{header.magic:08x}, "
                f"expected 0x{SNAP_MAGIC:08x}",
                device=self.cow.name,
            )
        if header.chunk_size != self.chunk_size:
            err = chunk_size_error(header.chunk_size)
            if err:
                raise CorruptMetadata(f"invalid on-disk chunk size {header.chunk_size}: {err}", device=self.cow.name)
            if self.chunk_size_supplied:
                log.warning("chunk size %d in device metadata overrides table chunk size of %d.", header.chunk_size,
                            self.chunk_size)
            self.chunk_size = header.chunk_size
        if self.chunk_bytes % self.cow.logical_block_size:
            raise CorruptMetadata(f"chunk size {self.chunk_size} is not a multiple of device blocksize",
                                  device=self.cow.name)
        self.valid = header.valid != 0
        self.version = header.version
        return header

    def read_metadata(self) -> None:
        """Load the store exactly as the kernel does (``persistent_read_metadata``).

        A header with magic 0 creates a new store (header written, area 0 zeroed). Wrong magic,
        version or chunk size, and records pointing outside the COW or at metadata chunks, raise
        ``CorruptMetadata`` before anything is written. ``valid == 0`` loads an invalid store.
        """
        header = self.read_header()
        self.table = self._new_table()
        if header.is_new:
            if self.readonly:
                self._area = bytearray(self.chunk_bytes)
            else:
                self._initialise()
            return
        if header.version != SNAPSHOT_DISK_VERSION:
            raise CorruptMetadata(f"unable to handle snapshot disk version {header.version}", device=self.cow.name)
        if not self.valid:
            return
        self._read_exceptions()

    def _initialise(self) -> None:
        cb = self.chunk_bytes
        if self.cow.size < cb * 2:
            raise CorruptMetadata(
                f"COW device ({self.cow.size} bytes) cannot hold a header and a metadata area "
                f"of {cb} bytes",
                device=self.cow.name,
            )
        self._write(DiskHeader.new(self.chunk_size).pack(cb), 0, "header")
        self._area = bytearray(cb)
        self._write(self._area, area_location(0, self.chunk_size) * cb, "metadata area 0")
        self._flush()
        self.current_area = 0
        self.current_committed = 0
        self.next_free = NUM_SNAPSHOT_HDR_CHUNKS + 1
        self.valid = True

    def _read_exceptions(self) -> None:
        cs = self.chunk_size
        cb = self.chunk_bytes
        epa = self.exceptions_per_area
        stride = epa + 1
        cow_chunks = self.cow_sectors // cs
        shift = self.table.shift
        keys: list = []  # floats while every key stays below FLOAT_EXACT, then ints
        use_float = True
        eq, mod = operator.eq, operator.mod
        next_free = NUM_SNAPSHOT_HDR_CHUNKS + 1
        area = 0
        records = 0
        while True:
            loc = area_location(area, cs)
            words = area_records(_read_exact(self.cow, cb, loc * cb, f"metadata area {area}"))
            news = words[1::2]
            try:
                n = news.index(0)
            except ValueError:
                n = epa
            if n:
                if n < epa:
                    del news[n:]
                olds = words[0 : 2 * n : 2]
                top = max(news)
                if top >= cow_chunks:
                    raise CorruptMetadata(
                        f"metadata area {area} maps to COW chunk {top}, past the end of the COW "
                        f"({cow_chunks} chunks)",
                        device=self.cow.name,
                    )
                low = min(news)
                span = (low - 1) // stride
                quick = (low - 1) % stride != 0 and (top - 1) // stride == span
                if not quick and any(map(eq, map(mod, news, repeat(stride)), repeat(NUM_SNAPSHOT_HDR_CHUNKS))):
                    raise CorruptMetadata(f"metadata area {area} maps an origin chunk onto a metadata chunk",
                                          device=self.cow.name)
                if use_float and ((max(olds) << shift) | top) >= FLOAT_EXACT:
                    use_float = False
                    keys[:] = map(int, keys)
                if use_float:
                    keys.extend(ExceptionTable.pack_float_keys(olds, news, shift))
                else:
                    keys.extend(ExceptionTable.pack_keys(olds, news, shift))
                records += n
                if top >= next_free:
                    next_free = top + 1
            if n < epa:
                self.current_committed = n
                self._area = bytearray(words_to_bytes(words))
                break
            area += 1
        self.current_area = area
        self.records = records
        self.next_free = skip_metadata(next_free, cs)
        self.table = ExceptionTable.from_key_list(shift, keys)

    # -- I/O helpers ------------------------------------------------------------------------------
    def _write(self, data: bytes | bytearray | memoryview, offset: int, what: str, durable: bool = False) -> None:
        if self.readonly:
            raise DeviceIOError(f"cannot write {what}: store opened read-only", device=self.cow.name)
        try:
            n = self._cow_route().write_durable(memoryview(data), offset) if durable else self.cow.write(data, offset)
        except OSError as err:
            raise DeviceIOError(f"cannot write {what}: {err}", operation="write", device=self.cow.name) from err
        if n != len(data):
            raise DeviceIOError(f"short write of {what}", operation="write", device=self.cow.name)

    @property
    def flush_cost(self) -> float | None:
        """Seconds a flush of the COW takes, measured on its routed file (``None`` until then)."""
        route = self._route
        return None if route is None else route.flush_cost

    def _cow_route(self) -> Route:
        """The COW's :class:`~snapshot.route.Route` (made again when a handover rebinds ``cow``)."""
        route = self._route
        if route is None or route.handle is not self.cow:
            route = self._route = Route(self.cow)
        return route

    def _flush(self) -> None:
        try:
            self._cow_route().flush()
        except OSError as err:
            raise DeviceIOError(f"flush failed: {err}", operation="flush", device=self.cow.name) from err

    def _area_io_write(self) -> None:
        # REQ_PREFLUSH|REQ_FUA: data copied on write becomes durable before the record that
        # points at it, and the record is durable before the callbacks run (a FUA write where the
        # COW takes one, such as an NBD export with SEND_FUA; else write then flush).
        if self.readonly:
            raise DeviceIOError("cannot write metadata area: store opened read-only", device=self.cow.name)
        try:
            self._cow_route().preflush_write_fua(memoryview(self._area),
                                                 area_location(self.current_area, self.chunk_size) * self.chunk_bytes)
        except OSError as err:
            raise DeviceIOError(f"cannot write metadata area: {err}", operation="write", device=self.cow.name) from err

    # -- exceptions -------------------------------------------------------------------------------
    def prepare_exception(self) -> int:
        """Take ``next_free`` (skipping metadata areas); ``NoSpace`` when ``(next_free+1)·C`` > size."""
        cs = self.chunk_size
        with self._lock:
            new = self.next_free
            if self.cow.size // SECTOR < (new + 1) * cs:  # (cow_sectors, inline)
                raise NoSpace("COW device is full", operation="snapshot", device=self.cow.name)
            # skip_metadata(new + 1), inline: the chunk after an area's last data chunk is the next area
            nf = new + 1
            if nf % (cs * SECTOR // DISK_EXCEPTION_SIZE + 1) == NUM_SNAPSHOT_HDR_CHUNKS:
                nf += 1
            self.next_free = nf
            self._pending += 1
            if 0 <= self._zeroed_upto <= nf and cs * SECTOR < ZERO_AHEAD_BYTES:
                self._zero_ahead_locked(nf)
            return new

    def prepare_exceptions(self, count: int) -> list[int]:
        """Allocate up to ``count`` chunks at once (fewer when the COW fills; ``NoSpace`` if none).

        Takes whole stretches of data chunks between metadata areas at a time.
        """
        out: list[int] = []
        stride = self.exceptions_per_area + 1
        with self._lock:
            nf = self.next_free
            last = self.cow_sectors // self.chunk_size - 1  # highest chunk (next_free+1)·C fits
            while len(out) < count and nf <= last:
                room = (NUM_SNAPSHOT_HDR_CHUNKS - nf) % stride  # data chunks before the next area
                if not room:  # nf is a metadata chunk (never left there, but be safe)
                    nf += 1
                    continue
                take = min(count - len(out), room, last - nf + 1)
                out.extend(range(nf, nf + take))
                nf += take
                if nf % stride == NUM_SNAPSHOT_HDR_CHUNKS:
                    nf += 1
            if not out:
                raise NoSpace("COW device is full", operation="snapshot", device=self.cow.name)
            self.next_free = nf
            self._pending += len(out)
            if 0 <= self._zeroed_upto <= nf and len(out) * self.chunk_bytes < ZERO_AHEAD_BYTES:
                self._zero_ahead_locked(nf)
        return out

    def _zero_ahead_locked(self, first: int) -> None:
        """Write zeros over the hole of up to ``ZERO_AHEAD_BYTES`` from chunk ``first`` on, the
        free space the next allocations take (``_lock`` held, so no chunk there is handed out
        before the write is done). Chunks at or past ``next_free`` hold nothing: no exception
        points there, and a metadata area there is not in use (each is zeroed before its first
        record anyway). Only a range that is a hole now is written: space already written is
        left as it is, and a COW that cannot tell holes (a block device) stops zeroing for good,
        as a failure does. Nothing is flushed here: the next commit's flush (REQ_PREFLUSH) makes
        the zeros and the blocks' allocation durable, before any record of a chunk that relies on
        reading zeros there (``zeroed_ahead``), once for all the chunks after it.
        """
        cb = self.chunk_bytes
        start = first * cb
        length = min(ZERO_AHEAD_BYTES // cb * cb, self.cow.size // cb * cb - start)
        if length <= 0:  # the COW is full (until it grows)
            return
        try:
            extents = self.cow.data_extents(start, length)
            if extents is None:  # cannot tell holes (a block device): every write overwrites
                self._zeroed_upto = -1
                return
            if not extents:
                self._write(_ZEROS[:length], start, "zeros ahead of allocation")
        except (OSError, DeviceIOError) as err:
            log.warning("%s: writing zeros ahead of allocation failed: %s", self.cow.name, err)
            self._zeroed_upto = -1
            return
        self._zeroed_from = first if not extents else first + length // cb
        self._zeroed_upto = first + length // cb

    def zeroed_ahead(self, new: int, count: int) -> bool:
        """True when COW chunks ``new..new+count-1`` lie in the range last zeroed ahead: freshly
        allocated, they read as zeros (a copy of zeros need not write them again)."""
        with self._lock:
            return self._zeroed_from <= new and new + count <= self._zeroed_upto

    def commit_exception(self, old: int, new: int, valid: bool, callback: CommitCallback) -> None:
        """Append ``{old, new}`` to the area; write it once nothing is pending or it is full.

        Callers commit in allocation order from one thread at a time (the kernel relies on
        kcopyd's single callback thread). Callbacks run after the area write, with the store's
        validity as ``success``.
        """
        self.commit_batch([(old, new, valid)], [callback])

    def commit_batch(self, records: Sequence[tuple[int, int, bool]], callbacks: Sequence[CommitCallback]) -> None:
        """``commit_exception`` for several exceptions in allocation order, with one area write
        for the batch (plus one per area it fills)."""
        self.commit_runs([(old, new, 1, valid) for old, new, valid in records], callbacks)

    def commit_runs(self, runs: Sequence[tuple[int, int, int, bool]], callbacks: Sequence[CommitCallback]) -> None:
        """Commit runs ``(old, new, count, valid)`` (``count`` consecutive chunks each) in
        allocation order: one area write for all of them (plus one per area they fill).

        A run's callback runs once, after the write of the area holding its last record; a failed
        earlier area leaves the store invalid, so the callback still sees ``success`` False.
        """
        ready: list[tuple[list[CommitCallback], bool]] = []
        total = 0
        with self._commit_lock:
            epa = self.exceptions_per_area
            for (old, new, count, valid), cb in zip(runs, callbacks):
                total += count
                if not valid:
                    self.valid = False
                    self._callbacks.append(cb)
                    continue
                done = 0
                while True:
                    i = self.current_committed
                    n = min(count - done, epa - i)
                    _pack_run(self._area, i, old + done, new + done, n)
                    self.current_committed = i + n
                    self.records += n
                    done += n
                    if done == count:
                        self._callbacks.append(cb)
                    if self.current_committed == epa:
                        ready.append(self._write_area_locked())
                    if done == count:
                        break
            with self._lock:
                self._pending -= total
                pending = self._pending
            if not pending and self._callbacks:
                ready.append(self._write_area_locked())
        for cbs, success in ready:
            for cb in cbs:
                cb(success)

    def commits_alone(self) -> bool:
        """True while one exception is pending and the store can write (a hint, read without
        locks: :meth:`commit_copied` decides under them)."""
        return self._pending == 1 and self.valid and not self.readonly

    def commit_copied(self, old: int, new: int, copy: Callable[..., int], args: tuple[Any, ...]) -> tuple[int, bool]:
        """:meth:`commit_exception` of ``{old, new}`` with its copy, where the record is the only
        exception pending and leaves the area not full (else ``(NOT_DONE, False)``, nothing
        done): under the commit lock (no other commit writes the area meanwhile), ``copy(*args,
        zeroed, area, area_offset, index)`` copies, flushes, writes the record into the area
        buffer and the area, and flushes (``snapshot.route.copy_commit``; ``zeroed``:
        :meth:`zeroed_ahead` of ``new``). From its answer the commit goes on as
        :meth:`commit_runs`': a failed flush fails the commit (the store invalid, never flushed
        again for it); a failed area write is made again in Python (through the device if it
        must); nothing of the copy in place (``NOT_DONE``, ``DMS_COPY``): nothing committed, the
        caller copies and commits. Returns ``(answer, success)``: ``success`` is what the
        commit's callback would be given (no callback: this record commits alone)."""
        with self._commit_lock:
            i = self.current_committed
            cb = self.chunk_size * SECTOR
            epa = cb // DISK_EXCEPTION_SIZE  # (exceptions_per_area, area_location: no calls here)
            if not self.valid or self.readonly or self._callbacks or self._pending != 1 or i + 1 >= epa:
                return NOT_DONE, False
            with self._lock:
                zeroed = self._zeroed_from <= new < self._zeroed_upto  # (zeroed_ahead(new, 1))
            rc = copy(*args, zeroed, self._area, (NUM_SNAPSHOT_HDR_CHUNKS + (epa + 1) * self.current_area) * cb, i)
            if rc == NOT_DONE or rc == DMS_COPY:
                return rc, False
            # the record, as C wrote it into the area unless its first flush failed
            _RECORD.pack_into(self._area, i * DISK_EXCEPTION_SIZE, old, new)
            self.current_committed = i + 1
            self.records += 1
            with self._lock:
                self._pending -= 1
            if not self._c_commits & (C_FLUSH_SAMPLE - 1):  # C's flushes count in flush_cost too
                took = last_flush_seconds()
                if took is not None:
                    self._cow_route().note_flush(took)
            self._c_commits += 1
            if rc == DMS_AREA:
                return rc, self._write_area_locked()[1]
            if rc == DMS_PREFLUSH or rc == DMS_FUA:
                log.warning("%s: metadata commit failed: flush failed", self.cow.name)
                self.valid = False
            return rc, self.valid

    def _write_area_locked(self) -> tuple[list[CommitCallback], bool]:
        """Commit the current area (zeroing the next one first when it is full)."""
        full = self.current_committed == self.exceptions_per_area
        if full:
            try:
                nxt = area_location(self.current_area + 1, self.chunk_size) * self.chunk_bytes
                if nxt + self.chunk_bytes > self.cow.size:
                    raise DeviceIOError("next metadata area lies past the end of the COW")
                self._write(bytes(self.chunk_bytes), nxt, "next metadata area")
            except DeviceIOError as err:
                log.warning("%s: zeroing the next metadata area failed: %s", self.cow.name, err)
                self.valid = False
        if self.valid:
            try:
                self._area_io_write()
            except DeviceIOError as err:
                log.warning("%s: metadata commit failed: %s", self.cow.name, err)
                self.valid = False
        if full:
            self.current_committed = 0
            self.current_area += 1
            self._area = bytearray(self.chunk_bytes)
        callbacks, self._callbacks = self._callbacks, []
        return callbacks, self.valid

    def usage(self) -> Usage:
        """allocated = ``next_free·C``; metadata = ``(current_area + 2)·C`` (``persistent_usage``)."""
        cs = self.chunk_size
        return Usage(self.cow_sectors, self.next_free * cs, (self.current_area + 1 + NUM_SNAPSHOT_HDR_CHUNKS) * cs)

    def drop_snapshot(self) -> None:
        """Mark the store invalid and write the header with ``valid = 0`` (``persistent_drop_snapshot``)."""
        self.valid = False
        try:
            self._write(DiskHeader.new(self.chunk_size, valid=False).pack(self.chunk_bytes), 0, "header")
            self._flush()
        except DeviceIOError as err:
            log.warning("%s: write header failed: %s", self.cow.name, err)

    # -- merging ----------------------------------------------------------------------------------
    def prepare_merge(self) -> tuple[int, int, int]:
        """The newest committed record and how many records before it continue its run."""
        with self._commit_lock:
            if not self.current_committed:
                if not self.current_area:
                    return 0, 0, 0
                self.current_area -= 1
                cb = self.chunk_bytes
                loc = area_location(self.current_area, self.chunk_size)
                self._area = _read_exact(self.cow, cb, loc * cb, f"metadata area {self.current_area}")
                self.current_committed = self.exceptions_per_area
            last_old, last_new = struct_from(self._area, self.current_committed - 1)
            n = 1
            while n < self.current_committed:
                o, nw = struct_from(self._area, self.current_committed - 1 - n)
                if o != last_old - n or nw != last_new - n:
                    break
                n += 1
            return n, last_old, last_new

    def commit_merge(self, count: int) -> None:
        """Zero the ``count`` newest records, write the area durably, recompute ``next_free``."""
        with self._commit_lock:
            if count > self.current_committed:
                raise ValueError(f"cannot merge {count} of {self.current_committed} records")
            for i in range(count):
                struct_into(self._area, self.current_committed - 1 - i, 0, 0)
            self._area_io_write()
            self.current_committed -= count
            self.records -= count
            self.next_free = area_location(self.current_area, self.chunk_size) + self.current_committed + 1
            with self._lock:  # chunks past next_free are handed out again: they hold copies
                self._zeroed_from = max(self._zeroed_upto, 0)

    # -- offline helpers --------------------------------------------------------------------------
    def iter_records(self) -> "list[tuple[int, int]]":
        """Every committed record in allocation (on-disk) order; for tools and tests."""
        out: list[tuple[int, int]] = []
        cb = self.chunk_bytes
        for area in range(self.current_area + 1):
            if area == self.current_area:
                words = area_records(self._area)
                n = self.current_committed
            else:
                loc = area_location(area, self.chunk_size)
                words = area_records(_read_exact(self.cow, cb, loc * cb, f"metadata area {area}"))
                n = self.exceptions_per_area
            out.extend(zip(words[0 : 2 * n : 2], words[1 : 2 * n : 2]))
        return out


_RECORD = struct.Struct("<QQ")
_ZEROS = memoryview(ZEROS)


def _pack_run(area: bytearray, index: int, old: int, new: int, count: int) -> None:
    """Write records ``index..index+count-1`` of an area buffer as ``old+k -> new+k``."""
    if count == 1:
        _RECORD.pack_into(area, index * 16, old, new)
        return
    words = array("Q", bytes(16 * count))
    words[0::2] = array("Q", range(old, old + count))
    words[1::2] = array("Q", range(new, new + count))
    if _BIG_ENDIAN:  # pragma: no cover - the project runs on little-endian hosts
        words.byteswap()
    area[index * 16 : (index + count) * 16] = memoryview(words).cast("B")


def struct_into(area: bytearray, index: int, old: int, new: int) -> None:
    """Write record ``index`` of an area buffer (little-endian)."""
    _RECORD.pack_into(area, index * 16, old, new)


def struct_from(area: bytes | bytearray, index: int) -> tuple[int, int]:
    """Read record ``index`` of an area buffer."""
    off = index * 16
    return (int.from_bytes(area[off : off + 8], "little"), int.from_bytes(area[off + 8 : off + 16], "little"))


def words_to_bytes(words: list[int]) -> bytes:
    """Inverse of ``area_records``."""
    arr = array("Q", words)
    if _BIG_ENDIAN:  # pragma: no cover
        arr.byteswap()
    return arr.tobytes()
