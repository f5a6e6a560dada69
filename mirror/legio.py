"""Leg writers: the other legs' halves of a mirror write, each on a thread of its own.

A write goes to the first leg on the caller's thread and to every other leg on that leg's writer
thread, as dm-io sends one bio per leg at once (drivers/md/dm-raid1.c ``do_write``). The hand-off
is one queue put and one lock: the writer releases the request's lock when its write is done, and
the caller waits by taking it (a ``concurrent.futures`` future costs a condition variable and a
work queue shared by every thread, several more wake-ups per write).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

__all__ = ["LegWriters", "Request"]


class Request:
    """One handed-over call: ``wait()`` returns its result once the writer has run it."""

    __slots__ = ("fn", "args", "done", "result")

    def __init__(self, fn: Callable[..., int], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.done = threading.Lock()
        self.done.acquire()
        self.result = 0

    def wait(self) -> int:
        """Block until the call ran; its return value."""
        self.done.acquire()
        return self.result


class LegWriters:
    """``count`` writer threads, one per leg after the first; ``submit(i, fn, *args)`` runs
    ``fn(*args)`` on writer ``i``. ``fn`` must not raise (its failure is part of its result)."""

    def __init__(self, count: int, name: str) -> None:
        self._queues: list[queue.SimpleQueue[Request | None]] = [queue.SimpleQueue() for _ in range(count)]
        self._threads = [threading.Thread(target=self._run, args=(q,), name=f"{name}-{i}", daemon=True)
                         for i, q in enumerate(self._queues)]
        for t in self._threads:
            t.start()

    def submit(self, i: int, fn: Callable[..., int], *args: Any) -> Request:
        """Hand ``fn(*args)`` to writer ``i``; the caller waits with ``Request.wait``."""
        req = Request(fn, args)
        self._queues[i].put(req)
        return req

    @staticmethod
    def _run(q: queue.SimpleQueue[Request | None]) -> None:
        while True:
            req = q.get()
            if req is None:
                return
            try:
                req.result = req.fn(*req.args)
            except BaseException:  # noqa: BLE001 - a writer must never die; the caller gets -1
                log.exception("mirror leg writer failed")
                req.result = -1
            finally:
                req.done.release()

    def close(self) -> None:
        """Stop the writers once the requests handed to them ran."""
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()
