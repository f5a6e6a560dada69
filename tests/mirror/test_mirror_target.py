"""The userspace ``mirror`` target over in-memory legs: table checks, I/O paths, resync, failures."""

from __future__ import annotations

import os
import threading
import time
from typing import Iterator

import pytest

from dmtools.errors import DeviceIOError, InvalidTable
from dmtools.testing.faults import FaultyEndpoint
from dmtools.testing.memory import GatedEndpoint, MemoryEndpoint
from dmtools.testing.wait import wait_until
from mirror.format import LogImage, format_log
from mirror.target import MirrorTarget
from mirror_memdev import FakeContext, build_mirror

MB = 1 << 20
LEN = 2 * MB // 512  # 2 MiB mirror
REGION = 128  # 64 KiB regions -> 32 regions


class Rig:
    """Legs, a log device and the target built on them."""

    def __init__(self, nlegs: int = 2, size: int = 2 * MB, gated: bool = False) -> None:
        self.journal: list[tuple[str, str, int, int]] = []
        self.devs: dict[str, MemoryEndpoint] = {}
        for i in range(nlegs):
            gate = gated and i == 0  # the gate starts open: a test closes it to hold a copy
            self.devs[f"leg{i}"] = (GatedEndpoint(size, "leg0", self.journal, open=True) if gate
                                    else MemoryEndpoint(size, f"leg{i}", self.journal))
        self.devs["log"] = MemoryEndpoint(64 * 1024, "log", self.journal)
        self.ctx = FakeContext(self.devs)
        self.targets: list[MirrorTarget] = []

    def leg(self, i: int) -> MemoryEndpoint:
        return self.devs[f"leg{i}"]

    def build(self, params: str, *, length: int = LEN, resume: bool = True, rate: int | None = None) -> MirrorTarget:
        t = build_mirror(self.ctx, length, params)
        self.targets.append(t)
        if rate is not None:
            t.message(["resync_rate", str(rate)])
        if resume:
            t.resume()
        return t

    def close(self) -> None:
        for t in self.targets:
            t.destroy()

    def __enter__(self) -> "Rig":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    with Rig() as r:
        yield r


def legs_params(n: int = 2) -> str:
    return f"{n} " + " ".join(f"leg{i} 0" for i in range(n))


def test_target_refuses_what_its_value_cannot_see(rig: Rig) -> None:
    # The table's words are checked by the value, with the kernel's texts (tests/test_table.py);
    # the target refuses a log type this engine lacks and a device it cannot open, writing nothing.
    with pytest.raises(InvalidTable, match='mirror-test: mirror: Error creating mirror dirty log: Module for logging type "userspace"'):
        rig.build(f"userspace 2 uuid-x log {legs_params()}")
    with pytest.raises(InvalidTable, match="Device lookup failure: nowhere"):
        rig.build(f"core 1 {REGION} 2 leg0 0 nowhere 0")
    assert not rig.targets and all(not j for j in rig.journal)


def test_leg_area_past_the_end_is_declared(rig: Rig) -> None:
    # the engine refuses the table at resume (dm_calculate_queue_limits), as the kernel does
    t = rig.build("core 1 128 2 leg0 0 leg1 8", resume=False)
    assert t.area_errors()


def test_too_small_disk_log_is_rejected() -> None:
    r = Rig()
    r.devs["log"] = MemoryEndpoint(1024, "log")
    r.ctx = FakeContext(r.devs)
    with pytest.raises(InvalidTable, match="too small"):
        r.build(f"disk 2 log {REGION} {legs_params()}")
    assert r.devs["log"].journal == []


def test_status_and_table_text(rig: Rig) -> None:
    t = rig.build(f"core 2 {REGION} nosync {legs_params()} 1 handle_errors")
    assert t.status() == "2 7:0 7:1 32/32 1 AA 1 core"
    assert t.table_params() == "core 2 128 nosync 2 7:0 0 7:1 0 1 handle_errors"
    d = rig.build(f"disk 2 log {REGION} {legs_params()} 2 handle_errors keep_log", resume=False)
    assert d.table_params() == "disk 2 7:2 128 2 7:0 0 7:1 0 2 handle_errors keep_log"
    assert d.status() == "2 7:0 7:1 0/32 1 AA 3 disk 7:2 A"


