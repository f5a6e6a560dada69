"""``dmtools monitor`` with the ``remove`` mirror policy, as it watches kernel mirrors.

dm-raid1 does not say how many writes it holds nor which leg is its default, so on the kernel the
``mirror-remove`` policy (``mirror.guard.MirrorGuard`` with ``tells_held=False``) decides from the
health letters, the sync count and whether the monitor's previous look saw the mirror fully in
sync. Here that guard runs over our userspace ``mirror`` target (which keeps dm-raid1's rules and
holds writes as it does), its messages unused, driven by a :class:`~dmtools.monitor.Monitor` scan
by scan: a failed leg is dropped and the held write lands; a source that failed out of sync gets
the held writes ended with EIO, again and again, never a wait without end. The kernel tier runs the
same on dm-raid1 (``test_mirror_monitor_kernel.py``).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest

from dmtools.events import PolicyAction
from dmtools.monitor import Monitor, MonitorConfig, PolicySettings
from dmtools.target_values import Linear, Mirror
from dmtools.testing.trip import Switch, install
from dmtools.testing.wait import wait_until
from mirror import MirrorManager
from mirror.guard import MirrorGuard
from test_mirror_guard import BOUND, RB, REGION, SIZE, _writer, failing_source
from test_mirror_manager import _image


@pytest.fixture
def eng(engine: Any) -> Any:
    install(engine)
    return engine


def _monitor(eng: Any) -> tuple[Monitor, list[MirrorGuard]]:
    """A monitor with the remove policy whose guard acts as on the kernel (messages unused)."""
    guards: list[MirrorGuard] = []

    def loader(name: str) -> Any:
        assert name == "mirror-remove"

        def make(dm: Any) -> MirrorGuard:
            guards.append(MirrorGuard(dm, tells_held=False))
            return guards[-1]
        return make

    mon = Monitor(eng, MonitorConfig(PolicySettings(mirror_policy="remove")), names=["m"],
                  event_numbers=False, uevents=False, policy_loader=loader)
    return mon, guards


def _until_failed(mm: MirrorManager, leg: int, letters: str = "DSF") -> None:
    wait_until(lambda: mm.status("m").health[leg] in letters, lambda: f"leg {leg} to fail: {mm.status('m').health}",
               BOUND)


def policy_actions(root: Path, policy: str, bound: float) -> list[dict[str, Any]]:
    """The ``policy`` actions in a monitor's ``events.jsonl`` (waiting up to ``bound`` seconds for
    the first: the monitor records an action once it has run, after the writes it released)."""
    import json

    deadline = time.monotonic() + bound
    while True:
        path = root / "events.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        acts = [e for e in map(json.loads, lines) if e.get("policy") == policy]
        if acts:
            return acts
        assert time.monotonic() < deadline, f"no {policy} action recorded in {path}: {lines}"
        time.sleep(0.05)


def _actions(events: list[Any]) -> list[PolicyAction]:
    return [e for e in events if isinstance(e, PolicyAction)]


@pytest.mark.parametrize("bad", [1, 0], ids=["second-leg", "primary"])
def test_failed_leg_dropped_and_held_write_lands(eng: Any, tmp_path: Path, bad: int) -> None:
    data = os.urandom(SIZE)
    paths = [_image(tmp_path, f"l{i}", SIZE, data) for i in range(2)]
    sw = Switch(f"mon-drop{bad}")
    eng.create("bad", f"0 {SIZE // 512} trip {paths[bad]} 0 {sw.name}")
    refs = [eng.device_ref("bad") if i == bad else p for i, p in enumerate(paths)]
    mm = MirrorManager(eng)
    mm.create("m", refs, region_size=REGION, nosync=True, monitor=False)  # left to the monitor
    mon, guards = _monitor(eng)
    assert _actions(mon.step()) == []  # catch-up: in sync, every leg alive
    sw.trip()
    new = os.urandom(3 * RB)
    done, out = _writer(eng, 5 * RB, new)
    _until_failed(mm, bad)
    assert not done.is_set()  # held by dm-raid1's rule (handle_errors without keep_log)
    acts = _actions(mon.step())
    assert [(a.policy, a.action, a.ok) for a in acts] == [("mirror-remove", "drop", True)]
    assert f"legs {bad} " in acts[0].detail and "dropped" in acts[0].detail
    assert done.wait(BOUND) and out[0][0] == "ok", out
    # in sync when leg 0 failed: the default had moved to leg 1, which holds everything
    assert eng.table("m").lines[0].target == Linear(paths[1 - bad], 0)
    expect = data[:5 * RB] + new + data[8 * RB:]
    with eng.open_endpoint("m", writable=False) as ep:
        buf = bytearray(SIZE)
        ep.readinto(buf, 0)
    assert bytes(buf) == expect
    assert [a[1] for a in guards[0].actions] == ["dropped"]


def test_source_failed_out_of_sync_ends_held_writes_again_and_again(eng: Any, tmp_path: Path) -> None:
    data, mm, _, unsynced = failing_source(eng, tmp_path, "mon-src-oos", monitor=False)
    mon, guards = _monitor(eng)  # started after the failure: it sees it at its first look
    done, out = _writer(eng, unsynced[0] * RB, b"w" * 4096)
    acts = _actions(mon.step())
    assert [(x.policy, x.ok) for x in acts] == [("mirror-remove", False)]
    assert "source leg 0 failed out of sync" in acts[0].detail and "EIO" in acts[0].detail
    assert done.wait(BOUND) and out[0][0] == errno.EIO, out
    assert isinstance(eng.table("m").lines[0].target, Mirror)  # kept for a repair
    # the next held write is ended too, by the guard's own pass (the kernel raises no new event)
    done, out = _writer(eng, unsynced[-1] * RB, b"x" * 4096)
    assert done.wait(BOUND) and out[0][0] == errno.EIO, out
    assert [act for dev, act, _ in guards[0].actions] == ["released"]  # recorded once
    guards[0].stop()


def test_mirror_monitor_process_for_a_daemon_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mirror.monitor.start``: the ``dmtools monitor`` process it starts (here for a mirror of a
    daemon, made with ``--no-monitor``) drops the failed leg, the held write lands, the action is in
    its journal, events file and log, and it exits once the mirror is removed."""
    import shutil
    import uuid

    from dmtools.engine.client import UserspaceClient
    from dmtools.errors import DMError
    from dmtools.events.store import StateStore
    from dmtools.testing.daemon import serving_daemon
    from mirror.monitor import start, state_root

    run = str(tmp_path / "run")
    data = os.urandom(SIZE)
    a, b = _image(tmp_path, "a", SIZE, data), _image(tmp_path, "b", SIZE, data)
    sw = Switch("monitor-process-leg")
    name = f"mon{uuid.uuid4().hex[:8]}-dmtt"
    monkeypatch.setenv("DMTOOLS_RUN_DIR", run)  # the monitor process finds the daemon there
    try:
        with serving_daemon(run, expose=False, setup=lambda d: install(d.engine)):
            client = UserspaceClient(run)
            try:
                client.create("bad", f"0 {SIZE // 512} trip {b} 0 {sw.name}")
                MirrorManager(client).create(name, [a, client.device_ref("bad")], region_size=REGION,
                                             nosync=True, monitor=False)
                assert start(client, name, interval=0.2) is not None
                assert start(client, name) is None  # one monitor per mirror
                sw.trip()
                done, out = _writer(client, RB, b"d" * 8192, name)
                assert done.wait(BOUND * 3), "the held write was never released by the monitor"
                assert out[0][0] == "ok"
                assert client.table(name).lines[0].target == Linear(a, 0)
                root = Path(state_root(name))
                acts = policy_actions(root, "mirror-remove", BOUND * 3)  # recorded once check returned
                assert len(acts) == 1 and acts[0]["ok"] and "legs 1 " in acts[0]["detail"], acts
                assert "dropped" in (root / "monitor.log").read_text()
                client.remove(name)
                deadline = time.monotonic() + BOUND * 3
                while True:
                    try:
                        StateStore("userspace", str(root), lock=True).close()
                        break
                    except DMError:
                        assert time.monotonic() < deadline, "the monitor outlived its mirror"
                        time.sleep(0.05)
                client.remove("bad")
            finally:
                client.close()
    finally:
        shutil.rmtree(state_root(name), ignore_errors=True)
