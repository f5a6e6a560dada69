"""The watcher over a fake backend: scans, wake-ups, catch-up across restarts, the store."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dmtools.errors import DMError
from dmtools.events import (EventHub, SnapshotInvalidated, SnapshotUsageCrossed, StateStore, UEvent, Watcher, identity,
                            last_events, read_events, sysfs_identity, write_event)
from dmtools.testing.wait import wait_until

from ev_fakes import MIRROR_TABLE, SNAP_TABLE, FakeDM, mirror_status, snap_status


def make_dm() -> FakeDM:
    dm = FakeDM()
    dm.add("snap", [(0, 2048, "snapshot", SNAP_TABLE, snap_status(10))], uuid="U-snap")
    dm.add("mir", [(0, 4096, "mirror", MIRROR_TABLE, mirror_status("AA"))])
    return dm


def kinds(events: list) -> list[str]:
    return [f"{e.device}:{e.kind}" for e in events]


def test_poll_reports_changes_once(tmp_path: Path) -> None:
    dm = make_dm()
    w = Watcher(dm, event_numbers=False, uevents=False)
    assert kinds(w.poll()) == ["mir:device-added", "snap:device-added"]
    assert w.poll() == []
    dm.set_status("snap", snap_status(91))
    dm.set_status("mir", mirror_status("DA", in_sync=3))
    events = w.poll()
    assert kinds(events) == ["mir:mirror-leg-health", "snap:snapshot-usage", "snap:snapshot-usage",
                             "snap:snapshot-usage"]
    assert [e.threshold for e in events if isinstance(e, SnapshotUsageCrossed)] == [80, 85, 90]
    assert w.poll() == []
    dm.remove("mir")
    assert kinds(w.poll()) == ["mir:device-removed"]


def test_names_limit_the_scope() -> None:
    dm = make_dm()
    w = Watcher(dm, names=["snap", "later"], event_numbers=False, uevents=False)
    assert kinds(w.poll()) == ["snap:device-added"]
    dm.add("later", [(0, 8, "zero", "", "")])
    dm.add("other", [(0, 8, "zero", "", "")])
    assert kinds(w.poll()) == ["later:device-added"]


def test_rename_is_one_event_and_keeps_history() -> None:
    dm = make_dm()
    w = Watcher(dm, event_numbers=False, uevents=False)
    w.poll()
    dm.rename("snap", "snap2")
    events = w.poll()
    assert kinds(events) == ["snap2:device-renamed"]
    assert events[0].old_name == "snap"  # type: ignore[attr-defined]


def test_event_number_wakes_the_watcher_within_a_bound() -> None:
    dm = make_dm()
    w = Watcher(dm, poll_interval=30.0, uevents=False)  # polling alone would take 30 s
    got: list = []
    stop = threading.Event()

    def run() -> None:
        for ev in w.events(stop=stop, timeout=20):
            got.append(ev)
            if isinstance(ev, SnapshotInvalidated):
                stop.set()

    t = threading.Thread(target=run)
    t.start()
    try:
        wait_until(lambda: len(got) >= 2, "the catch-up scan")
        assert len(got) == 2  # the two device-added of the catch-up scan
        started = time.monotonic()
        dm.set_status("snap", "Invalid", event=True)  # dm_table_event, as __invalidate_snapshot
        t.join(timeout=10)
        assert not t.is_alive()
        assert time.monotonic() - started < 5
        assert isinstance(got[-1], SnapshotInvalidated) and got[-1].source == "event_nr"
    finally:
        stop.set()
        t.join(timeout=10)
        w.close()


def test_catch_up_across_restart_loses_and_repeats_nothing(tmp_path: Path) -> None:
    dm = make_dm()
    with StateStore("fake", str(tmp_path), lock=True) as store:
        w = Watcher(dm, store=store, event_numbers=False, uevents=False)
        dm.set_status("snap", snap_status(82))
        first = w.poll()
        assert [e.threshold for e in first if isinstance(e, SnapshotUsageCrossed)] == [80]
        assert {e.source for e in first} == {"catch-up"}
    # the monitor is down while the snapshot fills and the mirror goes away
    dm.set_status("snap", snap_status(93))
    dm.remove("mir")
    dm.add("new", [(0, 8, "zero", "", "")])
    with StateStore("fake", str(tmp_path), lock=True) as store:
        w = Watcher(dm, store=store, event_numbers=False, uevents=False)
        events = w.poll()
        assert kinds(events) == ["mir:device-removed", "new:device-added", "snap:snapshot-usage", "snap:snapshot-usage"]
        assert [e.threshold for e in events if isinstance(e, SnapshotUsageCrossed)] == [85, 90]
        assert w.poll() == []
    # a third start with nothing changed reports nothing
    with StateStore("fake", str(tmp_path), lock=True) as store:
        assert Watcher(dm, store=store, event_numbers=False, uevents=False).poll() == []
    recent = last_events("snap", "fake", 10, root=str(tmp_path))
    assert [e.threshold for e in recent if isinstance(e, SnapshotUsageCrossed)] == [80, 85, 90]
    assert [e.kind for e in last_events("mir", "fake", 1, root=str(tmp_path))] == ["device-removed"]


def test_stop_hands_out_the_rest_on_the_next_start(tmp_path: Path) -> None:
    dm = make_dm()
    with StateStore("fake", str(tmp_path), lock=True) as store:
        w = Watcher(dm, store=store, event_numbers=False, uevents=False)
        it = w.events(timeout=5)
        first = next(it)  # mir:device-added; snap's batch is not committed yet
        assert (first.device, first.seq) == ("mir", 1)
        it.close()  # type: ignore[attr-defined]
        w.close()
        assert store.cursor() == 1 and store.last_seq == 1
    with StateStore("fake", str(tmp_path), lock=True) as store:
        again = Watcher(dm, store=store, event_numbers=False, uevents=False).poll()
        assert kinds(again) == ["snap:device-added"] and again[0].seq == 2
    with StateStore("fake", str(tmp_path), lock=True) as store:
        assert Watcher(dm, store=store, event_numbers=False, uevents=False).poll() == []
        dm.set_status("snap", snap_status(81))
        events = Watcher(dm, store=store, event_numbers=False, uevents=False).poll()
        assert [(e.kind, e.seq) for e in events] == [("snapshot-usage", 3)]


def test_second_monitor_is_refused(tmp_path: Path) -> None:
    with StateStore("fake", str(tmp_path), lock=True):
        with pytest.raises(DMError) as err:
            StateStore("fake", str(tmp_path), lock=True)
        assert err.value.errno == 16
        reader = StateStore("fake", str(tmp_path))
        with pytest.raises(DMError):
            reader.save("x", None, [])


def test_transient_device_seen_only_by_uevents() -> None:
    dm = make_dm()
    w = Watcher(dm, event_numbers=False, uevents=False)
    w.poll()
    w._on_uevent(UEvent("add", "dm-7", "253:7", "flash", "U-f", "sysfs", "uevent"))
    w._on_uevent(UEvent("remove", "dm-7", "253:7", "", "", "", "uevent"))
    events = w.poll("uevent")
    assert kinds(events) == ["flash:device-added", "flash:device-removed"]
    assert {e.source for e in events} == {"uevent"} and events[0].uuid == "U-f"


def test_uevent_source_is_attributed() -> None:
    dm = make_dm()
    w = Watcher(dm, event_numbers=False, uevents=False)
    w.poll()
    dm.set_suspended("snap", True)
    w._on_uevent(UEvent("change", "dm-0", "250:0", "snap", "U-snap", "udev", "udev"))
    events = w.poll("udev")
    assert kinds(events) == ["snap:device-suspended"] and events[0].source == "udev"


def test_identity_from_udev_properties_else_sysfs(tmp_path: Path) -> None:
    (tmp_path / "dm-3" / "dm").mkdir(parents=True)
    (tmp_path / "dm-3" / "dm" / "name").write_text("vg-snap\n")
    (tmp_path / "dm-3" / "dm" / "uuid").write_text("LVM-abc\n")
    assert sysfs_identity("dm-3", str(tmp_path)) == ("vg-snap", "LVM-abc")
    assert identity("dm-3", {}, str(tmp_path)) == ("vg-snap", "LVM-abc", "sysfs")
    assert identity("dm-3", {"DM_NAME": "n", "DM_UUID": "u"}, str(tmp_path)) == ("n", "u", "udev")
    assert identity("dm-9", {}, str(tmp_path)) == ("", "", "")
    assert sysfs_identity("../etc", str(tmp_path)) == ("", "")


def test_hub_publishes_to_subscribers_and_the_wire_form_round_trips(tmp_path: Path) -> None:
    dm = make_dm()
    hub = EventHub(dm, poll_interval=0.05)
    hub.start()
    sub_a, sub_b = hub.subscribe(), hub.subscribe()
    try:
        dm.set_status("mir", mirror_status("AD", in_sync=2), event=True)
        a = sub_a.get(timeout=10)
        b = sub_b.get(timeout=10)
        assert a is not None and a.kind == "mirror-leg-health" and a == b
        path = tmp_path / "events.jsonl"
        with open(path, "wb") as f:
            write_event(f, a)
            f.write(b'{"event":"heartbeat"}\n')
        with open(path, "rb") as f:
            assert list(read_events(f)) == [a]
    finally:
        hub.close()
    assert sub_a.closed and sub_a.get(timeout=0.1) is None


def test_subscribe_over_a_socket(tmp_path: Path) -> None:
    import json
    import socket

    from dmtools.events.publish import subscribe

    dm = make_dm()
    hub = EventHub(dm, poll_interval=0.05)
    hub.start()
    path = str(tmp_path / "control.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve() -> None:  # what the daemon does for a "subscribe" request
        conn, _ = server.accept()
        rd, wr = conn.makefile("rb"), conn.makefile("wb")
        assert json.loads(rd.readline())["verb"] == "subscribe"
        hub.stream(wr, heartbeat=0.1)  # returns once the client hung up
        for f in (rd, wr):
            try:
                f.close()
            except OSError:
                pass  # the unflushed heartbeat of a closed connection
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        stream = subscribe(path, timeout=10)
        got: list = []
        reader = threading.Thread(target=lambda: got.append(next(stream)), daemon=True)
        reader.start()
        wait_until(lambda: hub.subscribers, "the server to take the subscription")
        assert hub.subscribers == 1
        dm.set_status("snap", "Invalid", event=True)
        reader.join(timeout=10)
        assert got and isinstance(got[0], SnapshotInvalidated) and got[0].device == "snap"
        stream.close()  # type: ignore[attr-defined]
    finally:
        hub.close()
        thread.join(timeout=10)
        server.close()
    assert not thread.is_alive()




def test_rename_between_listing_and_capture_is_not_a_removal() -> None:
    dm = make_dm()
    w = Watcher(dm, event_numbers=False, uevents=False)
    w.poll()
    real_list = dm.list
    calls = [0]

    def racing_list() -> list:
        entries = real_list()
        calls[0] += 1
        if calls[0] == 1:
            dm.rename("snap", "snap2")  # after the listing, before the capture
        return entries

    dm.list = racing_list  # type: ignore[method-assign]
    events = w.poll()
    assert kinds(events) == ["snap2:device-renamed"] and calls[0] == 2