def test_core_log_resyncs_everything_from_the_default_leg(rig: Rig) -> None:
    rig.leg(0).data[:] = os.urandom(2 * MB)
    t = rig.build(f"core 1 {REGION} {legs_params()}")
    assert t.wait_in_sync(10)
    assert rig.leg(1).data == rig.leg(0).data
    assert t.status() == "2 7:0 7:1 32/32 1 AA 1 core"
    assert rig.ctx.events >= 1  # the sync-complete event


def test_last_region_may_be_short() -> None:
    with Rig() as r:
        r.leg(0).data[:] = os.urandom(2 * MB)
        t = r.build(f"core 1 {REGION} {legs_params()}", length=LEN - 8)
        assert t.nr_regions == 32 and t.wait_in_sync(10)
        end = (LEN - 8) * 512
        assert r.leg(1).data[:end] == r.leg(0).data[:end]
        assert r.leg(1).data[end:] == bytes(2 * MB - end)


def test_several_regions_recover_at_once() -> None:
    with Rig(gated=True) as r:
        r.leg(0).gate.clear()  # type: ignore[attr-defined]
        t = r.build(f"core 1 {REGION} {legs_params()}")
        wait_until(lambda: r.leg(0).in_flight >= 2, "two recoveries in flight", 5)  # type: ignore[attr-defined]
        r.leg(0).gate.set()  # type: ignore[attr-defined]
        assert t.wait_in_sync(10)
        assert r.leg(0).peak >= 2  # type: ignore[attr-defined]


def _ops(journal: list[tuple[str, str, int, int]]) -> list[str]:
    return [f"{op} {dev}" for op, dev, _o, _n in journal]


def test_write_ordering_mark_before_data_and_flush_legs_before_clean(rig: Rig) -> None:
    format_log(rig.devs["log"], 32, in_sync=True)
    t = rig.build(f"disk 2 log {REGION} {legs_params()}")
    assert t.wait_in_sync(5)
    time.sleep(0.05)
    rig.journal.clear()
    t.write(memoryview(b"a" * 4096), 3 * 64 * 1024)
    ops = _ops(rig.journal)
    assert ops[:4] == ["write log", "flush log", "write leg0", "write leg1"]
    # the worker then clears the region: legs flushed before the clean bit is written
    deadline = time.monotonic() + 5
    while LogImage.read(rig.devs["log"]).clean.test(3) is False and time.monotonic() < deadline:
        time.sleep(0.01)
    ops = _ops(rig.journal)
    assert sorted(ops[4:6]) == ["flush leg0", "flush leg1"] and ops[6] == "write log"
    assert rig.leg(0).data[3 * 65536 : 3 * 65536 + 4096] == b"a" * 4096 == rig.leg(1).data[3 * 65536 : 3 * 65536 + 4096]


def test_nosync_region_writes_go_to_the_default_leg_only(rig: Rig) -> None:
    img = format_log(rig.devs["log"], 32, in_sync=True)
    img.clean.clear(5)
    img.write(rig.devs["log"])
    t = rig.build(f"disk 2 log {REGION} {legs_params()}", rate=1)  # hold the resync
    t.rh.recovery_stopped = True
    t.write(memoryview(b"n" * 512), 5 * 65536)
    t.write(memoryview(b"s" * 512), 6 * 65536)
    assert rig.leg(0).data[5 * 65536 : 5 * 65536 + 512] == b"n" * 512
    assert rig.leg(1).data[5 * 65536 : 5 * 65536 + 512] == bytes(512)
    assert rig.leg(1).data[6 * 65536 : 6 * 65536 + 512] == b"s" * 512
    assert t.status().split()[3] == "31/32"


def test_write_to_recovering_region_waits_for_the_copy() -> None:
    with Rig(gated=True) as r:
        r.leg(0).data[:] = b"o" * (2 * MB)
        format_log(r.devs["log"], 32, in_sync=True)
        img = LogImage.read(r.devs["log"])
        img.clean.clear(0)
        img.write(r.devs["log"])
        r.leg(0).gate.clear()  # type: ignore[attr-defined]
        t = r.build(f"disk 2 log {REGION} {legs_params()}")
        assert r.leg(0).reading.wait(5)  # type: ignore[attr-defined]
        done = threading.Event()

        def writer() -> None:
            t.write(memoryview(b"w" * 512), 0)
            done.set()

        th = threading.Thread(target=writer)
        th.start()
        assert not done.wait(0.2)  # delayed while region 0 recovers
        r.leg(0).gate.set()  # type: ignore[attr-defined]
        assert done.wait(5)
        th.join()
        assert r.leg(0).data[:512] == b"w" * 512 == r.leg(1).data[:512]
        assert r.leg(1).data[512:65536] == b"o" * (65536 - 512)
        assert t.wait_in_sync(5)


