"""``WaitCountingCondition``: a snapshot's condition counts the threads waiting on it, so that
publishing an exception skips the notify only where nobody waits."""

from __future__ import annotations

import threading
import time

from snapshot.targets.core import WaitCountingCondition

WAIT = 30.0


def test_waiters_are_counted_while_they_wait_and_woken_by_a_notify() -> None:
    lock = threading.Lock()
    cond = WaitCountingCondition(lock)
    ready = [False]
    woke = threading.Event()

    def waiter() -> None:
        with cond:
            cond.wait_for(lambda: ready[0])  # (wait_for waits through wait: counted too)
        woke.set()

    threads = [threading.Thread(target=waiter, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    end = time.monotonic() + WAIT
    while time.monotonic() < end:  # until both wait (the count changes under the lock)
        with lock:
            if cond.waiting == 2:
                break
        time.sleep(0.001)
    with lock:
        assert cond.waiting == 2, "the waiters were not counted"
        ready[0] = True
        cond.notify_all()
    for t in threads:
        t.join(WAIT)
    assert woke.is_set() and not any(t.is_alive() for t in threads)
    with lock:
        assert cond.waiting == 0


def test_a_timed_out_wait_is_counted_out() -> None:
    cond = WaitCountingCondition(threading.Lock())
    with cond:
        assert cond.wait(0.01) is False
        assert cond.waiting == 0
