"""Publishing events to several listeners: what the userspace daemon offers its clients.

An :class:`EventHub` runs one :class:`~dmtools.events.watcher.Watcher` over a backend (the daemon's
engine) in a thread and hands every event to each :class:`Subscription`. A subscriber that falls
behind by more than ``max_queue`` events loses the oldest ones and is told how many
(``Subscription.lost``), so a slow client never stalls the daemon.

Wire form (one JSON object per line, as the daemon's control protocol): :func:`write_event` and
:func:`read_events`. A daemon serves a ``{"verb": "subscribe"}`` request by calling
``hub.stream(sock.makefile("wb"))`` in the connection's thread until the client hangs up;
:func:`subscribe` is the client side.
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import threading
from typing import Any, BinaryIO, Iterator, Sequence

from dmtools.backend import DeviceMapper
from dmtools.errors import DMError
from dmtools.events.state import DEFAULT_THRESHOLDS
from dmtools.events.types import Event
from dmtools.events.watcher import Watcher

__all__ = ["EventHub", "Subscription", "write_event", "read_events", "subscribe"]

log = logging.getLogger(__name__)


class Subscription:
    """One listener's queue of events."""

    def __init__(self, hub: "EventHub", max_queue: int) -> None:
        self._hub = hub
        self._queue: collections.deque[Event] = collections.deque()
        self._max = max_queue
        self._cond = threading.Condition()
        self._closed = False
        #: events dropped because this subscriber fell behind.
        self.lost = 0

    def _put(self, event: Event) -> None:
        with self._cond:
            if self._closed:
                return
            if len(self._queue) >= self._max:
                self._queue.popleft()
                self.lost += 1
            self._queue.append(event)
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or ``None`` after ``timeout`` seconds or once closed."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._queue) or self._closed, timeout)
            return self._queue.popleft() if self._queue else None

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.get()
            if event is None:
                return
            yield event

    @property
    def closed(self) -> bool:
        """True once closed (by the subscriber or by the hub stopping)."""
        return self._closed

    def close(self) -> None:
        """Stop receiving events."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._hub._drop(self)


class EventHub:
    """A watcher thread over ``dm`` whose events go to every subscriber."""

    def __init__(self, dm: DeviceMapper, *, thresholds: Sequence[int] = DEFAULT_THRESHOLDS,
                 poll_interval: float = 0.5, max_queue: int = 1024) -> None:
        self._watcher = Watcher(dm, thresholds=thresholds, poll_interval=poll_interval)
        self._max_queue = max_queue
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start watching (idempotent)."""
        if self._thread is not None:
            return
        # Devices that exist before the hub starts are its baseline, not news.
        for batch in self._watcher.scan("catch-up"):
            self._watcher.commit(batch)
        self._thread = threading.Thread(target=self._run, name="dmtools-event-hub", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self._watcher.events(stop=self._stop):
                self.publish(event)
        except Exception:  # noqa: BLE001 - the daemon keeps serving I/O without events
            log.exception("event hub stopped")

    def publish(self, event: Event) -> None:
        """Hand ``event`` to every subscriber (also for events the daemon raises itself)."""
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            sub._put(event)

    def subscribe(self) -> Subscription:
        """A new subscription; events from now on."""
        sub = Subscription(self, self._max_queue)
        with self._lock:
            self._subs.append(sub)
        return sub

    @property
    def subscribers(self) -> int:
        """How many subscriptions are open."""
        with self._lock:
            return len(self._subs)

    def _drop(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def wake(self) -> None:
        """Rescan now (the daemon calls this after each verb that changes a device)."""
        self._watcher.wake("poll")

    def stream(self, out: BinaryIO, *, heartbeat: float = 5.0) -> None:
        """Write events to ``out`` as JSON lines until it fails (the client hung up) or the hub stops.

        A ``{"event": "heartbeat"}`` line every ``heartbeat`` idle seconds detects dead clients.
        """
        sub = self.subscribe()
        try:
            while not self._stop.is_set():
                event = sub.get(timeout=heartbeat)
                try:
                    if event is None:
                        out.write(b'{"event":"heartbeat"}\n')
                    else:
                        write_event(out, event)
                    out.flush()
                except (OSError, ValueError):
                    return
        finally:
            sub.close()

    def close(self) -> None:
        """Stop the thread and close every subscription."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._watcher.poll_interval + 10)
            self._thread = None
        self._watcher.close()
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            sub.close()


def write_event(out: BinaryIO, event: Event) -> None:
    """Write one event as a JSON line."""
    out.write(json.dumps(event.to_dict(), separators=(",", ":")).encode() + b"\n")


def read_events(stream: BinaryIO) -> Iterator[Event]:
    """Events from a JSON-lines stream (heartbeats skipped) until it ends."""
    for line in stream:
        try:
            data: Any = json.loads(line)
        except ValueError as err:
            raise DMError(f"malformed event line: {err}") from err
        if isinstance(data, dict) and data.get("event") == "heartbeat":
            continue
        yield Event.from_dict(data)


def subscribe(socket_path: str, *, timeout: float | None = None) -> Iterator[Event]:
    """Connect to a daemon's control socket, ask for its events and yield them as they come.

    Ends when the daemon closes the stream; with ``timeout`` a silent daemon (no event and no
    heartbeat for that long) raises ``DMError``. Raises ``DaemonError`` when it cannot connect.
    """
    from dmtools.engine import rundir
    from dmtools.errors import DaemonError

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            rundir.connect(sock, socket_path)
        except OSError as err:
            raise DaemonError(f"cannot reach the dmtools daemon at {socket_path}: {err.strerror or err}",
                              errno=err.errno, operation="subscribe") from err
        sock.settimeout(timeout)
        sock.sendall(json.dumps({"verb": "subscribe", "args": {}}).encode() + b"\n")
        with sock.makefile("rb") as stream:
            try:
                yield from read_events(stream)
            except (socket.timeout, TimeoutError) as err:
                raise DMError("no event or heartbeat from the daemon in time", operation="subscribe") from err
    finally:
        sock.close()
