"""``dmtools snapshot status`` and ``dmtools mirror status`` read the events of a monitor run
with ``--state-dir DIR`` (the option ``dmtools monitor`` takes), on the in-process engine."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import dmtools.events.store as event_store
from dmtools.cli import main as cli_main
from dmtools.cli.monitor_cmd import format_event
from dmtools.engine import Engine
from dmtools.events import Event
from dmtools.testing.loops import backing
from mirror.manager import MirrorManager
from snapshot.manager import SnapshotManager

MiB = 1 << 20


class Kept:
    """The engine as the CLI's backend, surviving the commands' ``close()``."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def close(self) -> None:
        pass


@pytest.fixture
def eng(engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """The plugin's engine, behind the CLI's backend seam."""
    monkeypatch.setattr("dmtools.cli.common.open_backend", lambda args: Kept(engine))
    # the default state directory: empty, so only --state-dir can show events
    monkeypatch.setattr(event_store, "default_root", lambda: str(tmp_path / "default"))
    return engine


def run(*argv: str) -> int:
    return cli_main.main(list(argv), propagate=True)


def stack(eng: Engine, make_image: Callable[..., Path]) -> None:
    """A snapshot ``s`` of ``o`` 3/8 full, and a two-leg mirror ``m``."""
    image = backing(make_image)
    eng.create("o", f"0 {4 * MiB // 512} linear {image(4 * MiB, name='origin')} 0")
    SnapshotManager(eng).create("o", image(256 << 10, name="cow"), "s", chunk_size=8)
    with eng.open_endpoint("o") as ep:
        ep.write(b"x" * (96 << 10), 0)
    legs = []
    for i in range(2):
        eng.create(f"l{i}", f"0 2048 linear {image(MiB, name=f'leg{i}')} 0")
        legs.append(eng.device_ref(f"l{i}"))
    MirrorManager(eng).create("m", legs, region_size=256, nosync=True)


def monitor_run(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, list[dict[str, Any]]]:
    """One ``monitor --once`` into ``state_dir``; its events by device."""
    assert run("--json", "monitor", "--once", "--warn=10,20,30", "--state-dir", str(state_dir)) == 0
    doc = json.loads(capsys.readouterr().out)
    by_device: dict[str, list[dict[str, Any]]] = {}
    for ev in doc["events"]:
        by_device.setdefault(ev["device"], []).append(ev)
    return by_device


def test_snapshot_status_reads_the_given_state_dir(eng: Engine, tmp_path: Path, make_image: Callable[..., Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    stack(eng, make_image)
    state_dir = tmp_path / "elsewhere"
    recorded = monitor_run(state_dir, capsys)["s"]
    assert [e.get("threshold") for e in recorded] == [None, 10, 20, 30]
    assert run("--json", "snapshot", "status", "s") == 0  # the default directory: nothing
    assert json.loads(capsys.readouterr().out)["events"] == []
    assert run("--json", "snapshot", "status", "s", "--state-dir", str(state_dir)) == 0
    assert json.loads(capsys.readouterr().out)["events"] == recorded
    assert run("snapshot", "status", "s", "--state-dir", str(state_dir)) == 0
    out = capsys.readouterr().out.splitlines()
    i = out.index("recent events:")
    assert out[i + 1:] == [f"  {format_event(Event.from_dict(e))}" for e in recorded]
    assert "crossed 30%" in out[-1]


def test_mirror_status_reads_the_given_state_dir(eng: Engine, tmp_path: Path, make_image: Callable[..., Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    stack(eng, make_image)
    state_dir = tmp_path / "elsewhere"
    recorded = monitor_run(state_dir, capsys)["m"]
    assert [e["event"] for e in recorded] == ["device-added"] and recorded[0]["seq"] > 0
    assert run("--json", "mirror", "status", "m") == 0
    assert json.loads(capsys.readouterr().out)[0]["events"] == []
    assert run("--json", "mirror", "status", "--state-dir", str(state_dir), "m") == 0
    assert json.loads(capsys.readouterr().out)[0]["events"] == recorded
    assert run("mirror", "status", "m", "--state-dir", str(state_dir)) == 0
    events = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  event: ")]
    assert events == [f"  event: {format_event(Event.from_dict(recorded[0]))}"]
