"""The parts of dm-bio-prison-v1.c that dm-thin uses: cells on virtual blocks and deferred sets.

A cell (:class:`Cells`) is held while a block is looked up and, when it must be provisioned or its
sharing broken, until the new mapping is in place: every other I/O to the block waits for it, so
concurrent writers to one unprovisioned or shared block allocate or copy it once. Keys are
``(device id, virtual block)``.

I/O to a block that is mapped and not shared takes the cell only for the lookup, as
``thin_bio_map`` does, and runs outside it, counted on its data block in an :class:`InFlight`
set (the kernel's ``all_io_ds``/``shared_read_ds`` deferred sets): writers to one mapped block
run side by side, and what changes a mapping (a discard passing its block down, a write breaking
sharing) waits, holding the cell, until the I/O already sent to the old block is done.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Hashable

__all__ = ["Cells", "InFlight"]


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


class InFlight:
    """I/O sent to data blocks with its cell released, counted per data block (``all_io_ds``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._count: dict[int, int] = {}
        self._waiting = 0

    def enter(self, block: int) -> None:
        """One more I/O on ``block`` (taken while the virtual block's cell is held)."""
        with self._lock:
            count = self._count
            count[block] = count.get(block, 0) + 1

    def leave(self, block: int) -> None:
        """That I/O is done."""
        with self._lock:
            n = self._count[block] - 1
            if n:
                self._count[block] = n
                return
            del self._count[block]
            if self._waiting:
                self._drained.notify_all()

    def quiesce(self, block: int) -> None:
        """Wait until no I/O is in flight on ``block`` (``dm_deferred_set_add_work``)."""
        with self._lock:
            while block in self._count:
                self._waiting += 1
                try:
                    self._drained.wait()
                finally:
                    self._waiting -= 1
