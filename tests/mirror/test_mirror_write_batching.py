"""Mirror writes at speed without giving up the log's order: batched log flushes across writers,
lazy clean marks, and one write per leg for consecutive in-sync regions."""

from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest

import mirror.target as target_mod
from dmtools.errors import DeviceIOError
from dmtools.testing.faults import FaultyEndpoint
from dmtools.testing.memory import MemoryEndpoint
from dmtools.testing.wait import wait_until
from mirror.format import LogImage, format_log
from mirror.region import RegionState
from mirror.target import MirrorTarget
from mirror_memdev import FakeContext, build_mirror

KB = 1024
RSIZE = 64 * KB  # 64 KiB regions
NREG = 32
PARAMS = f"disk 2 log {RSIZE // 512} 2 leg0 0 leg1 0"


class HeldFlushLog(MemoryEndpoint):
    """A log device whose flushes wait for ``gate`` (``flushing`` is set while one waits)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.gate = threading.Event()
        self.gate.set()
        self.flushing = threading.Event()

    def flush(self) -> None:
        self.flushing.set()
        if not self.gate.wait(30):
            raise DeviceIOError("test gate never opened", operation="flush", device=self.name)
        super().flush()


class Rig:
    def __init__(self, leg1: Any = None) -> None:
        self.journal: list[tuple[str, str, int, int]] = []
        self.log = HeldFlushLog(64 * KB, "log", self.journal)
        self.devs: dict[str, Any] = {
            "leg0": MemoryEndpoint(NREG * RSIZE, "leg0", self.journal),
            "leg1": MemoryEndpoint(NREG * RSIZE, "leg1", self.journal),
            "log": self.log,
        }
        if leg1 is not None:
            self.devs["leg1"] = leg1(self.devs["leg1"])
        format_log(self.log, NREG, in_sync=True)
        self.t: MirrorTarget = build_mirror(FakeContext(self.devs), NREG * RSIZE // 512, PARAMS)
        self.t.resume()
        assert self.t.wait_in_sync(5)

    def ops(self) -> list[tuple[str, str, int]]:
        return [(op, dev, off) for op, dev, off, _n in list(self.journal)]


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.t.destroy()


def test_writers_share_one_log_flush_and_no_data_precedes_its_mark(rig: Rig) -> None:
    t = rig.t
    rig.journal.clear()
    rig.log.gate.clear()
    rig.log.flushing.clear()
    threads = [threading.Thread(target=t.write, args=(memoryview(b"A" * 4096), 0))]
    threads[0].start()
    assert rig.log.flushing.wait(10)  # the first writer's log flush is held, without the lock
    # a second write to the region whose mark is in flight, and writes to three new regions
    for region, byte in ((0, b"B"), (12, b"C"), (20, b"D"), (28, b"E")):
        th = threading.Thread(target=t.write, args=(memoryview(byte * 4096), region * RSIZE + 8192))
        th.start()
        threads.append(th)

    def all_waiting() -> bool:
        with t.cond:
            return t.rh.regions[0].pending == 2 and {12, 20, 28} <= t.log.unflushed

    wait_until(all_waiting, "the writers to mark their regions")
    assert [op for op in rig.ops() if op[1] != "log"] == []  # no data before the marks are durable
    rig.log.gate.set()
    for th in threads:
        th.join(10)
        assert not th.is_alive()
    ops = rig.ops()
    log_flushes = [i for i, op in enumerate(ops) if op[:2] == ("flush", "log")]
    assert len(log_flushes) == 2  # the three new regions' marks went in one flush
    first_data = {r: min(i for i, (op, dev, off) in enumerate(ops) if dev.startswith("leg") and off // RSIZE == r)
                  for r in (0, 12, 20, 28)}
    assert first_data[0] > log_flushes[0]
    assert all(first_data[r] > log_flushes[1] for r in (12, 20, 28))
    for region, byte in ((12, b"C"), (20, b"D"), (28, b"E")):
        at = region * RSIZE + 8192
        assert rig.devs["leg0"].data[at : at + 4096] == byte * 4096 == rig.devs["leg1"].data[at : at + 4096]
    assert not LogImage.read(rig.log).clean.test(12)  # marked dirty on disk


def test_clean_marks_wait_for_a_quiet_moment_or_the_backlog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(target_mod, "CLEAN_DELAY", 60.0)
    monkeypatch.setattr(target_mod, "CLEAN_MAX_DELAY", 120.0)
    monkeypatch.setattr(target_mod, "CLEAN_BACKLOG_BYTES", 24 * RSIZE)
    r = Rig()
    t = r.t
    try:
        assert t._clean_backlog == 24
        r.journal.clear()
        t.write(memoryview(b"q" * 4096), 3 * RSIZE)
        with t.cond:
            assert t.rh.state(3) is RegionState.CLEAN and 3 in t.rh.clean  # done, still marked
        t.write(memoryview(b"q" * 4096), 3 * RSIZE)  # written again: no new mark, no log flush
        assert [op for op in r.ops() if op[1] == "log"] == [("write", "log", 0), ("flush", "log", 0)]
        assert not LogImage.read(r.log).clean.test(3)
        # writes to every region: the clean ones waiting pass the backlog and are retired at once,
        # the legs flushed before the log write that clears them
        for region in range(NREG):
            t.write(memoryview(b"w" * 4096), region * RSIZE)
        wait_until(lambda: LogImage.read(r.log).clean.test(3), "the backlog to be retired")
        ops = r.ops()
        cleared = max(i for i, op in enumerate(ops) if op == ("write", "log", 0))
        assert {("flush", "leg0", 0), ("flush", "leg1", 0)} <= set(ops[:cleared])
        with t.cond:
            assert len(t.rh.clean) < t._clean_backlog
    finally:
        t.destroy()


def test_a_write_over_two_regions_fails_only_the_region_a_leg_cannot_hold() -> None:
    bad = (5 * RSIZE + 8 * KB) // 512  # one sector inside region 5 of leg 1
    r = Rig(leg1=lambda inner: FaultyEndpoint(inner, write_errors=[(bad, 1)], name="leg1"))
    t = r.t
    try:
        t.write(memoryview(b"x" * (2 * RSIZE)), 4 * RSIZE)  # regions 4 and 5 in one write per leg
        with t.cond:
            assert t.rh.state(4) is not RegionState.NOSYNC
            assert t.rh.state(5) is RegionState.NOSYNC
        assert t.health() == "AD"
        assert t.status().split()[3] == f"{NREG - 1}/{NREG}"
        assert r.devs["leg0"].data[4 * RSIZE : 6 * RSIZE] == b"x" * (2 * RSIZE)
        assert r.devs["leg1"].inner.data[4 * RSIZE : 5 * RSIZE] == b"x" * RSIZE
    finally:
        t.destroy()


def test_leg_writers_run_each_leg_on_its_own_thread_and_survive_a_bug() -> None:
    from mirror.legio import LegWriters

    writers = LegWriters(2, "test-leg")
    try:
        seen: list[str] = []

        def call(value: int) -> int:
            seen.append(threading.current_thread().name)
            if value < 0:
                raise RuntimeError("a bug in the write path")
            return value

        reqs = [writers.submit(i, call, v) for i, v in ((0, 4), (1, 8), (0, -1), (0, 2))]
        assert [r.wait() for r in reqs] == [4, 8, -1, 2]  # -1: the call raised; the writer went on
        assert sorted(set(seen)) == ["test-leg-0", "test-leg-1"]
        assert threading.current_thread().name not in seen
    finally:
        writers.close()