def test_read_fails_over_and_marks_r(rig: Rig) -> None:
    rig.leg(1).data[:] = b"z" * (2 * MB)
    t = rig.build(f"core 2 {REGION} nosync {legs_params()} 1 handle_errors")
    assert t.wait_in_sync(5)
    rig.leg(0).fail_reads = True
    buf = bytearray(4096)
    t.read(memoryview(buf), 8192)
    assert bytes(buf) == b"z" * 4096
    assert t.status().split()[5] == "RA"
    assert t.default == 1 and rig.ctx.events >= 1


def test_unsynced_region_reads_only_from_default(rig: Rig) -> None:
    t = rig.build(f"core 1 {REGION} {legs_params()}", rate=1)
    t.rh.recovery_stopped = True
    rig.leg(0).fail_reads = True
    with pytest.raises(DeviceIOError):
        t.read(memoryview(bytearray(512)), 20 * 65536)
    assert t.health() == "RA"


def test_write_failure_without_handle_errors_completes_and_marks_d(rig: Rig) -> None:
    t = rig.build(f"core 2 {REGION} nosync {legs_params()}")
    assert t.wait_in_sync(5)
    t.rh.recovery_stopped = True
    events = rig.ctx.events
    rig.leg(1).fail_writes = True
    t.write(memoryview(b"q" * 512), 0)
    assert t.status().split()[3:6] == ["31/32", "1", "AD"]
    assert rig.ctx.events == events  # no event without handle_errors
    assert rig.leg(0).data[:512] == b"q" * 512


def test_write_failure_with_handle_errors_is_held_until_suspend(rig: Rig) -> None:
    t = rig.build(f"core 2 {REGION} nosync {legs_params()} 1 handle_errors")
    assert t.wait_in_sync(5)
    events = rig.ctx.events
    rig.leg(1).fail_writes = True
    result: list[BaseException | None] = []

    def writer() -> None:
        try:
            t.write(memoryview(b"h" * 512), 0)
            result.append(None)
        except DeviceIOError as err:
            result.append(err)

    th = threading.Thread(target=writer)
    th.start()
    th.join(0.2)
    assert th.is_alive() and rig.ctx.events > events and t.health() == "AD"
    t.presuspend()
    th.join(5)
    assert isinstance(result[0], DeviceIOError)
    t.postsuspend()


def test_recovery_errors_mark_s() -> None:
    with Rig(nlegs=3) as r:
        r.leg(2).fail_writes = True
        t = r.build(f"core 1 {REGION} {legs_params(3)} 1 handle_errors")
        wait_until(lambda: t.health() == "AAS", lambda: f"health AAS, not {t.health()}", 5)
        assert int(t.status().split()[4].split("/")[0]) < 32


def test_failed_leg_flush_marks_f_and_keeps_regions_dirty(rig: Rig) -> None:
    format_log(rig.devs["log"], 32, in_sync=True)
    t = rig.build(f"disk 2 log {REGION} {legs_params()}")
    assert t.wait_in_sync(5)
    rig.leg(1).fail_flush = True
    t.write(memoryview(b"f" * 512), 0)
    wait_until(lambda: t.health() == "AF", lambda: f"health AF, not {t.health()}", 5)
    assert LogImage.read(rig.devs["log"]).out_of_sync() == list(range(32))


def test_log_device_failure_reported(rig: Rig) -> None:
    format_log(rig.devs["log"], 32, in_sync=True)
    t = rig.build(f"disk 2 log {REGION} {legs_params()}")
    rig.devs["log"].fail_writes = True
    t.write(memoryview(b"l" * 512), 0)
    assert t.status().endswith("3 disk 7:2 D")


