"""``snapshot-merge``: roll the origin back to the snapshot, newest exceptions first (dm-snap.c).

Loaded on the origin device in place of ``snapshot-origin``. Chunks that still have an exception
are served from the COW; the others from the origin (writes to them copy-on-write into the other
snapshots first). A background worker merges runs of consecutive chunks: protect the other
snapshots, hold writes to the run, copy COW -> origin with kcopyd, flush the origin, commit.
"""

from __future__ import annotations

import logging
import threading
import kcopyd
from dmtools.engine.target_driver import TargetContext
from dmtools.target_values import SnapshotMerge

from snapshot.targets.core import SECTOR, _read_full, _write_full, do_origin
from snapshot.targets.snap import SnapshotTarget

log = logging.getLogger("snapshot")


class SnapshotMergeTarget(SnapshotTarget):
    """``snapshot-merge <origin> <cow> P <chunk>``: persistent stores only."""

    name = "snapshot-merge"
    version = (1, 5, 0)
    value_type = SnapshotMerge
    origin_writable = True
    merge = True

    def __init__(self, ctx: TargetContext, start: int, length: int, value: SnapshotMerge) -> None:
        super().__init__(ctx, start, length, value)
        self.snap.merging = True
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        #: set once every exception has been merged.
        self.merge_done = threading.Event()
        self.snap.merge_control = self

    # -- I/O ------------------------------------------------------------------------------------
    def _lookup_for_io(self, c: int, write: bool) -> int | None:
        snap = self.snap
        with snap.cond:
            while True:
                if not snap.valid:
                    return None
                new = snap.table.lookup(c)
                if new is None:
                    return None
                if write:
                    lo, hi = snap.merge_range
                    if lo <= c < hi:
                        snap.cond.wait()
                        continue
                    snap.merge_writes += 1
                return new

    def read(self, buf: memoryview, offset: int) -> None:
        snap = self.snap
        cb = snap.chunk_bytes
        base = self._base + offset
        if not snap.valid:  # an invalid merging snapshot redirects everything to the origin
            _read_full(self.origin, buf, base)
            return
        pos = 0
        for here, length, c in snap._segments(base, len(buf)):
            assert c is not None
            piece = buf[pos : pos + length]
            new = self._lookup_for_io(c, False)
            if new is None:
                _read_full(self.origin, piece, here)
            else:
                _read_full(self.cow, piece, new * cb + here - c * cb)
            pos += length

    def write(self, buf: memoryview, offset: int) -> None:
        snap = self.snap
        cb = snap.chunk_bytes
        base = self._base + offset
        if not snap.valid:
            do_origin(snap.origins, self.origin, base, len(buf), skip=snap)
            _write_full(self.origin, buf, base)
            return
        pos = 0
        for here, length, c in snap._segments(base, len(buf)):
            assert c is not None
            piece = buf[pos : pos + length]
            new = self._lookup_for_io(c, True)
            if new is None:
                do_origin(snap.origins, self.origin, here, length, skip=snap)
                _write_full(self.origin, piece, here)
            else:
                try:
                    _write_full(self.cow, piece, new * cb + here - c * cb)
                finally:
                    with snap.cond:
                        snap.merge_writes -= 1
                        snap.cond.notify_all()
            pos += length

    def flush(self) -> None:
        """snapshot-merge sends flushes to both the origin and the COW."""
        self.origin.flush()
        self.cow.flush()

    def discard(self, offset: int, length: int) -> None:
        """Discards complete without effect while merging."""

    # -- the merge worker -------------------------------------------------------------------------
    def resume(self) -> None:
        """Take over the snapshot's exceptions (handover), then start merging."""
        super().resume()
        self.start_merge()

    def start_merge(self) -> None:
        """``start_merge``: run the merge worker unless it runs, finished or cannot merge."""
        with self._worker_lock:
            if self._worker is None and self.snap.valid and not self.merge_done.is_set():
                self._stop.clear()
                self._worker = threading.Thread(target=self._merge_loop, name=f"merge-{self.snap.name}", daemon=True)
                self._worker.start()

    def stop_merge(self) -> bool:
        """``stop_merge``: stop the worker and wait for it; True if it was running."""
        return self._halt()

    def _halt(self) -> bool:
        with self._worker_lock:
            self._stop.set()
            worker, self._worker = self._worker, None
        if worker is None:
            return False
        running = worker.is_alive()
        worker.join()
        return running

    def presuspend(self) -> None:
        """Merging stops on presuspend and restarts on the next resume."""
        self._halt()

    def destroy(self) -> None:
        self._halt()
        super().destroy()

    def _fail(self, reason: str) -> None:
        """dm-snap.c ``shut:``: set ``merge_failed`` (status ``Merge failed``), let writes held for
        the run go on, stop. The unmerged chunks keep their exceptions, so a reload retries. The
        kernel raises no dm event here (only invalidation does); pollers see the status."""
        log.error("%s: %s: shutting down merge", self.snap.name, reason)
        with self.snap.cond:
            self.snap.merge_failed = True
            self.snap.merge_range = (0, 0)
            self.snap.cond.notify_all()

    def _merge_loop(self) -> None:
        """The worker: merge runs until done, stopped or failed; whatever escapes is a failure."""
        try:
            self._merge_runs()
        except Exception as err:  # noqa: BLE001 - a bug or an unexpected error must not end the merge silently
            log.exception("%s: merge worker error", self.snap.name)
            self._fail(f"Merge error ({type(err).__name__}: {err})")

    def _merge_runs(self) -> None:
        snap = self.snap
        store = snap.store
        cs = snap.chunk_size
        cb = snap.chunk_bytes
        while not self._stop.is_set():
            if not snap.valid:
                log.error("%s: Snapshot is invalid: can't merge", snap.name)
                return
            try:
                n, last_old, last_new = store.prepare_merge()
            except Exception as err:  # noqa: BLE001 - any failure stops the merge
                self._fail(f"Read error in exception store: {err}")
                return
            if n <= 0:
                self.merge_done.set()
                return
            old = last_old + 1 - n
            new = last_new + 1 - n
            # protect the other snapshots: give them their copies of the range first
            do_origin(snap.origins, self.origin, old * cb, n * cb, skip=snap)
            with snap.cond:
                snap.merge_range = (old, old + n)
                snap.cond.wait_for(lambda: snap.merge_writes == 0)
            origin_sectors = self.origin.size // SECTOR
            count = min(n * cs, origin_sectors - old * cs)
            errors: list[tuple[int, int]] = []
            if count > 0:
                job = snap.kc.copy(kcopyd.Region(self.cow, new * cs, count),
                                   [kcopyd.Region(self.origin, old * cs, count)], 0, lambda r, w,
                                   ctx: errors.append((r, w)) if (r or w) else None)
                job.wait()
                if errors or not job.ok:  # dm-snap.c merge_callback's two messages
                    read_err = any(r for r, _ in errors)
                    self._fail("Read error" if read_err else "Write error" if errors else "Error in kcopyd")
                    return
            try:
                self.origin.flush()
                store.commit_merge(n)
            except Exception as err:  # noqa: BLE001
                self._fail(f"Write error in exception store: {err}")
                return
            with snap.cond:
                for c in range(old + n - 1, old - 1, -1):
                    snap.table.remove(c)
                snap.merge_range = (0, 0)
                snap.cond.notify_all()
