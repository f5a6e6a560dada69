"""Root tier on the userspace engine: auto-extend of a COW on a loop-backed file (the file grows,
the loop device's capacity is refreshed, the ``-cow`` device and the snapshot reloaded through
exception handover)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmtools.engine import Engine
from dmtools.events import PolicyAction, SnapshotInvalidated
from dmtools.monitor import Monitor, MonitorConfig, PolicySettings
from dmtools.testing.daemon import stop_daemon
from snapshot.manager import SnapshotManager

from ev_engine import Recorder, policies

pytestmark = pytest.mark.root

MiB = 1 << 20
WRITE = 16 << 10


def loop_snapshot(engine: Engine, make_image: Callable[..., Path], make_loop: Callable[..., Any],
                  cow_bytes: int) -> tuple[Path, Any]:
    origin = make_image(16 * MiB, name="origin")
    cow = make_image(cow_bytes, name="cow")
    loop = make_loop(cow)
    engine.create("o", f"0 {16 * MiB // 512} linear {origin} 0")
    SnapshotManager(engine).create("o", loop.path, "s", chunk_size=8)
    return cow, loop


def test_extend_snapshot_on_a_loop_backed_cow(make_image: Callable[..., Path],
                                              make_loop: Callable[..., Any], engine: Engine) -> None:
    # (the engine fixture comes last so it is torn down before the loop devices it holds)
    cow, loop = loop_snapshot(engine, make_image, make_loop, MiB)
    with engine.open_endpoint("o") as ep:
        ep.write(b"n" * 65536, 0)
    dm = Recorder(engine)
    res = SnapshotManager(dm).extend("s", 25)
    assert (res.old_bytes, res.new_bytes, res.loop, res.cow_device) == (MiB, MiB + MiB // 4, loop.path, "s-cow")
    assert res.handover and dm.handovers("o", "s") == 1
    assert os.path.getsize(cow) == MiB + MiB // 4
    with open(loop.path, "rb") as f:
        assert f.seek(0, os.SEEK_END) == MiB + MiB // 4
    used = engine.status("s")[0].params.split()[0]
    assert used.endswith(f"/{(MiB + MiB // 4) // 512}") and int(used.split("/")[0]) > 128
    assert not engine.info("s").suspended and not engine.info("o").suspended
    with engine.open_endpoint("s", writable=False) as ep:
        buf = bytearray(65536)
        ep.readinto(buf, 0)
    assert bytes(buf) == bytes(65536)  # the snapshot kept its exceptions through the reload


def test_autoextend_under_a_writer_keeps_the_loop_backed_snapshot_valid(
        make_image: Callable[..., Path], make_loop: Callable[..., Any], engine: Engine) -> None:
    cow, _loop = loop_snapshot(engine, make_image, make_loop, MiB + WRITE)
    dm = Recorder(engine)
    monitor = Monitor(dm, MonitorConfig(PolicySettings(warn=(80, 85, 90, 95), autoextend_threshold=70)),
                      event_numbers=False, policy_loader=policies)
    monitor.step()
    events = []
    with engine.open_endpoint("o") as ep:
        for off in range(0, 3 * MiB // 2, WRITE):  # more than the original COW holds
            ep.write(b"w" * WRITE, off)
            events += monitor.step()
    assert not [e for e in events if isinstance(e, SnapshotInvalidated)]
    extends = [e for e in events if isinstance(e, PolicyAction)]
    assert extends and all(e.ok and e.policy == "snapshot-autoextend" for e in extends)
    assert dm.handovers("o", "s") == len(extends)  # each extension reloaded the snapshot table
    assert os.path.getsize(cow) > 3 * MiB // 2
    assert engine.status("s")[0].params != "Invalid"


def test_watcher_over_the_daemon_gets_event_numbers(tmp_path: Path) -> None:
    import threading
    import time

    from dmtools.engine.client import UserspaceClient, start_daemon
    from dmtools.events import DeviceRenamed, Watcher

    run_dir = str(tmp_path / "run")
    start_daemon(run_dir)
    client = UserspaceClient(run_dir)
    try:
        client.create("a-dmtt", "0 8 zero")
        watcher = Watcher(client, poll_interval=30.0, uevents=False)  # polling would take 30 s
        assert [e.kind for e in watcher.poll()] == ["device-added"]
        got: list[Any] = []
        stop = threading.Event()

        def run() -> None:
            for ev in watcher.events(stop=stop, timeout=20):
                got.append(ev)
                stop.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        started = time.monotonic()
        client.rename("a-dmtt", "b-dmtt")  # raises a device event in the daemon's engine
        thread.join(timeout=25)
        watcher.close()
        assert got and isinstance(got[0], DeviceRenamed) and got[0].source == "event_nr"
        assert (got[0].old_name, got[0].device) == ("a-dmtt", "b-dmtt")
        assert time.monotonic() - started < 10
    finally:
        stop_daemon(client)
