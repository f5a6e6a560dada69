"""The event journal, the store's checkpoints and cursor, and the JSON-lines sink (unit tier)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dmtools.errors import CorruptMetadata, DMError, InvalidArgument
from dmtools.events import DeviceAdded, DeviceState, StateStore, Watcher, last_events
from dmtools.events.delivery import CursorSink, JsonLinesFile
from dmtools.events.journal import Journal, read_records
from dmtools.events.store import Plan
from dmtools.events.types import SnapshotUsageCrossed

from ev_fakes import FakeDM


def usage(name: str, *thresholds: int) -> list[SnapshotUsageCrossed]:
    return [SnapshotUsageCrossed(device=name, threshold=t, percent=t + 0.5, time=1.0) for t in thresholds]


def test_torn_last_record_is_cut_off_and_numbering_goes_on(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    j = Journal(path)
    j.open()
    assert [j.append({"x": i})["r"] for i in range(3)] == [1, 2, 3]
    j.close()
    with open(path, "ab") as f:
        f.write(b'{"r":4,"x":')  # a kill in the middle of an append
    assert [rec["x"] for rec in read_records(path)] == [0, 1, 2]  # a reader ignores it
    assert os.path.getsize(path) > 0 and open(path, "rb").read().endswith(b'"x":')
    j = Journal(path)
    assert [rec["r"] for rec in j.open()] == [1, 2, 3]
    assert open(path, "rb").read().endswith(b'"x":2}\n')  # the writer cut it off
    assert j.append({"x": 3})["r"] == 4
    j.close()


def test_damage_before_the_last_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    path.write_bytes(b'{"r":1}\nnot json\n{"r":3}\n')
    with pytest.raises(CorruptMetadata, match="record 2"):
        Journal(str(path)).open()
    assert [rec["r"] for rec in read_records(str(path))] == [1]
    path.write_bytes(b'{"r":1}\n{"r":2,\n')  # a complete-looking garbage last line: torn too
    assert [rec["r"] for rec in Journal(str(path)).open()] == [1]


def test_commit_numbers_events_and_restart_applies_what_checkpoints_missed(tmp_path: Path) -> None:
    state = DeviceState("s", devno="250:1")
    with StateStore("fake", str(tmp_path), lock=True) as store:
        events, _ = store.commit("s", state, usage("s", 80, 85))
        assert [e.seq for e in events] == [1, 2] and store.last_seq == 2
        # what a kill between the journal append and the checkpoint leaves behind
        journal = store._journal
        assert journal is not None
        journal.append({"device": "s", "state": state.to_dict(),
                        "events": [e.to_dict() for e in
                                   [SnapshotUsageCrossed(device="s", threshold=90, percent=91.0,
                                                         time=1.0, seq=3)]]})
    assert [e.threshold for e in last_events("s", "fake", 5, root=str(tmp_path))] == [80, 85, 90]  # type: ignore[attr-defined]
    with open(tmp_path / "fake" / "s.json") as f:
        assert json.load(f)["applied"] == 1  # a reader repaired nothing
    with StateStore("fake", str(tmp_path), lock=True) as store:
        assert store.last_seq == 3
        with open(tmp_path / "fake" / "s.json") as f:
            assert json.load(f)["applied"] == 2
        assert [e.seq for e in store.recent("s")] == [1, 2, 3]  # applied once, not twice
        assert [e.seq for e in store.pending(1)] == [2, 3]
        assert store.commit("s", state, usage("s", 95))[0][0].seq == 4


def test_rename_moves_the_history_even_when_replayed(tmp_path: Path) -> None:
    with StateStore("fake", str(tmp_path), lock=True) as store:
        store.commit("a", DeviceState("a", devno="250:1"), [DeviceAdded(device="a", time=1.0)])
        journal = store._journal
        assert journal is not None
        journal.append({"device": "b", "renamed_from": "a", "state": DeviceState("b", devno="250:1").to_dict(),
                        "events": []})  # killed before the checkpoints moved
    with StateStore("fake", str(tmp_path), lock=True) as store:
        assert store.names() == ["b"] and [e.kind for e in store.recent("b")] == ["device-added"]
        assert not (tmp_path / "fake" / "a.json").exists()


def test_compaction_keeps_numbering_undelivered_events_and_open_plans(tmp_path: Path) -> None:
    state = DeviceState("s", devno="250:1")
    with StateStore("fake", str(tmp_path), lock=True) as store:
        for i in range(40):
            store.commit("s", state, usage("s", *range(i * 2, i * 2 + 2)))
        _, plans = store.commit("m", DeviceState("m"), [], plans=[Plan("m", "mirror-repair", "repair", {"leg": 1})])
        store.start(plans[0])
        store.commit("s", state, usage("s", 200))
        assert store.last_seq == 81
        assert not store.compact(75, limit=1 << 20)  # small enough: nothing done
        before = os.path.getsize(tmp_path / "fake" / "journal")
        assert store.compact(75, limit=100)
        assert os.path.getsize(tmp_path / "fake" / "journal") * 5 < before
        assert [e.seq for e in store.pending(75)] == [76, 77, 78, 79, 80, 81]
        assert [(p.id, p.started) for p in store.open_plans()] == [(plans[0].id, True)]
    with StateStore("fake", str(tmp_path), lock=True) as store:
        assert store.last_seq == 81 and [e.seq for e in store.pending(79)] == [80, 81]
        assert [p.args for p in store.open_plans()] == [{"leg": 1}]
        assert store.commit("s", state, usage("s", 300))[0][0].seq == 82
        assert len(store.recent("s")) == 32 and store.recent("s")[-1].seq == 82


def test_json_lines_file_is_its_own_cursor(tmp_path: Path) -> None:
    path = str(tmp_path / "events.jsonl")
    events = [e.__class__(**{**e.__dict__, "seq": i + 1}) for i, e in enumerate(usage("s", 1, 2, 3))]
    with JsonLinesFile(path) as out:
        assert out.last_seq() == 0
        out.write(events[0])
        out.write(events[1])
        out.write(events[1])  # already there: not written twice
    with open(path, "ab") as f:
        f.write(b'{"event": "snapshot-usage", "seq": 3, "thr')  # torn by a kill
    with JsonLinesFile(path) as out:
        assert out.last_seq() == 2
        out.write(events[2])
    lines = [json.loads(x) for x in open(path)]
    assert [x["seq"] for x in lines] == [1, 2, 3] and lines[2]["threshold"] == 3
    (tmp_path / "other").write_text("hello\n")
    with pytest.raises(InvalidArgument, match="numbered monitor event"):
        JsonLinesFile(str(tmp_path / "other"))


def test_a_consumer_ahead_of_the_store_is_refused(tmp_path: Path) -> None:
    with StateStore("fake", str(tmp_path), lock=True) as store:
        w = Watcher(FakeDM(), store=store, event_numbers=False, uevents=False)
        with pytest.raises(DMError, match="not the same monitor state"):
            w.pending(5)
        sink = CursorSink(store, lambda e: None)
        assert sink.last_seq() == 0
        store.set_cursor(7)
        assert CursorSink(store, lambda e: None).last_seq() == 7
    with StateStore("fake", str(tmp_path), lock=True) as store:
        assert store.last_seq == 7  # numbering never goes back below what was handed out


@pytest.mark.parametrize(
    "checkpoint",
    [b'{"state": null, "recent": 5, "applied": "x"}', b'{"recent": [{"event": 1}], "applied": [1]}',
     b'{"recent": [{"seq": "x"}]}', b'{"recent": [5]}', b"[]", b"\xff"],
)
def test_a_damaged_state_directory_reads_as_unseen_devices(tmp_path: Path, checkpoint: bytes) -> None:
    """``--state-dir`` may name any directory: damaged files are ignored, never a crash (CLI fuzz)."""
    directory = tmp_path / "fake"
    directory.mkdir()
    (directory / "s.json").write_bytes(checkpoint)
    (directory / "journal").write_bytes(b'{"r": 1, "device": "s", "events": 5}\n')
    (directory / "cursor").write_bytes(b'{"seq": 1e999}')
    reader = StateStore("fake", str(tmp_path))
    assert (reader.names(), reader.load("s"), reader.recent("s"), reader.cursor()) == ([], None, [], 0)
    with StateStore("fake", str(tmp_path), lock=True) as store:  # the writer repairs the journal
        assert store.last_seq == 0 and store.recent("s") == []
