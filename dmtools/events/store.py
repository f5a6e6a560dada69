"""Persisted monitor state: each device's last state, its recent events, and the event journal.

Under ``<root>/<backend>/`` (``/run/dmtools/monitor/kernel/`` as root):

- ``journal``: the append-only :class:`~dmtools.events.journal.Journal`. Every change a monitor
  reports is committed there first, as one record holding the device's new state *and* its events,
  each event numbered with a sequence number (``seq``, 1, 2, 3, … per store, never reused). The
  record is the commit point: before it, the change was not seen (a restart derives it again from
  the stored state); after it, the change is known and numbered, so it is handed out exactly once
  (a consumer that already has ``seq`` N skips it; :meth:`StateStore.pending` hands out the rest).
- ``NAME.json``: one file per device, a checkpoint of the journal (state, the last
  ``RECENT_EVENTS`` events, the number of the last record applied), replaced atomically (write,
  rename). A restart re-applies journal records the checkpoints missed (applying is idempotent),
  so a checkpoint taking in a record is not fsynced; one recording a state change that no event
  explains (usage moving between thresholds) is, and so is every checkpoint before the journal is
  compacted. A removed device keeps a file with ``"state": null`` so its last
  events stay readable.
- ``cursor``: the ``seq`` of the last event handed to a consumer that cannot be asked itself
  (a pipe, a Python generator's caller); see :mod:`dmtools.events.delivery`.

Policy actions are journaled as *plans* in the record of the events that caused them, then
``started`` and ``done`` records, so a restart runs a plan that never started and reports one that
was interrupted (outcome unknown) instead of losing it.

An exclusive ``flock`` on ``.lock`` keeps two monitors from reporting the same changes; read-only
users (``--once`` while a monitor runs, ``snapshot status``) read without the lock and never
repair anything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence
from urllib.parse import quote, unquote

from dmtools.closing import Closing
from dmtools.errors import DMError
from dmtools.events.defaults import default_root
from dmtools.events.journal import Journal, atomic_replace, fsync_path, read_records
from dmtools.events.state import DeviceState
from dmtools.events.types import Event

__all__ = ["StateStore", "default_root", "last_events", "RECENT_EVENTS", "Plan", "JOURNAL_LIMIT"]

#: Events kept per device in its checkpoint for ``last_events``.
RECENT_EVENTS = 32
#: Journal size beyond which a fully delivered journal is rewritten (only open plans kept).
JOURNAL_LIMIT = 256 << 10
_JOURNAL = "journal"
_CURSOR = "cursor"


@dataclass(frozen=True)
class Plan:
    """A policy action decided for a device, journaled before it runs.

    ``id`` is given by :meth:`StateStore.commit`; ``args`` is what the policy needs to run it
    later (JSON values only); ``started`` is set once a ``started`` record was committed.
    """

    device: str
    policy: str
    action: str
    args: dict[str, Any]
    id: str = ""
    started: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "policy": self.policy, "action": self.action, "args": self.args}

    @classmethod
    def from_dict(cls, device: str, data: dict[str, Any]) -> "Plan":
        return cls(device, str(data["policy"]), str(data["action"]), dict(data.get("args") or {}), str(data["id"]))


def _checkpoint_ok(data: Any) -> bool:
    """A checkpoint as ``_checkpoint`` writes it (``recent`` a list of objects with integer
    ``seq``, ``applied`` an integer); a damaged or foreign one is treated as absent."""
    if not isinstance(data, dict):
        return False
    recent, applied = data.get("recent", []), data.get("applied", 0)
    if not isinstance(applied, int) or isinstance(applied, bool) or not isinstance(recent, list):
        return False
    return all(isinstance(e, dict) and isinstance(e.get("seq", 0) or 0, int) for e in recent)


def _atomic_write(path: str, data: Any, *, durable: bool = True) -> None:
    atomic_replace(path, json.dumps(data, sort_keys=True).encode(), durable=durable)


def _events_of(record: dict[str, Any]) -> Iterator[Event]:
    for item in record.get("events", ()):
        try:
            yield Event.from_dict(item)
        except DMError:
            continue


class StateStore(Closing):
    """Device states, recent events and the event journal of one backend, on disk.

    ``lock=True`` takes the store's exclusive lock (raises ``DMError`` with ``EBUSY`` when another
    monitor holds it), opens the journal and re-applies the records its checkpoints missed;
    without it the store can only be read.
    """

    def __init__(self, backend: str, root: str | None = None, *, lock: bool = False) -> None:
        if not backend or "/" in backend or backend.startswith("."):
            raise DMError(f"bad backend name for the monitor state: {backend!r}", errno=errno.EINVAL)
        self.directory = os.path.join(root or default_root(), backend)
        self._lock_fd: int | None = None
        self._journal: Journal | None = None
        self._next_seq = 1
        if lock:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.directory, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise DMError(f"another monitor is running (it holds {self.directory}/.lock)",
                                  errno=errno.EBUSY, operation="monitor") from err
                raise
            self._lock_fd = fd
            try:
                self._open_journal()
            except BaseException:
                self.close()
                raise

    @property
    def locked(self) -> bool:
        """True when this store holds the lock (and may be written)."""
        return self._lock_fd is not None

    def _writable(self) -> Journal:
        if self._journal is None:
            raise DMError("the monitor state is read-only here (lock not held)", errno=errno.EROFS, operation="monitor")
        return self._journal

    # --- checkpoints ------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return os.path.join(self.directory, quote(name, safe="") + ".json")

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            with open(self._path(name), encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # a foreign file: treat the device as never seen
        return data if _checkpoint_ok(data) else None

    def _files(self) -> Iterator[str]:
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.endswith(".json") and not entry.startswith("."):
                yield unquote(entry[: -len(".json")])

    def names(self) -> list[str]:
        """Devices with a stored state (tombstones of removed devices excluded)."""
        out = []
        for name in self._files():
            data = self._read(name)
            if data is not None and data.get("state") is not None:
                out.append(name)
        return sorted(out)

    def load(self, name: str) -> DeviceState | None:
        """The last state stored for ``name`` (``None``: never seen, or removed)."""
        data = self._read(name)
        if data is None or data.get("state") is None:
            return None
        try:
            return DeviceState.from_dict(data["state"])
        except DMError:
            return None

    def recent(self, name: str) -> list[Event]:
        """The events stored for ``name``, oldest first, including journal records that its
        checkpoint has not taken in yet (a reader may look while a monitor commits)."""
        data = self._read(name) or {}
        items = list(data.get("recent", []))
        applied = int(data.get("applied", 0))
        records = self._journal.records if self._journal is not None else \
            read_records(os.path.join(self.directory, _JOURNAL))
        for record in records:
            if record.get("device") == name and record["r"] > applied:
                items.extend(record.get("events", ()))
        out: list[Event] = []
        for item in items:
            try:
                out.append(Event.from_dict(item))
            except DMError:
                continue
        return out

    def _checkpoint(self, name: str, state: Any, recent: list[Any], applied: int, *, durable: bool = True) -> None:
        """Replace ``name``'s checkpoint; not ``durable`` when the journal holds what it adds
        (:meth:`compact` makes every checkpoint durable before it drops journal records)."""
        _atomic_write(self._path(name), {"state": state, "recent": recent[-RECENT_EVENTS:], "applied": applied},
                      durable=durable)

    def _apply(self, record: dict[str, Any]) -> None:
        """Take ``record`` into its device's checkpoint (no-op when already taken)."""
        name = record.get("device")
        if not isinstance(name, str) or not ("state" in record or record.get("events")):
            return
        r = int(record["r"])
        data = self._read(name)
        old = record.get("renamed_from")
        old_data = self._read(old) if old else None
        if old_data is not None and int(old_data.get("applied", 0)) >= r:
            old_data = None  # a later device of that name
        if data is None or int(data.get("applied", 0)) < r:
            previous = (old_data if old_data is not None else data) or {}  # a rename keeps history
            state = record["state"] if "state" in record else previous.get("state")
            self._checkpoint(name, state,
                             list(previous.get("recent", [])) + list(record.get("events", [])), r,
                             durable=False)
        if old and old_data is not None:  # after the new checkpoint: a kill between redoes this
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(old))

    def save(self, name: str, state: DeviceState | None, events: list[Event]) -> None:
        """Write ``name``'s checkpoint directly: ``state`` (``None``: removed) and ``events``
        appended as given (no journal record, no numbering: for importing history and tests)."""
        self._writable()
        data = self._read(name) or {}
        self._checkpoint(name, state.to_dict() if state is not None else None,
                         list(data.get("recent", [])) + [e.to_dict() for e in events], int(data.get("applied", 0)))

    # --- the journal ------------------------------------------------------------------------
    def _open_journal(self) -> None:
        journal = Journal(os.path.join(self.directory, _JOURNAL))
        records = journal.open()
        self._journal = journal
        next_seq = 1
        for record in records:
            next_seq = max(next_seq, int(record.get("base_seq", 0)))
            for item in record.get("events", ()):
                next_seq = max(next_seq, int(item.get("seq", 0)) + 1)
        for name in self._files():  # a journal lost or deleted by hand: never reuse numbers
            for item in (self._read(name) or {}).get("recent", []):
                if isinstance(item, dict):
                    next_seq = max(next_seq, int(item.get("seq", 0) or 0) + 1)
        next_seq = max(next_seq, self.cursor() + 1)
        self._next_seq = next_seq
        for record in records:
            self._apply(record)

    @property
    def last_seq(self) -> int:
        """The sequence number of the last event committed (0: none yet)."""
        return self._next_seq - 1

    def _number(self, events: Sequence[Event]) -> list[Event]:
        out = []
        for event in events:
            out.append(replace(event, seq=self._next_seq))
            self._next_seq += 1
        return out

    def commit(self, name: str, state: DeviceState | None, events: Sequence[Event], *,
               renamed_from: str | None = None, plans: Sequence[Plan] = ()) -> tuple[list[Event], list[Plan]]:
        """Commit ``name``'s new ``state`` (``None``: removed) with
        ``events`` and ``plans`` in one journal record; return them numbered (events' ``seq``,
        plans' ``id``). Durable when this returns."""
        journal = self._writable()
        if not events and not plans and not renamed_from:
            # A change that explains itself by no event (usage moving between thresholds) needs
            # no numbering: the checkpoint alone, as durable, keeps the next comparison right.
            data = self._read(name) or {}
            self._checkpoint(name, state.to_dict() if state is not None else None,
                             list(data.get("recent", [])), int(data.get("applied", 0)))
            return [], []
        r = journal.next_r
        numbered = self._number(events)
        ided = [replace(p, id=f"{r}.{i}") for i, p in enumerate(plans)]
        record: dict[str, Any] = {"device": name, "events": [e.to_dict() for e in numbered],
                                  "state": state.to_dict() if state is not None else None}
        if renamed_from:
            record["renamed_from"] = renamed_from
        if ided:
            record["plans"] = [p.to_dict() for p in ided]
        try:
            self._apply(journal.append(record))
        except BaseException:
            self._next_seq -= len(numbered)  # nothing was committed
            raise
        return numbered, ided

    def start(self, plan: Plan) -> Plan:
        """Record that ``plan`` is about to run (a restart then reports it as interrupted)."""
        self._writable().append({"device": plan.device, "started": plan.id})
        return replace(plan, started=True)

    def finish(self, plan: Plan, events: Sequence[Event]) -> list[Event]:
        """Record that ``plan`` ran, with the ``events`` that report it; return them numbered."""
        journal = self._writable()
        numbered = self._number(events)
        record = {"device": plan.device, "done": plan.id, "events": [e.to_dict() for e in numbered]}
        try:
            self._apply(journal.append(record))
        except BaseException:
            self._next_seq -= len(numbered)
            raise
        return numbered

    def open_plans(self) -> list[Plan]:
        """Plans committed but not finished, oldest first (``started`` tells which had begun)."""
        journal = self._writable()
        done = {rec["done"] for rec in journal.records if "done" in rec}
        started = {rec["started"] for rec in journal.records if "started" in rec}
        out = []
        for rec in journal.records:
            for item in rec.get("plans", ()):
                if item.get("id") not in done:
                    plan = Plan.from_dict(str(rec.get("device", "")), item)
                    out.append(replace(plan, started=plan.id in started))
        return out

    def pending(self, after: int) -> list[Event]:
        """Committed events numbered above ``after``, in order (those a consumer lacks)."""
        journal = self._writable()
        out = [e for rec in journal.records for e in _events_of(rec) if e.seq > after]
        return sorted(out, key=lambda e: e.seq)

    def compact(self, delivered: int, *, limit: int = JOURNAL_LIMIT) -> bool:
        """Rewrite the journal without what is no longer needed (records whose events are all at
        or below ``delivered`` and whose plans are finished) once it exceeds ``limit`` bytes."""
        journal = self._writable()
        if journal.size() <= limit:
            return False
        open_ids = {p.id for p in self.open_plans()}
        keep = []
        for rec in journal.records:
            if "base_r" in rec:
                continue
            if any(int(e.get("seq", 0)) > delivered for e in rec.get("events", ())) \
                    or any(p.get("id") in open_ids for p in rec.get("plans", ())) \
                    or rec.get("started") in open_ids:
                keep.append(rec)
        for name in self._files():  # what the dropped records hold must outlive a power cut
            with contextlib.suppress(FileNotFoundError):
                fsync_path(self._path(name))
        fsync_path(self.directory)
        journal.rewrite(keep, {"base_seq": self._next_seq})
        return True

    # --- the delivery cursor ----------------------------------------------------------------
    def cursor(self) -> int:
        """The ``seq`` of the last event a cursor-tracked consumer took (0: none)."""
        try:
            with open(os.path.join(self.directory, _CURSOR), encoding="utf-8") as f:
                return int(json.load(f).get("seq", 0))
        except (OSError, ValueError, AttributeError, TypeError, OverflowError):
            return 0

    def set_cursor(self, seq: int) -> None:
        """Record that events up to ``seq`` were taken (atomic and durable)."""
        self._writable()
        _atomic_write(os.path.join(self.directory, _CURSOR), {"seq": int(seq)})

    def close(self) -> None:
        """Close the journal and release the lock."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def last_events(name: str, backend: str, count: int = 5, root: str | None = None) -> list[Event]:
    """The last ``count`` events a monitor recorded for device ``name`` (for ``… status``)."""
    return StateStore(backend, root).recent(name)[-count:] if count > 0 else []
