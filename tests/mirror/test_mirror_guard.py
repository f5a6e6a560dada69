"""A mirror created by the manager is monitored from creation (``mirror.guard``): a write held after
a leg failure is released within a bounded time, by dropping the failed leg where the other legs
hold the data, else with EIO; it never waits forever, and no read returns data not written."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dmtools.errors import DeviceIOError
from dmtools.target_values import Linear, Mirror
from mirror import MirrorManager
from mirror.guard import GUARD_INTERVAL, UNMONITORED_PREFIX, guard_for
from dmtools.testing.trip import Switch, install
from dmtools.testing.wait import wait_until
from test_mirror_manager import _image

SIZE = 2 << 20
REGION = 128  # 64 KiB regions, 32 of them
RB = REGION * 512
#: a held write must end within this many seconds (a guard period plus a reload, on a loaded machine)
BOUND = 10.0


def _writer(eng: Any, offset: int, data: bytes, name: str = "m") -> tuple[threading.Event, list[Any]]:
    done = threading.Event()
    out: list[Any] = []

    def run() -> None:
        t0 = time.monotonic()
        try:
            with eng.open_endpoint(name) as ep:
                ep.write(data, offset)
                # an exposed device's write is in its page cache until then: its close writes it
                # only when it is the last (another opener, a probe, makes the close return at once)
                ep.flush()
            out.append(("ok", time.monotonic() - t0))
        except DeviceIOError as err:
            out.append((err.errno, time.monotonic() - t0))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done, out


@pytest.fixture
def eng(engine: Any) -> Any:
    install(engine)
    return engine


@pytest.mark.parametrize("legs,bad", [(2, 1), (3, 1), (2, 0)], ids=["2-legs", "3-legs", "primary"])
def test_failed_leg_is_dropped_and_the_held_write_lands(eng: Any, tmp_path: Path, legs: int, bad: int) -> None:
    data = os.urandom(SIZE)
    paths = [_image(tmp_path, f"l{i}", SIZE, data) for i in range(legs)]
    sw = Switch(f"drop{legs}{bad}")
    eng.create("bad", f"0 {SIZE // 512} trip {paths[bad]} 0 {sw.name}")
    refs = [eng.device_ref("bad") if i == bad else p for i, p in enumerate(paths)]
    mm = MirrorManager(eng)
    mm.create("m", refs, region_size=REGION, nosync=True)  # handle_errors and monitoring: the defaults
    sw.trip()
    new = os.urandom(3 * RB)
    done, out = _writer(eng, 5 * RB, new)
    assert done.wait(BOUND), "the held write was never released"
    assert out[0][0] == "ok" and out[0][1] < BOUND
    target = eng.table("m").lines[0].target
    kept = [p for i, p in enumerate(paths) if i != bad]
    if legs == 2:
        # in sync when the primary failed: the default moved to leg 1 (fail_mirror), which holds it all
        assert target == Linear(kept[0], 0)
    else:
        assert isinstance(target, Mirror) and [lg.device for lg in target.legs] == kept
        assert mm.status("m").health == "AA"
    expect = data[:5 * RB] + new + data[8 * RB:]
    with eng.open_endpoint("m", writable=False) as ep:
        buf = bytearray(SIZE)
        ep.readinto(buf, 0)
    assert bytes(buf) == expect
    for p in kept:
        with open(p, "rb") as f:
            assert f.read() == expect
    wait_until(lambda: guard_for(eng).actions, "the guard to record its action (once the reload returned)", BOUND)
    assert [a[1] for a in guard_for(eng).actions if a[0] == "m"] == ["dropped"]


@pytest.fixture
def late_worker(eng: Any, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Mirror workers (kmirrord) start their first pass only once the returned event is set (or
    the target is destroyed): the interleaving of a loaded machine, where a write reaches a new
    mirror before its worker thread has run. Depends on ``eng`` so that it ends first."""
    from mirror.target import MirrorTarget

    gate = threading.Event()
    run = MirrorTarget._run

    def late_run(self: MirrorTarget) -> None:
        with self.cond:
            while not gate.is_set() and not self._stop:
                self.cond.wait(0.05)
        run(self)

    monkeypatch.setattr(MirrorTarget, "_run", late_run)
    yield gate
    gate.set()


def test_primary_failing_before_the_first_worker_pass_is_dropped(late_worker: threading.Event, eng: Any,
                                                                 tmp_path: Path) -> None:
    """A ``nosync`` mirror is in sync from its load (the kernel's constructor wakes kmirrord, whose
    pass sets ``in_sync`` before any write): a write failing on the primary before our worker's
    first pass still moves the default to leg 1 (``fail_mirror``), so the guard drops leg 0 and the
    held write lands, not EIO (it failed so once in a full unit-tier run at load 8)."""
    test_failed_leg_is_dropped_and_the_held_write_lands(eng, tmp_path, 2, 0)
    assert not late_worker.is_set()  # no pass ran: the write met the state resume left


