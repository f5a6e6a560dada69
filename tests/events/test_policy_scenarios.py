"""The monitor's scenarios, one body over the in-process userspace engine (image files) and the
kernel (loop devices; the VM tier: ``scripts/vmtest -k events``): a snapshot filling under a
writer, with and without auto-extend, and a mirror leg failing under a writer, repaired onto the
spare."""

from __future__ import annotations

import os
from typing import Any

import pytest
from pytest_lazy_fixtures import lf

from dmtools.errors import DMError
from dmtools.events import LegHealthChanged, PolicyAction, ResyncFinished, SnapshotInvalidated, SnapshotUsageCrossed
from dmtools.monitor import Monitor, MonitorConfig, PolicySettings
from dmtools.status import parse_mirror_status
from mirror.manager import MirrorManager

from ev_engine import MiB, Recorder, Stack, fail_leg_under_writer, policies, collect_events

WRITE = 16 << 10
WARN = (80, 85, 90, 95)


@pytest.fixture(params=[pytest.param(lf("engine_stack"), id="engine"),
                        pytest.param(lf("kernel_stack"), id="kernel", marks=pytest.mark.kernel)])
def stack(request: pytest.FixtureRequest) -> Stack:
    result: Stack = request.param
    return result


def piece(off: int) -> bytes:
    return bytes([off // WRITE % 251 + 1]) * WRITE


def write_through(dm: Any, name: str, monitor: Monitor, total: int) -> list[Any]:
    """Writes of 16 KiB to ``name``, each flushed (so it reaches the snapshot), one monitor scan
    after each."""
    events: list[Any] = []
    with dm.open_endpoint(name) as ep:
        for off in range(0, total, WRITE):
            try:
                ep.write(piece(off), off)
                ep.flush()
            except DMError:
                pass  # an invalid snapshot fails nothing on the origin; keep going regardless
            events += monitor.step()
    return events


def read(dm: Any, name: str, offset: int, size: int = WRITE) -> bytes:
    with dm.open_endpoint(name, writable=False) as ep:
        buf = bytearray(size)
        ep.readinto(buf, offset)
    return bytes(buf)


def test_snapshot_fill_warns_in_order_then_goes_invalid(stack: Stack) -> None:
    origin, snap, _cow = stack.snapshot(MiB)
    monitor = Monitor(stack.dm, MonitorConfig(PolicySettings(warn=WARN)), names=[snap], event_numbers=False,
                      uevents=False)
    monitor.step()
    events = write_through(stack.dm, origin, monitor, 2 * MiB)
    assert [e.threshold for e in events if isinstance(e, SnapshotUsageCrossed)] == list(WARN)
    invalid = [e for e in events if isinstance(e, SnapshotInvalidated)]
    assert len(invalid) == 1 and invalid[0].device == snap and events[-1] is invalid[0]
    assert "INVALID" in invalid[0].describe() and invalid[0].last_percent is not None
    assert invalid[0].last_percent >= 95
    assert stack.dm.status(snap)[0].params == "Invalid"


def test_autoextend_keeps_the_snapshot_valid(stack: Stack) -> None:
    origin, snap, cow = stack.snapshot(MiB)
    settings = PolicySettings(warn=WARN, autoextend_threshold=70, autoextend_percent=20)
    dm = Recorder(stack.dm)
    monitor = Monitor(dm, MonitorConfig(settings), names=[snap], event_numbers=False, uevents=False,
                      policy_loader=policies)
    monitor.step()
    events = write_through(stack.dm, origin, monitor, 3 * MiB)  # three times the original COW
    assert not [e for e in events if isinstance(e, SnapshotInvalidated)]
    assert not [e for e in events if isinstance(e, SnapshotUsageCrossed)]  # never reached 80 %
    extends = [e for e in events if isinstance(e, PolicyAction)]
    assert extends and all(e.policy == "snapshot-autoextend" and e.ok and "handover" in e.detail
                           for e in extends), [str(e) for e in extends]
    assert dm.handovers(origin, snap) == len(extends)  # each extension reloaded the snapshot table
    used, total = (int(x) for x in stack.dm.status(snap)[0].params.split()[0].split("/"))
    assert total * 512 == os.path.getsize(cow) > 3 * MiB
    assert used * 100 < 70 * total + 100 * 8  # below the threshold (within the last chunk)
    # the origin returns what was written through it; the snapshot still shows its zeros
    assert read(stack.dm, origin, 3 * MiB - WRITE) == piece(3 * MiB - WRITE)
    assert read(stack.dm, snap, 3 * MiB - WRITE) == bytes(WRITE)


def test_leg_failure_event_and_repair_onto_the_spare(stack: Stack) -> None:
    mirror, legs, refs = stack.mirror()
    settings = PolicySettings(mirror_policy="repair", spare=refs[2])
    # Polling alone would take 30 s: the leg failure must arrive through the event number.
    monitor = Monitor(stack.dm, MonitorConfig(settings), names=[mirror], poll_interval=30.0, uevents=False,
                      policy_loader=lambda name: MirrorManager)
    monitor.step()
    got, thread = collect_events(monitor, lambda e: isinstance(e, ResyncFinished), 60)
    started, writer, result = fail_leg_under_writer(stack.dm, mirror, legs[1])
    thread.join(timeout=90)
    writer.join(timeout=30)
    monitor.close()
    events = [e for _t, e in got]
    failed = [(t, e) for t, e in got if isinstance(e, LegHealthChanged) and e.failed]
    assert failed, [str(e) for e in events]
    t_failed, ev = failed[0]
    assert (ev.device, ev.leg, ev.leg_device, ev.new) == (mirror, 1, refs[1], "D")
    assert t_failed - started < 10
    assert [(a.policy, a.ok) for a in events if isinstance(a, PolicyAction)] == [("mirror-repair", True)]
    assert isinstance(events[-1], ResyncFinished)
    status = parse_mirror_status(stack.dm.status(mirror)[0].params)
    assert status.devices == (refs[0], refs[2]) and status.health == "AA" and status.in_sync_complete
    images = [read(stack.dm, name, 0, 4 * MiB) for name in (legs[0], legs[2])]
    assert images[0] == images[1] and images[0][:65536] == b"x" * 65536
    assert result and not writer.is_alive()
