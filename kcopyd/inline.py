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

A job run here is returned as a :class:`~kcopyd.job.FinishedJob`: no events, locks, write lanes
or pieces. One whose regions are all endpoints the caller holds open (a thin pool's data device
breaking sharing of a block) opens and closes nothing, and calls no ``fstat`` when its one
destination is on the source's endpoint. The job counts in the client's ``progress`` once done:
its bytes submitted and, when written, done. The throttle is consulted while it limits anything
(a rate, or a duty cycle below 100%), as for the workers' jobs.

A copy whose regions all sit on plain descriptors (:meth:`~dmtools.endpoint.Endpoint.plain_fd`:
a file or block device the caller opened, through forwarding handles; no suspend gate, wrapper,
``O_DIRECT`` or zoned destination) runs in C (``dmk_copy`` of ``dmtools/_ffi/fastio.c``, the GIL
released) while no throttle limits the client: the same checks on the descriptors, the same
error bits, flags and progress. What C hands back (a region past an end, regions sharing bytes,
a read error of a job with ``IGNORE_ERROR``) runs here in Python, nothing having been written.
"""

from __future__ import annotations

import threading

from dmtools.endpoint import Endpoint
from dmtools.errors import InvalidArgument
from dmtools.lazy import logger
from dmtools.units import SECTOR
from kcopyd.fastpath import read_exact, read_salvage, write_exact
from kcopyd.job import DEST_ZEROED, IGNORE_ERROR, WRITE_SEQ, FinishedJob, Job, close_regions
from kcopyd.overlap import Span, endpoint_identities, plan_overlap, span_of
from kcopyd.pagepool import PAGE_SIZE
from kcopyd.region import MAX_REGIONS, OpenRegion, Region, open_regions

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Sequence
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
    _lock: threading.Lock  # the lock of the client's Condition
    _cond: threading.Condition
    _sched: Scheduler
    _total_bytes: int
    _closed: bool
    _cb_thread: threading.Thread
    copy: Callable[..., Job]
    zero: Callable[..., Job]
    _identities: Callable[[Region | None, list[Region], bool, Sequence[OpenRegion | None]], list[object]]

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
        if not isinstance(first, Region) or first.count * SECTOR > max_bytes:
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
        if src is not None and not self.throttle.active:
            plain = _plain_copy(src, regions, flags)
            if plain is not None:
                return self._finished(src, regions, src.count * SECTOR, *plain)
        if _endpoints_pass(src, regions):
            return self._run_endpoints(src, regions, flags)
        osrc, odests = open_regions(src, regions)
        if any(d.zoned for d in odests):
            flags |= WRITE_SEQ  # as Client.copy: forced for zoned destinations (dm-kcopyd.c)
        if flags & WRITE_SEQ:
            flags &= ~IGNORE_ERROR
        try:
            ids = self._identities(src, regions, allow_in_use, [osrc, *odests])
            # refuses what copy() refuses; an accepted overlap needs nothing more, the whole
            # source being read before any write
            plan_overlap((span_of(osrc), osrc.region.dev_name) if osrc is not None else None,
                         [(span_of(d), d.region.dev_name) for d in odests],
                         write_seq=bool(flags & WRITE_SEQ), identities=ids)
            nbytes = odests[0].region.nbytes
            read_err, write_err, written = _transfer(osrc.endpoint if osrc is not None else None,
                                                     osrc.offset if osrc is not None else 0,
                                                     [(d.endpoint, d.offset) for d in odests], nbytes, flags,
                                                     self.throttle)
        finally:
            # closes the regions kcopyd opened; an NBD destination is flushed, and one that
            # fails to is a failed destination
            closed_err = close_regions(osrc, odests)
        return self._finished(src, regions, nbytes, flags, read_err, write_err | closed_err, written)

    def _run_endpoints(self, src: Region | None, dests: list[Region], flags: int) -> Job:
        """:meth:`run` for a job whose regions are all open endpoints' and passed
        :func:`_endpoints_pass`: nothing to open or close, and the overlap checks without
        ``fstat`` when one destination is the source's endpoint (a thin pool's data device
        breaking sharing of a block)."""
        dest0 = dests[0]
        nbytes = dest0.nbytes
        for d in dests:
            if d.dev.zoned:  # type: ignore[union-attr]
                flags |= WRITE_SEQ  # as Client.copy: forced for zoned destinations (dm-kcopyd.c)
                break
        if flags & WRITE_SEQ:
            flags &= ~IGNORE_ERROR
        src_dev: Endpoint | None = src.dev if src is not None else None  # type: ignore[assignment]
        src_off = src.offset if src is not None else 0
        if len(dests) > 1 or (src is not None and src_dev is not dest0.dev):
            # two endpoints may still be one file or device: compared by what they open
            plan_overlap((_endpoint_span(src), src.dev_name) if src is not None else None,
                         [(_endpoint_span(d), d.dev_name) for d in dests], write_seq=bool(flags & WRITE_SEQ),
                         identities=endpoint_identities([src, *dests]))
            targets: list[tuple[Endpoint, int]] = [(d.dev, d.offset) for d in dests]  # type: ignore[misc]
        else:
            dest_off = dest0.offset
            if src is not None and src_off < dest_off + nbytes and dest_off < src_off + nbytes:
                key = ("obj", id(src_dev))  # one endpoint: a memmove, refused only with WRITE_SEQ back to front
                plan_overlap((Span(key, src_off, src_off + nbytes), src.dev_name),
                             [(Span(key, dest_off, dest_off + nbytes), dest0.dev_name)],
                             write_seq=bool(flags & WRITE_SEQ))
            targets = [(dest0.dev, dest_off)]  # type: ignore[list-item]
        read_err, write_err, written = _transfer(src_dev, src_off, targets, nbytes, flags, self.throttle)
        return self._finished(src, dests, nbytes, flags, read_err, write_err, written)

    def _finished(self, src: Region | None, dests: list[Region], nbytes: int, flags: int, read_err: bool,
                  write_err: int, written: bool) -> Job:
        """Count a job run here in the client's progress (submitted and, when ``written``, done)
        and return it finished."""
        with self._lock:  # the client's condition's lock, without Condition.__enter__'s Python frame
            self._total_bytes += nbytes
            if written:
                self._sched.done_bytes += nbytes
        return FinishedJob(src, dests, nbytes, flags, read_err, write_err, nbytes if written else 0)


#: fastio.c's kcopyd functions through cffi (:func:`dmtools._ffi.fastio.kcopyd_lib`): None until
#: first asked, False where there is no C library (every job then copies in Python).
_clib: Any = None


def _c_functions() -> Any:
    """:data:`_clib`, looked up on first use."""
    global _clib
    if _clib is None:
        from dmtools._ffi.fastio import kcopyd_lib

        _clib = kcopyd_lib() or False
    return _clib


def _plain_copy(src: Region, dests: list[Region], flags: int) -> tuple[int, bool, int, bool] | None:
    """Run a copy in C (``dmk_copy`` of fastio.c, the GIL released) when every region is an open
    endpoint's whose I/O is a plain ``pread``/``pwrite`` (:meth:`Endpoint.plain_fd`); returns the
    job's ``(flags, read_err, write_err, written)``, or ``None`` with nothing done: the Python
    path then runs it (and raises what it raises).

    C checks what :func:`_endpoints_pass` and the overlap checks do, on the descriptors (each
    region inside its file or device, no two regions sharing bytes) and hands back anything else
    before any I/O: regions past an end or sharing bytes, a read error of a job with
    ``IGNORE_ERROR`` (the Python path salvages what it can; the read is done again). A zoned
    destination is not plain (``WRITE_SEQ`` is forced for it), nor is an endpoint with a suspend
    gate, a wrapper's I/O or ``O_DIRECT``.
    """
    sdev = src.dev
    count = src.count
    if not isinstance(sdev, Endpoint) or not dests or len(dests) > MAX_REGIONS:
        return None
    lib = _clib if _clib is not None else _c_functions()
    if not lib:
        return None
    if flags & WRITE_SEQ:
        flags &= ~IGNORE_ERROR
    n = count * SECTOR
    dest0 = dests[0]
    if len(dests) == 1:
        if not isinstance(dest0, Region) or dest0.count != count:
            return None
        ddev = dest0.dev
        if not isinstance(ddev, Endpoint):
            return None
        dfd = ddev.plain_fd(n, True)
        sfd = dfd if ddev is sdev else sdev.plain_fd(n, False)
        if dfd < 0 or sfd < 0:
            return None
        rc = lib.dmk_copy1(sfd, src.sector * SECTOR, dfd, dest0.sector * SECTOR, n, flags & IGNORE_ERROR)
    else:
        sfd = sdev.plain_fd(n, False)
        words: list[int] = []
        for d in dests:
            if not isinstance(d, Region) or d.count != count:
                return None
            dev = d.dev
            fd = dev.plain_fd(n, True) if isinstance(dev, Endpoint) else -1
            if fd < 0:
                return None
            words += (fd, d.sector * SECTOR)
        if sfd < 0:
            return None
        rc = lib.dmk_copy(sfd, src.sector * SECTOR, words, len(dests), n, flags & IGNORE_ERROR)
    if rc >= 0:
        if rc:
            log.debug("kcopyd: write error on destinations %#x of a copy from %s", rc, src.dev_name)
        return flags, False, rc, True
    if rc == _C_READ_ERR:
        log.debug("kcopyd: read error on %s at %d", src.dev_name, src.offset)
        return flags, True, 0, False
    return None


#: ``dmk_copy``'s answer for a source that could not be read (fastio.c ``KC_READ_ERR``).
_C_READ_ERR = -2


def _endpoints_pass(src: Region | None, dests: list[Region]) -> bool:
    """True when every region is an open endpoint's and passes :func:`kcopyd.region.open_regions`'
    checks (1 to ``MAX_REGIONS`` destinations of the source's length, inside their devices,
    destinations writable). False sends the job to the general path, which raises the error."""
    if not dests or len(dests) > MAX_REGIONS:
        return False
    count = src.count if src is not None else dests[0].count
    sized: object = None  # the source's device and its size, asked once when a destination shares it
    size = 0
    if src is not None:
        sized = src.dev
        if not isinstance(sized, Endpoint):
            return False
        size = sized.size
        if (src.sector + count) * SECTOR > size:
            return False
    for d in dests:
        if not isinstance(d, Region):
            return False
        dev = d.dev
        if not isinstance(dev, Endpoint) or d.count != count or dev.read_only:
            return False
        if (d.sector + count) * SECTOR > (size if dev is sized else dev.size):
            return False
    return True


def _endpoint_span(region: Region) -> Span:
    """The :class:`~kcopyd.overlap.Span` of an endpoint's region (its file or device, by ``fstat``)."""
    return span_of(_Opened(region))


