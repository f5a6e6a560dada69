"""Root tier on the userspace engine: auto-extend of a COW on a loop-backed file (the file grows,
the loop device's capacity is refreshed, the ``-cow`` device reloaded)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmtools.engine import Engine
from dmtools.events import PolicyAction, SnapshotInvalidated
from dmtools.monitor import Monitor, MonitorConfig, PolicySettings, extend_snapshot

snapshot_targets = pytest.importorskip("snapshot.targets")
from snapshot.manager import SnapshotManager  # noqa: E402

pytestmark = pytest.mark.root

MiB = 1 << 20
WRITE = 16 << 10


@pytest.fixture
def eng() -> Iterator[Engine]:
    e = Engine()
    for name, cls in snapshot_targets.TARGETS.items():
        e.register_target(cls, name)
    try:
        yield e
    finally:
        e.close()


def loop_snapshot(eng: Engine, make_image: Callable[..., Path], make_loop: Callable[..., Any],
                  cow_bytes: int) -> tuple[Path, Any]:
    origin = make_image(16 * MiB, name="origin")
    cow = make_image(cow_bytes, name="cow")
    loop = make_loop(cow)
    eng.create("o", f"0 {16 * MiB // 512} linear {origin} 0")
    SnapshotManager(eng).create("o", loop.path, "s", chunk_size=8)
    return cow, loop


def test_extend_snapshot_on_a_loop_backed_cow(make_image: Callable[..., Path],
                                              make_loop: Callable[..., Any], eng: Engine) -> None:
    # (the engine fixture comes last so it is torn down before the loop devices it holds)
    cow, loop = loop_snapshot(eng, make_image, make_loop, MiB)
    res = extend_snapshot(eng, "s", 25)
    assert (res.old_bytes, res.new_bytes, res.loop, res.cow_device) == (MiB, MiB + MiB // 4, loop.path, "s-cow")
    assert os.path.getsize(cow) == MiB + MiB // 4
    with open(loop.path, "rb") as f:
        assert f.seek(0, os.SEEK_END) == MiB + MiB // 4
    assert eng.status("s")[0].params.split()[0].endswith(f"/{(MiB + MiB // 4) // 512}")
    assert not eng.info("s").suspended and not eng.info("o").suspended


def test_autoextend_under_a_writer_keeps_the_loop_backed_snapshot_valid(
        make_image: Callable[..., Path], make_loop: Callable[..., Any], eng: Engine) -> None:
    cow, _loop = loop_snapshot(eng, make_image, make_loop, MiB + WRITE)
    monitor = Monitor(eng, MonitorConfig(PolicySettings(warn=(80, 85, 90, 95), autoextend_threshold=70)),
                      event_numbers=False)
    monitor.step()
    events = []
    with eng.open_endpoint("o") as ep:
        for off in range(0, 3 * MiB // 2, WRITE):  # more than the original COW holds
            ep.write(b"w" * WRITE, off)
            events += monitor.step()
    assert not [e for e in events if isinstance(e, SnapshotInvalidated)]
    extends = [e for e in events if isinstance(e, PolicyAction)]
    assert extends and all(e.ok and e.policy == "snapshot-autoextend" for e in extends)
    assert os.path.getsize(cow) > 3 * MiB // 2
    assert eng.status("s")[0].params != "Invalid"
