"""What every exception store provides (drivers/md/dm-exception-store.h, ``dm_exception_store_type``)."""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dmtools.endpoint import Endpoint
from dmtools.errors import NoSpace
from dmtools.target_values import StoreMode

from snapshot.store.format import SECTOR
from snapshot.store.table import ExceptionTable

#: ``callback(success)`` run once an exception's record is durable (or has failed).
CommitCallback = Callable[[bool], None]


@dataclass(frozen=True)
class Usage:
    """The numbers behind the kernel's ``<allocated>/<total> <metadata>`` status, in sectors."""

    total_sectors: int
    sectors_allocated: int
    metadata_sectors: int

    @property
    def percent(self) -> float:
        """Allocated space as a percentage of the COW."""
        return 100.0 * self.sectors_allocated / self.total_sectors if self.total_sectors else 0.0

    def status_text(self) -> str:
        """``allocated/total metadata``: the kernel's INFO for a valid snapshot (dm-snap.c)."""
        return f"{self.sectors_allocated}/{self.total_sectors} {self.metadata_sectors}"


class ExceptionStore(abc.ABC):
    """Allocates COW chunks and records ``origin chunk -> COW chunk`` exceptions.

    Callers follow the kernel's protocol: ``read_metadata`` once, then for each exception
    ``prepare_exception`` (allocation) and, once its copy finished, ``commit_exception`` — in
    allocation order. ``commit_exception`` may hold the callback back to commit several exceptions
    with one metadata write.
    """

    #: ``PO``'s option: a full COW fails snapshot writes instead of invalidating (persistent only).
    overflow: bool = False

    def __init__(self, cow: Endpoint, chunk_size: int) -> None:
        self.cow = cow
        self.chunk_size = chunk_size
        self.valid = True
        self.table = ExceptionTable(1)
        self._lock = threading.Lock()

    @property
    def flush_cost(self) -> float | None:
        """Seconds a flush of the COW takes (a commit flushes twice), ``None`` when unknown."""
        return None

    @property
    def chunk_bytes(self) -> int:
        """Chunk size in bytes."""
        return self.chunk_size * SECTOR

    @property
    def cow_sectors(self) -> int:
        """COW device size in sectors (the kernel's ``get_dev_size``)."""
        return self.cow.size // SECTOR

    def _new_table(self) -> ExceptionTable:
        cow_chunks = self.cow_sectors // self.chunk_size if self.chunk_size else 0
        # two spare bits: a COW extended while active (LVM autoextend) keeps its packing
        return ExceptionTable(max(1, cow_chunks.bit_length() + 2))

    @abc.abstractmethod
    def read_metadata(self) -> None:
        """Load the store (fills ``table``, sets ``valid``); raises ``CorruptMetadata``."""

    @abc.abstractmethod
    def prepare_exception(self) -> int:
        """Allocate a COW chunk for a new exception; raises ``NoSpace`` when the COW is full."""

    def prepare_exceptions(self, count: int) -> list[int]:
        """Allocate up to ``count`` chunks (fewer when the COW fills); ``NoSpace`` if none."""
        out: list[int] = []
        while len(out) < count:
            try:
                out.append(self.prepare_exception())
            except NoSpace:
                if not out:
                    raise
                break
        return out

    @abc.abstractmethod
    def commit_exception(self, old: int, new: int, valid: bool, callback: CommitCallback) -> None:
        """Record ``old -> new``; ``callback(success)`` runs once the record is durable."""

    def commit_batch(self, records: Sequence[tuple[int, int, bool]], callbacks: Sequence[CommitCallback]) -> None:
        """``commit_exception`` for each ``(old, new, valid)`` in allocation order."""
        for (old, new, valid), cb in zip(records, callbacks):
            self.commit_exception(old, new, valid, cb)

    def commit_runs(self, runs: Sequence[tuple[int, int, int, bool]], callbacks: Sequence[CommitCallback]) -> None:
        """Commit runs ``(old, new, count, valid)`` of consecutive chunks in allocation order;
        each run's callback runs once, when all its records are done, with their joint success."""
        for (old, new, count, valid), cb in zip(runs, callbacks):
            joint = _JointCallback(count, cb)
            for k in range(count):
                self.commit_exception(old + k, new + k, valid, joint)

    def commits_alone(self) -> bool:
        """True when :meth:`commit_copied` would likely commit a new exception on its own now
        (a hint, read without locks; ``commit_copied`` decides). The base store never does."""
        return False

    def commit_copied(self, old: int, new: int, copy: Callable[..., int], args: tuple[Any, ...]) -> tuple[int, bool]:
        """Commit ``old -> new`` as :meth:`commit_exception` does, its copy and the commit's I/O
        done in one call: ``copy(*args, zeroed, area, area_offset, index)``
        (``snapshot.route.copy_commit``; ``zeroed``: COW chunk ``new`` reads as zeros, as
        :meth:`zeroed_ahead` tells) where this commit would write one metadata area with this
        record alone; returns ``(copy's answer, success)`` (``success`` what a commit callback
        would be given), or ``(-1, False)`` (``NOT_DONE``: nothing done) where it would not: the
        caller then copies and commits as usual. The base store never does."""
        return -1, False

    def zeroed_ahead(self, new: int, count: int) -> bool:
        """True when COW chunks ``new..new+count-1`` are known to read as zeros (the persistent
        store writes zeros ahead of allocations on a sparse COW file)."""
        return False

    @abc.abstractmethod
    def usage(self) -> Usage:
        """Space accounting for the status line."""

    def drop_snapshot(self) -> None:
        """Invalidate the store (persistent stores write ``valid = 0`` to the header)."""
        self.valid = False

    def prepare_merge(self) -> tuple[int, int, int]:
        """``(count, last_old, last_new)`` of the newest run to merge; count 0 when done."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge")

    def commit_merge(self, count: int) -> None:
        """Forget the ``count`` newest records after they were copied back to the origin."""
        raise NotImplementedError(f"{type(self).__name__} cannot merge")

    @property
    def can_merge(self) -> bool:
        """True for stores with prepare/commit_merge (persistent)."""
        return False

    @property
    @abc.abstractmethod
    def mode(self) -> StoreMode:
        """The store as tables name it (``P``, ``PO`` or ``N``)."""

    def close(self) -> None:
        """Release resources (the COW endpoint belongs to the caller)."""


class _JointCallback:
    """One ``CommitCallback`` for ``count`` records: calls ``callback`` once all reported."""

    __slots__ = ("left", "ok", "callback")

    def __init__(self, count: int, callback: CommitCallback) -> None:
        self.left = count
        self.ok = True
        self.callback = callback

    def __call__(self, success: bool) -> None:
        self.ok = self.ok and success
        self.left -= 1
        if not self.left:
            self.callback(self.ok)
