"""Per-block locks: the part of dm-bio-prison-v1.c that dm-thin uses to hold one virtual block.

A cell is held while a block is looked up and, when it must be provisioned or its sharing broken,
until the new mapping is in place; every other I/O to the block waits for it. Keys are
``(device id, virtual block)``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Hashable

__all__ = ["Cells"]


class Cells:
    """A set of held keys; ``hold(key)`` waits while another thread holds ``key``."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held: set[Hashable] = set()
        self._waiting = 0

    def acquire(self, key: Hashable) -> None:
        """Hold ``key``, waiting while another thread holds it (``bio_detain``); pair it with
        :meth:`release` in a ``finally`` (the per-block I/O path, where a ``with`` costs more)."""
        with self._cond:
            held = self._held
            while key in held:
                self._waiting += 1
                try:
                    self._cond.wait()
                finally:
                    self._waiting -= 1
            held.add(key)

    def release(self, key: Hashable) -> None:
        """Let the next waiter for ``key`` in (``cell_defer``)."""
        with self._cond:
            self._held.discard(key)
            if self._waiting:
                self._cond.notify_all()

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        """Hold ``key`` for the ``with`` body."""
        self.acquire(key)
        try:
            yield
        finally:
            self.release(key)

    @contextmanager
    def hold_all(self, keys: Iterable[Hashable]) -> Iterator[None]:
        """Hold every key of ``keys`` for the ``with`` body, taken together once none is held (so
        two callers never hold part of each other's keys and wait for the rest)."""
        wanted = set(keys)
        with self._cond:
            while not wanted.isdisjoint(self._held):
                self._waiting += 1
                try:
                    self._cond.wait()
                finally:
                    self._waiting -= 1
            self._held |= wanted
        try:
            yield
        finally:
            with self._cond:
                self._held -= wanted
                if self._waiting:
                    self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._held)
