"""The parts of dm-bio-prison-v1.c that dm-thin uses: cells on virtual blocks and deferred sets.

A cell is held while a block is looked up and, when it must be provisioned or its sharing broken,
until the new mapping is in place: every other I/O to the block waits for it, so concurrent
writers to one unprovisioned or shared block allocate or copy it once. Keys are
``(device id, virtual block)``.

I/O to a block that is mapped and not shared takes the cell only for the lookup, as
``thin_bio_map`` does, and runs outside it, counted on its data block (the kernel's
``all_io_ds``/``shared_read_ds`` deferred sets): writers to one mapped block run side by side,
and what changes a mapping (a discard passing its block down, a write breaking sharing) waits,
holding the cell, until the I/O already sent to the old block is done.

Both live in one :class:`Prison` under one lock, so the pool can check a block's cell and count
its I/O in flight in a single hold (:meth:`Prison.enter_unless_held`), with the metadata lock held
around it for the lookup. That lock is always taken last: nothing waits for another lock while
holding it, and its waits (:meth:`Prison.acquire`, :meth:`Prison.quiesce`) are never entered
with the metadata lock held.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Hashable

__all__ = ["Prison"]


class Prison:
    """Held cells (keys) and per-data-block counts of I/O in flight, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: notified when a cell is released or a block's last I/O leaves, if anyone waits.
        self._changed = threading.Condition(self.lock)
        self._held: set[Hashable] = set()
        self._count: dict[int, int] = {}
        self._waiting = 0

    def _wait(self) -> None:
        self._waiting += 1
        try:
            self._changed.wait()
        finally:
            self._waiting -= 1

    # -- cells ---------------------------------------------------------------------------------
    def acquire(self, key: Hashable) -> None:
        """Hold ``key``'s cell, waiting while another thread holds it (``bio_detain``); pair it
        with :meth:`release` in a ``finally`` (the per-block I/O path, where a ``with`` costs more)."""
        with self.lock:
            held = self._held
            while key in held:
                self._wait()
            held.add(key)

    def release(self, key: Hashable) -> None:
        """Let the next waiter for ``key`` in (``cell_defer``)."""
        with self.lock:
            self._held.discard(key)
            if self._waiting:
                self._changed.notify_all()

    def enter_unless_held(self, key: Hashable, block: int | None) -> bool:
        """In one hold of the lock: when no one holds ``key``'s cell, count one I/O in flight on
        ``block`` (a mapped, unshared block: the cell is taken and released at once, as
        ``thin_bio_map`` does) or, with ``block`` ``None``, take the cell; ``False`` when the
        cell is held (the caller waits with :meth:`acquire`)."""
        with self.lock:
            if key in self._held:
                return False
            if block is None:
                self._held.add(key)
            else:
                count = self._count
                count[block] = count.get(block, 0) + 1
            return True

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
        with self.lock:
            while not wanted.isdisjoint(self._held):
                self._wait()
            self._held |= wanted
        try:
            yield
        finally:
            with self.lock:
                self._held -= wanted
                if self._waiting:
                    self._changed.notify_all()

    def held(self) -> int:
        """How many cells are held."""
        with self.lock:
            return len(self._held)

    # -- I/O in flight on data blocks (all_io_ds) ------------------------------------------------
    def enter(self, block: int) -> None:
        """One more I/O on ``block`` (taken while the virtual block's cell is held)."""
        with self.lock:
            count = self._count
            count[block] = count.get(block, 0) + 1

    def leave(self, block: int) -> None:
        """That I/O is done."""
        with self.lock:
            count = self._count
            n = count[block] - 1
            if n:
                count[block] = n
                return
            del count[block]
            if self._waiting:
                self._changed.notify_all()

    def quiesce(self, block: int) -> None:
        """Wait until no I/O is in flight on ``block`` (``dm_deferred_set_add_work``)."""
        with self.lock:
            while block in self._count:
                self._wait()
