"""``Device.run`` and ``Device.enter_unheld``: a caller's own I/O inside a device's suspend gate, on
its live table (the way ``snapshot.route`` writes the file under a device)."""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

import pytest

from dmtools.engine import Engine
from dmtools.errors import DeviceIOError, InvalidArgument

WAIT = 30.0


def _device(engine: Engine, tmp_path: Path, name: str = "r") -> tuple[Any, Path]:
    img = tmp_path / f"{name}.img"
    img.write_bytes(bytes(1 << 20))
    engine.create(name, f"0 2048 linear {img} 0")
    return engine._get(name, "test"), img


def _leg(table: Any) -> tuple[str, int]:
    """The file and byte offset the one ``linear`` target of ``table`` maps onto."""
    (dev, base), = table.targets[0].file_layout().legs
    return dev.name, base


def test_run_calls_with_the_live_table_and_its_arguments(engine: Engine, tmp_path: Path) -> None:
    dev, img = _device(engine, tmp_path)
    seen: list[Any] = []
    assert dev.run(512, lambda table, a, b: seen.append((table, a, b)) or "done", 1, b"x") == "done"
    assert seen == [(dev.live, 1, b"x")]
    assert str(img) in _leg(seen[0][0])[0]
    with pytest.raises(InvalidArgument):
        dev.run(-1, lambda table: None)
    assert dev._inflight == 0


def test_a_suspended_device_holds_run_until_resume(engine: Engine, tmp_path: Path) -> None:
    dev, _ = _device(engine, tmp_path)
    engine.suspend("r")
    states: list[bool] = []
    ran = threading.Event()

    def inside(table: Any) -> None:
        states.append(dev.suspended)
        ran.set()

    worker = threading.Thread(target=dev.run, args=(0, inside), daemon=True)
    worker.start()
    assert not ran.wait(0.3), "run went on while the device was suspended"
    engine.resume("r")
    worker.join(WAIT)
    assert not worker.is_alive() and states == [False]


def test_a_suspend_waits_for_a_run_in_flight(engine: Engine, tmp_path: Path) -> None:
    dev, _ = _device(engine, tmp_path)
    inside, release = threading.Event(), threading.Event()

    def hold(table: Any) -> None:
        inside.set()
        release.wait(WAIT)

    worker = threading.Thread(target=dev.run, args=(0, hold), daemon=True)
    worker.start()
    assert inside.wait(WAIT)
    suspender = threading.Thread(target=engine.suspend, args=("r",), daemon=True)
    suspender.start()
    suspender.join(0.3)
    assert suspender.is_alive(), "the suspend did not wait for the I/O in flight"
    release.set()
    suspender.join(WAIT)
    worker.join(WAIT)
    assert not suspender.is_alive() and dev.suspended
    engine.resume("r")


def test_run_follows_a_reload(engine: Engine, tmp_path: Path) -> None:
    dev, img = _device(engine, tmp_path)
    other = tmp_path / "other.img"
    other.write_bytes(bytes(2 << 20))
    before = dev.run(0, _leg)
    engine.load("r", f"0 2048 linear {other} 1024")
    assert dev.run(0, _leg) == before  # loaded, not live yet
    engine.suspend("r")
    engine.resume("r")
    name, base = dev.run(0, _leg)
    assert str(other) in name and base == 1024 * 512
    assert str(img) in before[0]


def test_run_on_a_removed_device_raises_enxio(engine: Engine, tmp_path: Path) -> None:
    dev, _ = _device(engine, tmp_path)
    engine.remove("r")
    with pytest.raises(DeviceIOError) as info:
        dev.run(0, lambda t: None)
    assert info.value.errno == errno.ENXIO


def test_enter_unheld_counts_in_until_leave_and_answers_held_while_suspended(engine: Engine, tmp_path: Path) -> None:
    from dmtools.engine.device import HELD

    dev, img = _device(engine, tmp_path)
    table = dev.enter_unheld(512)
    assert table is dev.live and str(img) in _leg(table)[0] and dev._inflight == 1
    suspended = threading.Event()
    threading.Thread(target=lambda: (engine.suspend("r"), suspended.set()), daemon=True).start()
    assert not suspended.wait(0.3), "the suspend did not wait for the entered I/O"
    dev.leave()
    assert suspended.wait(WAIT) and dev.suspended and dev._inflight == 0
    assert dev.enter_unheld(0) is HELD and dev._inflight == 0  # nothing counted: no leave
    with pytest.raises(InvalidArgument):
        dev.enter_unheld(-1)
    engine.resume("r")
    assert dev.enter_unheld(0) is dev.live
    dev.leave()
    engine.remove("r")
    with pytest.raises(DeviceIOError) as info:
        dev.enter_unheld(0)
    assert info.value.errno == errno.ENXIO and dev._inflight == 0
