"""A write held after a leg failure (handle_errors without keep_log) survives a repair: the
manager suspends with noflush, the mirror requeues the held write, and it lands on the new table."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from dmtools.errors import DeviceIOError
from dmtools.testing.wait import wait_until
from mirror import MirrorManager
from test_mirror_manager import _image

SIZE = 4 << 20
REGION = 128  # 64 KiB regions
WAIT = 30.0  # seconds: bound for a loaded machine
OFFSET = 3 * 65536 + 4096
DATA = b"y" * 8192


def _failed_mirror(eng: Any, tmp_path: Path) -> tuple[MirrorManager, str, str]:
    """Mirror ``m`` over ``leg0``/``leg1`` (files a, b) with handle_errors; ``leg1`` now errors."""
    data = os.urandom(SIZE)
    a, b = _image(tmp_path, "a", data=data), _image(tmp_path, "b", data=data)
    n = SIZE // 512
    eng.create("leg0", f"0 {n} linear {a} 0")
    eng.create("leg1", f"0 {n} linear {b} 0")
    mm = MirrorManager(eng)
    mm.create("m", [eng.device_ref("leg0"), eng.device_ref("leg1")], region_size=REGION, nosync=True,
              handle_errors=True, monitor=False)  # the repair releases the hold
    eng.load("leg1", f"0 {n} error")
    eng.resume("leg1")
    return mm, a, b


def _held_write(eng: Any, op: str = "write") -> tuple[threading.Thread, threading.Event, list[BaseException]]:
    """Write ``DATA`` (or zeros, ``op="zero"``) at ``OFFSET`` of ``m`` in a thread."""
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with eng.open_endpoint("m") as ep:
                if op == "zero":
                    ep.zero(OFFSET, len(DATA))
                else:
                    ep.write(DATA, OFFSET)
        except BaseException as err:  # noqa: BLE001 - checked by the test
            errors.append(err)
        done.set()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread, done, errors


def _wait_for_health(mm: MirrorManager, health: str) -> None:
    wait_until(lambda: mm.status("m").health == health, f"mirror health {health}", WAIT)


@pytest.mark.parametrize("op", ["write", "zero"])
def test_write_held_after_leg_failure_lands_on_the_repaired_leg(engine: Any, tmp_path: Path, op: str) -> None:
    mm, a, _ = _failed_mirror(engine, tmp_path)
    expect = DATA if op == "write" else bytes(len(DATA))
    thread, done, errors = _held_write(engine, op)
    _wait_for_health(mm, "AD")  # the leg failure was seen: the write is now held
    assert not done.wait(0.2), "the write was not held after the leg failure"
    c = _image(tmp_path, "c")
    st = mm.repair("m", 1, c)
    assert done.wait(WAIT), "held write never completed after the repair"
    thread.join(WAIT)
    assert not errors, errors
    assert st.health == "AA" and st.legs[1] == c
    st = mm.resync("m", timeout=WAIT)
    assert st.fully_in_sync
    for path in (a, c):
        with open(path, "rb") as f:
            f.seek(OFFSET)
            assert f.read(len(DATA)) == expect, path
    with open(a, "rb") as fa, open(c, "rb") as fc:
        assert fa.read() == fc.read()
    with engine.open_endpoint("m", writable=False) as ep:
        buf = bytearray(len(DATA))
        ep.readinto(buf, OFFSET)
    assert buf == expect


def test_plain_suspend_still_fails_the_held_write(engine: Any, tmp_path: Path) -> None:
    # without noflush the held write ends in EIO at the suspend (dm-raid1.c hold_bio)
    mm, _, _ = _failed_mirror(engine, tmp_path)
    thread, done, errors = _held_write(engine)
    _wait_for_health(mm, "AD")
    assert not done.wait(0.2)
    engine.suspend("m")
    try:
        assert done.wait(WAIT), "held write not released by the suspend"
    finally:
        engine.resume("m")
    thread.join(WAIT)
    assert len(errors) == 1 and isinstance(errors[0], DeviceIOError)


def test_noflush_suspend_then_resume_resubmits_to_the_same_table(engine: Any, tmp_path: Path) -> None:
    # a noflush suspend with no new table: the requeued write goes back to the mirror, is held
    # again (the leg is still failed), and a repair then completes it
    mm, a, _ = _failed_mirror(engine, tmp_path)
    thread, done, errors = _held_write(engine)
    _wait_for_health(mm, "AD")
    engine.suspend("m", noflush=True)
    assert not done.wait(0.2), "a noflush suspend must not fail the held write"
    engine.resume("m")
    assert not done.wait(0.2), "the requeued write is held again on the same degraded table"
    c = _image(tmp_path, "c")
    mm.repair("m", 1, c)
    assert done.wait(WAIT)
    thread.join(WAIT)
    assert not errors, errors
    with open(c, "rb") as f:
        f.seek(OFFSET)
        assert f.read(len(DATA)) == DATA
