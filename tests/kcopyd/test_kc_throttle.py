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


def _io_loop(thr: kcopyd.Throttle, n: int, hold: float) -> float:
    t0 = time.monotonic()
    for _ in range(n):
        thr.io_start()
        time.sleep(hold)
        thr.io_finish()
    return time.monotonic() - t0


def test_duty_cycle_sleeps_between_ios():
    # 5 I/Os of 20 ms: unthrottled there is no sleep; at 20% the I/O share exceeds the budget after
    # each I/O, so the next one first sleeps 100 ms (SLEEP_USEC).
    free, slow = kcopyd.Throttle(percent=100), kcopyd.Throttle(percent=20)
    _io_loop(free, 5, 0.02)
    elapsed = _io_loop(slow, 5, 0.02)
    assert free.sleeps == 0 and slow.sleeps >= 2
    assert elapsed >= slow.sleeps * 0.1


def test_duty_cycle_gives_up_after_max_sleeps():
    thr = kcopyd.Throttle(percent=1)
    thr.io_start()
    time.sleep(0.05)
    thr.io_finish()
    t0 = time.monotonic()
    thr.io_start()  # far over budget: sleeps MAX_SLEEPS x 100 ms at most, then issues anyway
    thr.io_finish()
    assert time.monotonic() - t0 < 1.5


def test_throttled_copy_can_be_cancelled():
    size = 4 * 1024 * KiB
    src, dst = MemoryEndpoint(pattern(size)), MemoryEndpoint(size)
    done = threading.Event()
    with kcopyd.Client(num_pages=64, sub_job_size=16 * KiB, rate=32 * KiB) as kc:
        job = kc.copy(kcopyd.Region(src, 0, size // 512), [kcopyd.Region(dst, 0, size // 512)],
                      notify=lambda r, w, c: done.set())
        time.sleep(0.05)
        job.cancel()
        assert job.wait(TIMEOUT) and job.cancelled and done.is_set()
