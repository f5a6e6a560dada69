"""One snapshot's copy-on-write machinery (drivers/md/dm-snap.c), shared by the three targets.

Invariants kept from the kernel:

* origin data is overwritten only after its COW copy **and** its exception record are durable:
  ``origin_write_prepare`` returns pending exceptions the caller waits for before writing;
* exceptions complete (are committed) strictly in allocation order, whatever order their copies
  finish in (``_complete``), so a crash leaves no allocated-but-lost chunk below committed ones
  except the holes the kernel itself can leave;
* metadata commits are grouped: the persistent store writes an area only when nothing else is
  pending (or the area is full);
* the copy of a run of chunks (at most ``MAX_COPY_BYTES``) runs on the thread of the write that
  needs it, and so does its commit: the writer whose completion leaves nothing pending writes the
  metadata area (one flush, the area, one flush) for every writer waiting (group commit). A 4 KiB
  first write thus costs a read, a write and its share of one commit, with no thread hand-off
  (dm-snap.c hands the copy to kcopyd, whose thread runs the commit: in Python each hand-off
  costs more than the copy);
* an origin write whose range needs copies in several snapshots reads the origin once for all
  of them, after allocating every exception (``_copy_for_snapshots``); a rewrite of a range every
  snapshot holds already costs one cached lookup per snapshot (``ExceptionTable.unmapped``);
* a snapshot read that goes to the origin is *tracked*; an exception for that chunk is not
  released to origin writers until the tracked reads have drained.
* on an exposed origin, reads and the writes over chunks every snapshot holds are moved by the C
  data path (``dmtools.engine.passthrough``): an origin write marks its range there only after
  ``do_origin`` returned (every copy and record durable), and ``OriginRegistry.cow_change`` empties
  the marks, waiting for the C writes that relied on them, before a snapshot is resumed (a new
  one, a handover, a merge) or invalidated.
"""

from __future__ import annotations

import errno
import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import kcopyd
from dmtools.blockdev import buffer_address
from dmtools.engine.target_driver import ZEROS, DeviceHandle
from dmtools.errors import DeviceIOError, NoSpace
from dmtools.status import SnapshotState, SnapshotStatus
from dmtools.units import SECTOR

from snapshot.route import (DMS_COPY, DMS_DONE, DMS_MAPPED, DMS_MAPPED_WROTE, DMS_ORIGIN, DONE_WROTE, NOT_DONE,
                            Route, copy_commit, first_write)
from snapshot.store.base import ExceptionStore
from snapshot.store.fast import FastWrites
from snapshot.store.persistent import PersistentStore
from snapshot.targets.origins import STATE_KEY, OriginRegistry, device_key

log = logging.getLogger("snapshot")

#: pages (4 KiB) reserved by each snapshot's kcopyd client (the merge's copies).
KCOPYD_PAGES = 256
#: largest copy built by coalescing consecutive chunks (one read and one write on the writer's thread).
MAX_COPY_BYTES = 1 << 20


class WaitCountingCondition(threading.Condition):
    """A condition that counts the threads in :meth:`wait` (``waiting``, changed and read with
    its lock held): a notify where none waits is skipped (three Python calls each)."""

    waiting = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting += 1  # (the caller holds the lock: wait requires it)
        try:
            return super().wait(timeout)
        finally:
            self.waiting -= 1  # (the lock is held again)


class PendingException:
    """A run of ``count`` exceptions whose copy (or full-chunk write) and commit are in flight:
    origin chunks ``old..old+count-1`` to COW chunks ``new..new+count-1``, allocated together.

    A run is copied with one read and one write and completes as a whole; its exceptions keep their
    allocation order (a run's ``seq`` orders it among the others). ``done`` and ``ok`` change
    under the snapshot's condition, which is notified when they do.
    """

    __slots__ = ("old", "new", "count", "seq", "done", "ok")

    def __init__(self, old: int, new: int, seq: int, count: int = 1) -> None:
        self.old = old
        self.new = new
        self.count = count
        self.seq = seq
        self.done = False
        self.ok = False

    def chunks(self) -> range:
        """The origin chunks of the run."""
        return range(self.old, self.old + self.count)


def _runs(olds: list[int], news: list[int], longest: int) -> list[tuple[int, int, int]]:
    """``(old, new, count)`` runs where both chunk numbers go up by one, at most ``longest`` long."""
    n = len(olds)
    if n and olds[-1] - olds[0] == n - 1 and news[-1] - news[0] == n - 1:  # one stretch (the usual)
        o, w = olds[0], news[0]
        return [(o + k, w + k, min(longest, n - k)) for k in range(0, n, longest)]
    out: list[tuple[int, int, int]] = []
    i = 0
    while i < n:
        j = i + 1
        while j < n and j - i < longest and olds[j] == olds[j - 1] + 1 and news[j] == news[j - 1] + 1:
            j += 1
        out.append((olds[i], news[i], j - i))
        i = j
    return out


def eio(message: str, device: str) -> DeviceIOError:
    """The EIO every bio to an invalid snapshot gets (DM_MAPIO_KILL)."""
    return DeviceIOError(message, errno=errno.EIO, device=device)