def test_primary_failing_while_the_pass_that_ends_the_resync_writes_the_log(
        eng: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's pass that copies the last region writes the disk log without the lock before it
    notes ``in_sync``; a write to a region whose dirty mark is already on the log goes on meanwhile.
    The kernel's write would come in a later pass, after ``do_recovery`` set ``in_sync``: so must
    ours, or a failure of the primary keeps it the default and the held write ends with EIO."""
    import mirror.target as mt
    from mirror.guard import MirrorGuard
    from mirror.log import DiskDirtyLog

    # the first write's region keeps its durable dirty mark (no retirement during the test)
    monkeypatch.setattr(mt, "CLEAN_DELAY", 3600.0)
    monkeypatch.setattr(mt, "CLEAN_MAX_DELAY", 3600.0)
    last = SIZE // RB - 1
    copy_last, in_log_write, end_log_write = threading.Event(), threading.Event(), threading.Event()
    recover = mt.MirrorTarget._recover

    def late_last_copy(self: Any, run: list[int], source: Any) -> None:
        if last not in run:
            return recover(self, run, source)
        if run[:-1]:
            recover(self, run[:-1], source)
        threading.Thread(target=lambda: (copy_last.wait(), recover(self, [last], source)), daemon=True).start()

    write_image = DiskDirtyLog.write_image

    def held_log_write(self: DiskDirtyLog, pending: Any) -> None:
        if self.get_sync_count() == self.region_count and not in_log_write.is_set():
            in_log_write.set()
            end_log_write.wait()
        write_image(self, pending)

    monkeypatch.setattr(mt.MirrorTarget, "_recover", late_last_copy)
    monkeypatch.setattr(DiskDirtyLog, "write_image", held_log_write)
    data = os.urandom(SIZE)
    a, b = _image(tmp_path, "a", SIZE, data), _image(tmp_path, "b", SIZE)
    lg = _image(tmp_path, "log", 64 * 1024)
    sw = Switch("resync-end")
    eng.create("src", f"0 {SIZE // 512} trip {a} 0 {sw.name}")
    mm = MirrorManager(eng)
    try:
        mm.create("m", [eng.device_ref("src"), b], log=lg, region_size=REGION, monitor=False)
        t = eng._get("m", "test").live.targets[0]
        wait_until(lambda: mm.status("m").in_sync == last, "every region but the last to be copied", BOUND)
        with eng.open_endpoint("m") as ep:
            ep.write(b"1" * RB, 5 * RB)  # region 5: dirty mark on the log
        copy_last.set()
        assert in_log_write.wait(BOUND), "the pass that ends the resync never wrote the log"
        assert not t.in_sync  # the window: every region in sync, the pass not done
        sw.trip()
        done, out = _writer(eng, 5 * RB, b"2" * RB)
        wait_until(lambda: eng.message("m", 0, "held_ios") == "1", "the write to be held", BOUND)
        assert eng.message("m", 0, "default_leg") == "1"  # in sync when leg 0 failed: fail_mirror moved it
    finally:
        copy_last.set()
        end_log_write.set()
    assert MirrorGuard(eng).check("m") == "dropped"
    assert done.wait(BOUND) and out[0][0] == "ok"
    assert eng.table("m").lines[0].target == Linear(b, 0)
    with open(b, "rb") as f:
        assert f.read() == data[:5 * RB] + b"2" * RB + data[6 * RB:]


def failing_source(eng: Any, tmp_path: Path, switch: str,
                   monitor: bool = True) -> tuple[bytes, Any, list[int], list[int]]:
    """Mirror ``m`` whose source (leg 0) fails after 8 region copies of its resync, so out of
    sync: ``(data, manager, regions in sync, regions not)`` once its status shows ``S``."""
    data = os.urandom(SIZE)
    a, b = _image(tmp_path, "a", SIZE, data), _image(tmp_path, "b", SIZE)
    sw = Switch(switch, fail_after=8)
    eng.create("src", f"0 {SIZE // 512} trip {a} 0 {sw.name}")
    mm = MirrorManager(eng)
    mm.create("m", [eng.device_ref("src"), b], region_size=REGION, monitor=monitor)
    wait_until(lambda: mm.status("m").health[0] == "S", "leg 0 to fail", BOUND)
    t = eng._get("m", "test").live.targets[0]
    # a copy read from leg 0 before it failed may still land: wait for it
    wait_until(lambda: not t.rh.recovering, "recovery to stop", BOUND)
    st = mm.status("m")
    assert 0 < st.in_sync < st.regions
    synced = [r for r in range(st.regions) if t.log.in_sync(r)]
    return data, mm, synced, [r for r in range(st.regions) if r not in synced]


def test_source_failed_out_of_sync_ends_held_writes_with_eio(eng: Any, tmp_path: Path) -> None:
    data, mm, synced, unsynced = failing_source(eng, tmp_path, "src-oos")
    st = mm.status("m")
    # a write to a region not yet copied: held (dm-raid1 do_writes), then ended with EIO
    done, out = _writer(eng, unsynced[0] * RB, b"w" * 4096)
    assert done.wait(BOUND), "the held write was never released"
    assert out[0][0] == errno.EIO and out[0][1] < BOUND
    wait_until(lambda: any(act == "released" for dev, act, _ in guard_for(eng).actions if dev == "m"),
               lambda: f"the guard to record the release (once the resume returned): {guard_for(eng).actions}", BOUND)
    assert isinstance(eng.table("m").lines[0].target, Mirror)  # kept for a repair
    # reads: the copied regions come from leg 1 with their data, the others fail with EIO
    with eng.open_endpoint("m", writable=False) as ep:
        for r in range(st.regions):
            buf = bytearray(RB)
            if r in synced:
                ep.readinto(buf, r * RB)
                assert bytes(buf) == data[r * RB:(r + 1) * RB]
            else:
                with pytest.raises(DeviceIOError) as info:
                    ep.readinto(buf, r * RB)
                assert info.value.errno == errno.EIO


def test_unmonitored_mirror_is_left_to_another_monitor(eng: Any, tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    a, b = _image(tmp_path, "a", SIZE, data), _image(tmp_path, "b", SIZE, data)
    sw = Switch("unmon")
    eng.create("bad", f"0 {SIZE // 512} trip {b} 0 {sw.name}")
    mm = MirrorManager(eng)
    mm.create("m", [a, eng.device_ref("bad")], region_size=REGION, nosync=True, monitor=False)
    assert eng.info("m").uuid.startswith(UNMONITORED_PREFIX)
    sw.trip()
    done, out = _writer(eng, 0, b"z" * 4096)
    wait_until(lambda: eng.message("m", 0, "held_ios") == "1", "the write to be held", BOUND)
    assert guard_for(eng).check_all() == 0  # not watched: nothing done
    assert not done.is_set() and eng.table("m").lines[0].target.legs[1].device == eng.device_ref("bad")
    eng.suspend("m")  # what another monitor's reload does: the held write ends (EIO)
    eng.resume("m")
    assert done.wait(BOUND) and out[0][0] == errno.EIO


def test_guard_interval_is_short() -> None:
    assert GUARD_INTERVAL <= 1.0


@pytest.fixture(params=[pytest.param(False, id="unexposed"), pytest.param(None, id="exposed", marks=pytest.mark.root)])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    from dmtools.testing.daemon import serving_daemon
    from dmtools.testing.trip import install as install_trip

    with serving_daemon(str(tmp_path / "run"), expose=request.param, setup=lambda d: install_trip(d.engine)) as d:
        yield d


def test_daemon_runs_the_guard_for_mirrors_its_clients_create(daemon: Any, tmp_path: Path) -> None:
    """``mirror create`` through the daemon: the daemon's guard (a ``dmtools.services`` entry point)
    releases the held write after the CLI process is gone."""
    from dmtools.engine.client import UserspaceClient

    data = os.urandom(SIZE)
    a, b = _image(tmp_path, "a", SIZE, data), _image(tmp_path, "b", SIZE, data)
    sw = Switch("daemon-leg")
    client = UserspaceClient(daemon.run_dir)
    try:
        client.create("bad", f"0 {SIZE // 512} trip {b} 0 {sw.name}")
        MirrorManager(client).create("m", [a, client.device_ref("bad")], region_size=REGION, nosync=True)
        sw.trip()
        done, out = _writer(client, RB, b"d" * 8192)
        assert done.wait(BOUND), "the held write was never released by the daemon's guard"
        assert out[0][0] == "ok"
        assert client.table("m").lines[0].target == Linear(a, 0)
        with open(a, "rb") as f:
            f.seek(RB)
            assert f.read(8192) == b"d" * 8192
        client.remove("m")
        client.remove("bad")
    finally:
        client.close()


def test_dropping_a_leg_of_a_nosync_mirror_out_of_sync_resyncs_the_rest(eng: Any, tmp_path: Path) -> None:
    """A ``nosync`` core log reloaded would trust every region: once the mirror is out of sync (the
    failed write's region), the guard's new table resyncs them all instead. Leg 2 starts blank
    although the mirror was made ``nosync``: only a resync gives it the data."""
    from dmtools.target_values import CoreLog

    data = os.urandom(SIZE)
    paths = [_image(tmp_path, "l0", SIZE, data), _image(tmp_path, "l1", SIZE, data), _image(tmp_path, "l2", SIZE)]
    sw = Switch("nosync-drop")
    eng.create("bad", f"0 {SIZE // 512} trip {paths[1]} 0 {sw.name}")
    mm = MirrorManager(eng)
    mm.create("m", [paths[0], eng.device_ref("bad"), paths[2]], region_size=REGION, nosync=True)
    sw.trip()
    done, out = _writer(eng, 0, b"n" * 4096)  # fails on leg 1: held until the guard acts
    assert done.wait(BOUND) and out[0][0] == "ok"
    target = eng.table("m").lines[0].target
    assert [lg.device for lg in target.legs] == [paths[0], paths[2]]
    assert target.log == CoreLog(REGION)  # not nosync: every region is copied again
    st = mm.resync("m", timeout=60)
    assert st.fully_in_sync
    expect = b"n" * 4096 + data[4096:]
    for p in (paths[0], paths[2]):
        with open(p, "rb") as f:
            assert f.read() == expect
