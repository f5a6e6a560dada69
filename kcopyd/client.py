"""The kcopyd client: page budget, submission, worker threads and the callback thread.

Shape and semantics follow drivers/md/dm-kcopyd.c:

- a job larger than the sub-job size is split; up to ``SPLIT_COUNT`` (8) pieces of one job are in
  flight, each claiming the next piece when it completes (``segment_complete``);
- a piece waits for pages (``pages_jobs``) in submission order (``kcopyd.scheduler``); its one
  read serves every destination, whose writes are issued in parallel (``dm_io`` to all regions);
- without ``IGNORE_ERROR`` the first error stops handing out pieces and the job completes once the
  in-flight pieces drain; with it the copy goes on (unreadable ranges become zeros) and the errors
  are still reported; ``WRITE_SEQ`` writes in offset order and clears ``IGNORE_ERROR``;
- callbacks run exactly once per job, serialised, on the client's single callback thread.

Syscalls run on worker threads (``preadv``/``pwritev``/``copy_file_range`` release the GIL), so
several requests are in flight at once. Two choices are this engine's own, made per endpoint:

- a destination written through a regular file's page cache takes one write at a time, the
  others waiting in its lane in the order their reads finished (its writers would serialise on
  the file's inode lock anyway); block-device and O_DIRECT destinations take writes in parallel
  (``kcopyd.lanes``); two regular files are copied by ``copy_file_range`` (``kcopyd.offload``);
- a regular-file source that kcopyd opened by path and that has none of the job's range in the
  page cache (``kcopyd.fastpath.cached_bytes``) has its pages dropped once read, as ``dd
  iflag=nocache`` does: the copy does not push other data out of the cache, and the pages it frees
  serve the destinations' writes. Reads stay buffered, so readahead keeps the disk busy;
- such a source whose destinations all write by system calls (files, block devices, plain NBD
  connections) is written from a read-only mapping of its page cache, without copying it into
  pooled buffers first (``kcopyd.mapped``); a job with an NBD export moves larger pieces
  (``NBD_PIECE_SIZE``);
- a source that streams reads (an NBD export: ``NbdEndpoint.stream_read``) is read one request
  per piece, the pool's worth in flight, and each piece is written by the thread its reply lands
  on (the connection's pump) as soon as it lands, not after a worker's wait: no hand-off between
  threads on the way from the socket to the destination. A piece whose read failed is not
  written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from _queue import SimpleQueue  # queue.SimpleQueue itself: queue.py would bring heapq, 0.4 ms of start-up

from dmtools.endpoint import Endpoint
from dmtools.errors import InvalidArgument
from dmtools.lazy import logger
from dmtools.nbd.uri import is_nbd_uri
from kcopyd import writebehind
from kcopyd.dropsettle import drop_left
from kcopyd.fastpath import cached_bytes, plan_segments, read_exact, read_salvage, write_exact
from kcopyd.inline import InlineJobs
from kcopyd.job import DEST_ZEROED, IGNORE_ERROR, WRITE_SEQ, Job, NotifyFn, Piece, Plan, Progress
from kcopyd.mapped import SourceMap, can_map
from kcopyd.offload import OFFLOAD_DEPTH, OFFLOAD_PIECE_SIZE, can_offload, offload_depth, offload_piece
from kcopyd.overlap import (check_dests_not_in_use, endpoint_identities, knows_identity, plan_overlap,
                            region_identities, span_of)
from kcopyd.pagepool import PAGE_SIZE, PagePool
from kcopyd.region import OpenRegion, Region, open_regions
from kcopyd.scheduler import Scheduler
from kcopyd.throttle import Throttle

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Any, Callable, Sequence

    _Task = tuple[Callable[[Any], None], Any]

__all__ = ["Client", "IGNORE_ERROR", "WRITE_SEQ", "DEST_ZEROED", "SPLIT_COUNT", "SUB_JOB_SIZE", "MAX_SUB_JOB_SIZE"]

log = logger("kcopyd")

_KNOWN_FLAGS = IGNORE_ERROR | WRITE_SEQ | DEST_ZEROED

#: Pieces of one job in flight at once (SPLIT_COUNT, dm-kcopyd.c).
SPLIT_COUNT = 8
#: Default sub-job size: dm_mod.kcopyd_subjob_size_kb = 512 KiB (dm-kcopyd.c); its maximum 1024 KiB.
SUB_JOB_SIZE = 512 * 1024
MAX_SUB_JOB_SIZE = 1024 * 1024

#: Piece size of a buffered job with an NBD export named by URI, when the pool holds four such
#: pieces (``dmtools copy`` gives NBD copies 16 MiB): each piece is one request on one connection
#: and one trip through the workers, so larger pieces spend less of this process's CPU per byte
#: (measured, 1 GiB, 1 MiB -> 4 MiB pieces: user CPU 0.29 -> 0.20 s export -> file, and
#: 1.26 -> 0.93 CPU s file -> file + export); nbdcopy's 64 requests of 256 KiB are 16 MiB in
#: flight too.
NBD_PIECE_SIZE = 4 << 20


def _fully_allocated(ep: Endpoint, offset: int, length: int) -> bool:
    """True when the source range has no hole (then sub-jobs skip their extent queries).

    Holes made while the job runs are then copied as zeros, which reads the same.
    """
    if length <= 0:
        return True
    try:
        extents = ep.data_extents(offset, length)
    except Exception:  # noqa: BLE001 - unknown: let each sub-job ask
        return False
    return extents is None or (len(extents) == 1 and extents[0] == (offset, length))


def _backend_may_be_live() -> bool:
    """False when no table can map a device now: no ``/dev/mapper/control`` (kernel) and no
    userspace daemon's socket. Cheap: the in-use check's machinery is imported only otherwise."""
    from dmtools.linux import CONTROL_PATH
    from dmtools.engine.rundir import socket_path

    return os.path.exists(CONTROL_PATH) or os.path.exists(socket_path())


def _regular_file(path: Any) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, TypeError, ValueError):
        return False


def _uncached_file_source(osrc: OpenRegion, nbytes: int) -> bool:
    """True when a regular-file source opened by path has none of the job's range in the cache.

    Its pages are then brought in by this job alone and are dropped once read (as ``dd
    iflag=nocache`` does): the copy does not push other data out of the cache, and the pages
    it frees serve the destinations' writes.
    """
    ep = osrc.endpoint
    if not osrc.owned or not ep.is_regular_file:
        return False
    fd = ep.fileno()
    return fd is not None and cached_bytes(fd, osrc.offset, nbytes) == 0


class Client(InlineJobs):
    """A copy engine with its own page budget, worker threads and callback thread.

    ``num_pages`` 4 KiB pages are set aside for buffers; the buffers in use never exceed them,
    whatever the jobs (a piece larger than the pool is cut to the pool's size). ``threads`` worker
    threads issue the I/O. ``throttle`` (a shared :class:`~kcopyd.throttle.Throttle`) or ``rate``
    (bytes/s) and ``throttle_percent`` limit the copy. ``max_jobs`` bounds the jobs not yet done:
    ``copy()`` waits when that many are outstanding. ``offload=False`` disables
    ``copy_file_range`` (always buffers). ``drop_behind=False`` keeps the pages of an uncached
    file source in the page cache (by default they are dropped once read). ``write_behind=True``
    writes a destination file that held none of its range in the cache back to disk during the
    copy and drops what was written (:mod:`kcopyd.writebehind`). ``run()`` does a
    small job on the caller's thread and returns it done (:mod:`kcopyd.inline`).
    """

    def __init__(self, num_pages: int = 1024, *, sub_job_size: int = SUB_JOB_SIZE, threads: int = 8,
                 throttle: Throttle | None = None, rate: int | None = None, throttle_percent: int = 100,
                 max_jobs: int = 4096, offload: bool = True, drop_behind: bool = True,
                 write_behind: bool = False) -> None:
        if isinstance(sub_job_size, bool) or not isinstance(sub_job_size, int):
            raise InvalidArgument(f"sub_job_size must be an integer, not {sub_job_size!r}")
        if sub_job_size < 512 or sub_job_size % 512 or sub_job_size > MAX_SUB_JOB_SIZE:
            raise InvalidArgument(
                f"sub_job_size must be a multiple of 512 from 512 to {MAX_SUB_JOB_SIZE} bytes, "
                f"not {sub_job_size}"
            )
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InvalidArgument(f"threads must be a positive integer, not {threads!r}")
        if isinstance(max_jobs, bool) or not isinstance(max_jobs, int) or max_jobs < 1:
            raise InvalidArgument(f"max_jobs must be a positive integer, not {max_jobs!r}")
        self.pool = PagePool(num_pages)
        self.num_pages = num_pages
        self.sub_job_size = sub_job_size
        self.throttle = throttle if throttle is not None else Throttle(rate, throttle_percent)
        self.offload = offload
        self.drop_behind = drop_behind
        self.write_behind = write_behind
        self.max_jobs = max_jobs
        # A buffered piece never needs more than half the pool, so that even a small pool keeps
        # two pieces in flight (one read while the other is written).
        self._buffer_piece_size = min(sub_job_size, max(1, num_pages // 2) * PAGE_SIZE)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sched = Scheduler(self.pool, 2 * threads, self._start, self._resume, self._finish_locked)
        self._outstanding = 0  # jobs whose I/O is not finished
        self._unfinished = 0  # jobs whose callback has not run
        self._total_bytes = 0
        self._closed = False
        self._destroyed = False
        self._backends: list[Any] | None = None  # live backends, found for the first job given paths
        self._tasks: SimpleQueue[_Task | None] = SimpleQueue()
        self._callbacks: SimpleQueue[Job | None] = SimpleQueue()
        self._workers = [
            threading.Thread(target=self._worker, name=f"kcopyd-io-{i}", daemon=True)
            for i in range(threads)
        ]
        self._cb_thread = threading.Thread(target=self._callback_loop, name="kcopyd-cb", daemon=True)
        for t in self._workers:
            t.start()
        self._cb_thread.start()

    # -- public API -----------------------------------------------------------------------------
    def copy(self, src: Region, dests: Sequence[Region] | Region, flags: int = 0, notify: NotifyFn | None = None,
             context: Any = None, *, allow_in_use: bool = False) -> Job:
        """Copy ``src`` to every destination (at most 8) asynchronously; return the job at once.

        Every region is checked before any I/O; a bad one raises ``InvalidArgument`` and nothing is
        touched. ``notify(read_err, write_err, context)`` runs exactly once on the callback thread.
        Destinations that share bytes are refused; a source sharing bytes with a destination on
        the same file or device is copied as ``memmove`` does (see :mod:`kcopyd.overlap`).
        A destination given by path that a live table maps (kernel, or a running userspace
        daemon) raises ``DeviceBusy`` unless ``allow_in_use``.
        """
        if not isinstance(src, Region):
            raise InvalidArgument(f"source must be a Region, not {src!r}", operation="copy")
        return self._submit(src, dests, flags, notify, context, allow_in_use)

    def zero(self, dests: Sequence[Region] | Region, flags: int = 0, notify: NotifyFn | None = None,
             context: Any = None) -> Job:
        """Write zeros to every destination (``Endpoint.zero``: fallocate/BLKZEROOUT where possible)."""
        return self._submit(None, dests, flags, notify, context, False)

    @property
    def progress(self) -> Progress:
        """Bytes done out of all bytes submitted to this client."""
        return Progress(self._sched.done_bytes, self._total_bytes)

    @property
    def jobs_pending(self) -> int:
        """Jobs whose callback has not run yet."""
        return self._unfinished

    def destroy(self) -> None:
        """Wait for every job (callbacks included), then stop the threads and release the pages."""
        if threading.current_thread() is self._cb_thread:
            raise InvalidArgument("destroy() from a notify callback would wait for that callback", operation="destroy")
        with self._cond:
            self._closed = True
            while self._unfinished:
                self._cond.wait()
            if self._destroyed:
                return
            self._destroyed = True
        for _ in self._workers:
            self._tasks.put(None)
        self._callbacks.put(None)
        for t in self._workers:
            t.join()
        self._cb_thread.join()
        self.pool.close()
        for b in self._backends or ():
            b.close()

    close = destroy

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # -- submission -----------------------------------------------------------------------------
    def _submit(self, src: Region | None, dests: Sequence[Region] | Region, flags: int, notify: NotifyFn | None,
                context: Any, allow_in_use: bool) -> Job:
        if self._closed:
            raise InvalidArgument("the client has been destroyed", operation="copy")
        if isinstance(flags, bool) or not isinstance(flags, int) or flags & ~_KNOWN_FLAGS:
            raise InvalidArgument(f"unknown kcopyd flags {flags!r}", operation="copy")
        if notify is not None and not callable(notify):
            raise InvalidArgument(f"notify must be callable, not {notify!r}", operation="copy")
        dest_list = [dests] if isinstance(dests, Region) else list(dests)
        osrc, odests = open_regions(src, dest_list)
        if any(d.zoned for d in odests):
            flags |= WRITE_SEQ  # forced for zoned destinations (dm-kcopyd.c)
        if flags & WRITE_SEQ:
            flags &= ~IGNORE_ERROR  # WRITE_SEQ clears IGNORE_ERROR (dm-kcopyd.c)
        try:
            ids = self._identities(src, dest_list, allow_in_use, [osrc, *odests])
            reverse = plan_overlap(
                (span_of(osrc), osrc.region.dev_name) if osrc is not None else None,
                [(span_of(d), d.region.dev_name) for d in odests],
                write_seq=bool(flags & WRITE_SEQ),
                identities=ids,
            )
        except BaseException:
            for o in ([osrc] if osrc else []) + odests:
                o.close()
            raise
        nbytes = odests[0].region.nbytes
        if osrc is not None and osrc.endpoint.is_regular_file and nbytes > 0:
            # a larger readahead window, as cp does
            osrc.endpoint.fadvise(osrc.offset, nbytes, os.POSIX_FADV_SEQUENTIAL)
        job = Job(osrc, odests, nbytes, flags, notify, context, self._plan(osrc, odests, flags, reverse), self._cancel)
        if self.write_behind and job.lanes.used:
            job.lanes.start_write_behind(odests)
        with self._cond:
            while self._outstanding >= self.max_jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                for o in ([osrc] if osrc else []) + odests:
                    o.close()
                raise InvalidArgument("the client has been destroyed", operation="copy")
            self._outstanding += 1
            self._unfinished += 1
            self._total_bytes += nbytes
            self._sched.add(job)
        return job

    def _plan(self, osrc: OpenRegion | None, odests: list[OpenRegion], flags: int, reverse: bool | None) -> Plan:
        """How the job is cut and which I/O path it takes."""
        nbytes = odests[0].region.nbytes
        eps = [d.endpoint for d in odests] + ([osrc.endpoint] if osrc is not None else [])
        grain = max([PAGE_SIZE] + [ep.logical_block_size for ep in eps])
        plan = Plan(self._buffer_piece_size, SPLIT_COUNT, grain=grain)
        plan.dense = osrc is not None and _fully_allocated(osrc.endpoint, osrc.offset, nbytes)
        # copy_file_range between two regular files. Several destinations share one read into
        # pooled buffers instead (one read serving all of them, as the kernel's); WRITE_SEQ needs
        # the ordered write stage of the buffered path.
        plan.offload = bool(
            self.offload and osrc is not None and not flags & WRITE_SEQ and len(odests) == 1
            and reverse is None and can_offload(osrc.endpoint, odests[0].endpoint)
        )
        if reverse is not None:  # source and a destination share bytes: memmove (kcopyd.overlap)
            plan.reverse = reverse
            plan.max_active = 1
        if osrc is not None and not plan.offload and self.drop_behind:
            plan.drop_behind = _uncached_file_source(osrc, nbytes)
        # A file kcopyd opened, no overlap (a piece is read whole before it is written): the
        # destinations are written from the source's page cache (kcopyd.mapped).
        plan.mapped = bool(osrc is not None and osrc.owned and not plan.offload and reverse is None
                           and can_map(osrc.endpoint, [d.endpoint for d in odests]))
        if not plan.offload and osrc is not None and any(is_nbd_uri(o.region.dev) for o in [osrc, *odests]):
            plan.piece_size = max(plan.piece_size, min(NBD_PIECE_SIZE, self.num_pages * PAGE_SIZE // 4))
        if osrc is not None and hasattr(osrc.endpoint, "stream_read") and not plan.offload \
                and not plan.mapped and reverse is None and not flags & WRITE_SEQ:
            # An NBD source (named by URI or given as an endpoint): a piece's READs go out at once
            # on one connection, and the thread the last reply lands on writes it as soon as it
            # lands. Pieces of four 1 MiB requests (measured, 1 GiB to a file, load 5.6: wall
            # 0.83 s, user CPU 0.12 s; pieces of one request 0.99 s, 0.17 s; requests of 256 KiB,
            # nbdcopy's, left nbdkit's CPU as it was, 0.46-0.52 s, and cost 0.19 s of user CPU).
            plan.stream = True
            plan.piece_size = max(plan.piece_size, min(NBD_PIECE_SIZE, self.num_pages * PAGE_SIZE // 4))
        if plan.offload:
            plan.piece_size = OFFLOAD_PIECE_SIZE
            plan.max_active = offload_depth(osrc.endpoint, osrc.offset, nbytes) if osrc is not None else OFFLOAD_DEPTH
        elif osrc is None:
            plan.piece_size = max(self.sub_job_size, OFFLOAD_PIECE_SIZE)
        return plan

    def _identities(self, src: Region | None, dests: list[Region], allow_in_use: bool,
                    opened: Sequence[OpenRegion | None] = ()) -> list[Any]:
        """Identities of the regions given by path (once per job), after refusing a destination
        that a live table maps; ``[]`` when every region is an endpoint (but for two NBD exports
        given as endpoints: one export may be named twice), or when every path is a regular file,
        no backend can hold one and no NBD export takes part (two regular files share bytes only
        as one inode, which the job's spans compare: ``kcopyd.overlap``; an export may be served
        from one of the files by a server here: ``dmtools.nbd.peer``).
        ``opened`` (the regions opened, source first) lends NBD URIs their endpoints' identities."""
        regions = [src, *dests]
        paths = [r for r in regions if isinstance(r, Region) and not isinstance(r.dev, Endpoint)]
        if not paths:
            return endpoint_identities(regions)
        if self._backends is None:
            if not _backend_may_be_live():
                self._backends = []
            else:
                from dmtools.inputs import live_backends

                self._backends = live_backends()
        files = [r for r in paths if not is_nbd_uri(r.dev)]
        exports = len(paths) - len(files) + sum(1 for r in regions if r is not None and knows_identity(r.dev))
        if not self._backends and not exports and all(_regular_file(r.dev) for r in files):
            return []
        ids = region_identities(regions, self._backends, opened)
        if not allow_in_use:
            check_dests_not_in_use(dests, ids[1:], self._backends)
        return ids

    # -- the scheduler's hooks (under self._lock) -----------------------------------------------
    def _start(self, piece: Piece) -> None:
        job = piece.job
        if job.plan.stream:
            self._start_stream(piece)
            return
        if not job.pageless:
            fn = self._run_buffered
        else:
            fn = self._run_zero if job.open_src is None else self._run_offload
        self._tasks.put((fn, piece))

    def _resume(self, piece: Piece) -> None:
        self._tasks.put((self._issue_writes, piece))

    def _finish_locked(self, job: Job) -> None:
        self._outstanding -= 1
        self._cond.notify_all()
        self._callbacks.put(job)

    def _cancel(self, job: Job) -> None:
        with self._cond:
            if not self._sched.cancel(job):
                return
        self.throttle.wake()

    # -- worker side ----------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            item = self._tasks.get()
            if item is None:
                return
            fn, arg = item
            try:
                fn(arg)
            except BaseException:  # noqa: BLE001 - a worker must never die
                log.exception("kcopyd: unexpected error in %s", getattr(fn, "__name__", fn))

    def _done(self, piece: Piece, written: bool = True) -> None:
        with self._cond:
            self._sched.piece_done(piece, written)

    def _throttle_bytes(self, piece: Piece) -> None:
        thr = self.throttle
        if thr.rate is not None:
            thr.consume(piece.length, piece.job.cancel_event)

    def _segments(self, piece: Piece) -> list[tuple[int, int, bool]]:
        job = piece.job
        src = job.open_src
        if src is None:
            return [(0, piece.length, False)]
        if job.plan.dense:
            return [(0, piece.length, True)]
        try:
            return plan_segments(src.endpoint, src.offset + piece.offset, piece.length, job.plan.grain)
        except Exception:  # noqa: BLE001 - unknown extents: copy everything
            log.debug("kcopyd: data_extents failed on %s", src.region.dev_name, exc_info=True)
            return [(0, piece.length, True)]

    def _run_zero(self, piece: Piece) -> None:
        self._throttle_bytes(piece)
        piece.segments = [(0, piece.length, False)]
        self._write_stage(piece)

    def _run_offload(self, piece: Piece) -> None:
        """Copy a piece with ``copy_file_range`` to every destination in parallel."""
        self._throttle_bytes(piece)
        piece.segments = self._segments(piece)
        n = len(piece.job.open_dests)
        piece.pending = n
        for i in range(1, n):
            self._tasks.put((self._offload_one, (piece, i)))
        self._offload_one((piece, 0))

    def _offload_one(self, arg: tuple[Piece, int]) -> None:
        piece, i = arg
        failed = offload_piece(piece, i, self.throttle)
        with self._cond:
            if failed:
                piece.write_err |= 1 << i
            piece.pending -= 1
            if piece.pending:
                return
            if not piece.write_err:
                self._sched.piece_done(piece)
            else:
                self._sched.fall_back_to_buffers(piece, self._buffer_piece_size)

    def _run_buffered(self, piece: Piece) -> None:
        job = piece.job
        src = job.open_src
        assert src is not None and piece.pages is not None
        self._throttle_bytes(piece)
        if job.cancelled:  # cancelled while it waited for the throttle: no I/O
            self._done(piece, written=False)
            return
        thr = self.throttle
        ignore = bool(job.flags & IGNORE_ERROR)
        piece.segments = segs = self._segments(piece)
        base = src.offset + piece.offset
        if job.plan.mapped and self._map_source(piece, base):
            self._write_stage(piece)
            return
        for off, length, is_data in segs:
            if not is_data:
                continue
            views = piece.pages.spans(off, length)
            thr.io_start()
            try:
                read_exact(src.endpoint, views, base + off)
            except Exception as err:  # noqa: BLE001 - any failure is this piece's read error
                log.debug("kcopyd: read error on %s at %d: %s", src.region.dev_name, base + off, err)
                piece.read_err = True
                if not ignore:
                    break
                pos = base + off
                for v in views:
                    read_salvage(src.endpoint, v, pos, job.plan.grain)
                    pos += len(v)
            finally:
                thr.io_finish()
        if job.plan.drop_behind:
            self._drop_behind(piece)
        if piece.read_err and not ignore:
            self._done(piece, written=False)
            return
        self._write_stage(piece)

    def _start_stream(self, piece: Piece) -> None:
        """Under the lock: issue the READs of a piece of a dense streamed job at once (no
        throttle); the others go through a worker (``_run_stream``)."""
        job = piece.job
        if job.plan.dense and not self.throttle.active:
            piece.segments = [(0, piece.length, True)]
            try:
                self._stream_reads(piece, False)
                return
            except Exception as err:  # noqa: BLE001 - a worker tries again and reports it
                log.debug("kcopyd: streamed read of piece %d: %s", piece.offset, err)
        self._tasks.put((self._run_stream, piece))

    def _stream_reads(self, piece: Piece, throttled: bool) -> bool:
        """Issue ``piece``'s READs (its data segments, in requests of the source's
        ``request_size``) in one batch; False when it has no data. Raises when they cannot be
        issued (then none was)."""
        src = piece.job.open_src
        assert src is not None and piece.pages is not None
        ep: Any = src.endpoint
        limit = ep.request_size
        base = src.offset + piece.offset
        reads = []
        for off, length, is_data in piece.segments:
            if not is_data:
                continue
            pos = base + off
            for v in piece.pages.spans(off, length):
                for i in range(0, len(v), limit):
                    reads.append((v[i : i + limit], pos + i))
                pos += len(v)
        if not reads:
            return False
        ep.stream_read(reads, lambda err: self._stream_landed(piece, err, throttled))
        return True

    def _run_stream(self, piece: Piece) -> None:
        """A worker issues a streamed piece's READs (its extents asked first, unless the job is
        dense); the piece is written once all have landed."""
        job = piece.job
        src = job.open_src
        assert src is not None
        self._throttle_bytes(piece)
        if job.cancelled:
            self._done(piece, written=False)
            return
        piece.segments = self._segments(piece)
        thr = self.throttle
        thr.io_start()
        try:
            if not self._stream_reads(piece, True):  # all holes
                thr.io_finish()
                self._write_stage(piece)
        except Exception as err:  # noqa: BLE001 - the piece's read error
            thr.io_finish()
            log.debug("kcopyd: read error on %s in piece %d: %s", src.region.dev_name, piece.offset, err)
            self._stream_landed(piece, errno.EIO, False)

    def _stream_landed(self, piece: Piece, err: int, throttled: bool) -> None:
        """A streamed piece's READs are all done (on the source's pump thread): the piece is
        written from this thread, or, after a failed read, never written (its pages are
        salvaged by a worker with ``IGNORE_ERROR``)."""
        if throttled:
            self.throttle.io_finish()
        job = piece.job
        if not err:
            self._write_stage(piece)
            return
        src = job.open_src
        log.debug("kcopyd: read error on %s in piece %d: %s", src.region.dev_name if src else "?",
                  piece.offset, os.strerror(err))
        piece.read_err = True
        if job.flags & IGNORE_ERROR:
            self._tasks.put((self._salvage_stream, piece))
        else:
            self._done(piece, written=False)

    def _salvage_stream(self, piece: Piece) -> None:
        """``IGNORE_ERROR``: read a streamed piece whose read failed block by block, zeros where
        a block cannot be read, then write it (as ``_run_buffered`` does)."""
        job = piece.job
        src = job.open_src
        assert src is not None and piece.pages is not None
        pos0 = src.offset + piece.offset
        for off, length, is_data in piece.segments:
            if is_data:
                pos = pos0 + off
                for v in piece.pages.spans(off, length):
                    read_salvage(src.endpoint, v, pos, job.plan.grain)
                    pos += len(v)
        self._write_stage(piece)

    def _map_source(self, piece: Piece, base: int) -> bool:
        """Map the piece's source range and fault its data in (:mod:`kcopyd.mapped`); False, with
        nothing mapped, when that fails: the piece is then read into its pages (exact errors)."""
        src = piece.job.open_src
        assert src is not None
        fd = src.endpoint.fileno()
        assert fd is not None
        thr = self.throttle
        try:
            smap = SourceMap(fd, base, piece.length)
        except (OSError, ValueError) as err:
            log.debug("kcopyd: cannot map %s at %d: %s", src.region.dev_name, base, err)
            return False
        thr.io_start()
        try:
            for off, length, is_data in piece.segments:
                if is_data:
                    smap.populate(off, length)
        except OSError as err:
            log.debug("kcopyd: %s at %d: %s; reading into buffers", src.region.dev_name, base, err)
            smap.release()
            return False
        finally:
            thr.io_finish()
        piece.mapped = smap
        return True

    def _unmap(self, piece: Piece) -> None:
        """A mapped piece's writes are done: remove its mapping, then drop its source pages when
        the job drops behind (pages still mapped would stay in the cache)."""
        smap, piece.mapped = piece.mapped, None
        if smap is None:
            return
        smap.release()
        if piece.job.plan.drop_behind:
            self._drop_behind(piece)

    def _drop_behind(self, piece: Piece) -> None:
        """The piece's source range is read (or unmapped): drop what is now behind the job's
        read front from the cache (:meth:`kcopyd.job.Job.read_behind`)."""
        job = piece.job
        src = job.open_src
        assert src is not None
        with self._cond:
            span = job.read_behind(piece)
        if span is None:
            return
        src.endpoint.fadvise(src.offset + span[0], span[1] - span[0], os.POSIX_FADV_DONTNEED)
        fd = src.endpoint.fileno()
        if span[1] == job.total and not job.plan.reverse and fd is not None:
            # the whole range is read: what DONTNEED skipped (reads still in flight) goes too
            with contextlib.suppress(OSError):
                drop_left(fd, src.offset, job.total)

    def _source_faults(self, batch: list[Piece], failed: list[bool]) -> list[bool]:
        """Failed writes of mapped pieces whose source range can no longer be faulted in (the
        file was truncated meanwhile) are the source's read errors, not the destination's."""
        out = []
        for p, bad in zip(batch, failed):
            if bad and p.mapped is not None and not all(
                    p.mapped.readable(off, n) for off, n, is_data in p.segments if is_data):
                p.read_err = True
                bad = False
            out.append(bad)
        return out

    def _write_stage(self, piece: Piece) -> None:
        job = piece.job
        if job.flags & WRITE_SEQ or job.cancelled:
            with self._cond:
                # A cancelled job writes nothing more; a WRITE_SEQ job stops writing after an
                # error (dm-kcopyd.c run_io_job); otherwise in-flight pieces finish, as the kernel's.
                if job.writes_stopped:
                    self._sched.piece_done(piece, written=False)
                    return
                if job.park(piece):
                    return
        self._issue_writes(piece)

    def _issue_writes(self, piece: Piece) -> None:
        lanes = piece.job.lanes
        piece.pending = len(lanes)
        ready = list(range(len(lanes)))
        if lanes.used:
            with self._cond:
                ready = lanes.claim(piece)
        if not ready:
            return
        for i in ready[1:]:
            self._tasks.put((self._write_one, (piece, i)))
        self._write_one((piece, ready[0]))

    def _write_one(self, arg: tuple[Piece, int]) -> None:
        """Write one piece to destination i; then, on a one-writer lane, the pieces waiting for it.

        Waiting pieces that continue one another are written with one vectored write (fewer
        trips through the interpreter between writes, which matters when the CPUs are busy).
        """
        piece, i = arg
        lanes = piece.job.lanes
        batch = [piece]
        while batch:
            behind = lanes.behind[i]
            if behind is not None:
                failed = self._write_behind(batch, i, behind)
            else:
                failed = [self._write_piece(piece, i)] if len(batch) == 1 else self._write_batch(batch, i)
            if any(failed):
                failed = self._source_faults(batch, failed)
            unmap = []
            with self._cond:
                for p, bad in zip(batch, failed):
                    if bad:
                        p.write_err |= 1 << i
                    p.pending -= 1
                    if p.pending == 0:
                        if p.mapped is not None:
                            unmap.append(p)  # done below, outside the lock
                        else:
                            self._sched.piece_done(p)
                batch = lanes.next_batch(i)
            for p in unmap:
                self._unmap(p)
                self._done(p)
            if batch:
                piece = batch[0]

    def _write_behind(self, batch: list[Piece], i: int, behind: writebehind.WriteBehind) -> list[bool]:
        """Write contiguous pieces to destination ``i``, which has a write-behind; return each
        piece's failure. Pieces that are all data are written in steps of ``writebehind.CHUNK``,
        each handed to writeback as soon as it is written (the disk starts on a piece's first
        MiB while the rest is copied); a piece with holes is written as ``_write_piece`` does and
        handed over whole. A failed write is redone piece by piece (exact failures), and what
        was not yet handed over is handed over once every piece is written. A writeback error
        (the wait reports it) fails the whole batch and ends the destination's write-behind."""
        job = batch[0].job
        start = job.open_dests[i].offset + batch[0].offset
        total = batch[-1].offset + batch[-1].length - batch[0].offset
        handed = 0
        failed = [False] * len(batch)
        try:
            if all(p.segments == [(0, p.length, True)] for p in batch):
                ep = job.open_dests[i].endpoint
                views = []
                for p in batch:
                    views.extend(p.views(0, p.length))
                thr = self.throttle
                for run, n in writebehind.chunks(views, writebehind.CHUNK):
                    thr.io_start()
                    try:
                        write_exact(ep, run, start + handed)
                        ok = True
                    except Exception as err:  # noqa: BLE001 - redone piece by piece below
                        log.debug("kcopyd: write to destination %d failed (%s), writing piece by piece", i, err)
                        ok = False
                    finally:
                        thr.io_finish()
                    if not ok:
                        failed = [self._write_piece(p, i) for p in batch]
                        break
                    behind.written(start + handed, n)
                    handed += n
            else:
                failed = [self._write_piece(batch[0], i)] if len(batch) == 1 else self._write_batch(batch, i)
            if not any(failed) and handed < total:
                behind.written(start + handed, total - handed)
        except OSError as err:  # writeback failed: the destination's bytes are lost
            log.debug("kcopyd: writeback error on destination %d: %s", i, err)
            job.lanes.behind[i] = None
            failed = [True] * len(batch)
        return failed

    def _write_batch(self, batch: list[Piece], i: int) -> list[bool]:
        """Write contiguous all-data pieces to destination ``i`` at once; per piece on failure.

        Returns each piece's failure. A failed batch is redone piece by piece, so exactly the
        pieces that cannot be written count as failed.
        """
        dest = batch[0].job.open_dests[i]
        views: list[memoryview] = []
        for p in batch:
            views.extend(p.views(0, p.length))
        thr = self.throttle
        thr.io_start()
        try:
            dest.endpoint.writev(views, dest.offset + batch[0].offset)
            return [False] * len(batch)
        except Exception as err:  # noqa: BLE001 - retried piece by piece below
            log.debug("kcopyd: batched write to destination %d failed (%s), writing piece by piece", i, err)
        finally:
            thr.io_finish()
        return [self._write_piece(p, i) for p in batch]

    def _write_piece(self, piece: Piece, i: int) -> bool:
        """Write ``piece`` to destination ``i``; True when it failed."""
        job = piece.job
        dest = job.open_dests[i]
        ep = dest.endpoint
        base = dest.offset + piece.offset
        zeroed = bool(job.flags & DEST_ZEROED)
        thr = self.throttle
        try:
            for off, length, is_data in piece.segments:
                if is_data or not zeroed:
                    thr.io_start()
                    try:
                        if is_data:
                            write_exact(ep, piece.views(off, length), base + off)
                        else:
                            ep.zero(base + off, length)
                    finally:
                        thr.io_finish()
        except Exception as err:  # noqa: BLE001 - any failure is this destination's write error
            log.debug("kcopyd: write error on destination %d (%s): %s", i, dest.region.dev_name, err)
            return True
        return False

    # -- callbacks ------------------------------------------------------------------------------
    def _callback_loop(self) -> None:
        while True:
            job = self._callbacks.get()
            if job is None:
                return
            job.run_callback()
            with self._cond:
                self._unfinished -= 1
                self._cond.notify_all()
