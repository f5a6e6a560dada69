"""Event derivation from status transitions (pure: literal status texts, no devices)."""

from __future__ import annotations

import pytest

from dmtools.errors import InvalidArgument
from dmtools.events import (DeviceAdded, DeviceRemoved, DeviceRenamed, DeviceResumed, DeviceState, DeviceSuspended,
                            Event, LegHealthChanged, LogHealthChanged, MergeFailed, MergeFinished, SnapshotInvalidated,
                            SnapshotOverflowed, SnapshotUsageCrossed, TargetState, derive, parse_thresholds)

from ev_fakes import MIRROR_TABLE, SNAP_TABLE, mirror_status, snap_status


def snap(status: str, *, ttype: str = "snapshot", suspended: bool = False, name: str = "s",
         event_nr: int = 0) -> DeviceState:
    return DeviceState(name, "U-s", "250:1", event_nr, suspended, (TargetState(0, 2048, ttype, SNAP_TABLE, status),))


def mirror(status: str, table: str = MIRROR_TABLE) -> DeviceState:
    return DeviceState("m", "", "250:2", 0, False, (TargetState(0, 4096, "mirror", table, status),))


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


def test_thresholds_crossed_in_increasing_order_in_one_step() -> None:
    events = derive(snap(snap_status(50)), snap(snap_status(96)))
    assert [e.threshold for e in events if isinstance(e, SnapshotUsageCrossed)] == [80, 85, 90, 95]
    assert all(e.percent == 96.0 for e in events if isinstance(e, SnapshotUsageCrossed))


def test_each_threshold_once_along_a_slow_fill() -> None:
    seen: list[int] = []
    old = snap(snap_status(0))
    for pct in range(0, 101, 1):
        new = snap(snap_status(pct))
        seen += [e.threshold for e in derive(old, new) if isinstance(e, SnapshotUsageCrossed)]
        old = new
    assert seen == [80, 85, 90, 95]


def test_threshold_reached_exactly_counts_and_custom_thresholds() -> None:
    events = derive(snap(snap_status(79.99)), snap(snap_status(80)), thresholds=(80,))
    assert [e.threshold for e in events] == [80]  # type: ignore[attr-defined]
    assert derive(snap(snap_status(10)), snap(snap_status(99)), thresholds=()) == []


def test_usage_going_down_then_up_warns_again() -> None:
    # After an extension the usage drops; crossing 80 again is news again.
    a, b, c = snap(snap_status(82)), snap(snap_status(60)), snap(snap_status(81))
    assert derive(a, b) == []
    assert [e.threshold for e in derive(b, c)] == [80]  # type: ignore[attr-defined]


def test_invalidation_reports_last_usage() -> None:
    events = derive(snap(snap_status(97)), snap("Invalid"))
    assert kinds(events) == ["snapshot-invalidated"]
    ev = events[0]
    assert isinstance(ev, SnapshotInvalidated) and ev.last_percent == pytest.approx(97.0)
    assert "INVALID" in ev.describe() and "97.0%" in ev.describe()
    assert derive(snap("Invalid"), snap("Invalid")) == []


def test_overflow_and_merge_failed() -> None:
    assert isinstance(derive(snap(snap_status(90)), snap("Overflow"))[0], SnapshotOverflowed)
    old = snap("1000/10000 16", ttype="snapshot-merge")
    assert isinstance(derive(old, snap("Merge failed", ttype="snapshot-merge"))[0], MergeFailed)


def test_merge_finished_once() -> None:
    a = snap("1000/10000 16", ttype="snapshot-merge")
    b = snap("400/10000 16", ttype="snapshot-merge")
    c = snap("16/10000 16", ttype="snapshot-merge")
    assert derive(a, b) == []
    assert kinds(derive(b, c)) == ["merge-finished"]
    assert derive(c, c) == []
    # a merging snapshot reports no usage warnings while its usage shrinks
    assert not [e for e in derive(None, a) if isinstance(e, SnapshotUsageCrossed)]


def test_snapshot_converted_to_merge_that_is_already_done() -> None:
    before = DeviceState("s", "U-s", "250:1", 0, False, (TargetState(0, 2048, "snapshot", SNAP_TABLE, "16/10000 16"),))
    after = snap("16/10000 16", ttype="snapshot-merge")
    events = derive(before, after)
    assert kinds(events) == ["device-resumed", "merge-finished"]
    assert isinstance(events[0], DeviceResumed) and events[0].table_changed
    assert isinstance(events[1], MergeFinished)


def test_leg_failure_and_recovery() -> None:
    events = derive(mirror(mirror_status("AA")), mirror(mirror_status("AD", in_sync=3)))
    assert kinds(events) == ["mirror-leg-health"]
    ev = events[0]
    assert isinstance(ev, LegHealthChanged)
    assert (ev.leg, ev.leg_device, ev.old, ev.new, ev.failed) == (1, "250:11", "A", "D", True)
    back = derive(mirror(mirror_status("AD", in_sync=3)), mirror(mirror_status("AA")))
    assert kinds(back) == ["mirror-leg-health", "mirror-resync-finished"]
    assert not back[0].failed  # type: ignore[attr-defined]


