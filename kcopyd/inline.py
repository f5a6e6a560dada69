"""Small jobs run on the caller's thread: :meth:`kcopyd.Client.run`.

A target that needs one block zeroed or copied before it can complete a write (dm-thin.c
``schedule_zero``/``schedule_copy``) waits for the job anyway. In the kernel the hand-off to
kcopyd's thread is cheap; here each hand-off between Python threads costs more than copying a
64 KiB block, so a job of at most ``max_bytes`` (default ``INLINE_MAX_BYTES``, one maximal
sub-job) is done by the thread that asks for it: one read into a buffer, one write per destination.

The contract is the one of :meth:`~kcopyd.Client.copy` and :meth:`~kcopyd.Client.zero`: the same
region checks before any I/O (``InvalidArgument``, nothing touched), the same flags (``WRITE_SEQ``
forced for zoned destinations and clearing ``IGNORE_ERROR``), ``read_err`` and one ``write_err``
bit per destination in the returned job, the bytes counted in the client's ``progress``. The
whole source is read before any destination is written, so a source overlapping a destination is
copied as ``memmove`` does. ``DEST_ZEROED`` makes a zero job write nothing, as the workers do; a
copy writes its whole range. A job above ``max_bytes`` is submitted to the worker threads as
usual and waited for.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, Sequence

from dmtools.errors import InvalidArgument
from dmtools.lazy import logger
from kcopyd.fastpath import read_exact, read_salvage, write_exact
from kcopyd.job import DEST_ZEROED, IGNORE_ERROR, WRITE_SEQ, Job, Piece, Plan
from kcopyd.overlap import plan_overlap, span_of
from kcopyd.pagepool import PAGE_SIZE
from kcopyd.region import OpenRegion, Region, open_regions

if TYPE_CHECKING:  # pragma: no cover
    from kcopyd.scheduler import Scheduler
    from kcopyd.throttle import Throttle

__all__ = ["INLINE_MAX_BYTES", "InlineJobs"]

log = logger("kcopyd")

#: Largest job run on the caller's thread by default: one maximal sub-job (1024 KiB, the maximum
#: of dm_mod.kcopyd_subjob_size_kb in dm-kcopyd.c); larger jobs are split across the workers.
INLINE_MAX_BYTES = 1024 * 1024
#: Largest read buffer a thread keeps for its next inline job: zero-filling a new 64 KiB
#: ``bytearray`` for every block copied cost ~15% of a thin break_sharing job's instructions.
KEEP_BYTES = 256 << 10

_kept = threading.local()


def _take_buffer(n: int) -> bytearray:
    """A buffer of at least ``n`` bytes (its content undefined): the thread's kept one, taken
    out while in use (a job that an inner job's write starts on the same thread gets its own)."""
    buf: bytearray | None = _kept.__dict__.pop("buf", None)
    if buf is None or len(buf) < n:
        return bytearray(n)
    return buf


def _give_buffer(buf: bytearray) -> None:
    """Keep ``buf`` for this thread's next job (a small one only)."""
    if len(buf) <= KEEP_BYTES:
        _kept.buf = buf


class InlineJobs:
    """The part of :class:`kcopyd.Client` that runs small jobs on the caller's thread."""

    # The client's state this part uses (defined by Client.__init__).
    throttle: Throttle
    _cond: threading.Condition
    _sched: Scheduler
    _total_bytes: int
    _closed: bool
    _cb_thread: threading.Thread
    copy: Callable[..., Job]
    zero: Callable[..., Job]
    _identities: Callable[[Region | None, list[Region], bool], list[object]]

    def run(self, src: Region | None, dests: Sequence[Region] | Region, flags: int = 0, *,
            max_bytes: int = INLINE_MAX_BYTES, allow_in_use: bool = False) -> Job:
        """Copy ``src`` to every destination (zero them when ``src`` is ``None``); return the job, done.

        A job of at most ``max_bytes`` runs on the calling thread (no worker, no callback thread);
        a larger one goes through :meth:`copy`/:meth:`zero` and is waited for. Check the result
        with ``job.ok``, ``read_err``/``write_err`` or ``job.raise_for_error()``. Bad regions or
        flags raise ``InvalidArgument`` before any I/O, as :meth:`copy` does.
        """
        dest_list = [dests] if isinstance(dests, Region) else dests
        first = src if src is not None else (dest_list[0] if isinstance(dest_list, (list, tuple)) and dest_list
                                             else None)
        if not isinstance(first, Region) or first.nbytes > max_bytes:
            if threading.current_thread() is self._cb_thread:
                raise InvalidArgument("a notify callback cannot wait for a job of its client", operation="copy")
            job = self.copy(src, dests, flags, allow_in_use=allow_in_use) if src is not None else self.zero(dests, flags)
            job.wait()
            return job
        if self._closed:
            raise InvalidArgument("the client has been destroyed", operation="copy")
        if isinstance(flags, bool) or not isinstance(flags, int) or flags & ~(IGNORE_ERROR | WRITE_SEQ | DEST_ZEROED):
            raise InvalidArgument(f"unknown kcopyd flags {flags!r}", operation="copy")
        regions = list(dest_list)
        osrc, odests = open_regions(src, regions)
        if any(d.zoned for d in odests):
            flags |= WRITE_SEQ  # as Client.copy: forced for zoned destinations (dm-kcopyd.c)
        if flags & WRITE_SEQ:
            flags &= ~IGNORE_ERROR
        try:
            ids = self._identities(src, regions, allow_in_use)
            # refuses what copy() refuses; an accepted overlap needs nothing more, the whole
            # source being read before any write
            plan_overlap((span_of(osrc), osrc.region.dev_name) if osrc is not None else None,
                         [(span_of(d), d.region.dev_name) for d in odests],
                         write_seq=bool(flags & WRITE_SEQ), identities=ids)
        except BaseException:
            for o in ([osrc] if osrc else []) + odests:
                o.close()
            raise
        nbytes = odests[0].region.nbytes
        job = Job(osrc, odests, nbytes, flags, None, None, Plan(max(nbytes, PAGE_SIZE), 1))
        with self._cond:
            self._total_bytes += nbytes
        if nbytes:
            piece = job.start_piece()
            written = _run_piece(piece, self.throttle)
            with self._cond:
                if written:
                    self._sched.done_bytes += nbytes
            job.piece_done(piece, written)
        job.claim_completion()  # a later cancel() finds the job finished
        job.run_callback()  # closes the regions kcopyd opened (an NBD destination is flushed)
        return job


def _grain(job: Job) -> int:
    eps = [d.endpoint for d in job.open_dests] + ([job.open_src.endpoint] if job.open_src is not None else [])
    return max([PAGE_SIZE] + [ep.logical_block_size for ep in eps])


def _run_piece(piece: Piece, throttle: Throttle) -> bool:
    """Read the piece's whole source, then write each destination; errors go in ``piece``.
    True when the destinations were written (False: a read error without ``IGNORE_ERROR``)."""
    job = piece.job
    n = piece.length
    if throttle.rate is not None:
        throttle.consume(n, job.cancel_event)
    src = job.open_src
    if src is None:
        if job.flags & DEST_ZEROED:
            return True  # the destinations read as zeros already
        _write_all(piece, None, n, throttle)
        return True
    buf = _take_buffer(n)
    try:
        view = memoryview(buf)[:n]
        throttle.io_start()
        try:
            read_exact(src.endpoint, [view], src.offset)
        except Exception as err:  # noqa: BLE001 - any failure is the job's read error
            log.debug("kcopyd: read error on %s at %d: %s", src.region.dev_name, src.offset, err)
            piece.read_err = True
            if not job.flags & IGNORE_ERROR:
                return False
            read_salvage(src.endpoint, view, src.offset, _grain(job))  # zero-fills what it cannot read
        finally:
            throttle.io_finish()
        _write_all(piece, view, n, throttle)
    finally:
        _give_buffer(buf)
    return True


def _write_all(piece: Piece, view: memoryview | None, n: int, throttle: Throttle) -> None:
    """Write ``view`` (zeros when ``None``) to every destination of the piece's job, each
    failure a bit of ``piece.write_err``."""
    for i, dest in enumerate(piece.job.open_dests):
        if _write_failed(dest, view, n, throttle):
            piece.write_err |= 1 << i


def _write_failed(dest: OpenRegion, view: memoryview | None, n: int, throttle: Throttle) -> bool:
    """Write ``view`` (zeros when ``None``) to ``dest``; True when it failed."""
    throttle.io_start()
    try:
        if view is None:
            dest.endpoint.zero(dest.offset, n)
        else:
            write_exact(dest.endpoint, [view], dest.offset)
    except Exception as err:  # noqa: BLE001 - any failure is this destination's write error
        log.debug("kcopyd: write error on %s at %d: %s", dest.region.dev_name, dest.offset, err)
        return True
    finally:
        throttle.io_finish()
    return False