class _Opened:
    """What :func:`~kcopyd.overlap.span_of` reads of an open region, for an endpoint's region."""

    __slots__ = ("region", "endpoint", "offset")

    def __init__(self, region: Region) -> None:
        self.region = region
        self.endpoint = region.dev
        self.offset = region.offset


def _transfer(src: Endpoint | None, src_offset: int, dests: list[tuple[Endpoint, int]], n: int, flags: int,
              throttle: Throttle) -> tuple[bool, int, bool]:
    """Read ``n`` bytes of ``src`` at ``src_offset`` (zeros when ``None``), then write them to every
    ``(endpoint, offset)`` of ``dests``. Returns ``(read_err, write_err, written)``: ``write_err``
    a bit per failed destination, ``written`` False when a read error without ``IGNORE_ERROR``
    wrote nothing. The throttle is consulted only while it limits anything."""
    thr = throttle if throttle.active else None
    if thr is not None and thr.rate is not None:
        thr.consume(n)  # nobody can cancel a job before run() returns it
    if not n:
        return False, 0, True
    if src is None:
        if flags & DEST_ZEROED:
            return False, 0, True  # the destinations read as zeros already
        return False, _write_all(dests, None, n, thr), True
    read_err = False
    buf = _take_buffer(n)
    try:
        view = memoryview(buf)[:n]
        if thr is not None:
            thr.io_start()
        try:
            if src.readinto(view, src_offset) != n:  # short: read again as read_exact does (retries, EOF an error)
                read_exact(src, [view], src_offset)
        except Exception as err:  # noqa: BLE001 - any failure is the job's read error
            log.debug("kcopyd: read error on %s at %d: %s", src.name, src_offset, err)
            read_err = True
            if not flags & IGNORE_ERROR:
                return True, 0, False
            grain = max([PAGE_SIZE, src.logical_block_size] + [ep.logical_block_size for ep, _ in dests])
            read_salvage(src, view, src_offset, grain)  # zero-fills what it cannot read
        finally:
            if thr is not None:
                thr.io_finish()
        return read_err, _write_all(dests, view, n, thr), True
    finally:
        _give_buffer(buf)


def _write_all(dests: list[tuple[Endpoint, int]], view: memoryview | None, n: int, thr: Throttle | None) -> int:
    """Write ``view`` (zeros when ``None``) to every destination; the ``write_err`` bits of those
    that failed."""
    failed = 0
    for i, (ep, offset) in enumerate(dests):
        if thr is not None:
            thr.io_start()
        try:
            if view is None:
                ep.zero(offset, n)
            elif ep.write(view, offset) != n:  # short: write it again as write_exact does (continued)
                write_exact(ep, [view], offset)
        except Exception as err:  # noqa: BLE001 - any failure is this destination's write error
            log.debug("kcopyd: write error on %s at %d: %s", ep.name, offset, err)
            failed |= 1 << i
        finally:
            if thr is not None:
                thr.io_finish()
    return failed
