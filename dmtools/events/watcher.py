"""The event stream: scan devices when something may have changed, and report what did.

A :class:`Watcher` keeps the last :class:`~dmtools.events.state.DeviceState` of every device in
scope (all devices, or the named ones). It rescans when a uevent arrives, when a device's event
number moves, and every ``poll_interval`` seconds in any case (snapshot usage changes raise no
event, so dmeventd polls too), and turns each difference into typed events with
:func:`~dmtools.events.state.derive`.

With a :class:`~dmtools.events.store.StateStore` the last states are persisted: a watcher started
later first compares the stored states with the devices as they are now and reports what changed
meanwhile (``source="catch-up"``), and nothing it already reported. Each device's new state and
events are committed to the store's journal *before* they are handed out, numbered (``seq``);
:meth:`Watcher.events` hands out those above a cursor and moves it after each, so a stop or a
crash at any point neither loses nor repeats a committed event (the one exception is an event
handed to a consumer that dies with it before the cursor moved: see
:mod:`dmtools.events.delivery` for sinks that close that window).

Devices that came and went between two scans are still reported when a uevent saw them, with the
name udev gave them (``DM_NAME``) or, without udevd, the name read from sysfs when the ``add``
uevent arrived.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

from dmtools.backend import DeviceMapper
from dmtools.closing import Closing
from dmtools.errors import DMError
from dmtools.events.sources import EventNumberWaiter, UEvent, UeventSource
from dmtools.events.state import DEFAULT_THRESHOLDS, DeviceState, capture, derive
from dmtools.events.store import Plan, StateStore
from dmtools.events.types import DeviceAdded, DeviceRemoved, Event

__all__ = ["Watcher", "Batch"]

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """The events of one device from one scan, and the state to remember once they are handled."""

    name: str
    old: DeviceState | None
    new: DeviceState | None
    events: list[Event] = field(default_factory=list)
    renamed_from: str | None = None


class Watcher(Closing):
    """Typed events for the devices of one backend.

    ``names``: watch only these device names (default: every device). ``thresholds``: snapshot
    usage percentages to report crossings of
    (or a function of the device name returning them). ``store``: persisted state for catch-up across
    restarts (it must hold its lock). ``uevents``: listen to uevents (default: on the kernel
    backend, where devices are ``dm-N``). ``event_numbers``: wait on each device's event number.
    """

    def __init__(self, dm: DeviceMapper, *, names: Sequence[str] | None = None,
                 thresholds: Sequence[int] | Callable[[str], Sequence[int]] = DEFAULT_THRESHOLDS,
                 store: StateStore | None = None, poll_interval: float = 1.0, uevents: bool | None = None,
                 event_numbers: bool = True) -> None:
        if poll_interval <= 0:
            raise DMError("poll interval must be positive")
        self.dm = dm
        self.names = tuple(names) if names else None
        self._thresholds = thresholds if callable(thresholds) else tuple(thresholds)
        self.store = store
        self.poll_interval = poll_interval
        self._use_uevents = (dm.backend == "kernel") if uevents is None else uevents
        self._use_event_nr = event_numbers
        self._known: dict[str, DeviceState] = {}
        if store is not None:
            for name in store.names():
                state = store.load(name)
                if state is not None and self._in_scope(name):
                    self._known[name] = state
        self._kick = threading.Event()
        self._lock = threading.Lock()
        self._reasons: set[str] = set()
        self._uevents: list[UEvent] = []
        self._unmatched_adds: dict[str, UEvent] = {}
        self._waiter: EventNumberWaiter | None = None
        self._source: UeventSource | None = None
        self._started = False
        self._caught_up = False
        self._next_seq = 1  # numbering without a store

    # --- scope and state ------------------------------------------------------------------
    def thresholds(self, name: str) -> Sequence[int]:
        """The snapshot usage percentages reported for device ``name``."""
        t = self._thresholds
        return t(name) if callable(t) else t

    def _in_scope(self, name: str) -> bool:
        return self.names is None or name in self.names

    @property
    def known(self) -> dict[str, DeviceState]:
        """The last committed state of each device in scope."""
        return dict(self._known)

    @property
    def uevents_active(self) -> str | None:
        """``"udev"`` or ``"kernel"`` when a uevent listener runs, else ``None``."""
        return self._source.source if self._source is not None else None

    # --- wake-ups -------------------------------------------------------------------------
    def wake(self, reason: str = "poll") -> None:
        """Ask for a rescan now (policies call this after changing a device)."""
        with self._lock:
            self._reasons.add(reason)
        self._kick.set()

    def _on_uevent(self, event: UEvent) -> None:
        with self._lock:
            self._uevents.append(event)
        self.wake(event.source)

    def _on_event_nr(self, name: str, event_nr: int | None) -> None:
        self.wake("event_nr")

    def start(self) -> None:
        """Start the uevent listener and event-number waiters (``events()`` does this)."""
        if self._started:
            return
        self._started = True
        if self._use_uevents:
            try:
                self._source = UeventSource(self._on_uevent)
            except DMError as err:
                log.info("no uevents (%s); using event numbers and polling", err)
        if self._use_event_nr:
            self._waiter = EventNumberWaiter(self.dm, self._on_event_nr)

    def close(self) -> None:
        """Stop listening (the store stays open: its owner closes it)."""
        if self._source is not None:
            self._source.close()
            self._source = None
        if self._waiter is not None:
            self._waiter.close()
            self._waiter = None
        self._started = False

    # --- scanning -------------------------------------------------------------------------
    def current(self) -> dict[str, DeviceState]:
        """Every device in scope as it is now (no events, nothing remembered).

        A device that vanishes between the listing and its capture (removed, or renamed) makes
        the listing repeat, so a rename in that window is not mistaken for a removal.
        """
        out: dict[str, DeviceState] = {}
        for _attempt in range(4):
            vanished = False
            for entry in self.dm.list():
                if entry.name in out or not self._in_scope(entry.name):
                    continue
                state = capture(self.dm, entry.name)
                if state is None:
                    vanished = True
                elif state.name == entry.name:
                    out[state.name] = state
            if not vanished:
                break
        return out

    def scan(self, reason: str = "poll") -> list[Batch]:
        """Read every device in scope and return one batch per device whose events are due.

        Nothing is remembered until each batch is passed to :meth:`commit`.
        """
        if not self._caught_up:
            reason = "catch-up"
        with self._lock:
            uevents, self._uevents = self._uevents, []
        now = time.time()
        current = self.current()
        previous = dict(self._known)
        batches: list[Batch] = []
        gone = [n for n in previous if n not in current]
        new = [n for n in current if n not in previous]
        renames: dict[str, str] = {}
        for gone_name in gone:
            was = previous[gone_name]
            for new_name in new:
                cand = current[new_name]
                if was.devno and cand.devno == was.devno and cand.uuid == was.uuid \
                        and new_name not in renames:
                    renames[new_name] = gone_name
                    break
        pending = {u.devno: u for u in uevents if u.devno}
        for name in sorted(set(previous) | set(current)):
            if name in renames.values() and name not in current:
                continue  # reported under its new name
            old_name = renames.get(name)
            old = previous.get(old_name) if old_name else previous.get(name)
            now_state = current.get(name)
            source = reason
            if reason != "catch-up":
                either = now_state or old
                key = either.devno if either is not None else ""
                if key in pending:
                    source = pending[key].source
                elif old is not None and now_state is not None and old.event_nr != now_state.event_nr:
                    source = "event_nr"
            events = derive(old, now_state, thresholds=self.thresholds(name), source=source, now=now)
            # The first scan hands out every device, changed or not, so policies see them all.
            if events or old != now_state or old_name or (reason == "catch-up" and now_state):
                batches.append(Batch(name, old, now_state, events, old_name))
        batches.extend(self._transient(uevents, previous, current, now))
        self._caught_up = True
        return batches

    def _transient(self, uevents: list[UEvent], previous: dict[str, DeviceState],
                   current: dict[str, DeviceState], now: float) -> list[Batch]:
        """Devices that a uevent saw come and go between two scans."""
        seen = {s.devno for s in previous.values()} | {s.devno for s in current.values()}
        added: dict[str, UEvent] = dict(self._unmatched_adds)
        self._unmatched_adds = {}
        out: list[Batch] = []
        for u in uevents:
            if u.devno in seen:
                added.pop(u.devno, None)
                continue
            if u.action == "add":
                added[u.devno] = u
            elif u.action == "remove" and u.devno in added:
                first = added.pop(u.devno)
                name = first.name or u.name
                if not name or not self._in_scope(name):
                    continue
                uuid = first.uuid or u.uuid
                ev: dict[str, Any] = {"device": name, "uuid": uuid, "devno": u.devno, "source": u.source, "time": now}
                out.append(Batch(name, None, None, [DeviceAdded(**ev), DeviceRemoved(**ev)]))
        # An add whose device no scan saw yet: its remove may come with the next scan's uevents.
        self._unmatched_adds = {devno: u for devno, u in added.items() if devno not in seen}
        return out

    def commit(self, batch: Batch, extra: Sequence[Event] = (),
               plans: Sequence[Plan] = ()) -> tuple[list[Event], list[Plan]]:
        """Remember ``batch.new`` and commit it with the batch's events plus ``extra`` and the
        policy ``plans`` (one journal record with a store); return the events numbered and the
        plans with their ids. Nothing is written when nothing changed."""
        events = [*batch.events, *extra]
        changed = bool(events or plans or batch.renamed_from) or batch.old != batch.new
        if self.store is not None and changed:
            numbered, ided = self.store.commit(batch.name, batch.new, events, plans=plans,
                                               renamed_from=batch.renamed_from)
        else:
            numbered, ided = self.number(events), list(plans)
        if batch.renamed_from:
            self._known.pop(batch.renamed_from, None)
        if batch.old is None and batch.new is None:
            pass  # a transient device: only its events are recorded
        elif batch.new is None:
            self._known.pop(batch.name, None)
            if self._waiter is not None:
                self._waiter.unwatch(batch.name)
        else:
            self._known[batch.name] = batch.new
        if self._waiter is not None and batch.new is not None:
            if batch.renamed_from:
                self._waiter.unwatch(batch.renamed_from)
            self._waiter.watch(batch.name, batch.new.event_nr)
        return numbered, ided

    def number(self, events: Sequence[Event]) -> list[Event]:
        """``events`` numbered by this watcher's own counter (used without a store)."""
        out = [replace(e, seq=self._next_seq + i) for i, e in enumerate(events)]
        self._next_seq += len(out)
        return out

    def pending(self, after: int) -> list[Event]:
        """Events committed by an earlier run and numbered above ``after`` (none without a store).

        Raises ``DMError`` when ``after`` is beyond the store's last event: the consumer holds
        events of another store.
        """
        if self.store is None:
            return []
        if after > self.store.last_seq:
            raise DMError(f"the consumer already has event {after} but the monitor state in "
                          f"{self.store.directory} ends at event {self.store.last_seq}: "
                          "not the same monitor state", errno=errno.EINVAL, operation="monitor")
        return self.store.pending(after)

    def _watch_all(self) -> None:
        if self._waiter is None:
            return
        for name, state in self._known.items():
            self._waiter.watch(name, state.event_nr)

    def poll(self, reason: str = "poll") -> list[Event]:
        """Scan once, remember the result, and return the events in order (with a store, first
        those an earlier run committed but did not hand out; the cursor then moves past all)."""
        cursor = self.store.cursor() if self.store is not None else 0
        out: list[Event] = self.pending(cursor)
        for batch in self.scan(reason):
            out.extend(self.commit(batch)[0])
        if out:
            self._advance(out[-1].seq, cursor)
        return out

    def wait(self, timeout: float) -> str | None:
        """Block until a wake-up or ``timeout``; return the reason (``None`` on timeout)."""
        self._kick.wait(timeout)
        with self._lock:
            self._kick.clear()
            reasons, self._reasons = self._reasons, set()
        if not reasons:
            return None
        for preferred in ("udev", "uevent", "event_nr"):
            if preferred in reasons:
                return preferred
        return sorted(reasons)[0]

    def batches(self, *, timeout: float | None = None, stop: threading.Event | None = None) -> Iterator[Batch]:
        """Batches as they happen, each to be passed to :meth:`commit` by the caller.

        The first scan catches up with the stored state. Ends after ``timeout`` seconds or when
        ``stop`` is set (checked at least every ``poll_interval``).
        """
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        first = True
        while True:
            if stop is not None and stop.is_set():
                return
            if first:
                reason = "poll"  # "catch-up" unless this watcher already scanned
                first = False
            else:
                wait = self.poll_interval
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return
                reason = self.wait(wait) or "poll"
            self._watch_all()
            yield from self.scan(reason)

    def events(self, *, timeout: float | None = None, stop: threading.Event | None = None,
               after: int | None = None) -> Iterator[Event]:
        """Events as they happen, each committed before it is handed out.

        With a store: first the events an earlier run committed but did not hand out (those above
        ``after``, by default the store's cursor), and the cursor moves past each event as soon as
        the caller asks for the next one or closes the generator.
        """
        written = after if after is not None else (self.store.cursor() if self.store else 0)
        taken = written
        try:
            for event in self.pending(written):
                taken = event.seq
                yield event
                written = self._advance(taken, written)
            for batch in self.batches(timeout=timeout, stop=stop):
                for event in self.commit(batch)[0]:
                    taken = event.seq
                    yield event
                    written = self._advance(taken, written)
        finally:
            self._advance(taken, written)

    def _advance(self, taken: int, written: int) -> int:
        """Move the store's cursor to ``taken`` (an event the consumer has); return it."""
        if self.store is not None and self.store.locked and taken > written:
            self.store.set_cursor(taken)
            return taken
        return written
