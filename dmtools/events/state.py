"""What a monitor remembers of a device, and the events that follow from two such memories.

``capture(dm, name)`` reads a device's info, live table and status into a :class:`DeviceState`;
``derive(old, new)`` compares two states of the same device name and returns the events that
explain the difference, in a fixed order (lifecycle first, then each target in table order, and
within a snapshot the thresholds crossed in increasing order). ``derive`` is pure, so the same
function drives a live monitor, catches up after a restart (old = the persisted state) and is
tested on literal status texts.

A device seen for the first time is compared with a *pristine* one of the same table: an empty
snapshot, mirror legs all ``A``, a mirror already in sync. So a monitor started over a snapshot that
is 87 % full reports the 80 and 85 % crossings once, and one started over a degraded mirror reports
the failed leg once; the persisted state then prevents repeats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from dmtools.backend import DeviceMapper
from dmtools.errors import DeviceNotFound, InvalidArgument, InvalidStatus
from dmtools.events.defaults import DEFAULT_THRESHOLDS
from dmtools.events.types import (DeviceAdded, DeviceRemoved, DeviceRenamed, DeviceResumed, DeviceSuspended, Event,
                                  LegHealthChanged, LogHealthChanged, MergeFailed, MergeFinished, ResyncFinished,
                                  SnapshotInvalidated, SnapshotOverflowed, SnapshotUsageCrossed)
from dmtools.status import MirrorStatus, SnapshotState, SnapshotStatus, TargetStatus, ThinPoolStatus, parse_status

__all__ = ["TargetState", "DeviceState", "capture", "derive", "DEFAULT_THRESHOLDS", "parse_thresholds"]

def parse_thresholds(text: str | Iterable[int]) -> tuple[int, ...]:
    """``"80,85,90,95"`` (or integers) as a sorted tuple of distinct percentages in 1..100."""
    if isinstance(text, str):
        words = [w for w in text.replace(" ", "").split(",") if w]
        try:
            values = [int(w) for w in words]
        except ValueError as err:
            raise InvalidArgument(f"thresholds are integer percentages, not {text!r}") from err
    else:
        values = [int(v) for v in text]
    for v in values:
        if not 1 <= v <= 100:
            raise InvalidArgument(f"threshold {v}% is outside 1..100")
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class TargetState:
    """One table line: where it sits, its type, its table parameters and its status text."""

    start: int
    length: int
    target_type: str
    table: str
    status: str

    def parsed(self) -> TargetStatus | None:
        """The parsed status (``None`` when the text does not parse)."""
        try:
            return parse_status(self.target_type, self.status)
        except InvalidStatus:
            return None

    def snapshot(self) -> SnapshotStatus | None:
        """The parsed status of a ``snapshot``/``snapshot-merge`` line (``None`` otherwise)."""
        status = self.parsed()
        return status if isinstance(status, SnapshotStatus) else None

    def mirror(self) -> MirrorStatus | None:
        """The parsed status of a ``mirror`` line (``None`` otherwise)."""
        status = self.parsed()
        return status if isinstance(status, MirrorStatus) else None

    def thin_pool(self) -> ThinPoolStatus | None:
        """The parsed status of a ``thin-pool`` line (``None`` otherwise)."""
        status = self.parsed()
        return status if isinstance(status, ThinPoolStatus) else None

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "length": self.length, "type": self.target_type,
                "table": self.table, "status": self.status}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TargetState":
        return cls(int(data["start"]), int(data["length"]), str(data["type"]),
                   str(data.get("table", "")), str(data.get("status", "")))


@dataclass(frozen=True)
class DeviceState:
    """A device as a scan saw it."""

    name: str
    uuid: str = ""
    devno: str = ""
    event_nr: int = 0
    suspended: bool = False
    targets: tuple[TargetState, ...] = field(default=())

    @property
    def table_text(self) -> str:
        """The live table as text (empty without one)."""
        return "\n".join(f"{t.start} {t.length} {t.target_type} {t.table}".rstrip() for t in self.targets)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what the monitor persists and prints with ``--once --json``)."""
        return {"name": self.name, "uuid": self.uuid, "devno": self.devno,
                "event_nr": self.event_nr, "suspended": self.suspended,
                "targets": [t.to_dict() for t in self.targets]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeviceState":
        """Inverse of ``to_dict``; raises ``InvalidArgument`` for malformed data."""
        try:
            return cls(str(data["name"]), str(data.get("uuid", "")), str(data.get("devno", "")),
                       int(data.get("event_nr", 0)), bool(data.get("suspended", False)),
                       tuple(TargetState.from_dict(t) for t in data.get("targets", [])))
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidArgument(f"malformed device state: {err}") from err

    def summary(self) -> str:
        """One line for people: state, and each snapshot's usage or mirror's sync and health."""
        parts = ["SUSPENDED" if self.suspended else "ACTIVE"]
        for t in self.targets:
            snap, mir = t.snapshot(), t.mirror()
            if snap is not None:
                pct = snap.percent
                usage = (f"{pct:.1f}% full" if pct is not None and snap.state is SnapshotState.ACTIVE
                         else snap.state.value)
                if t.target_type == "snapshot-merge":
                    usage = "merge finished" if snap.merge_done else f"merging ({usage})"
                parts.append(f"{t.target_type} {usage}")
            elif mir is not None:
                parts.append(f"mirror {mir.in_sync}/{mir.regions} in sync, legs {mir.health}")
            elif not t.table and not t.status:
                continue
            else:
                parts.append(t.target_type)
        return ", ".join(parts)


def capture(dm: DeviceMapper, name: str) -> DeviceState | None:
    """Read ``name``'s info, live table and status; ``None`` when the device does not exist.

    The table and status are read one after the other, not atomically: a table swapped in between
    shows up as a mismatch of target types, and the line is then left out until the next scan.
    """
    try:
        info = dm.info(name, open_count=False)  # not used, and costly on the userspace engine
        if not info.exists:
            return None
        targets: list[TargetState] = []
        if info.live_table:
            table = dm.table(name)
            status = dm.status(name)
            for line, st in zip(table.lines, status):
                if line.target.target_type != st.target_type or int(line.start) != st.start:
                    continue
                targets.append(TargetState(int(line.start), int(line.length), st.target_type,
                                           line.target.params, st.params))
    except DeviceNotFound:
        return None
    return DeviceState(info.name, info.uuid, info.devno, info.event_nr, info.suspended, tuple(targets))


# --- derivation -------------------------------------------------------------------------------


def _pristine_snapshot() -> SnapshotStatus:
    return SnapshotStatus.usage(0, 0, None)


def _snapshot_events(old_t: TargetState | None, new_t: TargetState, thresholds: Sequence[int],
                     ev: dict[str, Any]) -> list[Event]:
    new = new_t.snapshot()
    if new is None:
        return []
    old = old_t.snapshot() if old_t is not None else None
    merging = new_t.target_type == "snapshot-merge"
    if old is None or (old_t is not None and old_t.target_type != new_t.target_type):
        old = _pristine_snapshot()
    out: list[Event] = []
    at: dict[str, Any] = {"target_start": new_t.start}
    if new.state is not old.state:
        if new.state is SnapshotState.INVALID:
            out.append(SnapshotInvalidated(last_percent=old.percent, **at, **ev))
        elif new.state is SnapshotState.OVERFLOW:
            out.append(SnapshotOverflowed(**at, **ev))
        elif new.state is SnapshotState.MERGE_FAILED:
            out.append(MergeFailed(**at, **ev))
    if new.state is not SnapshotState.ACTIVE:
        return out
    if merging:
        old_done = old.merge_done and old_t is not None and old_t.target_type == "snapshot-merge"
        if new.merge_done and not old_done:
            out.append(MergeFinished(**at, **ev))
        return out
    new_pct = new.percent
    if new_pct is None:
        return out
    old_pct = old.percent if old.state is SnapshotState.ACTIVE and old.percent is not None else 0.0
    for threshold in thresholds:
        if old_pct < threshold <= new_pct:
            out.append(SnapshotUsageCrossed(threshold=threshold, percent=round(new_pct, 2),
                                            allocated=new.allocated or 0, total=new.total or 0,
                                            **at, **ev))
    return out


def _mirror_events(old_t: TargetState | None, new_t: TargetState, ev: dict[str, Any]) -> list[Event]:
    new = new_t.mirror()
    if new is None:
        return []
    old = old_t.mirror() if old_t is not None else None
    at: dict[str, Any] = {"target_start": new_t.start}
    out: list[Event] = []
    # Legs are matched by device: a leg replaced by a spare starts from a pristine "A".
    old_health = dict(zip(old.devices, old.health)) if old is not None else {}
    for index, (dev, letter) in enumerate(zip(new.devices, new.health)):
        before = old_health.get(dev, "A")
        if letter != before:
            out.append(LegHealthChanged(leg=index, leg_device=dev, old=before, new=letter, **at, **ev))
    new_log = new.log_health
    if new_log is not None and new.log_device is not None:
        before_log = "A"
        if old is not None and old.log_device == new.log_device and old.log_health is not None:
            before_log = old.log_health.value
        if new_log.value != before_log:
            out.append(LogHealthChanged(log_device=new.log_device, old=before_log, new=new_log.value, **at, **ev))
    # First sight counts as in sync: only an observed resync can finish.
    was_complete = old is None or old.in_sync_complete
    if new.in_sync_complete and not was_complete:
        out.append(ResyncFinished(regions=new.regions, **at, **ev))
    return out


def _target_events(old: DeviceState | None, new: DeviceState, thresholds: Sequence[int],
                   ev: dict[str, Any]) -> list[Event]:
    old_by_start = {t.start: t for t in old.targets} if old is not None else {}
    out: list[Event] = []
    for t in new.targets:
        before = old_by_start.get(t.start)
        if t.target_type in ("snapshot", "snapshot-merge"):
            out.extend(_snapshot_events(before, t, thresholds, ev))
        elif t.target_type == "mirror":
            out.extend(_mirror_events(before if before is not None and before.target_type == "mirror" else None, t, ev))
    return out


def derive(old: DeviceState | None, new: DeviceState | None, *, thresholds: Sequence[int] = DEFAULT_THRESHOLDS,
           source: str = "poll", now: float | None = None) -> list[Event]:
    """The events that turn ``old`` into ``new`` (either may be ``None``: absent).

    ``thresholds`` are the snapshot usage percentages to report crossings of (empty: none).
    """
    import time as _time

    stamp = _time.time() if now is None else now
    if old is None and new is None:
        return []
    if new is None:
        assert old is not None
        return [DeviceRemoved(device=old.name, uuid=old.uuid, devno=old.devno, source=source, time=stamp)]
    ev: dict[str, Any] = {"device": new.name, "uuid": new.uuid, "devno": new.devno, "source": source, "time": stamp}
    out: list[Event] = []
    if old is not None and (old.devno != new.devno or old.uuid != new.uuid):
        # The same name on another device: the old one went, a new one came.
        out.append(DeviceRemoved(device=old.name, uuid=old.uuid, devno=old.devno, source=source, time=stamp))
        old = None
    if old is None:
        out.append(DeviceAdded(**ev))
        if new.suspended and new.targets:
            out.append(DeviceSuspended(**ev))
    else:
        if old.name != new.name:
            out.append(DeviceRenamed(old_name=old.name, **ev))
        table_changed = old.table_text != new.table_text
        if new.suspended and not old.suspended:
            out.append(DeviceSuspended(**ev))
        elif old.suspended and not new.suspended:
            out.append(DeviceResumed(table_changed=table_changed, **ev))
        elif table_changed and new.targets and not new.suspended:
            # A suspend/load/resume between two scans: only the new table tells. Still suspended on
            # a new table, the device is within a resume (or its preresume failed): nothing yet.
            out.append(DeviceResumed(table_changed=True, **ev))
    out.extend(_target_events(old, new, thresholds, ev))
    return out
