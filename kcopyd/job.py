"""A copy or zero job: its state, its completion (wait, ``await``, cancel) and its progress.

A job is created by :meth:`kcopyd.Client.copy` or :meth:`kcopyd.Client.zero`; the client's
threads move it through its sub-jobs (drivers/md/dm-kcopyd.c ``split_job``/``segment_complete``)
and then run its notify callback once on the client's callback thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from dmtools.errors import DeviceIOError, OperationCancelled
from dmtools.lazy import logger
from dmtools.record import record
from kcopyd.lanes import WriteLanes

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:  # pragma: no cover
    import asyncio
    from typing import Any, Generator

    from kcopyd.mapped import SourceMap
    from kcopyd.pagepool import Pages
    from kcopyd.region import OpenRegion, Region

__all__ = ["DEST_ZEROED", "FinishedJob", "IGNORE_ERROR", "Job", "NotifyFn", "Plan", "Progress", "WRITE_SEQ"]

log = logger("kcopyd")

#: ``notify(read_err, write_err, context)``: ``read_err`` a bool, ``write_err`` a bit per destination.
NotifyFn = Callable[[bool, int, "Any"], object]  # "Any": typing is not imported at run time

#: Flag masks, as callers pass ``BIT(DM_KCOPYDIGNORE_ERROR)`` and ``BIT(DM_KCOPYDWRITE_SEQ)``
#: (bit numbers 1 and 2, include/linux/dm-kcopyd.h).
IGNORE_ERROR = 1 << 1
WRITE_SEQ = 1 << 2
#: This project's flag: the destinations already read as zeros, so holes of the source are skipped.
DEST_ZEROED = 1 << 8
#: The largest page-cache folio (a PMD: 2 MiB on x86-64 with 4 KiB pages, MAX_PAGECACHE_ORDER in
#: include/linux/pagemap.h); ext4 and XFS read ahead into folios up to this size.
LARGE_FOLIO = 2 << 20


@record(frozen=True)
class Progress:
    """Bytes done out of bytes total."""

    done: int
    total: int

    @property
    def fraction(self) -> float:
        """``done / total`` (1.0 for an empty total)."""
        return self.done / self.total if self.total else 1.0

    @property
    def percent(self) -> int:
        """Whole percent done (0..100)."""
        return int(self.fraction * 100)


class Piece:
    """One sub-job: ``length`` bytes at job-relative ``offset``, with its buffer and errors."""

    __slots__ = ("job", "offset", "length", "pages", "mapped", "segments", "read_err", "write_err", "pending")

    def __init__(self, job: Job, offset: int, length: int) -> None:
        self.job = job
        self.offset = offset
        self.length = length
        self.pages: Pages | None = None
        #: the source's range, mapped: written from instead of ``pages`` (kcopyd.mapped)
        self.mapped: SourceMap | None = None
        self.segments: list[tuple[int, int, bool]] = []
        self.read_err = False
        self.write_err = 0
        self.pending = 0

    def views(self, start: int, length: int) -> list[memoryview]:
        """The piece's bytes ``[start, start+length)``: from its mapped source, else its pages."""
        if self.mapped is not None:
            return self.mapped.spans(start, length)
        assert self.pages is not None
        return self.pages.spans(start, length)


@record
class Plan:
    """How a job is cut into pieces and how they are read and written (chosen at submission)."""

    piece_size: int
    #: pieces in flight at once
    max_active: int
    #: pieces go through ``copy_file_range`` (kcopyd.offload), without pages
    offload: bool = False
    #: the source has no holes: pieces copy without asking for extents
    dense: bool = False
    #: hole segments stay aligned to this (page and logical block size)
    grain: int = 4096
    #: hand pieces out back to front (a memmove to a later offset, kcopyd.overlap)
    reverse: bool = False
    #: drop a file source's pages once read (none of its range was cached)
    drop_behind: bool = False
    #: write the destinations from a mapping of the file source's range (kcopyd.mapped)
    mapped: bool = False
    #: the source streams reads (an NBD export's ``stream_read``): a piece is one request, and
    #: the thread its reply lands on writes it (kcopyd.client ``_run_stream``)
    stream: bool = False


