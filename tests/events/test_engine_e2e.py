"""End to end on the in-process userspace engine (regular files, no root needed): the degraded
mirror policy, a restart catching up, a merge finishing (a snapshot filling, auto-extend and a
mirror leg's repair are in test_policy_scenarios.py, on both backends)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmtools.engine import Engine
from dmtools.events import MergeFinished, PolicyAction, SnapshotUsageCrossed, StateStore
from dmtools.monitor import Monitor, MonitorConfig, PolicySettings
from dmtools.testing.loops import backing
from snapshot.manager import SnapshotManager

from ev_engine import Stack, fail_leg_under_writer, collect_events

MiB = 1 << 20
WRITE = 16 << 10


def snapshot_stack(engine: Engine, make_image: Callable[..., Path], cow_bytes: int) -> str:
    image = backing(make_image)
    origin, cow = image(16 * MiB, name="origin"), image(cow_bytes, name="cow")
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


def test_degraded_policy_reports_and_changes_nothing(engine_stack: Stack) -> None:
    engine = engine_stack.dm
    mirror, legs, refs = engine_stack.mirror()
    monitor = Monitor(engine, MonitorConfig(PolicySettings(mirror_policy="degraded")), poll_interval=30.0)
    monitor.step()
    got, thread = collect_events(monitor, lambda e: isinstance(e, PolicyAction), 20)
    _started, writer, _result = fail_leg_under_writer(engine, mirror, legs[1])
    thread.join(timeout=25)
    monitor.close()
    actions = [e for _t, e in got if isinstance(e, PolicyAction)]
    assert [(a.policy, a.action, a.ok) for a in actions] == [("mirror-degraded", "report", True)]
    assert "leg 1" in actions[0].detail
    assert engine.table(mirror).lines[0].target.devices == (refs[0], refs[1])
    engine.suspend(mirror)  # releases the held write (EIO), as an administrator's intervention would
    engine.resume(mirror)
    writer.join(timeout=10)
    assert not writer.is_alive()


def test_restart_catches_up_on_the_engine(engine: Engine, tmp_path: Path, make_image: Callable[..., Path]) -> None:
    snapshot_stack(engine, make_image, 1 * MiB)
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


def test_merge_finished_event(engine: Engine, make_image: Callable[..., Path]) -> None:
    snapshot_stack(engine, make_image, 1 * MiB)
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