class CopyOnWrite:
    """Exception table, pending exceptions and kcopyd client of one snapshot or merge target.

    ``origins`` is the engine's registry (``origins_of(ctx)``); a snapshot built outside an engine
    gets a registry of its own.
    """

    def __init__(self, origin: DeviceHandle, cow: DeviceHandle, store: ExceptionStore, length_bytes: int, *, name: str,
                 event: Callable[[], None], overflow_allowed: bool = False, merge_target: bool = False,
                 owner: Any = None, origins: "OriginRegistry[CopyOnWrite] | None" = None) -> None:
        self.origin = origin
        self.cow = cow
        self.store = store
        self.length_bytes = length_bytes
        self.name = name
        self.event = event
        self.overflow_allowed = overflow_allowed
        #: a ``snapshot-merge`` table (``dm_target_is_snapshot_merge``): never gets new exceptions.
        self.merge_target = merge_target
        #: the target this snapshot belongs to (its ``ctx`` tells which device holds the table).
        self.owner = owner
        self.origins: OriginRegistry[CopyOnWrite] = OriginRegistry() if origins is None else origins
        self.origin_key = device_key(origin)
        self.cow_key = device_key(cow)
        #: the origin's and the COW's small I/O straight on their files where they allow it.
        self.origin_io = Route(origin)
        self.cow_io = Route(cow)
        #: the lock of ``cond``: held with ``with self.lock`` where nothing waits (a Condition's
        #: own ``__enter__``/``__exit__`` are Python calls, a lock's are not).
        self.lock = threading.Lock()
        self.cond = WaitCountingCondition(self.lock)
        self.valid = True
        self.active = False
        self.merging = False
        self.overflowed = False
        self.merge_failed = False
        #: ``stop_merge() -> bool`` (was it running) and ``start_merge()`` of a snapshot-merge's merge worker.
        self.merge_control: Any = None
        self.pending: dict[int, PendingException] = {}
        self.tracked: dict[int, int] = {}
        #: the origin chunk C writes before its exception is published (``_copy_commit_c``), or
        #: -1: snapshot reads of it wait (under ``cond``) until it is published.
        self.sealed = -1
        self._seal_waiters = 0  # snapshot reads waiting for ``sealed``
        #: chunks [first, last) being merged: writes to them wait (snapshot-merge).
        self.merge_range: tuple[int, int] = (0, 0)
        self.merge_writes = 0  # writes in flight to chunks with exceptions (merge drains them)
        #: chunks being copied on write (dm-snap.c ``in_progress``), throttled by the threshold.
        self.in_progress = 0
        #: writers waiting at ``snapshot_cow_threshold`` (for tests and diagnostics).
        self.throttled = 0
        self._progress_lock = threading.Lock()
        self._progress = threading.Condition(self._progress_lock)
        self._closing = False
        self._seq_alloc = 0
        self._seq_next = 0
        self._parked: dict[int, tuple[PendingException, bool]] = {}
        self._finished: list[tuple[PendingException, bool]] = []
        self._complete_lock = threading.Lock()
        #: the common first write in C (``origin_write_one``), made on first use (``_no_fast``:
        #: it cannot be). Its ``armed`` changes under ``lock``: every path of this class that
        #: reads or changes the table or the store fences it first (``fence``).
        self._fast: FastWrites | None = None
        self._no_fast = False
        self.kc = kcopyd.Client(num_pages=KCOPYD_PAGES, threads=4)

    @property
    def chunk_size(self) -> int:
        """Chunk size in sectors (0 for a handover destination until the handover)."""
        return self.store.chunk_size

    @property
    def chunk_bytes(self) -> int:
        """Chunk size in bytes."""
        return self.store.chunk_size * SECTOR

    @property
    def table(self) -> Any:
        """The completed-exception table."""
        return self.store.table

    # -- helpers ----------------------------------------------------------------------------------
    def chunks(self, offset: int, length: int) -> range:
        """Chunk numbers covering ``[offset, offset+length)``."""
        cb = self.chunk_bytes
        return range(offset // cb, (offset + length + cb - 1) // cb)

    def invalidate_locked(self, reason: str) -> None:
        """``__invalidate_snapshot``: mark invalid, write the header, raise an event (cond held)."""
        if not self.valid:
            return
        self.fence()
        log.error("%s: invalidating snapshot: %s", self.name, reason)
        with self.origins.cow_change(self.origin_key):  # the C data path's writes withdrawn first
            self.valid = False
        self.store.drop_snapshot()
        self.cond.notify_all()
        try:
            self.event()
        except Exception:  # noqa: BLE001 - an event must not break the I/O path
            log.exception("%s: raising the invalidation event failed", self.name)

    def invalidate(self, reason: str) -> None:
        """Lock-taking form of ``invalidate_locked``."""
        with self.cond:
            self.invalidate_locked(reason)

    def status(self) -> str:
        """The kernel's INFO text: Invalid | Merge failed | Overflow | used/total metadata."""
        with self.cond:
            self.fence()
            if not self.valid:
                state = SnapshotStatus(SnapshotState.INVALID)
            elif self.merge_failed:
                state = SnapshotStatus(SnapshotState.MERGE_FAILED)
            elif self.overflowed:
                state = SnapshotStatus(SnapshotState.OVERFLOW)
            else:
                u = self.store.usage()
                state = SnapshotStatus.usage(u.sectors_allocated, u.total_sectors, u.metadata_sectors)
            return state.format()

    # -- snapshot_cow_threshold (dm-snap.c account_start_copy/account_end_copy/wait_for_in_progress)
    def account_start_copy(self, chunks: int = 1) -> None:
        """Count ``chunks`` copies (or full-chunk writes) started."""
        with self._progress_lock:
            self.in_progress += chunks

    def account_end_copy(self, chunks: int = 1) -> None:
        """Count ``chunks`` copies finished; wake writers once at or below the threshold."""
        with self._progress_lock:
            self.in_progress -= chunks
            if self.throttled and not self.origins.over_threshold(self.in_progress):
                self._progress.notify_all()

    def wait_for_in_progress(self) -> None:
        """Wait while more than ``snapshot_cow_threshold`` copies are in flight."""
        over = self.origins.over_threshold
        if not over(self.in_progress):
            return
        with self._progress:
            self.throttled += 1
            try:
                self._progress.wait_for(lambda: self._closing or not over(self.in_progress))
            finally:
                self.throttled -= 1

    def wake_throttled(self) -> None:
        """Make throttled writers re-check the threshold (it changed, or the snapshot goes)."""
        with self._progress:
            self._progress.notify_all()

    # -- allocation and completion ----------------------------------------------------------------
    def _alloc_locked(self, chunk: int) -> PendingException:
        new = self.store.prepare_exception()  # raises NoSpace
        pe = PendingException(chunk, new, self._seq_alloc)
        self._seq_alloc += 1
        self.pending[chunk] = pe
        return pe

    def _submit_copies(self, pes: list[PendingException], source: "SharedRead | None" = None, c: bool = True) -> None:
        """Copy each run of origin chunks to the COW on the calling thread, then complete the runs.

        The copy is a read of the origin range into a buffer (or a slice of ``source``, the
        origin range one write's snapshots share) and one write of it to the COW. A run whose
        origin range reads as zeros is not written when its COW range is a hole (of a sparse COW
        file) too: it completes without a data write, its record still committed (and flushed)
        in order. A run that cannot be copied completes as failed, which invalidates the snapshot
        as a kcopyd error does (dm-snap.c ``copy_callback``). One chunk may be copied and
        completed in C (``_copy_commit_c``) unless ``c`` is False.
        """
        if c and len(pes) == 1 and pes[0].count == 1 and self._copy_commit_c(pes[0], None, source):
            return
        results: list[tuple[PendingException, bool]] = []
        for pe in pes:
            self.account_start_copy(pe.count)
            try:
                self._copy_run(pe, source)
                ok = True
            except Exception as err:  # noqa: BLE001 - every allocated exception must complete
                log.error("%s: copy-on-write of origin chunk %d (+%d) failed: %s", self.name, pe.old, pe.count - 1, err)
                ok = False
            self.account_end_copy(pe.count)
            results.append((pe, ok))
        self._complete_each(results)

    def _copy_run(self, pe: PendingException, source: "SharedRead | None" = None) -> None:
        """Copy origin chunks ``pe.old…`` to COW chunks ``pe.new…`` (the last one cut at the
        origin's end); raises on a read or write error."""
        cb = self.chunk_bytes
        start = pe.old * cb
        nbytes = min(pe.count * cb, self.origin.size - start)
        if nbytes <= 0:
            raise DeviceIOError("chunk lies past the end of the origin")
        dest = pe.new * cb
        if source is not None:
            if source.zero(start, nbytes) and self._cow_zero(pe, nbytes):
                return  # a hole copied onto a hole
            self.cow_io.write(source.slice(start, nbytes), dest)
            return
        buf = _take_buffer(nbytes)
        try:
            view = buf.view
            if not self.origin_io.readinto_full(view, start):
                _read_full(self.origin, view, start)
            if buf.zero(0, nbytes) and self._cow_zero(pe, nbytes):
                return  # a hole copied onto a hole
            self.cow_io.write(view, dest)
        finally:
            _give_buffer(buf)

    def _copy_commit_c(self, pe: PendingException, write: "tuple[Route, memoryview, int] | None" = None,
                       source: "SharedRead | None" = None) -> int:
        """Copy and complete the one-chunk exception ``pe`` in one C call (``copy_commit``: the
        origin read, the COW write, a flush, the area write, a flush, then ``write``, the origin
        write that needs the copy: ``(route, data, offset)``) where it is the next to complete
        and its record commits alone (``ExceptionStore.commit_copied``); then publish it as
        ``_complete`` does. Returns 0 with nothing done (the caller copies and completes it in
        Python), 1 once completed, 2 once completed and ``write`` made. With ``source`` (the
        origin bytes several snapshots share, read already) C copies from it, without ``write``.

        The copy runs under the completion lock, which the commit takes anyway. Before C writes
        the origin, before the exception is published, the chunk is *sealed*: snapshot reads of
        it wait for the exception (and then read the copy); a chunk with snapshot reads of the
        origin in flight (``tracked``) is not written by C.
        """
        store = self.store
        if not store.commits_alone() or self._parked or pe.seq != self._seq_next:
            return 0  # (concurrent writers: the Python path, which commits them together)
        cb = store.chunk_size * SECTOR
        start = pe.old * cb
        # a chunk inside the snapshot is whole on the origin unless the origin is smaller, which
        # copy_commit sees on the origin's live table (and declines): no size asked of the handle
        nbytes = cb if start + cb <= self.length_bytes else min(cb, self.origin.size - start)
        if nbytes <= 0 or store.cow is not self.cow:
            return 0
        data = None if source is None else source.slice(start, nbytes)
        if data is not None and len(data) != nbytes:  # (past the origin's end: the Python path)
            return 0
        # Not while another thread completes (it commits, or will: this one would wait for it,
        # and then not be the next in order or the only exception pending): the Python path
        # copies meanwhile, as it does for concurrent writers.
        if not self._complete_lock.acquire(False):  # (not blocking; positional: no keyword parsing)
            return 0
        try:
            if self._parked or pe.seq != self._seq_next:
                return 0
            if write is not None:
                with self.lock:
                    if self.tracked.get(pe.old):
                        write = None
                    else:
                        self.sealed = pe.old
            progress = self._progress_lock  # (account_start_copy/account_end_copy, inline)
            with progress:
                self.in_progress += 1
            try:
                rc, success = store.commit_copied(pe.old, pe.new, copy_commit,
                                                  (self.origin_io, self.cow_io, start, nbytes, pe.new * cb, pe.old,
                                                   pe.new, write, data))
                if rc == NOT_DONE or rc == DMS_COPY:
                    return 0  # (the origin is not written: unsealed below)
                self._seq_next += 1
                self._publish([(pe, success)])  # (unsealed there, with the exception in the table)
            except Exception as err:  # noqa: BLE001 - a waiter must never hang on a lost completion
                log.exception("%s: completing exceptions failed", self.name)
                self._fail_pending(f"exception completion failed: {err}")
                rc = DMS_ORIGIN
            finally:
                if self.sealed >= 0:
                    with self.cond:
                        self.sealed = -1
                        if self._seal_waiters:
                            self.cond.notify_all()
                with progress:
                    self.in_progress -= 1
                    if self.throttled and not self.origins.over_threshold(self.in_progress):
                        self._progress.notify_all()
        finally:
            self._complete_lock.release()
        return 2 if rc == DONE_WROTE else 1

    def _cow_zero(self, pe: PendingException, nbytes: int) -> bool:
        """True when the COW chunks of ``pe`` read as zeros: zeroed ahead by the store, or a hole."""
        return self.store.zeroed_ahead(pe.new, pe.count) or _reads_zeros(self.cow, pe.new * self.chunk_bytes, nbytes)

    def _complete(self, pes: list[PendingException], ok: bool) -> None:
        """Commit exceptions strictly in allocation order (dm-snap.c ``copy_callback``).

        Runs on the thread that copied them. Any exception raised on the way (store, table, a
        bug) invalidates the snapshot, as an I/O error does in the kernel
        (``__invalidate_snapshot``: header ``valid = 0``, later snapshot I/O gets EIO), and
        finishes every pending exception as failed, so no origin write waits forever.
        """
        self._complete_each([(pe, ok) for pe in pes])

    def _complete_each(self, results: list[tuple[PendingException, bool]]) -> None:
        """``_complete`` for ``(exception, copied ok)`` pairs."""
        try:
            self._complete_ordered(results)
        except Exception as err:  # noqa: BLE001 - a waiter must never hang on a lost completion
            log.exception("%s: completing exceptions failed", self.name)
            self._fail_pending(f"exception completion failed: {err}")

    def _fail_pending(self, reason: str) -> None:
        """Invalidate and mark every pending exception done and failed (waiters see ``ok=False``)."""
        with self.cond:
            try:
                self.invalidate_locked(reason)
            except Exception:  # noqa: BLE001 - still release the waiters below
                self.valid = False
                log.exception("%s: invalidating the snapshot failed", self.name)
            for pe in set(self.pending.values()):
                pe.ok = False
                pe.done = True
            self.pending.clear()
            self.cond.notify_all()

    def _complete_ordered(self, results: list[tuple[PendingException, bool]]) -> None:
        with self._complete_lock:
            parked = self._parked
            if len(results) == 1 and not parked and results[0][0].seq == self._seq_next:
                done, good = results[0]  # the next in order, nothing parked (one writer): commit it
                self._seq_next += 1
                self.store.commit_runs([(done.old, done.new, done.count, good)],
                                       [functools.partial(self._on_commit, done)])
            else:
                for pe, ok in results:
                    parked[pe.seq] = (pe, ok)
                runs: list[tuple[int, int, int, bool]] = []
                callbacks = []
                while self._seq_next in parked:
                    done, good = parked.pop(self._seq_next)
                    self._seq_next += 1
                    runs.append((done.old, done.new, done.count, good))
                    callbacks.append(functools.partial(self._on_commit, done))
                if runs:
                    self.store.commit_runs(runs, callbacks)
            if self._finished:
                batch, self._finished = self._finished, []
                self._publish(batch)

    def _on_commit(self, pe: PendingException, success: bool) -> None:
        # runs inside commit_exception, under _complete_lock
        self._finished.append((pe, success))

    def _publish(self, batch: list[tuple[PendingException, bool]]) -> None:
        """``pending_complete``: publish exceptions, drain tracked reads, wake waiters."""
        with self.lock:
            if len(batch) == 1:  # (one exception, the usual: no generators, no lists)
                one, success = batch[0]
                if not success:
                    self.invalidate_locked("copy or metadata I/O error")
                elif self.valid:
                    if one.count == 1:
                        self.table.insert_one(one.old, one.new)
                    else:
                        self.table.insert_new(list(zip(one.chunks(), range(one.new, one.new + one.count))))
            elif not all(success for _, success in batch):
                self.invalidate_locked("copy or metadata I/O error")
            elif self.valid:
                good: list[tuple[int, int]] = []
                for pe, _ in batch:
                    good.extend(zip(pe.chunks(), range(pe.new, pe.new + pe.count)))
                self.table.insert_new(good)
            if self._fast is not None and self.valid:  # (C's bitmap of the chunks with an exception follows the table)
                for pe, success in batch:
                    self._fast.mark(pe.old, pe.count)
            if self.tracked:
                tracked = self.tracked
                self.cond.wait_for(lambda: not any(tracked.get(c) for pe, _ in batch for c in pe.chunks()))
            pending = self.pending
            for pe, success in batch:
                # a run's chunks all map to it, or (after _fail_pending) none of them does
                if pending.get(pe.old) is pe:
                    if pe.count == 1:
                        del pending[pe.old]
                    else:
                        deque(map(pending.pop, pe.chunks()), 0)
                pe.ok = success and self.valid
                pe.done = True
            self.sealed = -1  # (a chunk C wrote on the origin is read from its copy from now on)
            if self.cond.waiting:
                self.cond.notify_all()

    def wait_all(self, pes: list[PendingException]) -> bool:
        """Wait until every exception in ``pes`` completed; True if all were committed."""
        if not all(pe.done for pe in pes):  # (done only ever turns True: no lock to see it did)
            with self.cond:
                self.cond.wait_for(lambda: all(pe.done for pe in pes))
        return all(pe.ok for pe in pes)

    # -- the origin's side ------------------------------------------------------------------------
    def origin_write_prepare(self, offset: int, length: int) -> list[PendingException]:
        """Start the copies an origin write of ``[offset, offset+length)`` needs (``__origin_write``).

        Returns the pending exceptions to wait for; an empty list means nothing to copy. A full COW
        invalidates the snapshot (the origin write goes on).
        """
        waits, start = self.origin_write_allocate(offset, length)
        if start:
            self._submit_copies(start)
        return waits

    def origin_write_allocate(self, offset: int, length: int) -> tuple[list[PendingException], list[PendingException]]:
        """The allocation half of ``origin_write_prepare``: ``(wait for, copy now)``.

        ``wait for`` holds every pending exception of the range (other writers' and the new
        ones); ``copy now`` the new ones, which the caller must copy and complete
        (``_submit_copies``). A range that is mapped throughout costs one cached lookup.
        """
        if offset >= self.length_bytes:
            return [], []
        length = min(length, self.length_bytes - offset)
        waits: list[PendingException] = []
        start: list[PendingException] = []
        with self.lock:
            if self._fast is not None:
                self.fence()
            if not self.valid or not self.active or self.merge_target:
                return [], []
            cb = self.chunk_bytes
            need = self.table.unmapped(offset // cb, (offset + length + cb - 1) // cb)
            if not need:
                return [], []
            pending = self.pending
            if pending:
                found = list(map(pending.get, need))
                if any(found):
                    waits.extend(dict.fromkeys(pe for pe in found if pe is not None))
                    need = [c for c, pe in zip(need, found) if pe is None]
            if len(need) == 1:  # one chunk (a small write): one exception, no runs to find
                try:
                    (new,) = self.store.prepare_exceptions(1)
                except NoSpace:
                    self.invalidate_locked("COW device is full")
                    return waits, start
                c = need[0]
                pe = PendingException(c, new, self._seq_alloc)
                self._seq_alloc += 1
                pending[c] = pe
                start.append(pe)
                waits.append(pe)
            elif need:
                try:
                    news = self.store.prepare_exceptions(len(need))
                except NoSpace:
                    news = []
                per_job = max(1, MAX_COPY_BYTES // cb)
                for old, new, count in _runs(need[: len(news)], news, per_job):
                    pe = PendingException(old, new, self._seq_alloc, count)
                    self._seq_alloc += 1
                    pending.update(dict.fromkeys(pe.chunks(), pe))
                    start.append(pe)
                waits.extend(start)
                if len(news) < len(need):
                    self.invalidate_locked("COW device is full")
        return waits, start

    def origin_write_one(self, offset: int, length: int, write: "tuple[Route, memoryview, int] | None",
                         c: int = 2) -> int:
        """``origin_write_prepare`` and the wait for its copies, for an origin write whose range
        lies in one chunk of this, the origin's only snapshot (or one of several whose commits
        are fast: ``write`` None for all but the last), while no exception of it is pending (one
        writer, the common first write): the whole write in C
        (:class:`~snapshot.store.fast.FastWrites`, armed here while nothing unusual goes on)
        with ``c`` 2; else, with ``c`` 1, the copy and commit in C (``_copy_commit_c``) where it
        can, ``write`` made there too where it can; with ``c`` 0 (C failed the copy) in Python. Returns -1
        with nothing done where the range spans chunks or an exception is pending (the caller
        then takes the general path); else 0 (nothing to copy: the chunk has its exception, or
        the snapshot takes none), 1 (copied and committed, or the snapshot invalid: the caller
        writes) or 2 (``write`` made too)."""
        size = self.length_bytes
        if offset >= size:
            return 0
        last = offset + length - 1 if offset + length <= size else size - 1
        fast = self._fast
        # armed: C makes the write, its copy and commit first where needed (the common case)
        if c == 2 and fast is not None and fast.armed and last // (cb := fast.chunk_bytes) == offset // cb:
            rc = first_write(fast.state, self.origin_io, self.cow_io, offset // cb, cb, write)
            done = 2 if rc == DONE_WROTE or rc == DMS_MAPPED_WROTE else self._c_answer(rc)
            if done >= 0:
                return done
            c = 0 if done == -2 else 1
        with self.lock:
            if self._fast is not None:
                self.fence()
            if not self.valid or not self.active or self.merge_target:
                return 0
            store = self.store
            cb = store.chunk_size * SECTOR
            chunk = offset // cb
            if last // cb != chunk or self.pending:
                return -1
            if store.table.lookup(chunk) is not None:
                return 0
            fast = self._arm_locked() if c == 2 else None
            if fast is None:
                try:
                    new = store.prepare_exception()
                except NoSpace:
                    self.invalidate_locked("COW device is full")
                    return 0
                pe = PendingException(chunk, new, self._seq_alloc)
                self._seq_alloc += 1
                self.pending[chunk] = pe
        if fast is not None:
            done = self._c_answer(first_write(fast.state, self.origin_io, self.cow_io, chunk, cb, write))
            return done if done >= 0 else self.origin_write_one(offset, length, write, 0 if done == -2 else 1)
        done = self._copy_commit_c(pe, write) if c else 0
        if done:
            return done
        self._submit_copies([pe], c=False)  # (C declined or stopped: not asked again)
        self.wait_all([pe])
        return 1

    def _c_answer(self, rc: int) -> int:
        """``route.first_write``'s answer ``rc`` (a write inside one origin chunk made by C, its
        copy and commit first where it needs them) as ``origin_write_one``'s, or -1 with nothing
        done (C is off, declined, or not routed: the caller fences and takes the Python path),
        -2 when C failed the copy with nothing of it in place (the Python path copies)."""
        if rc == DONE_WROTE or rc == DMS_MAPPED_WROTE:
            return 2
        if rc == DMS_MAPPED:
            return 0
        if rc == DMS_DONE:  # (copied and committed, no write asked)
            return 1
        if rc == DMS_COPY:
            return -2
        if rc < 0:
            return -1
        with self.lock:  # a failure once the copy was in place: the fence goes on from it
            self.fence()
        return 1

    def _arm_locked(self) -> "FastWrites | None":
        """Arm the first writes in C while nothing unusual goes on (``lock`` held): valid,
        active, no exception pending or completing, no read of the origin tracked; the store
        persistent, over this COW, and willing (``FastWrites.arm``). The armed C state, or None."""
        store = self.store
        if self._no_fast or not (self.valid and self.active and not self.merge_target and not self.merging
                                 and not self.pending and not self.tracked and not self._parked
                                 and not self._finished and self.sealed < 0 and type(store) is PersistentStore
                                 and store.cow is self.cow):
            return None
        fast = self._fast
        made = fast is None or fast.store is not store
        if made:
            fast = self._fast = FastWrites.create(store, self.length_bytes)
            if fast is None:
                self._no_fast = True
                return None
        if not fast.arm(PARALLEL_FLUSH_SECONDS):  # type: ignore[union-attr]
            return None
        if made or not self.origins.first_current(self.origin_key):  # (the exposure's C data path)
            self.origins.first_writes(self.origin_key)
        return fast

    def arm(self) -> None:
        """Arm the first writes in C now (the snapshot just became active), so that the first
        origin writes through the exposed node are made in C already."""
        with self.lock:
            if self._fast is None or not self._fast.armed:
                self._arm_locked()

    def c_first_write(self) -> "tuple[int, Any, int] | bool | None":
        """What the exposure's C data path needs to make this snapshot's copies of an origin
        write (``OriginRegistry.first_writes``): None when origin writes copy nothing into it
        (invalid, not active, a merge's target); False where C cannot (no C state for its
        store, or its COW not an exposed engine device); else ``(its C state's address, its COW
        device's slot, chunk bytes)``. Read without the lock: a change of these goes through
        ``OriginRegistry.cow_change``."""
        if not self.valid or not self.active or self.merge_target:
            return None
        fast = self._fast
        if fast is None or fast.store is not self.store or self.store.cow is not self.cow:
            return False
        dev = getattr(self.cow.inner, "device", None)
        slot = getattr(dev, "fast_path", None)
        if slot is None:
            return False
        return int(fast.ffi.cast("uintptr_t", fast.state)), slot, self.store.chunk_size * SECTOR

    def sync(self) -> None:
        """Fold what the first writes in C did into the table and the store, for a caller about
        to read them without the lock (tools, tests); C is armed again by the next origin write."""
        with self.lock:
            self.fence()

    def fence(self) -> None:
        """Disarm the first writes in C and fold what they did into the table and the store
        (``lock`` held); a commit C failed invalidates the snapshot as in ``_publish``."""
        fast = self._fast
        if fast is None or not fast.armed:
            return
        pairs = fast.fence()
        failed = not fast.store.valid  # (a flush of the last write failed: its commit failed)
        if pairs and self.valid:
            insert = self.table.insert_one
            for old, new in pairs[: len(pairs) - fast.failed_records] if failed else pairs:
                insert(old, new)
        if self.valid and failed:
            self.invalidate_locked("copy or metadata I/O error")

    # -- the snapshot's side ----------------------------------------------------------------------
    def _segments(self, offset: int, length: int) -> Iterator[tuple[int, int, int | None]]:
        """``(offset, length, cow_chunk|None)`` pieces of a request split at chunk boundaries."""
        cb = self.chunk_bytes
        end = offset + length
        pos = offset
        while pos < end:
            c = pos // cb
            stop = min(end, (c + 1) * cb)
            yield pos, stop - pos, c
            pos = stop

    def read(self, buf: memoryview, offset: int) -> None:
        """Read the snapshot's view: COW where an exception exists, the origin elsewhere."""
        if not self.valid:  # also a handover destination whose source went away (chunk size 0)
            raise eio("snapshot is invalid", self.name)
        cb = self.chunk_bytes
        pos = 0
        total = len(buf)
        while pos < total:
            here = offset + pos
            c = here // cb
            # gather a run of chunks served by the same device and contiguous there
            with self.cond:
                if self._fast is not None:
                    self.fence()
                while c == self.sealed:  # its origin chunk is being overwritten: read the copy
                    self._seal_waiters += 1
                    try:
                        self.cond.wait()
                    finally:
                        self._seal_waiters -= 1
                if not self.valid:
                    raise eio("snapshot is invalid", self.name)
                new = self.table.lookup(c)
                stop = min(offset + total, (c + 1) * cb)
                if new is None:
                    tracked = [c]
                    while stop < offset + total:
                        nc = stop // cb
                        if nc == self.sealed or self.table.lookup(nc) is not None:
                            break
                        tracked.append(nc)
                        stop = min(offset + total, (nc + 1) * cb)
                    for t in tracked:
                        self.tracked[t] = self.tracked.get(t, 0) + 1
                else:
                    tracked = []
                    while stop < offset + total:
                        nc = stop // cb
                        if self.table.lookup(nc) != new + (nc - c):
                            break
                        stop = min(offset + total, (nc + 1) * cb)
            piece = buf[pos : pos + stop - here]
            try:
                if new is None:
                    _read_full(self.origin, piece, here)
                else:
                    _read_full(self.cow, piece, new * cb + here - c * cb)
            finally:
                if tracked:
                    with self.cond:
                        for t in tracked:
                            n = self.tracked[t] - 1
                            if n:
                                self.tracked[t] = n
                            else:
                                del self.tracked[t]
                        self.cond.notify_all()
            pos += stop - here

    def write(self, buf: memoryview, offset: int) -> None:
        """Write to the COW, creating exceptions as needed (``snapshot_map`` for writes)."""
        if not self.valid:
            raise eio("snapshot is invalid", self.name)
        pos = 0
        for here, length, c in self._segments(offset, len(buf)):
            assert c is not None
            self._write_chunk(buf[pos : pos + length], here, c)
            pos += length

    def _write_chunk(self, piece: memoryview, here: int, c: int) -> None:
        cb = self.chunk_bytes
        within = here - c * cb
        pe: PendingException | None = None
        full = False
        self.wait_for_in_progress()
        with self.cond:
            if self._fast is not None:
                self.fence()
            while True:
                if not self.valid:
                    raise eio("snapshot is invalid", self.name)
                if self.overflowed:
                    raise eio("snapshot overflowed", self.name)
                new = self.table.lookup(c)
                if new is not None:
                    if self.merging:
                        lo, hi = self.merge_range
                        if lo <= c < hi:
                            self.cond.wait()
                            continue
                        self.merge_writes += 1
                    break
                pe = self.pending.get(c)
                if pe is not None:
                    self.cond.wait_for(lambda: c not in self.pending or not self.valid)
                    continue
                try:
                    pe = self._alloc_locked(c)
                except NoSpace:
                    if self.overflow_allowed:
                        if not self.overflowed:
                            log.error("%s: Snapshot overflowed: Unable to allocate exception.", self.name)
                        self.overflowed = True  # no dm event here, as in dm-snap.c
                    else:
                        self.invalidate_locked("COW device is full")
                    raise eio("no space left in the COW device", self.name) from None
                full = len(piece) == cb
                break
        if new is not None:
            try:
                self.cow_io.write(piece, new * cb + within)
            finally:
                if self.merging:
                    with self.cond:
                        self.merge_writes -= 1
                        self.cond.notify_all()
            return
        assert pe is not None
        if full:
            # a whole-chunk write needs no origin read: write it, then complete the exception
            self.account_start_copy()
            try:
                self.cow_io.write(piece, pe.new * cb)
                ok = True
            except (OSError, DeviceIOError) as err:
                log.error("%s: COW write failed: %s", self.name, err)
                ok = False
            self.account_end_copy()
            self._complete([pe], ok)
            if not self.wait_all([pe]):
                raise eio("snapshot is invalid", self.name)
            return
        self._submit_copies([pe])
        if not self.wait_all([pe]):
            raise eio("snapshot is invalid", self.name)
        self.cow_io.write(piece, pe.new * cb + within)

    def discard(self, offset: int, length: int) -> None:
        """``discard_zeroes_cow``: zero whole chunks that have exceptions; others need nothing."""
        cb = self.chunk_bytes
        for c in self.chunks(offset, length):
            if c * cb < offset or (c + 1) * cb > offset + length:
                continue
            with self.cond:
                if self._fast is not None:
                    self.fence()
                new = self.table.lookup(c)
            if new is not None:
                self.cow.zero(new * cb, cb)

    # -- lifetime ---------------------------------------------------------------------------------
    def register(self) -> bool:
        """Join the origin's snapshot list; True when this is a handover destination.

        Raises ``InvalidTable`` with the kernel's handover refusals (``OriginRegistry.register``).
        """
        return self.origins.register(self)

    def destroy(self) -> None:
        """Leave the origin, wait for copies, release the kcopyd client."""
        self.origins.unregister(self)
        with self.lock:
            self.fence()
        with self._progress:
            self._closing = True
            self._progress.notify_all()
        try:
            self.kc.destroy()
        finally:
            self.store.close()

    @property
    def can_merge(self) -> bool:
        """The store supports snapshot-merge."""
        return self.store.can_merge


def origins_of(engine: Any) -> OriginRegistry[CopyOnWrite]:
    """The snapshot registry of ``engine`` (an ``Engine`` or a table's ``TargetContext``), made on
    first use; ``origins_of(engine).set_cow_threshold(n)`` sets its ``snapshot_cow_threshold``."""
    registry: OriginRegistry[CopyOnWrite] = engine.target_state(STATE_KEY, OriginRegistry)
    return registry


def do_origin(origins: OriginRegistry[CopyOnWrite], origin: DeviceHandle, offset: int, length: int, *,
              skip: CopyOnWrite | None = None, limit: bool = False, key: Any = None,
              write: "tuple[Route, memoryview, int] | None" = None) -> bool:
    """Make every active, valid, non-merging snapshot of ``origin`` hold its own copy of
    ``[offset, offset+length)`` before the caller overwrites it (dm-snap.c ``do_origin``).

    With ``limit`` (origin writes; not the merge's) it first waits while any of the snapshots has
    more than ``snapshot_cow_threshold`` copies in flight. Returns once every needed exception is
    copied **and** committed (or its snapshot is invalid). Runs inside the origin's gate, which a
    handover freezes. ``key`` is ``device_key(origin)`` where the caller keeps it.

    ``write``: the caller's origin write of the range, ``(route, data, offset)``. Where the range
    needs one new exception (one chunk, one snapshot, nothing else to wait for) its copy and
    commit in C may make that write too (``CopyOnWrite._copy_commit_c``): then True, and the
    caller must not write again.
    """
    if key is None:
        key = device_key(origin)
    gate = origins.origin_gate(key)
    gate.join()
    try:
        snaps: tuple[CopyOnWrite, ...] = gate.snaps
        # one snapshot, no exception pending (a hint, read without the lock): one writer, the usual
        if write is not None and len(snaps) == 1 and skip is None and not snaps[0].pending:
            snap = snaps[0]
            if limit and snap.in_progress and origins.over_threshold(snap.in_progress):  # (0 is never over)
                snap.wait_for_in_progress()
            done = snap.origin_write_one(offset, length, write)
            if done >= 0:
                return done == 2
            limit = False  # (waited already)
        if limit:
            over = origins.over_threshold
            for snap in snaps:
                if over(snap.in_progress):
                    snap.wait_for_in_progress()
        # (several snapshots whose COWs flush fast, each with the whole write in C, none with an
        # exception pending: a hint)
        if write is not None and len(snaps) > 1 and skip is None and not _slow_commits(snaps) \
                and not any(snap.pending or snap._no_fast for snap in snaps):
            done = _each_in_turn(snaps, offset, length, write)
            if done >= 0:
                return done == 2
        waits: list[tuple[CopyOnWrite, list[PendingException]]] = []
        copies: list[tuple[CopyOnWrite, list[PendingException]]] = []
        for snap in snaps:
            if snap is skip:
                continue
            wait, start = snap.origin_write_allocate(offset, length)
            if wait:
                waits.append((snap, wait))
            if start:
                copies.append((snap, start))
        if copies:
            if write is not None and len(copies) == 1 and len(waits) == 1 and len(waits[0][1]) == 1:
                snap, (pe,) = copies[0]
                done = snap._copy_commit_c(pe, write) if pe.count == 1 else 0
                if done:
                    return done == 2
                snap._submit_copies([pe], c=False)  # (C declined or stopped: not asked again)
            else:
                _copy_for_snapshots(copies, gate.inflight)
        # One pass is enough: every chunk of the range had an exception already or has one of the
        # pending exceptions waited for here, which either commits or invalidates its snapshot.
        for snap, pes in waits:
            snap.wait_all(pes)
        return False
    finally:
        gate.leave()


def _each_in_turn(snaps: tuple[CopyOnWrite, ...], offset: int, length: int,
                  write: "tuple[Route, memoryview, int]") -> int:
    """An origin write inside one chunk of each of several snapshots whose commits are fast:
    each snapshot's copy and commit in turn on this thread (``origin_write_one``: the whole
    write in C where it can), ``write`` made with the last one's. Where the commits take no
    longer than a hand-off to the pool, one C call per snapshot costs less than the shared read
    of ``_copy_for_snapshots`` and its Python per snapshot.
    Returns ``origin_write_one``'s answer for the last snapshot, or -1 once one declines (the
    caller goes on with the general path: the copies made stay made)."""
    last = len(snaps) - 1
    done = -1
    for i, snap in enumerate(snaps):
        done = snap.origin_write_one(offset, length, write if i == last else None)
        if done < 0:
            return -1
    return done


class SharedRead:
    """Origin bytes ``[start, start+len(buf))``, read once for every snapshot that copies them."""

    __slots__ = ("buf", "start")

    def __init__(self, buf: "_Buffer", start: int) -> None:
        self.buf = buf
        self.start = start

    def slice(self, offset: int, length: int) -> memoryview:
        """The origin bytes ``[offset, offset+length)`` (inside the shared range)."""
        at = offset - self.start
        return self.buf.view[at : at + length]

    def zero(self, offset: int, length: int) -> bool:
        """True when the origin bytes ``[offset, offset+length)`` are all zero."""
        return self.buf.zero(offset - self.start, length)


#: largest origin range read once for all the snapshots of one origin write.
MAX_SHARED_READ = 4 * MAX_COPY_BYTES


def _copy_for_snapshots(copies: list[tuple[CopyOnWrite, list[PendingException]]], inflight: int) -> None:
    """Copy and complete the new exceptions of one origin write in each of its snapshots.

    With several snapshots the origin range is read once for all of them (dm-snap.c reads it
    once per snapshot's kcopyd job), after every exception is allocated, so no origin write can
    have changed it since. Their COW writes and commits then run at once (a small pool takes the
    second and later snapshots, as each snapshot's kcopyd client does in dm-snap.c), unless as
    many origin writes are in flight as there are snapshots to copy into. A failed read fails
    every run, which invalidates each snapshot, as a kcopyd read error does.
    """
    if len(copies) == 1:
        snap, pes = copies[0]
        snap._submit_copies(pes)
        return
    origin = copies[0][0].origin
    spans = [(pe.old * snap.chunk_bytes, (pe.old + pe.count) * snap.chunk_bytes) for snap, pes in copies for pe in pes]
    lo = min(a for a, _ in spans)
    hi = min(max(b for _, b in spans), origin.size)
    parallel = inflight < len(copies) and not _IN_POOL.flag and (hi - lo >= PARALLEL_COPY_BYTES
                                                                 or _slow_commits(snap for snap, _ in copies))
    if not 0 < hi - lo <= MAX_SHARED_READ:
        _run_copies([(snap, pes, None) for snap, pes in copies], parallel)
        return
    with _copy_buffer(hi - lo) as buf:
        try:
            _read_full(origin, buf.view, lo)
        except Exception as err:  # noqa: BLE001 - every allocated exception must complete
            log.error("%s: reading origin bytes %d+%d to copy on write failed: %s", origin.name, lo, hi - lo, err)
            for snap, pes in copies:
                snap._complete(pes, False)
            return
        source = SharedRead(buf, lo)
        _run_copies([(snap, pes, source) for snap, pes in copies], parallel)


#: a COW flush slower than this (seconds) is worth overlapping with the other snapshots' commits
#: in the pool; faster ones (tmpfs, a battery-backed cache) cost less than the hand-off to a pool
#: thread and back (random 4 KiB first writes with 4 snapshots on tmpfs: 173-202 us of CPU per
#: write in parallel, 108-111 us on the writer's thread).
PARALLEL_FLUSH_SECONDS = 20e-6
#: copies of this many bytes or more go to the pool whatever the flushes cost: their writes (the
#: kernel copying them, without the GIL) then run on other CPUs at once.
PARALLEL_COPY_BYTES = 256 << 10


def _slow_commits(snaps: Iterable[CopyOnWrite]) -> bool:
    """True unless every snapshot's COW is known to flush faster than ``PARALLEL_FLUSH_SECONDS``."""
    for snap in snaps:
        cost = snap.store.flush_cost
        if cost is None or cost >= PARALLEL_FLUSH_SECONDS:
            return True
    return False


def _run_copies(jobs: list[tuple[CopyOnWrite, list[PendingException], SharedRead | None]], parallel: bool) -> None:
    """Each snapshot's ``_submit_copies``: the first on this thread, the others in the pool when
    ``parallel``; returns once all are done (re-raising what one raised)."""
    if not parallel:
        for snap, pes, source in jobs:
            snap._submit_copies(pes, source)
        return
    pool = _cow_pool()
    futures = [pool.submit(snap._submit_copies, pes, source) for snap, pes, source in jobs[1:]]
    try:
        snap, pes, source = jobs[0]
        snap._submit_copies(pes, source)
    finally:
        for f in futures:
            f.result()


class _PoolFlag(threading.local):
    """``flag`` is True on the threads of the copy pool (a nested origin write, as when a COW is
    itself a snapshotted origin, runs inline there instead of waiting for the pool)."""

    flag = False


_IN_POOL = _PoolFlag()
#: threads that copy and commit for the second and later snapshots of one origin write.
COW_POOL_THREADS = 8
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _mark_pool_thread() -> None:
    _IN_POOL.flag = True


def _cow_pool() -> ThreadPoolExecutor:
    """The process's copy pool, started on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(COW_POOL_THREADS, thread_name_prefix="snapshot-cow",
                                       initializer=_mark_pool_thread)
        return _pool


def _reads_zeros(dev: DeviceHandle, offset: int, length: int) -> bool:
    """True when ``dev`` says ``[offset, offset+length)`` holds no data (a hole reads as zeros)."""
    try:
        extents = dev.data_extents(offset, length)
    except Exception:  # noqa: BLE001 - unknown: copy as usual
        return False
    return extents is not None and not extents


def _read_full(dev: DeviceHandle, buf: memoryview, offset: int) -> None:
    n = dev.readinto(buf, offset)
    if n < len(buf):
        buf[n:] = bytes(len(buf) - n)


def _write_full(dev: DeviceHandle, buf: memoryview, offset: int) -> None:
    n = dev.write(buf, offset)
    if n != len(buf):
        raise DeviceIOError("short write", errno=errno.EIO, operation="write", device=dev.name)


class _CopyBuffers(threading.local):
    """Each thread's spare copy buffers, by size, at most ``KEEP_BYTES`` of them (a nested copy on
    the same thread, as when a COW is itself a snapshotted origin, takes another one)."""

    #: bytes of spare buffers a thread keeps (a 1 MiB run and a few chunks).
    KEEP_BYTES = MAX_COPY_BYTES + (256 << 10)

    def __init__(self) -> None:
        self.free: dict[int, list[_Buffer]] = {}
        self.kept = 0


_BUFFERS = _CopyBuffers()
#: alignment of a copy buffer's bytes: a COW write of ``DIRECT_MIN`` bytes or more goes to an
#: ``O_DIRECT`` descriptor straight from them (``BackingDevice`` first copies the bytes of a
#: misaligned buffer to a bounce buffer: a memcpy per snapshot of every large copy).
BUFFER_ALIGN = 4096


class _Buffer:
    """``len`` bytes at an address aligned to ``BUFFER_ALIGN``: ``view`` for I/O, at ``at`` in the
    bytearray ``data`` (compared with zeros there)."""

    __slots__ = ("data", "at", "view")

    def __init__(self, nbytes: int) -> None:
        self.data = bytearray(nbytes + BUFFER_ALIGN - 1)
        self.at = -buffer_address(memoryview(self.data)) % BUFFER_ALIGN
        self.view = memoryview(self.data)[self.at : self.at + nbytes]

    def __len__(self) -> int:
        return len(self.view)

    def zero(self, offset: int, length: int) -> bool:
        """True when bytes ``[offset, offset+length)`` of the buffer are all zero."""
        return _all_zero(self.data, self.at + offset, length)


def _take_buffer(nbytes: int) -> _Buffer:
    """A ``nbytes`` buffer of this thread's (``_give_buffer`` it back after use)."""
    bufs = _BUFFERS
    spare = bufs.free.get(nbytes)
    if spare:
        bufs.kept -= nbytes
        return spare.pop()
    return _Buffer(nbytes)


def _give_buffer(buf: _Buffer) -> None:
    """Keep ``buf`` for this thread's next copy of its size while the thread's spare buffers stay
    within ``KEEP_BYTES``."""
    bufs = _BUFFERS
    nbytes = len(buf)
    if bufs.kept + nbytes <= bufs.KEEP_BYTES:
        bufs.free.setdefault(nbytes, []).append(buf)
        bufs.kept += nbytes


@contextmanager
def _copy_buffer(nbytes: int) -> Iterator[_Buffer]:
    """``_take_buffer`` for the block, given back after it."""
    buf = _take_buffer(nbytes)
    try:
        yield buf
    finally:
        _give_buffer(buf)


def _all_zero(buf: bytearray, at: int = 0, length: int | None = None) -> bool:
    """True when ``buf[at:at+length]`` (all of ``buf`` by default) holds only zero bytes
    (compared with memcmp, 1 MiB at a time, without copying)."""
    end = len(buf) if length is None else at + length
    if at < end and buf[at]:  # the usual data: no need to look further
        return False
    step = len(ZEROS)
    zeros = _ZEROS_VIEW
    return all(buf.startswith(zeros[: min(step, end - pos)], pos) for pos in range(at, end, step))


_ZEROS_VIEW = memoryview(ZEROS)
