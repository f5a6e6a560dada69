"""A copy or zero job: its state, its completion (wait, ``await``, cancel) and its progress.

A job is created by :meth:`kcopyd.Client.copy` or :meth:`kcopyd.Client.zero`; the client's
threads move it through its sub-jobs (drivers/md/dm-kcopyd.c ``split_job``/``segment_complete``)
and then run its notify callback once on the client's callback thread.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generator

from dmtools.errors import DeviceIOError, OperationCancelled

if TYPE_CHECKING:  # pragma: no cover
    import asyncio

    from kcopyd.pagepool import Pages
    from kcopyd.region import OpenRegion, Region

__all__ = ["Job", "Progress", "NotifyFn"]

#: ``notify(read_err, write_err, context)``: ``read_err`` a bool, ``write_err`` a bit per destination.
NotifyFn = Callable[[bool, int, Any], object]


@dataclass(frozen=True)
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

    __slots__ = ("job", "offset", "length", "pages", "segments", "read_err", "write_err", "pending")

    def __init__(self, job: Job, offset: int, length: int) -> None:
        self.job = job
        self.offset = offset
        self.length = length
        self.pages: Pages | None = None
        self.segments: list[tuple[int, int, bool]] = []
        self.read_err = False
        self.write_err = 0
        self.pending = 0


class Job:
    """An asynchronous copy (or zero) of one region to up to 8 destinations.

    Attributes set when the job is done: ``read_err`` (bool), ``write_err`` (bit *i* set when
    ``dests[i]`` failed) and ``cancelled``. ``wait()`` blocks, ``await job`` suspends a coroutine;
    both finish after the notify callback has run.
    """

    def __init__(
        self,
        src: OpenRegion | None,
        dests: list[OpenRegion],
        nbytes: int,
        flags: int,
        notify: NotifyFn | None,
        context: Any,
    ) -> None:
        self._src = src
        self._dests = dests
        self.flags = flags
        self.notify = notify
        self.context = context
        self.total = nbytes
        self.read_err = False
        self.write_err = 0
        self.cancelled = False
        self._done_event = threading.Event()
        self._cancel_event = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[Job]]] = []
        self._waiters_lock = threading.Lock()
        # Scheduling state, guarded by the client's lock.
        self._client: Any = None
        self._next = 0  # next job-relative byte offset to hand out
        self._done_bytes = 0
        self._active = 0  # pieces handed out and not yet complete
        self._stop = False  # error (without IGNORE_ERROR) or cancel: hand out nothing more
        self._retry: list[Piece] = []  # pieces to redo with buffers (copy_file_range fallback)
        self._offload = False  # pieces go through copy_file_range
        self._piece_size = 0
        self._max_active = 8
        self._write_offset = 0  # WRITE_SEQ: next offset allowed to write
        self._parked: dict[int, Piece] = {}
        self._grain = 4096  # hole segments stay aligned to this (page and logical block size)
        self._queued = False  # completion handed to the callback thread
        self._dense = False  # the source has no holes: sub-jobs copy without asking for extents
        # Write lanes: a destination whose ``_lanes`` entry is a deque takes one write at a time
        # (pieces wait in the deque, in the order their reads finished); ``None`` lets its writes
        # run in parallel. ``_lane_busy[i]`` is True while a write to destination i runs.
        self._lanes: list[deque[Piece] | None] = [None] * len(dests)
        self._lane_busy = [False] * len(dests)
        self._drop_behind = False  # drop a file source's pages once read (it was not cached)
        self._reverse = False  # hand pieces out back to front (a memmove to a later offset)

    # -- public ---------------------------------------------------------------------------------
    @property
    def src(self) -> Region | None:
        """The source region (``None`` for a zero job)."""
        return self._src.region if self._src is not None else None

    @property
    def dests(self) -> list[Region]:
        """The destination regions, in ``write_err`` bit order."""
        return [d.region for d in self._dests]

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
        return [i for i in range(len(self._dests)) if self.write_err >> i & 1]

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is done (callback included); False if ``timeout`` passed first."""
        return self._done_event.wait(timeout)

    def cancel(self) -> None:
        """Stop handing out sub-jobs; in-flight I/O drains, then the callback runs once.

        ``cancelled`` is set unless the job had already finished all its pieces.
        """
        self._cancel_event.set()
        client = self._client
        if client is not None:
            client._cancel(self)

    def raise_for_error(self) -> None:
        """Raise ``OperationCancelled`` or ``DeviceIOError`` naming what failed, if anything did."""
        if self.cancelled:
            raise OperationCancelled("copy cancelled", operation="copy")
        if self.read_err or self.write_err:
            parts = []
            if self.read_err:
                src = self.src
                parts.append(f"read error on {src.dev_name if src is not None else 'source'}")
            for i in self.failed_dests:
                parts.append(f"write error on destination {i} ({self._dests[i].region.dev_name})")
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
            f"<kcopyd.Job {state} {self._done_bytes}/{self.total} bytes to {len(self._dests)} "
            f"dest(s) read_err={int(self.read_err)} write_err={self.write_err:#x}>"
        )

    # -- used by the client ---------------------------------------------------------------------
    def _take(self, length: int) -> Piece:
        """The next piece of ``length`` bytes: front to back, or back to front for ``_reverse``."""
        offset = self.total - self._next - length if self._reverse else self._next
        self._next += length
        return Piece(self, offset, length)

    def _has_work(self) -> bool:
        return not self._stop and (bool(self._retry) or self._next < self.total)

    def _finished(self) -> bool:
        return self._active == 0 and not self._has_work()

    def _complete(self) -> None:
        """Mark done and wake every waiter (called on the callback thread after notify)."""
        with self._waiters_lock:
            self._done_event.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut, self)
            except RuntimeError:  # the loop was closed meanwhile: nobody is waiting any more
                pass


def _resolve(fut: "asyncio.Future[Job]", job: Job) -> None:
    if not fut.done():
        fut.set_result(job)
