"""A repaired or added leg is never in sync before it is copied (userspace engine).

The seam: ``mirror.manager.swap_table`` is wrapped so that the manager stops right after the first
table with the new leg is live, before any message or copy it would send next: what the mirror
does then is what it does if the manager (or the daemon) died there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

import mirror.manager
from dmtools.errors import DeviceIOError, InvalidTable
from mirror import MirrorManager
from mirror.format import LogImage
from test_mirror_manager import _image

MB = 1 << 20
SIZE = 2 * MB
REGION = 128  # 64 KiB -> 32 regions
REGION_BYTES = REGION * 512


class Stopped(Exception):
    """The manager stopped between the table swap and what follows it."""


def _stop_after_swap(monkeypatch: pytest.MonkeyPatch, window: Callable[[], None]) -> None:
    """The first swap made by the manager goes through, then ``window()`` runs and the manager stops."""
    real = mirror.manager.swap_table

    def swap(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        monkeypatch.setattr(mirror.manager, "swap_table", real)
        window()
        raise Stopped

    monkeypatch.setattr(mirror.manager, "swap_table", swap)


def _crash_before_load(monkeypatch: pytest.MonkeyPatch, window: Callable[[], None]) -> None:
    """The manager stops at its first swap, before the table with the new leg is loaded."""
    def swap(*args: Any, **kwargs: Any) -> None:
        window()
        raise Stopped

    monkeypatch.setattr(mirror.manager, "swap_table", swap)


VERBS = {
    "repair": lambda mm, name, new: mm.repair(name, 2, new),
    "add_leg": lambda mm, name, new: mm.add_leg(name, new),
}


@pytest.mark.parametrize("when", ["live", "before_load"])
@pytest.mark.parametrize("verb", sorted(VERBS))
def test_a_crash_before_the_copy_leaves_a_log_that_resyncs_the_new_leg(
        engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verb: str, when: str) -> None:
    """The process dies right after the new table is live, or just before it is loaded: the log
    and legs as they are then (the log read first: a region it shows clean was copied before) are
    activated from the log with the new leg, as after a restart by a caller that cannot know how
    far the repair went; the new leg must then get leg 0's data, not be trusted blank."""
    mm = MirrorManager(engine)
    data = os.urandom(SIZE)
    a, b = _image(tmp_path, "a", SIZE, data), _image(tmp_path, "b", SIZE, data)
    c = _image(tmp_path, "c", SIZE, data) if verb == "repair" else None
    new = _image(tmp_path, "new", SIZE)
    lg = _image(tmp_path, "log", 64 * 1024)
    legs = [a, b] + ([c] if c else [])
    mm.create("m", legs, log=lg, region_size=REGION, nosync=True)
    crash = tmp_path / "crash"
    crash.mkdir()

    def window() -> None:  # the machine dies: what the devices hold now is all that is left
        for p in [lg, *legs, new]:
            shutil.copyfile(p, crash / Path(p).name)

    (_stop_after_swap if when == "live" else _crash_before_load)(monkeypatch, window)
    with pytest.raises(Stopped):
        VERBS[verb](mm, "m", new)
    mm.remove("m")
    after = [str(crash / Path(p).name) for p in [*legs[:2], new]]  # repair: leg 2 was replaced
    mm.activate("again", after, log=str(crash / "log"), region_size=REGION)
    mm.resync("again", timeout=30)
    assert Path(after[-1]).read_bytes() == data  # every region of the new leg copied


