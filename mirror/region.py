"""The region hash: per-region state and pending-write counts (drivers/md/dm-region-hash.c).

A region absent from the hash is CLEAN when the log says it is in sync and NOSYNC otherwise. The
transitions are the kernel's:

- ``inc`` (a write is about to be dispatched): ``pending += 1``; CLEAN → DIRTY and the log's
  ``mark_region`` (the caller flushes the log before dispatching);
- ``dec`` (the write completed): when ``pending`` drops to 0, a previous failed flush makes the
  region NOSYNC, a RECOVERING region becomes quiesced, a DIRTY one CLEAN on the clean list;
- ``update_states`` (start of each worker pass): clean regions get ``clear_region`` and leave the
  hash; recovered ones get ``clear_region`` + ``set_region_sync(1)``; failed recoveries get
  ``set_region_sync(0 if errors are handled else 1)``; then the log is flushed;
- ``mark_nosync`` (a write failed on some leg): NOSYNC and the log's sync bit cleared;
- ``recovery_prepare`` takes regions from ``get_resync_work`` up to ``max_recovery`` at a time and
  sets them RECOVERING; they are copied once quiesced, and writes to them wait until they end.

Not thread-safe: the mirror target calls it under its own lock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mirror.log import CoreDirtyLog

__all__ = ["RegionState", "RegionEntry", "RegionHash"]


class RegionState(enum.IntFlag):
    """Region hash states (include/linux/dm-region-hash.h)."""

    CLEAN = 0x01  #: no writes in flight
    DIRTY = 0x02  #: writes in flight
    NOSYNC = 0x04  #: out of sync
    RECOVERING = 0x08  #: under resync


@dataclass
class RegionEntry:
    """One region in the hash (dm-region-hash.c ``struct dm_region``)."""

    key: int
    state: RegionState
    pending: int = 0
    #: bumped by every write: a region written again during a leg flush is not cleared by it
    generation: int = 0


@dataclass
class Retirement:
    """Regions taken by ``collect`` to be retired once the legs are flushed (``apply``)."""

    recovered: list[int]
    failed: list[int]
    clean: dict[int, int]  # region -> generation seen

    def __bool__(self) -> bool:
        return bool(self.recovered or self.failed or self.clean)

    @property
    def needs_leg_flush(self) -> bool:
        """A clean mark is coming: the data it covers must be durable first."""
        return bool(self.recovered or self.clean)


class RegionHash:
    """Region states for one mirror set; see the module docstring."""

    def __init__(self, log: CoreDirtyLog, max_recovery: int = 1) -> None:
        self.log = log
        self.max_recovery = max_recovery
        self.regions: dict[int, RegionEntry] = {}
        #: regions whose writes completed, with the time they became clean (insertion order)
        self.clean: dict[int, float] = {}
        self.quiesced: list[int] = []
        self.recovered: list[int] = []
        self.failed_recovered: list[int] = []
        self.recovering: set[int] = set()  # regions RECOVERING, quiesced or being copied
        self.flush_failure = False
        self.recovery_stopped = True

    # -- lookups ---------------------------------------------------------------------------------
    def _find(self, key: int) -> RegionEntry:
        reg = self.regions.get(key)
        if reg is None:
            state = RegionState.CLEAN if self.log.in_sync(key) else RegionState.NOSYNC
            reg = self.regions[key] = RegionEntry(key, state)
        return reg

    def state(self, key: int) -> RegionState:
        """``dm_rh_get_state``: the hash's state, else CLEAN/NOSYNC from the log."""
        reg = self.regions.get(key)
        if reg is not None:
            return reg.state
        return RegionState.CLEAN if self.log.in_sync(key) else RegionState.NOSYNC

    def in_sync(self, key: int) -> bool:
        """True when the region is CLEAN or DIRTY (reads may balance)."""
        return self.state(key) in (RegionState.CLEAN, RegionState.DIRTY)

    # -- writes ----------------------------------------------------------------------------------
    def inc(self, key: int) -> None:
        """A write to ``key`` is about to be dispatched."""
        reg = self._find(key)
        reg.pending += 1
        reg.generation += 1
        if reg.state is RegionState.CLEAN:
            reg.state = RegionState.DIRTY
            self.clean.pop(key, None)
            self.log.mark_region(key)

    def mark_ahead(self, key: int, now: float) -> None:
        """Mark a CLEAN region dirty before any write to it, in the same log flush as a real mark.

        A sequential writer reaches it next and needs no log flush of its own; unused, it is
        retired with the clean regions. An extra dirty mark costs at most a resync of the region.
        """
        if key in self.regions or not self.log.in_sync(key) or not self.log.is_clean(key):
            return
        self.regions[key] = RegionEntry(key, RegionState.CLEAN)
        self.log.mark_region(key)
        self.clean[key] = now

    def dec(self, key: int, now: float = 0.0) -> bool:
        """A write to ``key`` completed; True when the worker must run now (a region quiesced
        for its recovery, or gone out of sync). A region gone clean waits on the clean list:
        the worker retires those lazily (dm-region-hash.c clears them at its next pass)."""
        reg = self.regions[key]
        reg.pending -= 1
        if reg.pending:
            return False
        if self.flush_failure:
            reg.state = RegionState.NOSYNC
            return True
        if reg.state is RegionState.RECOVERING:
            self.quiesced.append(key)
            return True
        if reg.state is RegionState.DIRTY:
            reg.state = RegionState.CLEAN
            self.clean[key] = now
        return False

    def mark_nosync(self, key: int) -> None:
        """A write to ``key`` failed on some leg: never let the region be marked clean."""
        self.log.set_region_sync(key, False)
        reg = self._find(key)
        recovering = reg.state is RegionState.RECOVERING
        reg.state = RegionState.NOSYNC
        self.clean.pop(key, None)
        if recovering:
            if key in self.quiesced:
                self.quiesced.remove(key)
            self.recovering.discard(key)

    # -- worker ----------------------------------------------------------------------------------
    def update_states(self, errors_handled: bool) -> list[int]:
        """``dm_rh_update_states``: retire every clean and recovered region and flush the log (whose
        flush flushes the legs first); return the regions whose recovery ended. The log flush may
        raise (log device failure); the states are updated first, as in the kernel."""
        return self.apply(self.collect(), errors_handled, legs_flushed=False)

    def collect(self, clean_before: float | None = None) -> Retirement:
        """Take what the next ``apply`` retires. ``clean_before`` keeps the regions clean only since
        then (they stay dirty on the log a little longer; a region written again soon needs no new
        mark). The caller may flush the legs between ``collect`` and ``apply`` without the lock."""
        batch = Retirement(self.recovered, self.failed_recovered, {})
        keep: dict[int, float] = {}
        for key, since in self.clean.items():
            reg = self.regions.get(key)
            if clean_before is not None and since >= clean_before:
                keep[key] = since
            elif reg is not None and reg.state is RegionState.CLEAN and not reg.pending:
                batch.clean[key] = reg.generation
        self.recovered = []
        self.failed_recovered = []
        self.clean = keep
        return batch

    def apply(self, batch: Retirement, errors_handled: bool, *, legs_flushed: bool, flush: bool = True) -> list[int]:
        """Retire ``batch`` and flush the log (unless ``flush`` is False: the caller writes the
        log's changes itself). With ``legs_flushed`` the caller flushed the legs after
        ``collect``; a region written since then keeps its dirty mark."""
        ended: list[int] = []
        for key in batch.recovered:
            self.regions.pop(key, None)
            self.log.clear_region(key)
            self.log.set_region_sync(key, True)
            self.recovering.discard(key)
            ended.append(key)
        for key in batch.failed:
            self.regions.pop(key, None)
            self.log.set_region_sync(key, not errors_handled)
            self.recovering.discard(key)
            ended.append(key)
        for key, generation in batch.clean.items():
            reg = self.regions.get(key)
            if reg is None or reg.generation != generation or reg.state is not RegionState.CLEAN or reg.pending:
                if reg is not None and reg.state is RegionState.CLEAN and not reg.pending:
                    self.clean.setdefault(key, 0.0)  # written and done again: retire it next time
                continue
            del self.regions[key]
            self.log.clear_region(key)
        if flush:
            self.log.flush(legs_flushed=legs_flushed)
        return ended

    def recovery_prepare(self) -> None:
        """Start quiescing regions that need resync, up to ``max_recovery`` in flight."""
        while not self.recovery_stopped and len(self.recovering) < self.max_recovery:
            key = self.log.get_resync_work()
            if key is None:
                return
            reg = self._find(key)
            reg.state = RegionState.RECOVERING
            self.recovering.add(key)
            self.clean.pop(key, None)
            if not reg.pending:
                self.quiesced.append(key)

    def recovery_start(self) -> int | None:
        """Pop a quiesced region ready to copy."""
        return self.quiesced.pop(0) if self.quiesced else None

    def recovery_end(self, key: int, success: bool) -> None:
        """The copy of ``key`` finished (retired at the next ``update_states``).

        A region whose recovery was already ended (a failed write made it NOSYNC) is left alone: a
        copy that may have raced a write must never mark it in sync.
        """
        if key not in self.recovering:
            return
        (self.recovered if success else self.failed_recovered).append(key)

    def abandon(self, key: int) -> None:
        """Give up a prepared region whose copy never started (suspend): it stays out of sync."""
        if key in self.quiesced:
            self.quiesced.remove(key)
        self.recovering.discard(key)
        self.log.set_region_sync(key, False)
        reg = self.regions.get(key)
        if reg is not None and reg.state is RegionState.RECOVERING:
            if reg.pending:
                reg.state = RegionState.NOSYNC
            else:
                del self.regions[key]
