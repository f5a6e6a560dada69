"""``dmtools snapshot status NAME`` also shows the device's last monitor events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import dmtools.events.store as event_store
from dmtools.cli.monitor_cmd import format_event
from dmtools.events import SnapshotUsageCrossed, StateStore
from test_snapshot_cli import env, run  # noqa: F401 - env is a fixture used below


def _record(root: Path, name: str, count: int) -> list[SnapshotUsageCrossed]:
    """What a monitor stores for ``name``: ``count`` usage events, one second apart."""
    events = [SnapshotUsageCrossed(device=name, threshold=50 + 5 * i, percent=50.5 + 5 * i,
                                   allocated=100 + i, total=512, time=1_700_000_000 + i)
              for i in range(count)]
    with StateStore("userspace", str(root), lock=True) as store:
        store.save(name, None, events)
    return events


def test_status_prints_the_last_five_events(env: tuple[Any, Path, bytes], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    eng, tmp, _ = env
    root = tmp_path / "monitor"
    monkeypatch.setattr(event_store, "default_root", lambda: str(root))
    assert run(["snapshot", "create", "vol", "--cow", str(tmp / "s.cow"), "--name", "s", "--chunk-size", "8K"]) == 0
    capsys.readouterr()
    assert run(["snapshot", "status", "s"]) == 0
    assert "recent events" not in capsys.readouterr().out  # nothing recorded yet
    assert run(["--json", "snapshot", "status", "s"]) == 0
    assert json.loads(capsys.readouterr().out)["events"] == []
    events = _record(root, "s", 7)
    assert run(["snapshot", "status", "s"]) == 0
    out = capsys.readouterr().out.splitlines()
    i = out.index("recent events:")
    assert out[i + 1:] == [f"  {format_event(e)}" for e in events[-5:]]
    assert run(["--json", "snapshot", "status", "s"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["events"] == [e.to_dict() for e in events[-5:]]
    assert data["name"] == "s" and data["status"] == "32/512 32"