@pytest.mark.parametrize("log", ["disk", "core"])
def test_a_read_after_leg_0_fails_is_never_served_by_the_blank_leg(
        engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log: str) -> None:
    """Leg 1 of a 2-leg mirror is replaced; leg 0 fails before the copy: a read of the mirror
    returns leg 0's data (a region already copied) or fails, never the new leg's zeros. The core
    log is a ``nosync`` one, which starts in sync at every load."""
    mm = MirrorManager(engine)
    data = os.urandom(SIZE)
    a, b = _image(tmp_path, "a", SIZE, data), _image(tmp_path, "b", SIZE, data)
    new = _image(tmp_path, "new", SIZE)
    n = SIZE // 512
    engine.create("leg0", f"0 {n} linear {a} 0")
    leg0 = engine.device_ref("leg0")
    lg = _image(tmp_path, "log", 64 * 1024) if log == "disk" else "core"
    mm.create("m", [leg0, b], log=lg, region_size=REGION, nosync=True)
    got: list[bytes | None] = []

    def window() -> None:
        engine.load("leg0", f"0 {n} error")
        engine.resume("leg0")
        with engine.open_endpoint("m", writable=False) as ep:
            for r in range(SIZE // REGION_BYTES):
                buf = bytearray(REGION_BYTES)
                try:
                    ep.readinto(buf, r * REGION_BYTES)
                except (OSError, DeviceIOError):
                    got.append(None)
                else:
                    got.append(bytes(buf))

    _stop_after_swap(monkeypatch, window)
    with pytest.raises(Stopped):
        mm.repair("m", 1, new)
    wrong = [r for r, buf in enumerate(got)
             if buf is not None and buf != data[r * REGION_BYTES:(r + 1) * REGION_BYTES]]
    assert len(got) == SIZE // REGION_BYTES and wrong == []


def test_a_repair_copies_at_its_rate_from_the_first_region(
        engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The table that starts the copy is held to ``rate`` as it goes live, not from a message the
    manager sends once the copy is under way (the device's rate carries over to a table loaded on
    it); after a repair that waited the device's rate is unlimited again."""
    mm = MirrorManager(engine)
    data = os.urandom(SIZE)
    a, b = _image(tmp_path, "a", SIZE, data), _image(tmp_path, "b", SIZE, data)
    new, other = _image(tmp_path, "new", SIZE), _image(tmp_path, "other", SIZE)
    mm.create("m", [a, b], region_size=REGION, nosync=True)
    rates: list[int] = []
    _stop_after_swap(monkeypatch, lambda: rates.append(engine._get("m", "test").live.targets[0].rate))
    with pytest.raises(Stopped):
        mm.repair("m", 1, new, rate=MB)
    assert rates == [MB]
    st = mm.repair("m", 1, other, rate=64 * MB)
    assert st.fully_in_sync and Path(other).read_bytes() == data
    assert engine._get("m", "test").live.targets[0].rate == 0


def test_a_repair_without_handle_errors_on_a_core_log_ends_in_sync_with_its_features(
        engine: Any, tmp_path: Path) -> None:
    """The copy runs with handle_errors; the table then gets its own features back, and its core
    log (which resyncs at every load) is waited for again, so the repair returns in sync."""
    mm = MirrorManager(engine)
    data = os.urandom(SIZE)
    a, b, new = _image(tmp_path, "a", SIZE, data), _image(tmp_path, "b", SIZE), _image(tmp_path, "new", SIZE)
    mm.create("m", [a, b], region_size=REGION, handle_errors=False)
    mm.resync("m", timeout=30)
    st = mm.repair("m", 1, new)
    assert st.fully_in_sync and st.features == () and Path(new).read_bytes() == data


def test_a_refused_load_leaves_the_old_table_resyncing(
        engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``resync_all`` holds the old table's recovery until a resume: when the new table is refused,
    the manager resumes the old one, which then copies every region to its own legs again."""
    mm = MirrorManager(engine)
    data = os.urandom(SIZE)
    a, b = _image(tmp_path, "a", SIZE, data), _image(tmp_path, "b", SIZE, data)
    new, lg = _image(tmp_path, "new", SIZE), _image(tmp_path, "log", 64 * 1024)
    mm.create("m", [a, b], log=lg, region_size=REGION, nosync=True)
    table = str(mm.dm.table("m"))

    def refused(*args: Any, **kwargs: Any) -> None:
        raise InvalidTable("refused")

    monkeypatch.setattr(mirror.manager, "swap_table", refused)
    with pytest.raises(InvalidTable):
        mm.repair("m", 1, new)
    assert str(mm.dm.table("m")) == table
    st = mm.resync("m", timeout=30)
    assert st.fully_in_sync and LogImage.read(mm.open_ref(lg)).out_of_sync() == []
