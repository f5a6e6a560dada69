"""Throttle: byte rate (changeable while running) and the kernel's duty-cycle percentage."""

from __future__ import annotations

import threading
import time

import pytest

import kcopyd
from dmtools.errors import InvalidArgument
from dmtools.testing.faults import MemoryEndpoint, SlowEndpoint
from kc_helpers import TIMEOUT, pattern

KiB = 1024


def test_rate_limits_the_copy():
    size = 512 * KiB
    src, dst = MemoryEndpoint(pattern(size)), MemoryEndpoint(size)
    with kcopyd.Client(num_pages=64, sub_job_size=16 * KiB, rate=1024 * KiB) as kc:
        t0 = time.monotonic()
        job = kc.copy(kcopyd.Region(src, 0, size // 512), [kcopyd.Region(dst, 0, size // 512)])
        assert job.wait(TIMEOUT) and job.ok
        elapsed = time.monotonic() - t0
    # 512 KiB at 1 MiB/s: about half a second (the first burst of at most rate/10 is free)
    assert elapsed >= 0.35
    assert dst.data == src.data


def test_rate_change_while_running_takes_effect():
    size = 4 * 1024 * KiB
    src = SlowEndpoint(MemoryEndpoint(pattern(size)))
    dst = MemoryEndpoint(size)
    with kcopyd.Client(num_pages=64, sub_job_size=16 * KiB, rate=64 * KiB) as kc:
        job = kc.copy(kcopyd.Region(src, 0, size // 512), [kcopyd.Region(dst, 0, size // 512)])
        assert src.started.wait(TIMEOUT)
        assert not job.wait(0.3), "at 64 KiB/s the 4 MiB copy needs a minute"
        t0 = time.monotonic()
        kc.throttle.rate = None
        assert job.wait(TIMEOUT) and job.ok
        assert time.monotonic() - t0 < 10
    assert dst.data == src.inner.data


def test_shared_throttle_and_bad_values():
    thr = kcopyd.Throttle(rate=10 * 1024 * KiB)
    with kcopyd.Client(throttle=thr) as a, kcopyd.Client(throttle=thr) as b:
        assert a.throttle is b.throttle is thr
    for bad in (0, -5, 1.5, True):
        with pytest.raises(InvalidArgument):
            kcopyd.Throttle(rate=bad)  # type: ignore[arg-type]
    for bad in (0, 101, 50.0):
        with pytest.raises(InvalidArgument):
            kcopyd.Throttle(percent=bad)  # type: ignore[arg-type]


class FakeClock:
    """A monotonic clock that only the test moves: ``sleep`` advances it (and records the sleep)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _io_loop(thr: kcopyd.Throttle, clock: FakeClock, n: int, hold: float) -> None:
    for _ in range(n):
        thr.io_start()
        clock.now += hold  # the I/O is in flight for ``hold`` seconds
        thr.io_finish()


def test_duty_cycle_sleeps_between_ios(monkeypatch: pytest.MonkeyPatch):
    # Five I/Os of 1/32 s at 25 %, with sleeps of 1/8 s (binary fractions: the arithmetic is exact).
    # The first I/O issues at once. Each of the next three finds the I/O share over 25 % (e.g. 1/32 s
    # of 1/32 s), sleeps once, and then the share is under 25 %. The fifth finds it exactly at 25 %
    # (4/32 s of 16/32 s) and issues without sleeping. Unthrottled, nothing ever sleeps.
    monkeypatch.setattr(kcopyd.throttle, "SLEEP_USEC", 125000)
    fc, sc = FakeClock(), FakeClock()
    free = kcopyd.Throttle(percent=100, clock=fc, sleep=fc.sleep)
    slow = kcopyd.Throttle(percent=25, clock=sc, sleep=sc.sleep)
    _io_loop(free, fc, 5, 1 / 32)
    _io_loop(slow, sc, 5, 1 / 32)
    assert free.sleeps == 0 and fc.slept == []
    assert slow.sleeps == 3 and sc.slept == [0.125] * 3
    assert sc.now - 100.0 == 5 / 32 + 3 / 8


def test_duty_cycle_gives_up_after_max_sleeps():
    clock = FakeClock()
    thr = kcopyd.Throttle(percent=1, clock=clock, sleep=clock.sleep)
    thr.io_start()
    clock.now += 0.5  # one long I/O: 100 % of the window, far over a 1 % budget
    thr.io_finish()
    thr.io_start()  # sleeps MAX_SLEEPS x 100 ms, then issues anyway (dm-kcopyd.c io_job_start)
    thr.io_finish()
    assert thr.sleeps == kcopyd.throttle.MAX_SLEEPS
    assert clock.slept == [kcopyd.throttle.SLEEP_USEC / 1e6] * kcopyd.throttle.MAX_SLEEPS


def test_throttled_copy_can_be_cancelled():
    size = 4 * 1024 * KiB
    src, dst = SlowEndpoint(MemoryEndpoint(pattern(size))), MemoryEndpoint(size)
    done = threading.Event()
    with kcopyd.Client(num_pages=64, sub_job_size=16 * KiB, rate=32 * KiB) as kc:
        job = kc.copy(kcopyd.Region(src, 0, size // 512), [kcopyd.Region(dst, 0, size // 512)],
                      notify=lambda r, w, c: done.set())
        assert src.started.wait(TIMEOUT)
        assert not job.wait(0.3), "at 32 KiB/s the 4 MiB copy needs two minutes: the throttle holds it"
        t0 = time.monotonic()
        job.cancel()
        assert job.wait(TIMEOUT) and job.cancelled and done.is_set()
        assert time.monotonic() - t0 < 10, "cancel wakes a throttled job instead of waiting out its sleep"
        assert bytes(dst.data) != bytes(src.inner.data)