class Job:
    """An asynchronous copy (or zero) of one region to up to 8 destinations.

    Attributes set when the job is done: ``read_err`` (bool), ``write_err`` (bit *i* set when
    ``dests[i]`` failed) and ``cancelled``. ``wait()`` blocks, ``await job`` suspends a coroutine;
    both finish after the notify callback has run.
    """

    def __init__(self, src: OpenRegion | None, dests: list[OpenRegion], nbytes: int, flags: int,
                 notify: NotifyFn | None, context: Any, plan: Plan,
                 on_cancel: Callable[[Job], None] | None = None) -> None:
        #: the open regions (used by the client's I/O; ``src``/``dests`` name the regions)
        self.open_src = src
        self.open_dests = dests
        self.flags = flags
        self.notify = notify
        self.context = context
        self.total = nbytes
        self.plan = plan
        self.read_err = False
        self.write_err = 0
        self.cancelled = False
        self._done_event = threading.Event()
        self.cancel_event = threading.Event()  # set by cancel(): a throttled piece stops waiting
        self._on_cancel = on_cancel
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Job]]] = []
        self._waiters_lock = threading.Lock()
        # Scheduling state, guarded by the client's lock.
        self._next = 0  # next job-relative byte offset to hand out
        self._done_bytes = 0
        self._active = 0  # pieces handed out and not yet complete
        self._stop = False  # error (without IGNORE_ERROR) or cancel: hand out nothing more
        self._retry: list[Piece] = []  # pieces to redo with buffers (copy_file_range fallback)
        self._write_offset = 0  # WRITE_SEQ: next offset allowed to write
        self._parked: dict[int, Piece] = {}
        self._queued = False  # completion handed to the callback thread
        self._behind = 0  # drop-behind: every byte before this is read (job-relative)
        self._behind_done: dict[int, int] = {}  # read pieces beyond it: offset -> end
        # a buffered copy gives destinations written through a page cache a lane (kcopyd.lanes)
        self._lanes = WriteLanes.for_regions(dests) if src is not None and not plan.offload else WriteLanes(
            [False] * len(dests))

    # -- public ---------------------------------------------------------------------------------
    @property
    def src(self) -> Region | None:
        """The source region (``None`` for a zero job)."""
        return self.open_src.region if self.open_src is not None else None

    @property
    def dests(self) -> list[Region]:
        """The destination regions, in ``write_err`` bit order."""
        return [d.region for d in self.open_dests]

    @property
    def done(self) -> bool:
        """True once the job completed and its callback ran."""
        return self._done_event.is_set()

    @property
    def ok(self) -> bool:
        """True when the job is done without read or write errors and was not cancelled."""
        return self.done and not self.read_err and not self.write_err and not self.cancelled

    @property
    def progress(self) -> Progress:
        """Bytes processed so far out of the job's size."""
        return Progress(self._done_bytes, self.total)

    @property
    def failed_dests(self) -> list[int]:
        """Indexes of the destinations whose writes failed."""
        return [i for i in range(len(self.dests)) if self.write_err >> i & 1]

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is done (callback included); False if ``timeout`` passed first."""
        return self._done_event.wait(timeout)

    def cancel(self) -> None:
        """Stop handing out sub-jobs; in-flight I/O drains, then the callback runs once.

        ``cancelled`` is set unless the job had already finished all its pieces.
        """
        self.cancel_event.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    def raise_for_error(self) -> None:
        """Raise ``OperationCancelled`` or ``DeviceIOError`` naming what failed, if anything did."""
        if self.cancelled:
            raise OperationCancelled("copy cancelled", operation="copy")
        if self.read_err or self.write_err:
            parts = []
            if self.read_err:
                src = self.src
                parts.append(f"read error on {src.dev_name if src is not None else 'source'}")
            dests = self.dests
            for i in self.failed_dests:
                parts.append(f"write error on destination {i} ({dests[i].dev_name})")
            raise DeviceIOError("; ".join(parts), operation="copy")

    def __await__(self) -> Generator[Any, None, Job]:
        import asyncio  # imported on first use: most callers never await

        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Job] = loop.create_future()
        with self._waiters_lock:
            if self._done_event.is_set():
                fut.set_result(self)
            else:
                self._waiters.append((loop, fut))
        return (yield from fut.__await__())

    def __repr__(self) -> str:
        state = "done" if self.done else "running"
        return (
            f"<kcopyd.Job {state} {self._done_bytes}/{self.total} bytes to {len(self.dests)} "
            f"dest(s) read_err={int(self.read_err)} write_err={self.write_err:#x}>"
        )

    # -- used by the client (under its lock unless said otherwise) ----------------------------
    @property
    def lanes(self) -> WriteLanes:
        """The destinations' write lanes (:mod:`kcopyd.lanes`)."""
        return self._lanes

    @property
    def pageless(self) -> bool:
        """True for a zero job or a ``copy_file_range`` one: its pieces need no pages."""
        return self.open_src is None or self.plan.offload

    @property
    def has_work(self) -> bool:
        """True while pieces remain to be handed out."""
        return not self._stop and (bool(self._retry) or self._next < self.total)

    @property
    def wants_piece(self) -> bool:
        """True when a piece remains and fewer than ``plan.max_active`` are in flight."""
        return self.has_work and self._active < self.plan.max_active

    @property
    def finished(self) -> bool:
        """True when nothing is in flight and nothing remains to hand out."""
        return self._active == 0 and not self.has_work

    @property
    def writes_stopped(self) -> bool:
        """True when a read piece must not be written: cancelled, or WRITE_SEQ after an error."""
        return self.cancelled or bool(self.flags & WRITE_SEQ and self._stop)

    def next_length(self) -> int:
        """The size of the next piece (a piece to redo first)."""
        return self._retry[0].length if self._retry else min(self.plan.piece_size, self.total - self._next)

    def start_piece(self) -> Piece:
        """Hand out the next piece: one to redo, else front to back (back to front for ``reverse``)."""
        self._active += 1
        if self._retry:
            return self._retry.pop(0)
        length = self.next_length()
        offset = self.total - self._next - length if self.plan.reverse else self._next
        self._next += length
        return Piece(self, offset, length)

    def read_behind(self, piece: Piece) -> tuple[int, int] | None:
        """Drop-behind: ``piece``'s source range is read; the job-relative range to drop from the
        cache now, or ``None``. Pieces finish out of order and ``POSIX_FADV_DONTNEED`` skips a
        folio reaching outside the range it is given (mm/truncate.c ``find_lock_entries``), so a
        large folio across pieces is dropped only once every byte before the read front is
        read: the range reaches ``LARGE_FOLIO`` back behind the front's old place (measured:
        per-piece ranges left 1 GiB of 2 MiB folios cached, at three times the copy's CPU).
        A back-to-front job drops each piece's own range."""
        if self.plan.reverse:
            return piece.offset, piece.offset + piece.length
        self._behind_done[piece.offset] = piece.offset + piece.length
        old = front = self._behind
        while front in self._behind_done:
            front = self._behind_done.pop(front)
        if front == old:
            return None
        self._behind = front
        return max(0, old - LARGE_FOLIO), front

    def park(self, piece: Piece) -> bool:
        """WRITE_SEQ: hold ``piece`` until every earlier offset is written; True when held."""
        if not self.flags & WRITE_SEQ or piece.offset == self._write_offset:
            return False
        self._parked[piece.offset] = piece
        return True

    def piece_done(self, piece: Piece, written: bool) -> tuple[list[Piece], Piece | None]:
        """Account a finished piece: its bytes (when ``written``) and errors.

        Returns the parked pieces to drop (WRITE_SEQ stopped) and the parked piece whose turn
        to be written has come.
        """
        self._active -= 1
        if written:  # progress counts what reached the destinations
            self._done_bytes += piece.length
        self.read_err |= piece.read_err
        self.write_err |= piece.write_err
        if (piece.read_err or piece.write_err) and not self.flags & IGNORE_ERROR:
            self._stop = True
        if not self.flags & WRITE_SEQ:
            return [], None
        if written and piece.offset == self._write_offset:
            self._write_offset = piece.offset + piece.length
        if self._stop:
            return self._unpark(), None
        return [], self._parked.pop(self._write_offset, None)

    def _unpark(self) -> list[Piece]:
        parked = list(self._parked.values())
        self._parked.clear()
        return parked

    def stop(self) -> list[Piece] | None:
        """Cancel: hand out nothing more; returns the parked pieces to drop (``None`` once done)."""
        if self._queued:
            return None
        self.cancelled = True
        self._stop = True
        self._retry.clear()
        return self._unpark()

    def fall_back_to_buffers(self, piece: Piece, piece_size: int) -> None:
        """``copy_file_range`` failed on ``piece``: redo it, and copy the rest, through buffers."""
        if self.plan.offload:  # the first piece to fail: lanes are made once, before any write
            self.plan.offload = False
            self.plan.piece_size = piece_size
            self._lanes = WriteLanes.for_regions(self.open_dests)
        self._active -= 1
        for off in range(piece.offset, piece.offset + piece.length, piece_size):
            self._retry.append(Piece(self, off, min(piece_size, piece.offset + piece.length - off)))

    def claim_completion(self) -> bool:
        """True the first time: the caller hands the job to the callback thread."""
        queued, self._queued = self._queued, True
        return not queued

    def run_callback(self) -> None:
        """On the callback thread: close the regions, run ``notify``, then wake every waiter.

        A destination that fails to close (an NBD flush) counts as failed.
        """
        self.write_err |= close_regions(self.open_src, self.open_dests)
        if self.notify is not None:
            try:
                self.notify(self.read_err, self.write_err, self.context)
            except Exception:  # noqa: BLE001 - a callback must never kill the client
                log.exception("kcopyd: notify callback raised")
        with self._waiters_lock:
            self._done_event.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut, self)
            except RuntimeError:  # the loop was closed meanwhile: nobody is waiting any more
                pass


