"""An endpoint on an NBD export, through libnbd: several requests in flight on several connections.

Each connection is one libnbd handle: callers (kcopyd's worker threads) issue ``aio_pread``/
``aio_pwrite``/``aio_zero`` commands on it and wait for their completion, one of the waiting
threads driving the handle at a time (no poller thread, see :class:`_Connection`), so every
connection carries as many requests as there are callers. A second and
further connections are opened only when the server advertises ``CAN_MULTI_CONN`` (doc/proto.md:
without it a client should not spread one export over several connections); requests go to the
least busy connection.

Streamed reads (``stream_read``, kcopyd's path for an export source) do not wait: each connection
that carries one gets a *pump* thread of its own, which drives it, issues the reads queued for it
and runs each read's completion as its reply lands (kcopyd writes the bytes there and then), as
nbdcopy's threads do, one per connection. While a pump runs, it is the connection's driver: other
callers' commands are issued from their threads and waited for as usual. A pump stops after
``POLL_SLICE_MS`` with nothing in flight, and at ``close``.

- Holes: ``data_extents`` asks ``BLOCK_STATUS`` in the ``base:allocation`` context; a range that
  reads as zeros (``STATE_ZERO``) is a hole, whatever ``STATE_HOLE`` says (as nbdcopy does).
- Zeros: ``zero`` sends ``WRITE_ZEROES`` (the server may punch holes), first with ``FAST_ZERO`` when
  offered; a server that answers ENOTSUP (zeroing is no faster than writing) gets plain
  ``WRITE_ZEROES`` from then on. Without ``SEND_WRITE_ZEROES`` zero buffers are written.
- Durability: ``flush`` sends ``FLUSH`` on every connection that wrote, all at once (replies to
  writes are awaited before, as doc/proto.md requires across connections); ``close`` flushes
  first. ``write_durable`` (the kernel's ``REQ_FUA``) sends one ``WRITE`` with ``CMD_FLAG_FUA``
  when the server offers ``SEND_FUA``, else ``WRITE`` then ``FLUSH``.
- Failures: a failed command raises :class:`~dmtools.errors.DeviceIOError` with the server's errno.
  A connection whose server goes away fails its commands (ENOTCONN) and is dead for good (libnbd
  cannot reconnect a handle); a command with no reply within ``timeout`` seconds kills its
  connection the same way (ETIMEDOUT), so a hung server gives an error, never a hang.
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time
from collections import deque

from dmtools.endpoint import Endpoint
from dmtools.errors import DeviceIOError, InvalidArgument
from dmtools.lazy import logger
from dmtools.nbd._lib import load
from dmtools.nbd.errors import NbdConnectionError
from dmtools.nbd.uri import NbdUri, parse_uri

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Any, Callable

    from dmtools.identity import Identity

    #: A command: the libnbd ``aio_*`` method, its arguments before ``completion``, its flags.
    _Cmd = tuple[str, tuple[Any, ...], int]

__all__ = ["NbdEndpoint", "DEFAULT_CONNECTIONS", "DEFAULT_TIMEOUT", "MAX_REQUEST", "REQUEST_SIZE",
           "source_connections"]

log = logger("dmtools.nbd")

#: Connections per export when the server allows multi-conn (nbdcopy's default --connections).
DEFAULT_CONNECTIONS = 4
#: Seconds a command may wait for its reply before its connection is declared dead.
DEFAULT_TIMEOUT = 30.0
#: Longest a driving thread sleeps in ``nbd.poll`` before it looks for a kill (milliseconds).
POLL_SLICE_MS = 500
#: Largest READ/WRITE payload any server must accept: 32 MiB (doc/proto.md "Block size
#: constraints"; qemu-nbd's maximum, the kernel's max_hw_sectors).
MAX_REQUEST = 32 << 20
#: Largest READ/WRITE payload sent: a longer read or write goes as several requests in flight at
#: once, on the least busy connections. Servers take each request's payload into a buffer of its
#: own (nbdkit and qemu-nbd allocate one per request), and buffers of several MiB are given back
#: to the kernel when freed and faulted in again by the next request (measured, nbdkit memory
#: export, 1 GiB read in 4 MiB requests: 47-61k page faults and 0.57-0.78 s of nbdkit CPU;
#: in 1 MiB requests 4-11k and 0.28-0.36 s; nbdcopy's 256 KiB requests 253 and 0.28-0.43 s).
REQUEST_SIZE = 1 << 20
#: Largest WRITE_ZEROES/BLOCK_STATUS length sent (lengths are 32-bit without extended headers).
MAX_EFFECT = 1 << 30
#: How far ahead a ``data_extents`` query looks, and how long its answer is reused (sequential
#: copies then ask the server once per window instead of once per sub-job).
EXTENT_WINDOW = 64 << 20
EXTENT_TTL = 1.0

def source_connections() -> int:
    """Connections for an export a copy reads: ``DEFAULT_CONNECTIONS``, at most one per CPU this
    process may run on, as nbdcopy limits its connections to its threads (one per CPU). Each
    connection is a pool of server threads whose reply buffers are allocated and freed per
    request; more connections than CPUs kept more of those buffers cold (measured, nbdkit memory
    export -> file, 1 GiB, 2 CPUs, 5 rounds at load 6: 4 connections 7.5k page faults and 0.35 s of
    nbdkit CPU, 0.69 s of ours; 2 connections 3.3k, 0.33 s and 0.63 s)."""
    return max(1, min(DEFAULT_CONNECTIONS, len(os.sched_getaffinity(0))))


class _Request:
    """One command in flight: its completion sets ``err`` (an errno, 0 on success) and ``finished``.

    ``wake`` is set when the request finishes, and also when its waiter is handed the job of
    driving the connection (the waiter tells the two apart by ``finished``). ``waiting`` is True
    while a thread sleeps on ``wake`` (under the connection's lock): a thread that issued several
    requests waits for one at a time, and only a request someone waits for may be handed the
    connection.
    """

    __slots__ = ("wake", "err", "finished", "waiting", "keep", "deadline")

    def __init__(self, keep: Any, deadline: float | None) -> None:
        self.wake = threading.Event()
        self.err = 0
        self.finished = False
        self.waiting = False
        self.keep = keep  # the buffer libnbd reads or fills, alive until completion
        self.deadline = deadline  # monotonic time by which its reply must have come

    def complete(self, err: Any) -> int:
        # Runs in the driving thread, inside aio_notify_*: no handle calls, never raise.
        if not self.finished:
            self.err = err.value
            self.finished = True
            self.wake.set()
        return 1  # retire the command (no aio_command_completed needed)

    def fail(self, code: int) -> None:
        if not self.finished:
            self.err = code
            self.finished = True
            self.wake.set()


class _Read(_Request):
    """A streamed read: no thread waits for it (no ``wake``: an Event is a lock and a condition
    made per request); once finished it joins its pump's ``landed`` queue, and the pump counts it
    into its batch."""

    __slots__ = ("batch", "landed")

    def __init__(self, keep: Any, deadline: float | None, batch: _Batch, landed: deque[_Read]) -> None:
        self.err = 0
        self.finished = False
        self.waiting = False
        self.keep = keep
        self.deadline = deadline
        self.batch: _Batch | None = batch  # the reads whose ``done`` runs once all are in
        self.landed = landed

    def complete(self, err: Any) -> int:
        if not self.finished:
            self.err = err.value
            self.finished = True
            self.landed.append(self)
        return 1

    def fail(self, code: int) -> None:
        if not self.finished:
            self.err = code
            self.finished = True
            self.landed.append(self)


class _Batch:
    """Streamed reads queued together on one connection: ``done(errno)`` runs once all are in,
    with the first error (0 when none failed). Used by the connection's pump thread only."""

    __slots__ = ("left", "err", "done")

    def __init__(self, left: int, done: Callable[[int], None]) -> None:
        self.left = left
        self.err = 0
        self.done = done


class _Connection:
    """One libnbd handle, driven by the threads that wait on it (leader/followers).

    Callers issue ``aio_*`` commands from their own threads and then wait. One waiter at a time
    *drives* the connection: it sleeps in poll(2) on the socket, in the direction libnbd asks for,
    and tells libnbd what the socket is ready for (``aio_notify_read``/``aio_notify_write``, in C
    with the GIL released); the completion callbacks run in the driver's thread. When its own
    command is done it hands the job to another waiter. A caller whose command completes while it
    drives needs no thread switch at all, and the others need one wake-up each: fewer hand-offs
    than a poller thread per connection, whose every completion and every partial send was a trip
    through Python (measured: about half the client CPU per GiB). The driver sleeps without the
    handle's lock (``nbd.poll`` holds it while asleep: every command issued meanwhile waited for
    the next reply; 1 GiB export -> file, 4 workers, load 5: 0.47-0.72 s of the workers' time
    in issuing commands, 0.21-0.36 s without), so a caller issues its command
    at once; what libnbd could not send then is sent at the driver's next wake-up (the next
    reply); the endpoint spreads commands over idle connections first.
    """

    def __init__(self, nbd: Any, handle: Any, name: str, timeout: float | None) -> None:
        self.nbd = nbd
        self.h = handle
        self.name = name
        self.timeout = timeout
        self.pending: set[_Request] = set()
        self.lock = threading.Lock()
        self.dead = 0  # errno once the connection is unusable
        self.wrote = False
        self.driving = False
        self._fd = handle.aio_get_fd()
        self._poller = select.poll()  # used by the driver only
        self._events = 0  # what the poller waits for on the socket
        # Streamed reads (see stream_read): the pump thread, reads waiting for it to issue them,
        # the finished ones whose ``done`` it has to run, and how many are not done yet.
        self.pump: threading.Thread | None = None
        self.inbox: list[tuple[_Read, Any, int]] = []
        self.landed: deque[_Read] = deque()
        self.streaming = 0
        self._stopping = False
        self._wake_fd = -1  # an eventfd that wakes the pump from poll(2), made with it

    @property
    def busy(self) -> int:
        return len(self.pending)

    def submit(self, start: Callable[[Callable[[Any], int]], Any], keep: Any = None) -> _Request:
        """Queue a command (``start(completion)`` calls one ``aio_*``); return its request."""
        req = _Request(keep, time.monotonic() + self.timeout if self.timeout is not None else None)
        with self.lock:
            if self.dead:
                req.fail(self.dead)
                return req
            self.pending.add(req)
        try:
            start(req.complete)
        except self.nbd.Error as err:
            req.fail(err.errnum or errno.EIO)
        else:
            # The pump sleeps in poll(2) for replies: a payload that libnbd could not send at
            # once (a long write) is sent when it is told the socket is writable.
            if self.pump is not None and self.h is not None \
                    and self.h.aio_get_direction() & self.nbd.AIO_DIRECTION_WRITE:
                self._wake()
        return req

    # -- streamed reads: a pump thread per connection --------------------------------------------
    def stream_read(self, parts: list[tuple[Any, int]], done: Callable[[int], None]) -> None:
        """Queue READs (buffer, offset); ``done(errno)`` (0 when all succeeded) runs on this
        connection's pump thread once every reply is in (the pump is started here when none
        runs). Called from the pump itself (from a ``done``), the reads are issued when that
        ``done`` returns, without a wake-up."""
        batch = _Batch(len(parts), done)
        deadline = time.monotonic() + self.timeout if self.timeout is not None else None
        landed = self.landed
        reqs = [(_Read(buf, deadline, batch, landed), buf, offset) for buf, offset in parts]
        me = threading.current_thread()
        start = wake = False
        with self.lock:
            self.pending.update(r[0] for r in reqs)
            self.streaming += len(reqs)
            self.inbox.extend(reqs)
            if self.pump is None:
                if self._wake_fd < 0:
                    self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._stopping = False
                self.pump = threading.Thread(target=self._pump, name=f"nbd-pump {self.name}", daemon=True)
                start = True
            elif self.pump is not me:
                wake = True
        if start:
            self.pump.start()  # type: ignore[union-attr]  # set above, under the lock
        elif wake:
            self._wake()

    def _wake(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:  # closed meanwhile (the pump has stopped): nothing to wake
            pass

    def _pump(self) -> None:
        """The pump thread: drive the connection (once no other thread drives it), issuing the
        queued reads and running the finished ones' ``done``, until nothing has been queued for
        ``POLL_SLICE_MS`` or the connection is closed."""
        wake_fd = self._wake_fd
        idle = select.poll()
        idle.register(wake_fd, select.POLLIN)
        while True:
            with self.lock:
                if not self.driving:
                    self.driving = True
                    break
            idle.poll(POLL_SLICE_MS)  # a driving waiter wakes us when it hands off
            self._drain_wake()
        try:
            self._pump_loop(wake_fd)
        finally:
            self._hand_off()

    def _drain_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except (BlockingIOError, OSError):
            pass

    def _pump_loop(self, wake_fd: int) -> None:
        """Rounds of: issue the queued reads, run the landed ones' ``done``, then sleep in poll(2)
        and move the state machine. A 1 MiB reply comes in about five socket buffers' worth: until
        a reply lands, a read is queued or libnbd's direction changes, the pump only polls and
        reads (the round's bookkeeping, under the lock, once per reply, not per buffer)."""
        nbd, h = self.nbd, self.h
        monotonic = time.monotonic
        poller = select.poll()
        poller.register(wake_fd, select.POLLIN)
        events = 0  # what the poller waits for on the socket
        idle = False  # a whole slice went by with nothing in flight
        deadline = self._deadline()
        landed = self.landed
        while True:
            with self.lock:
                todo, self.inbox = self.inbox, []
                if not todo and not landed and (
                        self._stopping or (idle and not self.streaming and not self.pending)):
                    self.pump = None  # a read queued from now on starts a new pump
                    return
            idle = False
            for req, buf, offset in todo:
                if self.dead or h is None:
                    req.fail(self.dead or errno.ESHUTDOWN)
                    continue
                try:
                    h.aio_pread(buf, offset, completion=req.complete)
                except nbd.Error as err:
                    req.fail(err.errnum or errno.EIO)
            if todo:
                deadline = self._deadline()
            self._run_landed()
            if self.inbox or self._stopping:
                continue
            wait_ms = POLL_SLICE_MS
            if deadline is not None:
                wait_ms = min(POLL_SLICE_MS, max(0, int((deadline - monotonic()) * 1000) + 1))
            want = d = 0
            if not self.dead and h is not None:
                d = h.aio_get_direction()
                want = (select.POLLIN if d & nbd.AIO_DIRECTION_READ else 0) | \
                       (select.POLLOUT if d & nbd.AIO_DIRECTION_WRITE else 0)
                if not want:  # not connected any more: nbd_poll says why
                    try:
                        h.poll(0)
                    except nbd.Error as err:
                        self.kill(err.errnum or errno.ENOTCONN)
                    else:
                        self.kill(errno.ENOTCONN)
                    continue
            if want != events:
                if want:
                    poller.register(self._fd, want)
                elif events:
                    poller.unregister(self._fd)
                events = want
            progressed = False
            while True:
                ready = poller.poll(wait_ms)
                if not ready:
                    break
                progressed = True
                for fd, got in ready:
                    if fd == wake_fd:
                        self._drain_wake()
                        continue
                    try:
                        if got & (select.POLLIN | select.POLLHUP):
                            h.aio_notify_read()
                        elif got & select.POLLOUT:
                            h.aio_notify_write()
                        else:  # POLLERR, POLLNVAL
                            h.poll(0)
                    except nbd.Error as err:
                        log.debug("nbd: %s: connection failed: %s", self.name, err)
                        self.kill(err.errnum or errno.ENOTCONN)
                if landed or self.inbox or self._stopping or self.dead or h is None or h.aio_get_direction() != d:
                    break
                if deadline is not None:
                    wait_ms = min(POLL_SLICE_MS, max(0, int((deadline - monotonic()) * 1000) + 1))
            if progressed:
                continue
            deadline = self._deadline()
            if deadline is not None and monotonic() >= deadline and not self.dead:
                log.warning("nbd: %s: no reply within %.1f s, dropping the connection", self.name, self.timeout)
                self.kill(errno.ETIMEDOUT)
            else:
                idle = deadline is None

    def _run_landed(self) -> None:
        """Count in every finished streamed read; run a batch's ``done`` once all its reads are
        in (on the pump thread)."""
        landed = self.landed
        if not landed:
            return
        reqs = []
        while landed:  # completions append only on this thread (the driver) or in kill()
            reqs.append(landed.popleft())
        with self.lock:
            self.pending.difference_update(reqs)
            self.streaming -= len(reqs)
        for req in reqs:
            batch, req.batch, req.keep = req.batch, None, None
            assert batch is not None  # set by stream_read
            if req.err and not batch.err:
                batch.err = req.err
            batch.left -= 1
            if batch.left:
                continue
            try:
                batch.done(batch.err)
            except BaseException:  # noqa: BLE001 - the pump must go on
                log.exception("nbd: %s: a read's completion raised", self.name)

    def stop_pump(self) -> None:
        """Stop the pump thread (its queued reads fail) and wait for it, unless called from it."""
        t = self.tell_pump_to_stop()
        if t is not None and t is not threading.current_thread():
            t.join()

    def tell_pump_to_stop(self) -> threading.Thread | None:
        """Ask the pump thread to stop, without waiting for it; return it (``None``: none runs)."""
        with self.lock:
            t = self.pump
            self._stopping = True
        if t is not None:
            self._wake()
        return t

    def wait(self, req: _Request) -> int:
        """Wait for ``req``, driving the connection when no other thread does; return its errno.

        A reply that does not come within the timeout kills the connection (ETIMEDOUT).
        """
        if self.pump is threading.current_thread():  # a streamed read's completion waits here:
            self._drive(req)  # the pump drives already (replies to its reads queue meanwhile)
        while not req.finished:
            with self.lock:
                drive = not self.driving
                if drive:
                    self.driving = True
                else:
                    req.wake.clear()  # under the lock: a hand-off after this is not lost
                req.waiting = not drive
            if drive:
                try:
                    self._drive(req)
                finally:
                    self._hand_off()
            elif not req.finished:
                # The driver kills the connection at the deadline; wait a little longer.
                limit = None if req.deadline is None else max(0.0, req.deadline - time.monotonic()) + 1.0
                if not req.wake.wait(limit) and not req.finished and not self.driving:
                    continue  # no driver and no hand-off: take over
        with self.lock:
            req.waiting = False
            self.pending.discard(req)
        return req.err

    def _hand_off(self) -> None:
        """Stop driving; wake a thread waiting for an unfinished request to take over (a request
        issued but not yet waited for is left alone: its thread, busy waiting for another of its
        requests, would not notice, and the replies would sit undriven until a timeout). With no
        one waiting, the next thread to wait drives."""
        with self.lock:
            self.driving = False
            nxt = next((r for r in self.pending if r.waiting and not r.finished), None)
            pump = self.pump is not None and self.pump is not threading.current_thread()
        if nxt is not None:
            nxt.wake.set()
        elif pump:
            self._wake()  # the pump waits for its turn to drive

    def _drive(self, req: _Request) -> None:
        """Move the state machine until ``req`` is finished or the connection dies.

        The earliest deadline is looked up again only when a wait ends with nothing done (about
        5 rounds per 1 MiB reply otherwise, each looking through every request in flight): the
        one known is never later than the true one (requests issued since have later deadlines),
        so a wait is never longer than it should be, and the connection is killed only after a
        wait with nothing done, with a fresh deadline past, as before.
        """
        nbd, h = self.nbd, self.h
        if h is None:
            req.fail(self.dead or errno.ESHUTDOWN)
            return
        monotonic = time.monotonic
        deadline = self._deadline()
        while not req.finished:
            if self.dead:
                req.fail(self.dead)
                return
            wait_ms = POLL_SLICE_MS
            if deadline is not None:
                wait_ms = min(POLL_SLICE_MS, max(0, int((deadline - monotonic()) * 1000) + 1))
            try:
                progressed = self._poll(wait_ms)
            except nbd.Error as err:
                log.debug("nbd: %s: connection failed: %s", self.name, err)
                self.kill(err.errnum or errno.ENOTCONN)
                return
            if progressed:
                continue
            deadline = self._deadline()
            if deadline is not None and monotonic() >= deadline:
                log.warning("nbd: %s: no reply within %.1f s, dropping the connection", self.name, self.timeout)
                self.kill(errno.ETIMEDOUT)
                return

    def _poll(self, timeout_ms: int) -> bool:
        """One round of libnbd's ``nbd_poll`` (lib/poll.c: poll(2) in the direction the state
        machine waits for, then one ``aio_notify_*``), asleep without the handle's lock; False
        when nothing happened within ``timeout_ms``. Raises ``nbd.Error`` when the connection
        fails."""
        nbd, h = self.nbd, self.h
        want = h.aio_get_direction()
        events = (select.POLLIN if want & nbd.AIO_DIRECTION_READ else 0) | \
                 (select.POLLOUT if want & nbd.AIO_DIRECTION_WRITE else 0)
        if not events:  # not connected any more: nbd_poll says why
            return bool(h.poll(timeout_ms))
        if events != self._events:  # only the driver polls: a change of direction is re-registered
            self._poller.register(self._fd, events)
            self._events = events
        ready = self._poller.poll(timeout_ms)
        if not ready:
            return False
        got = ready[0][1]
        if got & (select.POLLIN | select.POLLHUP):
            h.aio_notify_read()
        elif got & select.POLLOUT:
            h.aio_notify_write()
        else:  # POLLERR, POLLNVAL
            return bool(h.poll(0))
        return True

    def _deadline(self) -> float | None:
        """The earliest deadline of the requests waiting for a reply (``None``: no timeout)."""
        if self.timeout is None:
            return None
        with self.lock:
            return min((r.deadline for r in self.pending if not r.finished and r.deadline is not None), default=None)

    def kill(self, code: int) -> None:
        """Declare the connection dead: fail every command still waiting (a driver stops within
        ``POLL_SLICE_MS``)."""
        with self.lock:
            if not self.dead:
                self.dead = code
            reqs = list(self.pending)
        for r in reqs:
            r.fail(code)

    def close(self) -> None:
        self.kill(errno.ESHUTDOWN)
        self.stop_pump()
        self.h = None  # libnbd 1.14 closes the handle (and its socket) when it is collected
        if self._wake_fd >= 0 and self.pump is None:
            os.close(self._wake_fd)
            self._wake_fd = -1


class NbdEndpoint(Endpoint):
    """The export named by an NBD URI, as an :class:`~dmtools.endpoint.Endpoint`.

    ``writable=False`` opens it for reading only (``read_only`` is then True, as for a file opened
    read-only). ``connections`` is the most connections used when the server allows multi-conn.
    ``timeout`` (seconds, ``None`` for none) bounds the wait for each reply. Raises
    ``InvalidArgument`` for a bad URI, ``NbdUnavailable`` without libnbd and
    ``NbdConnectionError`` when the server cannot be reached or refuses the export.
    """

    def __init__(self, uri: str | NbdUri, *, writable: bool = False, connections: int = DEFAULT_CONNECTIONS,
                 timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.uri = uri if isinstance(uri, NbdUri) else parse_uri(uri)
        if isinstance(connections, bool) or not isinstance(connections, int) or connections < 1:
            raise InvalidArgument(f"connections must be a positive integer, not {connections!r}")
        self.name = self.uri.text
        self.timeout = timeout
        self._writable = writable
        self._nbd = nbd = load()
        self._conns: list[_Connection] = []
        self._rr = 0
        self._closed = False
        self._fast_zero = True
        self._extents_lock = threading.Lock()
        self._extents: tuple[int, int, float, list[tuple[int, int]]] | None = None
        self._identity: Identity | None = None
        first = self._connect(0)
        try:
            h = first.h
            self._size = h.get_size()
            self._export_ro = bool(h.is_read_only())
            self._can_flush = bool(h.can_flush())
            self._can_fua = bool(h.can_fua())
            self._can_zero = bool(h.can_zero())
            self._can_fast_zero = bool(h.can_fast_zero())
            self._can_extents = bool(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
            self.multi_conn = bool(h.can_multi_conn())
            # TLS encrypts in this process (GnuTLS reads the buffer); plain sockets are sent by
            # the kernel from the caller's buffer.
            self._tls = bool(h.get_tls_negotiated())
            self._min_block = h.get_block_size(nbd.SIZE_MINIMUM) or 1
            preferred = h.get_block_size(nbd.SIZE_PREFERRED) or 4096
            maximum = h.get_block_size(nbd.SIZE_MAXIMUM)
            # The server's preferred size when it asks for larger requests, within its maximum.
            self._max_request = min(max(REQUEST_SIZE, preferred), maximum or MAX_REQUEST, MAX_REQUEST)
            n = connections if self.multi_conn else 1
            self._connect_more(n - 1)
        except BaseException:
            self.close()
            raise

    def _connect(self, index: int) -> _Connection:
        conn = _Connection(self._nbd, self._handle(index), f"{self.name}#{index}", self.timeout)
        self._conns.append(conn)
        return conn

    def _connect_more(self, n: int) -> None:
        """Open ``n`` more connections at once: each handshake waits for the server a few round
        trips (libnbd releases the GIL meanwhile), so opening them one after the other would add
        up those waits. All or nothing: the first failure is raised once all are done."""
        handles: list[Any] = [None] * n
        errors: list[BaseException] = []

        def open_one(i: int) -> None:
            try:
                handles[i] = self._handle(i + 1)
            except BaseException as err:  # noqa: BLE001 - raised by the caller below
                errors.append(err)

        threads = [threading.Thread(target=open_one, args=(i,), name=f"nbd-connect-{i + 1}", daemon=True)
                   for i in range(1, n)]
        for t in threads:
            t.start()
        if n:
            open_one(0)
        for t in threads:
            t.join()
        for i, h in enumerate(handles):
            if h is not None:
                self._conns.append(_Connection(self._nbd, h, f"{self.name}#{i + 1}", self.timeout))
        handles.clear()  # the error's traceback holds this frame: the handles live on in _conns only
        if errors:
            raise errors[0]

    def _handle(self, index: int) -> Any:
        """A libnbd handle connected to the export."""
        nbd = self._nbd
        h = nbd.NBD()
        try:
            h.set_handle_name(f"{'dst' if self._writable else 'src'}{index}")
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            h.set_uri_allow_local_file(True)  # ?tls-psk-file= and ?tls-certificates= (as nbdcopy)
            # A failed read raises, and its buffer is never used: no need to zero it first (nbdcopy).
            h.set_pread_initialize(False)
            h.connect_uri(self.uri.text)
        except nbd.Error as err:
            raise NbdConnectionError(f"cannot connect: {err.string}", errno=err.errnum or None, operation="nbd",
                                     device=self.name) from err
        return h

    # -- properties -----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return int(self._size)

    @property
    def logical_block_size(self) -> int:
        return max(512, int(self._min_block))

    @property
    def read_only(self) -> bool:
        return self._export_ro or not self._writable

    @property
    def identity(self) -> "Identity":
        """The export's bytes as :mod:`dmtools.identity` knows them (one export named two ways,
        by a symlink, a relative path or ``nbds://``, is one identity; an export that a local
        nbdkit serves from a file or device, as ``dmtools serve`` does, is also that file's or
        device's bytes: :mod:`dmtools.nbd.peer`), so kcopyd refuses a copy whose regions share
        bytes of it even when they are handed in as endpoints. Over TCP the server is the
        address the connection reached."""
        ident = self._identity
        if ident is None:
            from dmtools.errors import DMError
            from dmtools.identity import identify, served_as
            from dmtools.nbd.peer import served_file

            ident = identify(self._peer_uri())  # a Unix socket's server is looked up there
            path = served_file(self._conns[0]._fd) if self.uri.transport == "tcp" and self._conns else None
            if path is not None:
                try:
                    ident = served_as(ident, identify(path))
                except (DMError, OSError) as err:  # gone meanwhile, or not ours to read: the export alone
                    log.debug("nbd: %s: what %s serves is unknown: %s", self.name, path, err)
            self._identity = ident
        return ident

    def _peer_uri(self) -> str:
        """The URI, with a TCP host replaced by the address the connection reached (``localhost``,
        a host name and an address are then one server)."""
        if self.uri.transport != "tcp" or not self._conns:
            return self.uri.text
        import socket
        from urllib.parse import quote

        try:
            with socket.socket(fileno=os.dup(self._conns[0]._fd)) as sock:
                host, port = sock.getpeername()[:2]
        except OSError:
            return self.uri.text
        host = f"[{host}]" if ":" in host else host
        return f"nbd://{host}:{port}/{quote(self.uri.export, safe='/')}"

    @property
    def connections(self) -> int:
        """Connections open to the server."""
        return len(self._conns)

    @property
    def can_zero(self) -> bool:
        """True when the server takes ``WRITE_ZEROES``."""
        return self._can_zero

    @property
    def can_fast_zero(self) -> bool:
        """True when the server takes ``WRITE_ZEROES`` with ``FAST_ZERO``."""
        return self._can_fast_zero

    @property
    def can_fua(self) -> bool:
        """True when the server honours ``CMD_FLAG_FUA`` on writes (``SEND_FUA``)."""
        return self._can_fua

    @property
    def writes_by_kernel(self) -> bool:
        """True without TLS: libnbd sends a write's payload with ``send(2)`` from the caller's
        buffer; with TLS, GnuTLS reads it in this process to encrypt it."""
        return not self._tls

    @property
    def can_flush(self) -> bool:
        """True when the server takes ``FLUSH``."""
        return self._can_flush

    # -- command plumbing -----------------------------------------------------------------------
    def _pick(self) -> _Connection:
        live = [c for c in self._conns if not c.dead]
        if self._closed or not live:
            raise DeviceIOError("the connection to the server is gone", errno=errno.ENOTCONN,
                                operation="nbd", device=self.name)
        self._rr = (self._rr + 1) % len(live)
        best = live[self._rr]
        for c in live:
            if c.busy < best.busy:
                best = c
        return best

    def _run(self, op: str, cmds: list[_Cmd], conns: list[_Connection] | None = None) -> None:
        """Issue commands (``aio_*`` name, arguments, flags) at once, on ``conns`` (one each) or on
        the least busy connections; wait for all; raise on failure."""
        issued = []
        for i, (name, args, flags) in enumerate(cmds):
            c = conns[i] if conns is not None else self._pick()
            method = getattr(c.h, name)

            def start(cb: Callable[[Any], int], method: Any = method, args: tuple[Any, ...] = args,
                      flags: int = flags) -> Any:
                return method(*args, completion=cb, flags=flags)

            issued.append((c, c.submit(start, args)))
        first_err = 0
        for c, req in issued:
            err = c.wait(req)
            if err and not first_err:
                first_err = err
        if first_err:
            raise DeviceIOError(f"{os.strerror(first_err)}", errno=first_err, operation=op, device=self.name)

    @property
    def request_size(self) -> int:
        """The longest READ/WRITE payload sent in one request (longer I/O is split)."""
        return int(self._max_request)

    def stream_read(self, parts: list[tuple[Any, int]], done: Callable[[int], None]) -> None:
        """Read each ``(buffer, offset)`` of ``parts`` (at most :attr:`request_size` bytes each)
        without waiting, all on one connection: ``done(errno)`` runs once all are in, with the
        first error (0 when none), on the pump thread of that connection, which runs every
        completion of its connection as its replies land (one thread per connection, as
        nbdcopy's). The least busy connection carries them, the caller's own when it is a pump
        thread of this endpoint and no busier than the others. The buffers must stay alive
        until ``done`` runs. Raises ``InvalidArgument`` (a part empty, too long or beyond the
        export's end) or ``DeviceIOError`` (no connection left), and then ``done`` never runs."""
        if not parts:
            raise InvalidArgument("stream_read needs at least one part")
        for buf, offset in parts:
            n = memoryview(buf).nbytes
            if n > self._max_request or n <= 0:
                raise InvalidArgument(f"a streamed read is 1 to {self._max_request} bytes, not {n}")
            if offset < 0 or offset + n > self._size:
                raise InvalidArgument(f"a streamed read at {offset} + {n} is beyond the export's end")
        best = self._pick()
        me = threading.current_thread()
        for c in self._conns:
            if c.pump is me and not c.dead and c.busy <= best.busy:
                best = c
                break
        best.stream_read(parts, done)

    def _pieces(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        out = []
        pos, end = offset, offset + length
        while pos < end:
            n = min(limit, end - pos)
            out.append((pos, n))
            pos += n
        return out

    # -- I/O ------------------------------------------------------------------------------------
    def readinto(self, buf: Any, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), self._size - offset))
        if n == 0:
            return 0
        cmds: list[_Cmd] = [("aio_pread", (mv[pos - offset : pos - offset + length], pos), 0)
                            for pos, length in self._pieces(offset, n, self._max_request)]
        self._run("read", cmds)
        return n

    def write(self, buf: Any, offset: int) -> int:
        return self._write(buf, offset, 0)

    def _write(self, buf: Any, offset: int, flags: int) -> int:
        self._check_writable(offset, memoryview(buf).nbytes)
        mv = memoryview(buf).cast("B")
        self._invalidate(offset, len(mv))
        cmds: list[_Cmd] = [("aio_pwrite", (mv[pos - offset : pos - offset + length], pos), flags)
                            for pos, length in self._pieces(offset, len(mv), self._max_request)]
        if not flags & self._nbd.CMD_FLAG_FUA:
            self._mark_written()
        self._run("write", cmds)
        return len(mv)

    def zero(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        self._check_writable(offset, length)
        if not self._can_zero:
            super().zero(offset, length)
            return
        self._invalidate(offset, length)
        self._mark_written()
        limit = MAX_EFFECT - MAX_EFFECT % max(1, self._min_block)
        pieces = self._pieces(offset, length, limit)
        nbd = self._nbd
        if self._can_fast_zero and self._fast_zero:
            try:
                self._run("zero", [("aio_zero", (n, p), nbd.CMD_FLAG_FAST_ZERO) for p, n in pieces])
                return
            except DeviceIOError as err:
                if err.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                # Zeroing is no faster than writing on this server (doc/proto.md FAST_ZERO):
                # plain WRITE_ZEROES from now on, which still sends no data.
                self._fast_zero = False
        self._run("zero", [("aio_zero", (n, p), 0) for p, n in pieces])

    def flush(self) -> None:
        if self._closed:
            return
        targets = [c for c in self._conns if c.wrote]
        if not targets or not self._can_flush:
            return
        # Every connection that wrote, at once (nbdcopy flushes every handle); the replies to the
        # writes came before, as a flush covers only what was replied to (doc/proto.md).
        for c in targets:
            c.wrote = False
        try:
            self._run("flush", [("aio_flush", (), 0)] * len(targets), conns=targets)
        except BaseException:
            for c in targets:
                c.wrote = True
            raise

    def write_durable(self, buf: Any, offset: int) -> int:
        """Write ``buf`` with ``CMD_FLAG_FUA`` when the server takes it (one command: the server
        replies once the data is on stable storage), else write then ``FLUSH``."""
        if not self._can_fua:
            return super().write_durable(buf, offset)
        return self._write(buf, offset, self._nbd.CMD_FLAG_FUA)

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """Ranges that hold data (not ``STATE_ZERO``) in ``[offset, offset+length)``; ``None`` if unknown."""
        if not self._can_extents:
            return None
        end = min(offset + length, self._size)
        if end <= offset:
            return []
        with self._extents_lock:
            cached = self._extents
            if cached is None or not (cached[0] <= offset and end <= cached[1]) \
                    or time.monotonic() - cached[2] > EXTENT_TTL:
                cached = None
        if cached is None:
            stop = min(self._size, max(end, offset + EXTENT_WINDOW))
            data = self._query_extents(offset, end, stop)
            covered = max(end, data[1])
            cached = (offset, covered, time.monotonic(), data[0])
            with self._extents_lock:
                self._extents = cached
        out = []
        for s, n in cached[3]:
            lo, hi = max(s, offset), min(s + n, end)
            if lo < hi:
                out.append((lo, hi - lo))
        return out

    def _query_extents(self, offset: int, need: int, stop: int) -> tuple[list[tuple[int, int]], int]:
        """Ask BLOCK_STATUS from ``offset`` until at least ``need`` is covered; data ranges and the end."""
        nbd = self._nbd
        data: list[tuple[int, int]] = []
        pos = offset
        zero_bit = nbd.STATE_ZERO
        align = max(1, self._min_block)
        while pos < need:
            count = min(stop - pos, MAX_EFFECT)
            count -= count % align if count > align else 0
            got: list[tuple[int, int, int]] = []

            def extent_cb(meta: str, off: int, entries: list[int], err: Any,
                          got: list[tuple[int, int, int]] = got) -> int:
                if meta == nbd.CONTEXT_BASE_ALLOCATION:
                    p = off
                    for i in range(0, len(entries) - 1, 2):
                        got.append((p, entries[i], entries[i + 1]))
                        p += entries[i]
                return 0

            self._run("block-status", [("aio_block_status", (count, pos, extent_cb), 0)])
            if not got:
                raise DeviceIOError("the server sent no extents", errno=errno.EIO, operation="block-status",
                                    device=self.name)
            for start, n, flags in got:
                if start >= stop:
                    break
                n = min(n, stop - start)
                if not flags & zero_bit and n > 0:
                    if data and data[-1][0] + data[-1][1] == start:
                        data[-1] = (data[-1][0], data[-1][1] + n)
                    else:
                        data.append((start, n))
                pos = start + n
        return data, pos

    def _check_writable(self, offset: int, length: int) -> None:
        if self.read_only:
            why = "the export is read-only" if self._export_ro else "the export is open for reading only"
            raise DeviceIOError(why, errno=errno.EPERM, operation="write", device=self.name)
        if offset + length > self._size:
            raise DeviceIOError("write beyond the end of the export", errno=errno.ENOSPC,
                                operation="write", device=self.name)

    def _mark_written(self) -> None:
        for c in self._conns:
            c.wrote = True

    def _invalidate(self, offset: int, length: int) -> None:
        with self._extents_lock:
            c = self._extents
            if c is not None and offset < c[1] and c[0] < offset + length:
                self._extents = None

    def close(self) -> None:
        """Flush what was written (when the server takes FLUSH), then close every connection.

        Raises ``DeviceIOError`` when the flush fails: the writes may not be durable.
        """
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            # Every pump is told to stop before any is waited for: they wind down together, not
            # one after the other (each stop is a wake-up and a thread switch). The threads told
            # are the ones waited for: a pump that has already cleared its slot may still be
            # running, and close returns only once none is.
            me = threading.current_thread()
            told = []
            for c in self._conns:
                c.kill(errno.ESHUTDOWN)
                told.append(c.tell_pump_to_stop())
            for t in told:
                if t is not None and t is not me:
                    t.join()
            for c in self._conns:
                c.close()
            self._conns = []

    def __repr__(self) -> str:
        return f"<NbdEndpoint {self.name} size={getattr(self, '_size', '?')} connections={len(self._conns)}>"