def test_resync_rate_is_held() -> None:
    with Rig(size=MB) as r:
        # 16 regions of 8 KiB = 128 KiB at 256 KiB/s: about 0.5 s
        t = r.build(f"core 1 16 {legs_params()}", length=256, rate=256 * 1024)
        t0 = time.monotonic()
        assert t.wait_in_sync(10)
        took = time.monotonic() - t0
        assert 0.4 <= took <= 2.0, took  # never faster than the limit; slower only under load


def test_rebuild_copies_to_the_rebuilt_leg_only() -> None:
    with Rig(nlegs=3) as r:
        data = os.urandom(2 * MB)
        r.leg(0).data[:] = data
        r.leg(1).data[:] = data
        format_log(r.devs["log"], 32, in_sync=True)
        t = r.build(f"disk 2 log {REGION} {legs_params(3)}")
        assert t.wait_in_sync(5)
        r.journal.clear()
        t.message(["rebuild", "2"])
        assert t.status().split()[4] == "0/32"
        assert t.wait_in_sync(10)
        assert r.leg(2).data == data
        assert not [j for j in r.journal if j[0] == "write" and j[1] == "leg1"]
        assert LogImage.read(r.devs["log"]).out_of_sync() == []
        with pytest.raises(Exception, match="cannot rebuild"):
            t.message(["rebuild", "0"])


def test_write_during_rebuild_reaches_every_leg_after_resync() -> None:
    with Rig(nlegs=3) as r:
        data = os.urandom(2 * MB)
        r.leg(0).data[:] = data
        r.leg(1).data[:] = data
        t = r.build(f"core 2 {REGION} nosync {legs_params(3)}", rate=1)
        assert t.wait_in_sync(5)
        t.message(["rebuild", "2"])
        t.write(memoryview(b"W" * 4096), 10 * 65536)  # NOSYNC now: default leg only
        t.message(["resync_rate", "0"])
        assert t.wait_in_sync(10)
        assert r.leg(1).data == r.leg(0).data == r.leg(2).data
        assert r.leg(1).data[10 * 65536 : 10 * 65536 + 4096] == b"W" * 4096


@pytest.mark.parametrize("features", ["", " 1 handle_errors"])
def test_region_whose_copy_failed_is_never_marked_in_sync(features: str) -> None:
    """Regression test for the dm-mirror silent corruption (2006): a region whose recovery copy did
    not complete must stay out of sync on the log, so that the next activation copies it again."""
    with Rig() as r:
        r.leg(0).data[:] = os.urandom(2 * MB)
        format_log(r.devs["log"], 32, in_sync=False)
        bad = 5 * 65536 + 40960  # the second half of region 5 cannot be written on leg 1
        r.devs["leg1"] = FaultyEndpoint(r.leg(1), write_errors=[(bad // 512, 8)])  # type: ignore[assignment]
        t = r.build(f"disk 2 log {REGION} {legs_params()}{features}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with t.cond:
                if not t.rh.recovering and t.log.sync_search >= 32:
                    break
            time.sleep(0.01)
        t.presuspend()
        t.postsuspend()
        on_disk = LogImage.read(r.devs["log"])
        assert on_disk.out_of_sync() == [5]
        if features:
            assert t.health() == "AS" and t.status().split()[3] == "31/32"
        else:
            # without handle_errors the kernel counts a failed recovery as in sync in memory
            # (dm-region-hash.c), but the clean bit on disk stays 0: the next activation recopies it
            assert t.status().split()[3] == "32/32"


def test_sequential_writes_share_log_flushes_and_end_clean(rig: Rig) -> None:
    format_log(rig.devs["log"], 32, in_sync=True)
    t = rig.build(f"disk 2 log {REGION} {legs_params()}")
    assert t.wait_in_sync(5)
    rig.journal.clear()
    for r in range(16):
        t.write(memoryview(b"s" * 65536), r * 65536)
    log_flushes = [j for j in rig.journal if j[:2] == ("flush", "log")]
    assert len(log_flushes) >= 1 and len(log_flushes) <= 16 // t.mark_ahead + 1  # marks ride along with earlier flushes
    wait_until(lambda: LogImage.read(rig.devs["log"]).out_of_sync() == [], "unused marks to be retired too", 5)
    assert rig.leg(1).data[: 16 * 65536] == b"s" * (16 * 65536)
