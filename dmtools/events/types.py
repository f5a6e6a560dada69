"""Typed device-mapper events: what changed on a device, as immutable values.

Every event names its device (``device``, plus ``uuid`` and ``devno`` when known), says how it was
noticed (``source``: ``udev`` for udevd's uevents, ``uevent`` for the kernel's raw uevents,
``event_nr`` for a device event counter that moved, ``poll`` for a periodic status read, ``catch-up``
for a change that happened while no monitor watched, ``policy`` for an action a monitor policy took)
and when (``time``, seconds since the epoch). A monitor with a state store numbers the events it
commits (``seq``: 1, 2, 3, … never reused, see :mod:`dmtools.events.store`); ``0`` means not
numbered. ``to_dict()``/``Event.from_dict()`` give the JSON
form used by ``dmtools monitor --json`` and by the userspace daemon's event stream.

The kernel raises a device event (``dm_table_event`` in drivers/md/dm-table.c) when a snapshot is
invalidated (dm-snap.c ``__invalidate_snapshot``), when a mirror leg fails with ``handle_errors`` and
when a mirror's resync completes (dm-raid1.c ``fail_mirror``, ``do_recovery``); snapshot usage moves
without events, which is why dmeventd polls it (every 10 s) and so do we.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dmtools.errors import InvalidArgument

__all__ = [
    "Severity",
    "Event",
    "TargetEvent",
    "DeviceAdded",
    "DeviceRemoved",
    "DeviceSuspended",
    "DeviceResumed",
    "DeviceRenamed",
    "SnapshotUsageCrossed",
    "SnapshotInvalidated",
    "SnapshotOverflowed",
    "MergeFinished",
    "MergeFailed",
    "LegHealthChanged",
    "LogHealthChanged",
    "ResyncFinished",
    "PolicyAction",
    "EVENT_TYPES",
]


class Severity(enum.Enum):
    """How much an event matters to a person watching."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every event: which device, how it was noticed, and when."""

    #: the event's name in JSON (``"event"`` key) and in text output.
    kind: ClassVar[str] = "event"
    #: ``describe()`` of an event whose text has no fields, and ``severity`` unless it depends on them.
    summary: ClassVar[str] = ""
    level: ClassVar[Severity] = Severity.INFO

    device: str
    uuid: str = ""
    devno: str = ""
    source: str = "poll"
    time: float = field(default_factory=time.time)
    seq: int = 0

    @property
    def severity(self) -> Severity:
        """How serious the event is."""
        return self.level

    def describe(self) -> str:
        """A one-line description for people (without the device name)."""
        return self.summary or self.kind

    def __str__(self) -> str:
        return f"{self.device}: {self.describe()}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{"event": kind, "severity": ..., "message": ..., <fields>}``."""
        data: dict[str, Any] = {"event": self.kind, "severity": self.severity.value, "message": self.describe()}
        data.update(dataclasses.asdict(self))
        return data

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "Event":
        """Rebuild an event from ``to_dict()``'s output; raises ``InvalidArgument`` for garbage."""
        if not isinstance(data, dict):
            raise InvalidArgument(f"an event is a JSON object, not {type(data).__name__}")
        cls = EVENT_TYPES.get(str(data.get("event")))
        if cls is None:
            raise InvalidArgument(f"unknown event kind {data.get('event')!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as err:
            raise InvalidArgument(f"malformed {cls.kind} event: {err}") from err


@dataclass(frozen=True, kw_only=True)
class TargetEvent(Event):
    """An event about one target of a device's table: ``target_start`` is its sector in the table."""

    target_start: int = 0


# --- device lifecycle -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DeviceAdded(Event):
    """A device appeared (dm ``add`` uevent, or first seen by a scan)."""

    kind: ClassVar[str] = "device-added"
    summary: ClassVar[str] = "device added"


@dataclass(frozen=True, kw_only=True)
class DeviceRemoved(Event):
    """A device went away (dm ``remove`` uevent, or missing from a scan)."""

    kind: ClassVar[str] = "device-removed"
    summary: ClassVar[str] = "device removed"


@dataclass(frozen=True, kw_only=True)
class DeviceSuspended(Event):
    """A device was suspended: its I/O is held (no uevent exists for this; scans see it)."""

    kind: ClassVar[str] = "device-suspended"
    summary: ClassVar[str] = "device suspended"


@dataclass(frozen=True, kw_only=True)
class DeviceResumed(Event):
    """A device was resumed (dm ``change`` uevent); ``table_changed`` when a new table went live."""

    kind: ClassVar[str] = "device-resumed"

    table_changed: bool = False

    def describe(self) -> str:
        return "device resumed with a new table" if self.table_changed else "device resumed"


@dataclass(frozen=True, kw_only=True)
class DeviceRenamed(Event):
    """A device was renamed from ``old_name`` (same device number and uuid)."""

    kind: ClassVar[str] = "device-renamed"

    old_name: str = ""

    def describe(self) -> str:
        return f"device renamed from {self.old_name}"


# --- snapshots --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SnapshotUsageCrossed(TargetEvent):
    """A snapshot's COW usage rose past ``threshold`` percent (dmeventd's 80/85/90/95 warnings).

    ``allocated`` and ``total`` are sectors as the status line reports them; ``target_start`` is
    the sector of the snapshot target within the device's table.
    """

    kind: ClassVar[str] = "snapshot-usage"
    level: ClassVar[Severity] = Severity.WARNING

    threshold: int
    percent: float
    allocated: int = 0
    total: int = 0

    def describe(self) -> str:
        return (f"snapshot is {self.percent:.1f}% full (crossed {self.threshold}%; "
                f"{self.allocated}/{self.total} sectors)")


@dataclass(frozen=True, kw_only=True)
class SnapshotInvalidated(TargetEvent):
    """The snapshot became ``Invalid``: its COW filled up or an I/O error hit it; every I/O to it
    now fails while the origin keeps working. ``last_percent`` is the usage last seen valid."""

    kind: ClassVar[str] = "snapshot-invalidated"
    level: ClassVar[Severity] = Severity.ERROR

    last_percent: float | None = None

    def describe(self) -> str:
        seen = "" if self.last_percent is None else f"; last seen {self.last_percent:.1f}% full"
        return f"snapshot is INVALID (COW full or I/O error){seen}"


@dataclass(frozen=True, kw_only=True)
class SnapshotOverflowed(TargetEvent):
    """A ``PO`` snapshot ran out of COW space: ``Overflow``; writes to it fail, reads work."""

    kind: ClassVar[str] = "snapshot-overflowed"
    summary: ClassVar[str] = "snapshot OVERFLOWED (writes to it fail, reads still work)"
    level: ClassVar[Severity] = Severity.ERROR


@dataclass(frozen=True, kw_only=True)
class MergeFinished(TargetEvent):
    """A ``snapshot-merge`` target finished: allocated == metadata (Documentation snapshot.rst)."""

    kind: ClassVar[str] = "merge-finished"
    summary: ClassVar[str] = "snapshot merge finished"


@dataclass(frozen=True, kw_only=True)
class MergeFailed(TargetEvent):
    """A ``snapshot-merge`` target stopped on an error (``Merge failed``)."""

    kind: ClassVar[str] = "merge-failed"
    summary: ClassVar[str] = "snapshot merge FAILED (retry the merge or inspect manually)"
    level: ClassVar[Severity] = Severity.ERROR


# --- mirrors ----------------------------------------------------------------------------------


_LETTERS = {"A": "alive", "F": "flush failed", "D": "dead (write failed)",
            "S": "resync failed", "R": "read failed", "U": "unknown error"}


@dataclass(frozen=True, kw_only=True)
class LegHealthChanged(TargetEvent):
    """A mirror leg's health letter changed (dm-raid1.c ``device_status_char``: A F D S R U)."""

    kind: ClassVar[str] = "mirror-leg-health"

    leg: int
    leg_device: str
    old: str
    new: str

    @property
    def failed(self) -> bool:
        """True when the leg now reports an error."""
        return self.new != "A"

    @property
    def severity(self) -> Severity:
        if self.new == "A":
            return Severity.INFO
        return Severity.WARNING if self.new == "R" else Severity.ERROR

    def describe(self) -> str:
        what = "FAILED" if self.failed else "recovered"
        return (f"mirror leg {self.leg} ({self.leg_device}) {what}: "
                f"{self.old} -> {self.new} ({_LETTERS.get(self.new, self.new)})")


@dataclass(frozen=True, kw_only=True)
class LogHealthChanged(TargetEvent):
    """A mirror's disk log health letter changed (dm-log.c ``disk_status``: A F D)."""

    kind: ClassVar[str] = "mirror-log-health"

    log_device: str
    old: str
    new: str

    @property
    def severity(self) -> Severity:
        return Severity.INFO if self.new == "A" else Severity.ERROR

    def describe(self) -> str:
        return f"mirror log {self.log_device} health {self.old} -> {self.new}"


@dataclass(frozen=True, kw_only=True)
class ResyncFinished(TargetEvent):
    """Every region of a mirror is in sync again (dm-raid1.c raises an event at that point)."""

    kind: ClassVar[str] = "mirror-resync-finished"

    regions: int = 0

    def describe(self) -> str:
        return f"mirror in sync ({self.regions} regions)"


# --- policies ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PolicyAction(Event):
    """What a monitor policy did about a device (``ok`` False when the action failed)."""

    kind: ClassVar[str] = "policy"

    policy: str
    action: str
    ok: bool = True
    detail: str = ""

    @property
    def severity(self) -> Severity:
        return Severity.INFO if self.ok else Severity.ERROR

    def describe(self) -> str:
        state = "" if self.ok else " FAILED"
        return f"{self.policy}: {self.action}{state}" + (f": {self.detail}" if self.detail else "")


#: Every event class by its ``kind``.
EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (DeviceAdded, DeviceRemoved, DeviceSuspended, DeviceResumed, DeviceRenamed,
                SnapshotUsageCrossed, SnapshotInvalidated, SnapshotOverflowed, MergeFinished,
                MergeFailed, LegHealthChanged, LogHealthChanged, ResyncFinished, PolicyAction)
}
