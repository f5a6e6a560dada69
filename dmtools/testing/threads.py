"""Run test bodies in threads (released together, or one started now), and fail the test if one
fails or hangs."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["HeldAt", "Worker", "lock_waiters", "run_together", "take_turns"]


class Worker:
    """``fn(*args, **kwargs)`` running in a thread of its own from now on. :meth:`result` waits for
    it and re-raises what it raised: a test sees a failed call (an ``EIO``, a short write), not
    only its effects."""

    def __init__(self, fn: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        self.error: BaseException | None = None
        self._fn = fn
        self._thread = threading.Thread(target=self._run, args=(args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            self._fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised by result()
            self.error = err

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout: float = 20.0) -> None:
        """Wait up to ``timeout`` seconds for the call; ``AssertionError`` if it is still running
        then, else what it raised, if anything."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self._fn!r} still running after {timeout} s"
        if self.error is not None:
            raise self.error


def run_together(fns: Sequence[Callable[[], object]], timeout: float = 60.0) -> None:
    """Run each of ``fns`` in its own thread, all released at once by a barrier; wait up to
    ``timeout`` seconds for them. Raises ``AssertionError`` if a thread is still running then,
    and re-raises the first exception a thread raised."""
    start = threading.Barrier(len(fns))
    errors: list[BaseException] = []

    def run(fn: Callable[[], object]) -> None:
        start.wait()
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - re-raised by the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(fn,), daemon=True) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    stuck = sum(t.is_alive() for t in threads)
    assert not stuck, f"{stuck} of {len(threads)} threads still running after {timeout} s"
    if errors:
        raise errors[0]


class HeldAt:
    """``dm`` (a backend) whose first call of ``method`` waits for ``go``, with ``inside`` set
    meanwhile: a manager given it is stopped inside its change, at that call."""

    def __init__(self, dm: Any, method: str, timeout: float = 60.0) -> None:
        self._dm, self._method, self._timeout = dm, method, timeout
        self.inside, self.go = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        call = getattr(self._dm, name)
        if name != self._method:
            return call

        def held(*args: Any, **kwargs: Any) -> Any:
            if not self.inside.is_set():
                self.inside.set()
                assert self.go.wait(self._timeout), f"{self._method} held for {self._timeout} s"
            return call(*args, **kwargs)

        return held


def lock_waiters(paths: Iterable["str | os.PathLike[str]"]) -> bool:
    """True when ``/proc/locks`` shows a blocked lock request on one of ``paths``' inodes."""
    inodes = {f":{os.stat(p).st_ino} " for p in paths}
    with open("/proc/locks") as f:
        return any(" -> " in line and any(i in line for i in inodes) for line in f)


def take_turns(first: Callable[[], object], second: Callable[[], object], held: HeldAt,
               locks: Callable[[], Iterable["str | os.PathLike[str]"]], timeout: float = 60.0) -> None:
    """Run ``first`` (whose backend is ``held``) until it is stopped inside its change, then
    ``second``; once ``second`` waits on a lock of the files ``locks()`` names (or has ended: no
    lock stopped it), let ``first`` go. Re-raises what either raised."""
    a = Worker(first)
    assert held.inside.wait(timeout), "the first change never reached its held call"
    b = Worker(second)
    deadline = time.monotonic() + timeout
    while b.is_alive() and not lock_waiters(locks()):
        assert time.monotonic() < deadline, "the second change neither waited nor ended"
        time.sleep(0.001)
    held.go.set()
    a.result(timeout)
    b.result(timeout)
