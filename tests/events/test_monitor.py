"""Monitor policies and configuration over the fake backend, and the ``monitor`` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dmtools.cli import main as cli_main
from dmtools.errors import DMError, InvalidArgument
from dmtools.events import PolicyAction
from dmtools.monitor import Monitor, MonitorConfig, PolicySettings, load_policy

from ev_fakes import MIRROR_TABLE, SNAP_TABLE, FakeDM, mirror_status, snap_status

THREE_LEGS = "core 1 1024 3 250:10 0 250:11 0 250:12 0 1 handle_errors"


class FakeRepairer:
    def __init__(self, dm: Any, fail: bool = False) -> None:
        self.dm = dm
        self.calls: list[tuple[str, int, str]] = []
        self.fail = fail

    def repair(self, name: str, leg: int, spare: str, *, wait: bool = True) -> None:
        assert wait is False
        if self.fail:
            raise DMError("leg 0 is the resync source")
        self.calls.append((name, leg, spare))


class FakeRemover:
    """The ``mirror-remove`` policy: records each check and answers ``result``."""

    def __init__(self, result: str = "dropped") -> None:
        self.result = result
        self.calls: list[tuple[str, bool]] = []
        self.actions: list[tuple[str, str, str]] = []

    def check(self, name: str, *, in_sync_before: bool = False) -> str:
        self.calls.append((name, in_sync_before))
        if self.result in ("dropped", "released"):
            self.actions.append((name, self.result, f"{self.result} by the fake"))
        return self.result


def loader_for(repairer: FakeRepairer | None, remover: FakeRemover | None = None) -> Any:
    def load(name: str) -> Any:
        assert name in ("mirror-repair", "mirror-remove")
        return lambda dm: repairer if name == "mirror-repair" else (remover or FakeRemover())
    return load


def actions(events: list[Any]) -> list[tuple[str, str, bool]]:
    return [(e.policy, e.action, e.ok) for e in events if isinstance(e, PolicyAction)]


def test_settings_validation() -> None:
    assert PolicySettings(autoextend_threshold=100).autoextend_threshold is None
    assert PolicySettings(warn="90,80").warn == (80, 90)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="spare"):
        PolicySettings(mirror_policy="repair")
    with pytest.raises(InvalidArgument):
        PolicySettings(mirror_policy="explode")
    with pytest.raises(InvalidArgument):
        PolicySettings(autoextend_threshold=0)
    with pytest.raises(InvalidArgument):
        PolicySettings(autoextend_percent=0)


def test_config_per_device_overrides(tmp_path: Path) -> None:
    path = tmp_path / "monitor.json"
    path.write_text(json.dumps({"defaults": {"warn": [80, 90]},
                                "devices": {"m": {"mirror_policy": "repair", "spare": "/dev/sdz"}}}))
    cfg = MonitorConfig.load(str(path), PolicySettings(autoextend_threshold=70))
    assert cfg.for_device("x") == PolicySettings(warn=(80, 90), autoextend_threshold=70)
    assert cfg.for_device("m").mirror_policy == "repair" and cfg.for_device("m").warn == (80, 90)
    with pytest.raises(InvalidArgument, match="unknown"):
        MonitorConfig.from_dict({"devices": {"m": {"colour": "red"}}})
    with pytest.raises(InvalidArgument, match="unknown"):
        MonitorConfig.from_dict({"default": {}})
    path.write_text("{")
    with pytest.raises(InvalidArgument, match="JSON"):
        MonitorConfig.load(str(path))


def test_missing_repair_implementation_is_refused_up_front() -> None:
    with pytest.raises(InvalidArgument, match="dmtools.policies"):
        load_policy("no-such-policy")

    def missing(name: str) -> Any:
        raise InvalidArgument(f"no {name!r} policy is installed")

    cfg = MonitorConfig(PolicySettings(mirror_policy="repair", spare="/dev/sdz"))
    with pytest.raises(InvalidArgument, match="mirror-repair"):
        Monitor(FakeDM(), cfg, policy_loader=missing)


def test_repair_uses_the_spare_once() -> None:
    dm = FakeDM()
    dm.add("m", [(0, 4096, "mirror", THREE_LEGS, mirror_status("AAA", legs=("250:10", "250:11", "250:12")))])
    rep, rem = FakeRepairer(dm), FakeRemover()
    cfg = MonitorConfig(PolicySettings(mirror_policy="repair", spare="250:20"))
    mon = Monitor(dm, cfg, event_numbers=False, uevents=False, policy_loader=loader_for(rep, rem))
    assert actions(mon.step()) == []
    dm.set_status("m", mirror_status("ADA", legs=("250:10", "250:11", "250:12")))
    assert actions(mon.step()) == [("mirror-repair", "repair", True)]
    assert rep.calls == [("m", 1, "250:20")] and rem.calls == []
    dm.set_status("m", mirror_status("ADD", legs=("250:10", "250:11", "250:12")))
    events = mon.step()
    # the spare is used: the failed leg is removed instead (LVM's "allocate" falls back so)
    assert actions(events) == [("mirror-repair", "repair", True)]
    detail = [e for e in events if isinstance(e, PolicyAction)][0].detail
    assert "already used" in detail and "dropped by the fake" in detail
    assert rep.calls == [("m", 1, "250:20")] and rem.calls == [("m", False)]


def test_read_errors_are_reported_not_repaired_and_failures_reported() -> None:
    dm = FakeDM()
    dm.add("m", [(0, 4096, "mirror", MIRROR_TABLE, mirror_status("AA"))])
    rep, rem = FakeRepairer(dm, fail=True), FakeRemover("waiting")
    cfg = MonitorConfig(PolicySettings(mirror_policy="repair", spare="250:20"))
    mon = Monitor(dm, cfg, event_numbers=False, uevents=False, policy_loader=loader_for(rep, rem))
    mon.step()
    dm.set_status("m", mirror_status("AR"))
    assert actions(mon.step()) == [("mirror-degraded", "report", True)]
    dm.set_status("m", mirror_status("DR"))
    events = mon.step()
    assert actions(events) == [("mirror-repair", "repair", False)]
    assert "resync source" in [e for e in events if isinstance(e, PolicyAction)][0].detail
    assert rem.calls == [("m", False)]  # then the removal was tried, and had nothing to do
    rep.fail = False
    dm.set_status("m", mirror_status("DD"))  # the read-failed leg now fails writes too
    assert actions(mon.step()) == [("mirror-repair", "repair", True)]
    assert rep.calls == [("m", 1, "250:20")]
    dm.set_status("m", mirror_status("SD"))  # D -> S is no new failure
    assert actions(mon.step()) == []


def test_remove_policy_drops_failed_legs_in_one_reload() -> None:
    """``remove``: one ``mirror-remove`` plan per failure, with every newly failed leg and whether
    the mirror was fully in sync with every leg alive at the look before (the kernel's default leg
    moved off a failed one only then); a read error holds nothing while the mirror is in sync."""
    dm = FakeDM()
    legs = ("250:10", "250:11", "250:12")
    dm.add("m", [(0, 4096, "mirror", THREE_LEGS, mirror_status("AAA", legs=legs))])
    rem = FakeRemover()
    cfg = MonitorConfig(PolicySettings(mirror_policy="remove"))
    mon = Monitor(dm, cfg, event_numbers=False, uevents=False, policy_loader=loader_for(None, rem))
    assert actions(mon.step()) == []
    dm.set_status("m", mirror_status("ARA", legs=legs))  # in sync: nothing held, reported
    assert actions(mon.step()) == [("mirror-degraded", "report", True)]
    assert rem.calls == []
    dm.set_status("m", mirror_status("DDA", in_sync=3, legs=legs))
    events = mon.step()
    assert actions(events) == [("mirror-remove", "drop", True)]
    assert [e.detail for e in events if isinstance(e, PolicyAction)] == ["dropped by the fake"]
    assert rem.calls == [("m", False)]  # the look before showed a failed leg: not known in sync

    dm.add("n", [(0, 4096, "mirror", THREE_LEGS, mirror_status("AAA", legs=legs))])
    mon.step()
    dm.set_status("n", mirror_status("DAA", in_sync=3, legs=legs))
    rem.result = "released"
    assert actions(mon.step()) == [("mirror-remove", "drop", False)]  # writes ended, nothing dropped
    assert rem.calls[-1] == ("n", True)

    dm.add("o", [(0, 4096, "mirror", THREE_LEGS, mirror_status("AAA", in_sync=1, legs=legs))])
    mon.step()
    dm.set_status("o", mirror_status("AAR", in_sync=2, legs=legs))  # out of sync: writes may be held
    rem.result = "dropped"
    assert actions(mon.step()) == [("mirror-remove", "drop", True)]
    assert rem.calls[-1] == ("o", False)


def test_autoextend_failure_is_reported_once() -> None:
    dm = FakeDM()
    dm.add("s", [(0, 2048, "snapshot", SNAP_TABLE, snap_status(10))])
    mon = Monitor(dm, MonitorConfig(PolicySettings(autoextend_threshold=70)), event_numbers=False, uevents=False)
    mon.step()
    failures = []
    for pct in (71, 75, 80, 90):
        dm.set_status("s", snap_status(pct))
        failures += [e for e in mon.step() if isinstance(e, PolicyAction)]
    assert len(failures) == 1 and not failures[0].ok
    assert "not a file or a loop-backed file" in failures[0].detail


def test_policies_off_by_default() -> None:
    dm = FakeDM()
    dm.add("s", [(0, 2048, "snapshot", SNAP_TABLE, snap_status(10))])
    dm.add("m", [(0, 4096, "mirror", MIRROR_TABLE, mirror_status("AA"))])
    mon = Monitor(dm, event_numbers=False, uevents=False)
    mon.step()
    dm.set_status("s", snap_status(99))
    dm.set_status("m", mirror_status("AD"))
    assert [e.kind for e in mon.step()] == ["mirror-leg-health"]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[FakeDM, Any]:
    dm = FakeDM()
    dm.add("s", [(0, 2048, "snapshot", SNAP_TABLE, snap_status(87))])
    monkeypatch.setitem(cli_main.BUILTIN_COMMANDS, "monitor", "dmtools.cli.monitor_cmd:register")
    monkeypatch.setattr("dmtools.cli.common.open_backend", lambda args: dm)

    def run(*argv: str) -> int:
        return cli_main.main(["monitor", "--state-dir", str(tmp_path), *argv], propagate=True)

    return dm, run


def test_cli_once_reports_changes_since_last_run_then_state(cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    dm, run = cli
    assert run("--once", "--warn") == 0
    out = capsys.readouterr().out.splitlines()
    assert "s: device added" in out[0] and "crossed 80%" in out[1] and "crossed 85%" in out[2]
    assert out[-1].split() == ["s", "ACTIVE,", "snapshot", "87.0%", "full"]
    assert run("--once", "--warn") == 0
    assert capsys.readouterr().out.split() == ["s", "ACTIVE,", "snapshot", "87.0%", "full"]
    dm.set_status("s", snap_status(96))
    assert run("--json", "--once", "--warn", "80,85,90,95") == 0
    doc = json.loads(capsys.readouterr().out)
    assert [e["threshold"] for e in doc["events"]] == [90, 95]
    assert doc["devices"]["s"]["targets"][0]["status"] == snap_status(96)


def test_cli_stream_json_lines(cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    dm, run = cli
    assert run("--json", "--warn", "--timeout", "0.3", "--interval", "0.05", "--no-uevents") == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["event"] for x in lines] == ["device-added", "snapshot-usage", "snapshot-usage"]
    assert lines[1]["severity"] == "warning" and lines[1]["device"] == "s"


def test_cli_bad_options(cli: Any) -> None:
    _dm, run = cli
    with pytest.raises(InvalidArgument):
        run("--once", "--mirror-policy", "repair")
    with pytest.raises(InvalidArgument):
        run("--once", "--warn", "80,x")


def test_cli_output_file_holds_each_event_once_across_runs(cli: Any, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    dm, run = cli
    out = tmp_path / "events.jsonl"
    assert run("--once", "--warn", "--output", str(out)) == 0
    assert capsys.readouterr().out.split() == ["s", "ACTIVE,", "snapshot", "87.0%", "full"]
    first = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["seq"], x["event"], x.get("threshold")) for x in first] == [
        (1, "device-added", None), (2, "snapshot-usage", 80), (3, "snapshot-usage", 85)]
    assert run("--once", "--warn", "--output", str(out)) == 0  # nothing new: nothing written
    capsys.readouterr()
    assert out.read_text().splitlines() == [json.dumps(x, sort_keys=True) for x in first]
    dm.set_status("s", snap_status(91))
    assert run("--warn", "--output", str(out), "--timeout", "0.3", "--interval", "0.05", "--no-uevents") == 0
    assert capsys.readouterr().out == ""  # the events went to the file
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["seq"], x.get("threshold")) for x in lines[3:]] == [(4, 90)]
    (tmp_path / "foreign.txt").write_text("not events\n")
    with pytest.raises(InvalidArgument, match="numbered monitor event"):
        run("--once", "--output", str(tmp_path / "foreign.txt"))


def test_cli_stdout_resumes_after_the_last_printed_event(cli: Any, capsys: pytest.CaptureFixture[str]) -> None:
    dm, run = cli
    assert run("--json", "--warn", "--timeout", "0.2", "--interval", "0.05", "--no-uevents") == 0
    assert [json.loads(x)["seq"] for x in capsys.readouterr().out.splitlines()] == [1, 2, 3]
    dm.set_status("s", snap_status(96))
    assert run("--json", "--warn", "--timeout", "0.2", "--interval", "0.05", "--no-uevents") == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(x["seq"], x["threshold"]) for x in lines] == [(4, 90), (5, 95)]


def test_plans_left_by_a_killed_monitor_run_or_are_reported_interrupted(tmp_path: Path) -> None:
    from dmtools.events import StateStore, capture
    from dmtools.events.store import Plan

    dm = FakeDM()
    dm.add("m", [(0, 4096, "mirror", MIRROR_TABLE, mirror_status("DA"))])
    cfg = MonitorConfig(PolicySettings(mirror_policy="degraded"))
    args = {"leg": 0, "leg_device": "250:10", "health": "D"}
    with StateStore("fake", str(tmp_path), lock=True) as store:
        # what a monitor killed after committing the leg failure leaves: one plan never started,
        # one started (it was running when the kill came)
        _, plans = store.commit("m", capture(dm, "m"), [], plans=[
            Plan("m", "mirror-degraded", "report", args), Plan("m", "mirror-degraded", "report", args)])
        store.start(plans[1])
    with StateStore("fake", str(tmp_path), lock=True) as store:
        events = Monitor(dm, cfg, store=store, event_numbers=False, uevents=False).step()
        done = [e for e in events if isinstance(e, PolicyAction)]
        assert [(a.ok, "keeps running" in a.detail, "interrupted" in a.detail) for a in done] == [
            (True, True, False), (False, False, True)]
        assert store.open_plans() == []
    with StateStore("fake", str(tmp_path), lock=True) as store:  # reported once
        assert actions(Monitor(dm, cfg, store=store, event_numbers=False, uevents=False).step()) == []
