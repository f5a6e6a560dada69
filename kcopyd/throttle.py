"""Throttles: a byte rate (token bucket) and the kernel's duty-cycle percentage.

The duty cycle follows drivers/md/dm-kcopyd.c (``io_job_start``/``io_job_finish``): the throttle
tracks time with I/O in flight (``io_period``) against elapsed time (``total_period``), halving both
once the window passes about a second; before an I/O, while the I/O share is above ``percent``, it
sleeps ``SLEEP_USEC`` (at most ``MAX_SLEEPS`` times) and then issues anyway. 100 means unlimited,
as the kernel's ``dm_snapshot.snapshot_copy_throttle`` and ``dm_mirror.raid1_resync_throttle``.

The byte rate is this project's addition (users ask for "MB/s" limits, as md's speed_limit_max and
LVM's --maxrecoveryrate). Both settings can change while jobs run; one ``Throttle`` may be shared by
several clients, which are then throttled as a group (as the kernel's shared throttle struct).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from dmtools.errors import InvalidArgument

__all__ = ["Throttle", "SLEEP_USEC", "MAX_SLEEPS"]

#: Sleep between duty-cycle checks and how many sleeps before issuing anyway (dm-kcopyd.c).
SLEEP_USEC = 100000
MAX_SLEEPS = 10
#: Accounting window: ``1 << SHIFT_HZ`` jiffies, i.e. about one second (dm-kcopyd.c).
_ACCOUNT_INTERVAL = 1.0


class Throttle:
    """Limit copying to ``rate`` bytes per second and/or ``percent`` of the time with I/O in flight."""

    def __init__(self, rate: int | None = None, percent: int = 100, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """``clock`` and ``sleep`` are the time source of the duty cycle (tests pass a fake one)."""
        self._clock = clock
        self._sleep = sleep
        self._cond = threading.Condition()
        self._rate: int | None = None
        self._percent = 100
        self.rate = rate
        self.percent = percent
        self._tokens = 0.0
        self._stamp = self._clock()
        # duty-cycle accounting
        self._num_io = 0
        self._io_period = 0.0
        self._total_period = 0.0
        self._last = self._clock()
        #: duty-cycle sleeps taken so far (statistics; tests read it)
        self.sleeps = 0

    # -- settings -------------------------------------------------------------------------------
    @property
    def rate(self) -> int | None:
        """Bytes per second, or ``None`` for no rate limit."""
        return self._rate

    @rate.setter
    def rate(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise InvalidArgument(f"rate must be a positive number of bytes per second, not {value!r}")
        with self._cond:
            self._rate = value
            self._tokens = 0.0
            self._stamp = self._clock()
            self._cond.notify_all()

    @property
    def percent(self) -> int:
        """Duty cycle in percent (1..100; 100 = unlimited)."""
        return self._percent

    @percent.setter
    def percent(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
            raise InvalidArgument(f"throttle percent must be 1..100, not {value!r}")
        with self._cond:
            self._percent = value

    @property
    def active(self) -> bool:
        """True when any limit applies."""
        return self._rate is not None or self._percent < 100

    # -- byte rate ------------------------------------------------------------------------------
    def consume(self, nbytes: int, cancelled: threading.Event | None = None) -> None:
        """Wait until ``nbytes`` may be transferred under the byte rate (debt-based token bucket)."""
        with self._cond:
            while True:
                rate = self._rate
                if rate is None:
                    return
                now = self._clock()
                burst = max(rate / 10.0, 1.0)
                self._tokens = min(burst, self._tokens + (now - self._stamp) * rate)
                self._stamp = now
                if self._tokens >= 0:
                    self._tokens -= nbytes
                    return
                if cancelled is not None and cancelled.is_set():
                    return
                # Woken early by a rate change (notify_all in the setter).
                self._cond.wait(min(1.0, -self._tokens / rate))

    def wake(self) -> None:
        """Wake every waiter so it re-checks its cancel event (a job was cancelled)."""
        with self._cond:
            self._cond.notify_all()

    # -- duty cycle ----------------------------------------------------------------------------
    def _account(self, now: float) -> None:
        diff = now - self._last
        self._last = now
        if self._num_io:
            self._io_period += diff
        self._total_period += diff
        if self._total_period >= _ACCOUNT_INTERVAL:
            shift = int(self._total_period / _ACCOUNT_INTERVAL).bit_length()
            self._total_period /= 1 << shift
            self._io_period /= 1 << shift

    def io_start(self) -> None:
        """Before an I/O: sleep while the I/O share exceeds ``percent`` (at most ``MAX_SLEEPS`` times)."""
        slept = 0
        with self._cond:
            while self._percent < 100:
                self._account(self._clock())
                skew = self._io_period - self._percent * self._total_period / 100.0
                if skew <= 0 or slept >= MAX_SLEEPS:
                    break
                slept += 1
                self.sleeps += 1
                self._cond.release()
                try:
                    self._sleep(SLEEP_USEC / 1e6)
                finally:
                    self._cond.acquire()
            self._num_io += 1

    def io_finish(self) -> None:
        """After an I/O: account the time it was in flight."""
        with self._cond:
            if self._percent < 100 and self._num_io == 1:
                # the last I/O in flight ends an I/O period
                self._account(self._clock())
                self._io_period = min(self._io_period, self._total_period)
            self._num_io -= 1
