"""End to end on the in-process userspace engine (regular files, no root needed): a mirror leg
failing and the repair policy, a restart catching up, a merge finishing (a snapshot filling, with
and without auto-extend, is in test_snapshot_events.py, on both backends)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any


from dmtools.engine import Engine
from dmtools.events import (LegHealthChanged, MergeFinished, PolicyAction, ResyncFinished, SnapshotUsageCrossed,
                            StateStore)
from dmtools.monitor import Monitor, MonitorConfig, PolicySettings
from mirror.manager import MirrorManager
from snapshot.manager import SnapshotManager

from ev_engine import image

MiB = 1 << 20
WRITE = 16 << 10


def snapshot_stack(engine: Engine, tmp_path: Path, cow_bytes: int) -> str:
    origin = image(tmp_path, "origin", 16 * MiB)
    cow = image(tmp_path, "cow", cow_bytes)
    engine.create("o", f"0 {16 * MiB // 512} linear {origin} 0")
    SnapshotManager(engine).create("o", cow, "s", chunk_size=8)
    return cow


def fill(engine: Engine, monitor: Monitor, total: int) -> list[Any]:
    """Write ``total`` new bytes to the origin in 16 KiB pieces, one monitor scan after each."""
    events: list[Any] = []
    with engine.open_endpoint("o") as ep:
        for off in range(0, total, WRITE):
            ep.write(bytes([off // WRITE % 251 + 1]) * WRITE, off)
            events += monitor.step()
    return events


def mirror_stack(engine: Engine, tmp_path: Path) -> list[str]:
    refs = []
    for i in range(3):
        engine.create(f"l{i}", f"0 8192 linear {image(tmp_path, f'leg{i}', 4 * MiB)} 0")
        refs.append(engine.device_ref(f"l{i}"))
    MirrorManager(engine).create("m", refs[:2], handle_errors=True, region_size=1024,
                              monitor=False)  # the Monitor under test owns the failures
    MirrorManager(engine).resync("m")
    return refs


def run_monitor(monitor: Monitor, until: Any, timeout: float) -> tuple[list[Any], threading.Thread]:
    got: list[Any] = []
    stop = threading.Event()

    def run() -> None:
        for ev in monitor.events(timeout=timeout, stop=stop):
            got.append((time.monotonic(), ev))
            if until(ev):
                stop.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return got, thread


def fail_leg_under_writer(engine: Engine, name: str) -> tuple[float, threading.Thread, list[str]]:
    """Turn leg device ``name`` into an ``error`` device, then write to the mirror in a thread
    (with handle_errors the write is held until the monitor acts)."""
    with engine.open_endpoint("m") as ep:
        ep.write(b"x" * 65536, 0)
    engine.load(name, "0 8192 error")
    engine.resume(name)
    result: list[str] = []

    def write() -> None:
        try:
            with engine.open_endpoint("m") as ep:
                ep.write(b"y" * 65536, MiB)
            result.append("ok")
        except Exception as err:  # noqa: BLE001 - the outcome is what the test looks at
            result.append(type(err).__name__)

    started = time.monotonic()
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return started, writer, result


def test_leg_failure_event_and_repair_onto_the_spare(engine: Engine, tmp_path: Path) -> None:
    refs = mirror_stack(engine, tmp_path)
    settings = PolicySettings(mirror_policy="repair", spare=refs[2])
    # Polling alone would take 30 s: the leg failure must arrive through the event number.
    monitor = Monitor(engine, MonitorConfig(settings), poll_interval=30.0, policy_loader=lambda name: MirrorManager)
    monitor.step()
    got, thread = run_monitor(monitor, lambda e: isinstance(e, ResyncFinished), 25)
    started, writer, result = fail_leg_under_writer(engine, "l1")
    thread.join(timeout=30)
    writer.join(timeout=10)
    monitor.close()
    events = [e for _t, e in got]
    failed = [(t, e) for t, e in got if isinstance(e, LegHealthChanged) and e.failed]
    assert failed, [str(e) for e in events]
    t_failed, ev = failed[0]
    assert (ev.device, ev.leg, ev.leg_device, ev.new) == ("m", 1, refs[1], "D")
    assert t_failed - started < 5
    actions = [e for e in events if isinstance(e, PolicyAction)]
    assert [(a.policy, a.ok) for a in actions] == [("mirror-repair", True)]
    assert isinstance(events[-1], ResyncFinished)
    status = engine.status("m")[0].params
    assert status == f"2 {refs[0]} {refs[2]} 8/8 1 AA 1 core"
    legs = [bytearray(4 * MiB) for _ in range(2)]
    for buf, name in zip(legs, ("l0", "l2")):
        with engine.open_endpoint(name, writable=False) as ep:
            ep.readinto(buf, 0)
    assert legs[0] == legs[1] and legs[0][:65536] == b"x" * 65536
    assert result and not writer.is_alive()


def test_degraded_policy_reports_and_changes_nothing(engine: Engine, tmp_path: Path) -> None:
    refs = mirror_stack(engine, tmp_path)
    monitor = Monitor(engine, MonitorConfig(PolicySettings(mirror_policy="degraded")), poll_interval=30.0)
    monitor.step()
    got, thread = run_monitor(monitor, lambda e: isinstance(e, PolicyAction), 20)
    _started, writer, _result = fail_leg_under_writer(engine, "l1")
    thread.join(timeout=25)
    monitor.close()
    actions = [e for _t, e in got if isinstance(e, PolicyAction)]
    assert [(a.policy, a.action, a.ok) for a in actions] == [("mirror-degraded", "report", True)]
    assert "leg 1" in actions[0].detail
    assert engine.table("m").lines[0].target.devices == (refs[0], refs[1])
    engine.suspend("m")  # releases the held write (EIO), as an administrator's intervention would
    engine.resume("m")
    writer.join(timeout=10)
    assert not writer.is_alive()


def test_restart_catches_up_on_the_engine(engine: Engine, tmp_path: Path) -> None:
    snapshot_stack(engine, tmp_path, 1 * MiB)
    config = MonitorConfig(PolicySettings(warn=(80, 85, 90, 95)))
    state_dir = str(tmp_path / "state")
    with StateStore("userspace", state_dir, lock=True) as store:
        monitor = Monitor(engine, config, store=store, event_numbers=False)
        monitor.step()
        first = fill(engine, monitor, 52 * WRITE)  # to about 82 %
    assert [e.threshold for e in first if isinstance(e, SnapshotUsageCrossed)] == [80]
    with engine.open_endpoint("o") as ep:  # nobody watches while the COW passes 85 and 90 %
        for off in range(52 * WRITE, 58 * WRITE, WRITE):  # to about 91 %
            ep.write(b"z" * WRITE, off)
    with StateStore("userspace", state_dir, lock=True) as store:
        events = Monitor(engine, config, store=store, event_numbers=False).step()
    assert [e.threshold for e in events if isinstance(e, SnapshotUsageCrossed)] == [85, 90]
    assert {e.source for e in events} == {"catch-up"}


def test_merge_finished_event(engine: Engine, tmp_path: Path) -> None:
    snapshot_stack(engine, tmp_path, 1 * MiB)
    monitor = Monitor(engine, event_numbers=False)
    monitor.step()
    with engine.open_endpoint("o") as ep:  # copy some origin chunks into the COW
        for off in range(0, 8 * WRITE, WRITE):
            ep.write(b"m" * WRITE, off)
    SnapshotManager(engine).merge("s", wait=False)  # "o" now runs snapshot-merge
    finished: list[Any] = []
    deadline = time.monotonic() + 20
    seen: list[Any] = []
    while not finished and time.monotonic() < deadline:
        events = monitor.step()
        seen += events
        finished = [e for e in events if isinstance(e, MergeFinished)]
        time.sleep(0.02)
    assert finished and finished[0].device == "o", [str(e) for e in seen]
    assert [e.kind for e in seen if e.device == "s"] == ["device-removed"]
    with engine.open_endpoint("o", writable=False) as ep:  # the origin is back to the snapshot's zeros
        buf = bytearray(WRITE)
        ep.readinto(buf, 0)
    assert buf == bytes(WRITE)