def test_leg_replaced_by_spare_is_not_a_health_change_but_resync_finishes() -> None:
    degraded = mirror(mirror_status("AD", in_sync=2))
    spare_table = "core 1 1024 2 250:10 0 250:12 0 1 handle_errors"
    resyncing = mirror(mirror_status("AA", in_sync=1, legs=("250:10", "250:12")), spare_table)
    synced = mirror(mirror_status("AA", in_sync=4, legs=("250:10", "250:12")), spare_table)
    first = derive(degraded, resyncing)
    assert kinds(first) == ["device-resumed"]
    assert kinds(derive(resyncing, synced)) == ["mirror-resync-finished"]
    assert derive(resyncing, synced)[0].regions == 4  # type: ignore[attr-defined]


def test_resync_finished_only_after_an_observed_resync() -> None:
    assert kinds(derive(None, mirror(mirror_status("AA")))) == ["device-added"]
    assert kinds(derive(mirror(mirror_status(in_sync=0)), mirror(mirror_status()))) == ["mirror-resync-finished"]


def test_disk_log_health() -> None:
    table = "disk 2 250:9 1024 2 250:10 0 250:11 0"
    a = mirror("2 250:10 250:11 4/4 1 AA 3 disk 250:9 A", table)
    b = mirror("2 250:10 250:11 4/4 1 AA 3 disk 250:9 D", table)
    events = derive(a, b)
    assert kinds(events) == ["mirror-log-health"]
    assert isinstance(events[0], LogHealthChanged) and events[0].new == "D"


def test_first_sight_compares_with_a_pristine_device() -> None:
    events = derive(None, snap(snap_status(87)))
    assert kinds(events) == ["device-added", "snapshot-usage", "snapshot-usage"]
    assert [e.threshold for e in events[1:]] == [80, 85]  # type: ignore[attr-defined]
    events = derive(None, mirror(mirror_status("DA", in_sync=1)))
    assert kinds(events) == ["device-added", "mirror-leg-health"]
    assert kinds(derive(None, snap("Invalid"))) == ["device-added", "snapshot-invalidated"]


def test_lifecycle_events() -> None:
    a = snap(snap_status(1))
    assert kinds(derive(a, None)) == ["device-removed"]
    assert isinstance(derive(a, None)[0], DeviceRemoved)
    assert kinds(derive(a, snap(snap_status(1), suspended=True))) == ["device-suspended"]
    resumed = derive(snap(snap_status(1), suspended=True), a)
    assert kinds(resumed) == ["device-resumed"] and not resumed[0].table_changed  # type: ignore[attr-defined]
    renamed = derive(a, snap(snap_status(1), name="t"))
    assert isinstance(renamed[0], DeviceRenamed) and renamed[0].old_name == "s"
    # same name, another device: removed then added
    other = DeviceState("s", "U-other", "250:9", 0, False, a.targets)
    assert kinds(derive(a, other)) == ["device-removed", "device-added"]
    assert isinstance(derive(None, a)[0], DeviceAdded)
    assert isinstance(derive(a, snap(snap_status(1), suspended=True))[0], DeviceSuspended)


def test_event_fields_and_json_round_trip() -> None:
    events = derive(mirror(mirror_status("AA")), mirror(mirror_status("AS")), source="event_nr", now=123.0)
    ev = events[0]
    assert (ev.device, ev.devno, ev.source, ev.time) == ("m", "250:2", "event_nr", 123.0)
    data = ev.to_dict()
    assert data["event"] == "mirror-leg-health" and data["severity"] == "error"
    assert Event.from_dict(data) == ev
    with pytest.raises(InvalidArgument):
        Event.from_dict({"event": "nonsense", "device": "x"})
    with pytest.raises(InvalidArgument):
        Event.from_dict({"event": "mirror-leg-health", "device": "x"})


def test_state_round_trip_and_summary() -> None:
    st = snap(snap_status(50))
    assert DeviceState.from_dict(st.to_dict()) == st
    assert "50.0% full" in st.summary()
    assert "legs AD" in mirror(mirror_status("AD")).summary()
    with pytest.raises(InvalidArgument):
        DeviceState.from_dict({"uuid": "x"})


def test_parse_thresholds() -> None:
    assert parse_thresholds("95, 80,85,90,80") == (80, 85, 90, 95)
    with pytest.raises(InvalidArgument):
        parse_thresholds("80,abc")
    with pytest.raises(InvalidArgument):
        parse_thresholds("0")


def test_suspended_on_a_new_table_is_not_resumed_yet() -> None:
    # Seen between the table swap and the end of a resume (or after a failed preresume): the
    # device is still suspended, so no "resumed" until a scan sees it running.
    before = DeviceState("s", "U-s", "250:1", 0, True, ())
    swapped = snap(snap_status(1), suspended=True)
    assert derive(before, swapped) == []
    assert kinds(derive(swapped, snap(snap_status(1)))) == ["device-resumed"]
    assert kinds(derive(snap(snap_status(1)), swapped)) == ["device-suspended"]
