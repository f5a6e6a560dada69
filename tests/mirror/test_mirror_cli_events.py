"""``dmtools mirror status NAME`` also shows the mirror's last monitor events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import dmtools.events.store as event_store
from dmtools.cli.monitor_cmd import format_event
from dmtools.events import LegHealthChanged, StateStore
from test_mirror_cli import files, run, use_engine  # noqa: F401 - fixtures used below


def test_status_prints_the_last_five_events(files: dict[str, str], use_engine: Any, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "monitor"
    monkeypatch.setattr(event_store, "default_root", lambda: str(root))
    assert run(["mirror", "create", "em", files["a"], files["b"], "--region-size", "64K", "--nosync"]) == 0
    capsys.readouterr()
    assert run(["--json", "mirror", "status", "em"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["events"] == []
    events = [LegHealthChanged(device="em", leg=1, leg_device=files["b"], old="AD"[i % 2], new="DA"[i % 2],
                               time=1_700_000_000 + i) for i in range(6)]
    with StateStore("userspace", str(root), lock=True) as store:
        store.save("em", None, events)
    assert run(["mirror", "status", "em"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("em: ")
    assert [ln for ln in out if ln.startswith("  event: ")] == [f"  event: {format_event(e)}" for e in events[-5:]]
    assert run(["--json", "mirror", "status", "em"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 1 and data[0]["name"] == "em"
    assert data[0]["events"] == [e.to_dict() for e in events[-5:]]