class FinishedJob(Job):
    """A job done on the caller's thread (:meth:`kcopyd.Client.run`), made finished.

    It has a :class:`Job`'s results and methods: ``wait()`` and ``await`` return at once,
    ``cancel()`` changes nothing (``cancelled`` stays False, as for any job that finished all its
    pieces). It holds no events, locks or write lanes: none of the client's threads ever sees it.
    """

    def __init__(self, src: Region | None, dests: list[Region], nbytes: int, flags: int, read_err: bool,
                 write_err: int, done_bytes: int) -> None:
        self._src_region = src
        self._dest_regions = dests
        self.flags = flags
        self.notify = None
        self.context = None
        self.total = nbytes
        self.read_err = read_err
        self.write_err = write_err
        self.cancelled = False
        self._done_bytes = done_bytes
        self._queued = True

    @property
    def src(self) -> Region | None:
        return self._src_region

    @property
    def dests(self) -> list[Region]:
        return list(self._dest_regions)

    @property
    def done(self) -> bool:
        return True

    def wait(self, timeout: float | None = None) -> bool:
        return True

    def cancel(self) -> None:
        """Nothing to stop: the job is finished."""

    def __await__(self) -> Generator[Any, None, Job]:
        return self
        yield  # unreachable: makes this a generator that finishes at once


def close_regions(src: OpenRegion | None, dests: list[OpenRegion]) -> int:
    """Close the regions kcopyd opened (an NBD destination is flushed); return the ``write_err``
    bits of the destinations that failed to close (their writes may not be durable)."""
    if src is not None:
        try:
            src.close()
        except Exception:  # noqa: BLE001
            log.exception("kcopyd: closing %s failed", src.region.dev_name)
    failed = 0
    for i, o in enumerate(dests):
        try:
            o.close()  # an NBD destination is flushed here
        except Exception as err:  # noqa: BLE001 - the writes may not be durable
            log.warning("kcopyd: closing destination %d (%s) failed: %s", i, o.region.dev_name, err)
            failed |= 1 << i
    return failed


def _resolve(fut: "asyncio.Future[Job]", job: Job) -> None:
    if not fut.done():
        fut.set_result(job)
