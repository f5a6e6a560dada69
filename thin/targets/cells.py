"""The parts of dm-bio-prison-v1.c that dm-thin uses: cells on virtual blocks and deferred sets.

A cell is held while a block is looked up and, when it must be provisioned or its sharing broken,
until the new mapping is in place: every other I/O to the block waits for it, so concurrent
writers to one unprovisioned or shared block allocate or copy it once. Keys are
``(device id, virtual block)``. I/O over several blocks holds their cells as one range
(:meth:`Prison.take_range`: a device and a run of virtual blocks, no key built per block), which
excludes every other I/O to any block of it as holding each of its cells would, as the kernel's
prison would detain each of the bio's blocks.

I/O to a block that is mapped and not shared takes the cell only for the lookup, as
``thin_bio_map`` does, and runs outside it, counted on its data block (the kernel's
``all_io_ds``/``shared_read_ds`` deferred sets): writers to one mapped block run side by side,
and what changes a mapping (a discard passing its block down, a write breaking sharing) waits,
holding the cell, until the I/O already sent to the old block is done.

The prison also knows blocks the pool found mapped and not shared (:attr:`Prison.mapped`): I/O to
one of them whose cell is free is counted in flight on its data block in one hold of the prison's
lock, without the metadata lock or a lookup (:meth:`Prison.enter_mapped`). The pool forgets a
block there before its mapping can change: a discard removes it holding the cell, and a snapshot
of the device (which makes its mappings shared), a delete, an abort and fail mode forget them
all, each before it returns.

Both live in one :class:`Prison` under one lock, so the pool can check a block's cell and count
its I/O in flight in a single hold (:meth:`Prison.enter_unless_held`), with the metadata lock held
around it for the lookup. That lock is always taken last: nothing waits for another lock while
holding it, and its waits (:meth:`Prison.acquire`, :meth:`Prison.quiesce`,
:meth:`Prison.close_gate`) are never entered with the metadata lock held.

The prison is also the pool device's gate for data I/O of thin devices: while the pool is live
and not suspended, that I/O goes straight to the data device (what the pool target's ``map``
does with it, without a second pass through the engine's device layer), counted here; a suspend
closes the gate and waits for that I/O to finish (:meth:`Prison.close_gate`), after which I/O goes
through the pool device again, whose own gate holds it until the pool resumes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["HELD", "MAPPED_MAX", "Prison"]

#: a cell's key: ``(device id, virtual block)``.
Key = tuple[int, int]
#: a held range of cells: ``(device id, first block, end block)``.
Cells = tuple[int, int, int]

#: :meth:`Prison.enter_unless_held`'s answer when another I/O holds the cell.
HELD: Any = object()

#: blocks :attr:`Prison.mapped` knows at most (64 KiB blocks: 4 GiB of data); past that it starts
#: again from none (a bound on its memory, one entry taking about 150 bytes).
MAPPED_MAX = 1 << 16


class Prison:
    """Held cells (keys) and per-data-block counts of I/O in flight, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: notified when a cell is released or a block's last I/O leaves, if anyone waits.
        self._changed = threading.Condition(self.lock)
        self._held: set[Key] = set()
        #: ranges of cells held together (:meth:`take_range`), few at a time: one per I/O over
        #: several blocks in flight.
        self._ranges: list[Cells] = []
        self._count: dict[int, int] = {}
        self._waiting = 0
        #: the data device while the gate is open (else ``None``), whether writes may go there,
        #: and how many I/Os were sent there straight and are not done.
        self._route: Any = None
        self._route_writes = False
        self._direct = 0
        #: ``(device id, virtual block)`` -> data block of mappings the pool found or made, mapped
        #: and not shared: changed only by the pool, with its lock held (see :meth:`enter_mapped`).
        self.mapped: dict[Key, int] = {}
        #: how many :attr:`mapped` holds at most.
        self.mapped_max = MAPPED_MAX

    def _wait(self) -> None:
        self._waiting += 1
        try:
            self._changed.wait()
        finally:
            self._waiting -= 1

    # -- cells ---------------------------------------------------------------------------------
    def acquire(self, key: Key) -> None:
        """Hold ``key``'s cell, waiting while another thread holds it (``bio_detain``); pair it
        with :meth:`release` in a ``finally`` (the per-block I/O path, where a ``with`` costs more)."""
        with self.lock:
            held = self._held
            while key in held or (self._ranges and self._in_range(key)):
                self._wait()
            held.add(key)

    def release(self, key: Key, direct: bool = False) -> None:
        """Let the next waiter for ``key`` in (``cell_defer``); ``direct``: the I/O that held the
        cell also had the data device from :meth:`enter_unless_held`, and is done with it."""
        with self.lock:
            self._held.discard(key)
            if direct:
                self._direct -= 1
            if self._waiting:
                self._changed.notify_all()

    def enter_unless_held(self, key: Key, block: int | None, write: bool) -> Any:
        """In one hold of the lock: :data:`HELD` when another I/O holds ``key``'s cell (the
        caller waits with :meth:`acquire`). Else, with ``block`` ``None``, take the cell and
        return the data device for a write while the gate is open (the write of a new block:
        pair with ``release(key, True)``, or give it back with :meth:`leave_direct` when no new
        block comes at once), else ``None``; with a mapped, unshared ``block`` (the cell taken
        and released at once, as ``thin_bio_map`` does), count one I/O in flight on it and
        return where to send it: the data device while the gate is open (pair with
        ``leave(block, True)``), else ``None`` (through the pool device: ``leave(block, False)``)."""
        with self.lock:
            if key in self._held or (self._ranges and self._in_range(key)):
                return HELD
            if block is None:
                self._held.add(key)
                route = self._route
                if write and route is not None and self._route_writes:
                    self._direct += 1
                    return route
                return None
            return self._in_flight(block, write)

    def _in_flight(self, block: int, write: bool) -> Any:
        """Count one I/O in flight on a mapped ``block``; the data device for it while the gate
        is open, else ``None`` (the lock held)."""
        count = self._count
        count[block] = count.get(block, 0) + 1
        route = self._route
        if route is not None and (self._route_writes or not write):
            self._direct += 1
            return route
        return None

    def enter_mapped(self, key: Key, write: bool) -> tuple[int, Any] | None:
        """``thin_bio_map``'s remap of a block :attr:`mapped` knows, in one hold of the lock:
        when ``key``'s cell is free, count one I/O in flight on its data block and return
        ``(data block, route)`` as :meth:`enter_unless_held` does for a mapped block (pair with
        ``leave(block, route is not None)``); else ``None`` (look it up the pool's way)."""
        mapped = self.mapped
        if key not in mapped:  # without the lock: the pool's way is always right
            return None
        with self.lock:
            block = mapped.get(key)
            if block is None or key in self._held or (self._ranges and self._in_range(key)):
                return None
            return block, self._in_flight(block, write)

    def know(self, key: Key, block: int) -> None:
        """``key`` maps to ``block``, which is not shared (the pool's lock held)."""
        mapped = self.mapped
        if len(mapped) >= self.mapped_max:
            mapped.clear()
        mapped[key] = block

    def forget(self, key: Key) -> None:
        """``key``'s mapping is about to change (its cell held)."""
        self.mapped.pop(key, None)

    def forget_all(self) -> None:
        """Mappings may change without their cells (a snapshot, a delete, an abort, fail
        mode): from now on every I/O looks its block up."""
        with self.lock:
            self.mapped.clear()

    @contextmanager
    def hold(self, key: Key) -> Iterator[None]:
        """Hold ``key`` for the ``with`` body."""
        self.acquire(key)
        try:
            yield
        finally:
            self.release(key)

    def _in_range(self, key: Key) -> bool:
        """Whether a held range covers ``key`` (the lock held)."""
        dev_id, vblock = key
        for d, begin, end in self._ranges:
            if d == dev_id and begin <= vblock < end:
                return True
        return False

    def _range_free(self, dev_id: int, begin: int, end: int) -> bool:
        """Whether no cell of ``[begin, end)`` of ``dev_id`` is held, alone or in a range (the
        lock held)."""
        for d, b, e in self._ranges:
            if d == dev_id and b < end and begin < e:
                return False
        held = self._held
        if not held:
            return True
        if len(held) < end - begin:
            return not any(d == dev_id and begin <= v < end for d, v in held)
        return not any((dev_id, v) in held for v in range(begin, end))

    @contextmanager
    def hold_range(self, dev_id: int, begin: int, end: int) -> Iterator[None]:
        """Hold the cells of ``[begin, end)`` of ``dev_id`` for the ``with`` body."""
        cells = self.take_range(dev_id, begin, end)
        try:
            yield
        finally:
            self.give_range(cells)

    def take_range(self, dev_id: int, begin: int, end: int) -> Cells:
        """Hold the cells of ``[begin, end)`` of ``dev_id`` together, once none of them is held
        (so two callers never hold part of each other's cells and wait for the rest); returns
        what to give back with :meth:`give_range` in a ``finally`` (:meth:`hold_range` without
        a ``with``, for the per-I/O path, where one costs more)."""
        return self.take_range_to_write(dev_id, begin, end, False)[0]

    def take_range_to_write(self, dev_id: int, begin: int, end: int, write: bool = True) -> tuple[Cells, Any]:
        """:meth:`take_range` and, in the same hold of the lock, the data device for writes of
        the range while the gate is open and lets writes through (as :meth:`enter_direct`
        gives it: pair with ``give_range(cells, True)``), else ``None``."""
        cells = (dev_id, begin, end)
        with self.lock:
            if self._ranges or self._held:
                while not self._range_free(dev_id, begin, end):
                    self._wait()
            self._ranges.append(cells)
            route = self._route
            if write and route is not None and self._route_writes:
                self._direct += 1
                return cells, route
        return cells, None

    def give_range(self, cells: Cells, direct: bool = False) -> None:
        """Release the cells :meth:`take_range` took (``direct``: and the data device
        :meth:`take_range_to_write` gave with them)."""
        with self.lock:
            self._ranges.remove(cells)
            if direct:
                self._direct -= 1
            if self._waiting:
                self._changed.notify_all()

    def held(self) -> int:
        """How many cells are held, alone or in ranges."""
        with self.lock:
            return len(self._held) + sum(end - begin for _d, begin, end in self._ranges)

    # -- I/O in flight on data blocks (all_io_ds) ------------------------------------------------
    def enter(self, block: int) -> None:
        """One more I/O on ``block`` (taken while the virtual block's cell is held)."""
        with self.lock:
            count = self._count
            count[block] = count.get(block, 0) + 1

    def leave(self, block: int, direct: bool = False) -> None:
        """That I/O is done (``direct``: it went to the data device :meth:`enter_unless_held` gave)."""
        with self.lock:
            count = self._count
            n = count[block] - 1
            if n:
                count[block] = n
            else:
                del count[block]
            if direct:
                self._direct -= 1
            if self._waiting and (direct or not n):
                self._changed.notify_all()

    def quiesce(self, block: int) -> None:
        """Wait until no I/O is in flight on ``block`` (``dm_deferred_set_add_work``)."""
        with self.lock:
            while block in self._count:
                self._wait()

    # -- the gate to the data device -----------------------------------------------------------
    def open_gate(self, data: Any, writes: bool) -> None:
        """I/O of thin devices may go to ``data`` straight from now on (writes only if ``writes``)."""
        with self.lock:
            self._route, self._route_writes = data, writes

    def close_gate(self) -> None:
        """Send I/O through the pool device from now on, and wait until none sent to the data
        device straight is left (a suspend's drain)."""
        with self.lock:
            self._route = None
            while self._direct:
                self._wait()

    def enter_direct(self, write: bool) -> Any:
        """The data device for one I/O sent there straight (pair with :meth:`leave_direct`), or
        ``None`` while the gate is closed (send it through the pool device)."""
        with self.lock:
            route = self._route
            if route is None or (write and not self._route_writes):
                return None
            self._direct += 1
            return route

    def leave_direct(self) -> None:
        """An I/O :meth:`enter_direct` routed is done."""
        with self.lock:
            self._direct -= 1
            if self._waiting:
                self._changed.notify_all()
