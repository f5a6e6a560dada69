"""The in-core thin pool (dm-thin.c ``struct pool``): metadata, modes, allocation and commits.

One ``Pool`` serves every table of a pool device (see :mod:`thin.targets.pool_table`) and every
``thin`` device on it. It holds the metadata (:class:`~thin.metadata.ThinMetadata` over the
metadata device's handle), the data device, the kcopyd client that zeroes and copies blocks, and
the pool mode. The rules are the kernel's:

* modes degrade ``WRITE`` < ``OUT_OF_DATA_SPACE`` < ``OUT_OF_METADATA_SPACE`` < ``READ_ONLY`` <
  ``FAIL`` (``set_pool_mode``); every change raises a device event; ``needs_check`` keeps a pool
  out of write mode;
* a data allocation that finds no free block commits first (blocks freed in the transaction become
  free), then enters out-of-data-space: writes that need a block wait for space, for
  ``no_space_timeout`` seconds, or fail at once with ``error_if_no_space``;
* crossing the low water mark raises one event per resume;
* a failed metadata operation aborts the transaction, sets ``needs_check`` on disk and switches to
  read-only (fail mode if even that fails), as ``metadata_operation_failed`` does;
* commits (``__commit_transaction``'s order: data device flushed, metadata written and flushed,
  superblock last) happen on a flush to a thin device with changes, once a second when anything
  changed, after every message, on status, on suspend and at close.

One lock (the kernel's ``pmd->root_lock``) serialises the metadata; data I/O never runs under it.
"""

from __future__ import annotations

import enum
import errno
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Sequence

import kcopyd
from dmtools.errors import CorruptMetadata, DeviceBusy, DeviceIOError, DMError, InvalidTable, NoSpace, PoolNotWritable
from dmtools.status import PoolMode, ThinPoolStatus
from dmtools.target_values import ThinPool
from dmtools.thin_messages import (CreateSnap, CreateThin, Delete, ReleaseMetadataSnap, ReserveMetadataSnap,
                                   SetTransactionId, parse_pool_message)
from dmtools.units import SECTOR

from thin.metadata import Lookup, ThinMetadata
from thin.metadata.ondisk import BLOCK_SECTORS, ENTRIES_PER_BITMAP, MAX_METADATA_SECTORS
from thin.metadata.transaction import EndpointMetadataDevice
from thin.targets import params
from thin.targets.cells import HELD, Prison

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.engine.target_driver import DeviceHandle

__all__ = ["DeviceState", "Features", "Mode", "Pool"]

log = logging.getLogger("thin")

#: metadata blocks one mapping insert may take at most: the top-level leaf and the device tree's
#: path shadowed, and a split at each of its levels.
INSERT_COST = 8

#: new mappings kept waiting in core (``ThinMetadata.map_new``) before they go into the btrees
#: between commits: a bound on the memory they take and on the time one fold holds the lock.
PENDING_MAX = 4096


class Mode(enum.IntEnum):
    """dm-thin.c ``enum pool_mode``, in order of degradation."""

    WRITE = 0
    OUT_OF_DATA_SPACE = 1
    OUT_OF_METADATA_SPACE = 2
    READ_ONLY = 3
    FAIL = 4


# The per-I/O paths compare the mode with these: an enum member read from its class costs about
# 70 ns (Python 3.11), a module global about 10.
_WRITE, _FAIL = Mode.WRITE, Mode.FAIL

_MODE_TEXT = {Mode.WRITE: "write", Mode.OUT_OF_DATA_SPACE: "out-of-data-space",
              Mode.OUT_OF_METADATA_SPACE: "out-of-metadata-space", Mode.READ_ONLY: "read-only",
              Mode.FAIL: "failure"}


@dataclass(frozen=True)
class Features:
    """dm-thin.c ``struct pool_features`` of one pool table."""

    zero_new_blocks: bool = True
    discard_enabled: bool = True
    discard_passdown: bool = True
    error_if_no_space: bool = False
    read_only: bool = False

    @classmethod
    def of(cls, value: ThinPool) -> Features:
        """The features a typed ``thin-pool`` table value asks for."""
        return cls(value.zero_new_blocks, value.discard_enabled, value.discard_passdown,
                   value.error_if_no_space, value.read_only)


class DeviceState:
    """An open thin device in core (dm-thin-metadata.c ``struct dm_thin_device``)."""

    __slots__ = ("dev_id", "open_count", "changed", "aborted_with_changes")

    def __init__(self, dev_id: int) -> None:
        self.dev_id = dev_id
        self.open_count = 0
        #: mappings changed in the current transaction (a flush must commit).
        self.changed = False
        #: changes were lost by an abort: flushes fail (``dm_thin_aborted_changes``).
        self.aborted_with_changes = False


def _eio(message: str, device: str) -> DeviceIOError:
    return DeviceIOError(message, errno=errno.EIO, device=device)


class Pool:
    """See the module docstring. ``pool_md`` is the pool's engine device (its identity)."""

    def __init__(self, pool_md: Any, name: str, metadata: "DeviceHandle", data: "DeviceHandle",
                 value: ThinPool) -> None:
        self.pool_md = pool_md
        self.name = name
        self.metadata_name = metadata.name
        self.data_name = data.name
        self.data = data
        self.block_size = value.block_size
        self.block_bytes = value.block_size * SECTOR
        self.refs = 0
        self.lock = threading.RLock()
        #: notified when the mode or free space changes (writers waiting for space).
        self.space = threading.Condition(self.lock)
        #: cells on virtual blocks and I/O in flight on data blocks (see :mod:`thin.targets.cells`).
        self.prison = Prison()
        self.pf = Features.of(value)
        #: the live ``error_if_no_space``: set by ``no_space_timeout``, reset in write mode.
        self.pf_error_if_no_space = self.pf.error_if_no_space
        self.low_water_blocks = value.low_water_mark
        self.low_water_triggered = False
        self.mode = Mode.READ_ONLY if value.read_only else Mode.WRITE
        self.suspended = False
        #: the bound table was loaded writable (see :meth:`bind`).
        self._data_writable = False
        self.devices: dict[int, DeviceState] = {}
        #: mapping inserts so far: a commit after a data flush made without the lock flushes
        #: again only when this moved (see :meth:`commit`).
        self.mapped = 0
        #: transactions aborted so far: a block taken before an abort is not given back after it.
        self.aborts = 0
        #: new blocks :meth:`_alloc_locked` may still give without its checks: none of them can
        #: fall due before these are used up (see ``_alloc_locked``); whatever else changes the
        #: metadata, the mode or the low water mark sets it to 0.
        self._quota = 0
        self._event: Callable[[], None] | None = None
        self._no_space_timer: threading.Timer | None = None
        self.md = self._open_metadata(metadata, value)
        self.reserve = self._metadata_reserve()
        self.kc = kcopyd.Client(num_pages=params.KCOPYD_PAGES, threads=2)
        self._stop = threading.Event()
        self._committer = threading.Thread(target=self._commit_loop, name=f"thin-commit-{name}", daemon=True)
        self._committer.start()

    # -- metadata ------------------------------------------------------------------------------
    def _open_metadata(self, handle: "DeviceHandle", value: ThinPool) -> ThinMetadata:
        """Format an all-zero metadata device, else open it (dm-thin-metadata.c ``__create_persistent_data_objects``)."""
        dev = EndpointMetadataDevice(handle, writable=not value.read_only)
        try:
            if dev.nr_blocks < 1:
                raise InvalidTable("metadata device is smaller than one 4 KiB block")
            if not any(dev.read(0)):
                if value.read_only:
                    raise PoolNotWritable("Error creating metadata object: a read-only pool cannot "
                                          "format empty metadata", errno=errno.EPERM)
                return ThinMetadata.format(dev, data_block_size=value.block_size)
            return ThinMetadata.open(dev, writable=True, data_block_size=value.block_size)
        except DMError as err:
            if err.message.startswith("Error creating metadata object"):
                raise
            raise InvalidTable(f"Error creating metadata object: {err.message}", errno=err.errno) from err

    def _metadata_reserve(self) -> int:
        # dm-thin-metadata.c __set_metadata_reserve: min(4096 blocks, a tenth of the space map).
        return min(4096, self.md.nr_metadata_blocks // 10)

    def metadata_free(self) -> int:
        """Free metadata blocks net of the reserve (``dm_pool_get_free_metadata_block_count``);
        blocks freed in this transaction are not free before the commit."""
        msm = self.md.tm.msm
        free = msm.nr_blocks - msm.nr_allocated - len(msm.freed)
        return max(0, free - self.reserve)

    def _commit_cost(self) -> int:
        """Metadata blocks the next commit still takes: the kernel shadows a changed space-map
        bitmap when it changes it, ours moves it at commit (plus the data index btree's path and
        the metadata index block), so the early commit that keeps a commit from ever running out
        (dm-thin.c ``alloc_data_block``) comes that much sooner."""
        tm = self.md.tm
        return 2 * len(tm.dsm.dirty_bitmaps) + len(tm.msm.dirty_bitmaps) + 2

    def _room(self) -> int:
        """Free metadata blocks above the reserve, less what the next commit takes
        (:meth:`metadata_free` and :meth:`_commit_cost`, inline: this runs for every new block)."""
        tm = self.md.tm
        msm = tm.msm
        return (len(msm.counts) - msm.nr_allocated - len(msm.freed) - self.reserve
                - 2 * len(tm.dsm.dirty_bitmaps) - len(msm.dirty_bitmaps) - 2)

    def _metadata_floor(self) -> bool:
        """Fewer metadata blocks left, reserve included, than one more mapping and its commit
        take: only a tiny metadata device (whose reserve is a few blocks) gets here before the
        kernel's own rule (no free block above the reserve) stops it."""
        msm = self.md.tm.msm
        return msm.nr_blocks - msm.nr_allocated - len(msm.freed) <= self._commit_cost() + INSERT_COST

    def metadata_failed(self, op: str, err: BaseException) -> None:
        """``metadata_operation_failed``: abort the transaction, mark needs_check, go read-only."""
        with self.lock:
            log.error("%s: metadata operation '%s' failed: %s", self.name, op, err)
            if self.mode == Mode.FAIL:
                return
            log.error("%s: aborting current metadata transaction", self.name)
            lost = [d for d in self.devices.values() if d.changed]
            self.prison.forget_all()
            try:
                self.md.abort()
            except Exception as abort_err:  # noqa: BLE001 - any failure here is fail mode
                log.error("%s: failed to abort metadata transaction: %s", self.name, abort_err)
                self.set_mode(Mode.FAIL)
                return
            self.aborts += 1
            for d in lost:
                d.aborted_with_changes, d.changed = True, False
            try:
                self.md.mark_needs_check()
            except Exception as flag_err:  # noqa: BLE001
                log.error("%s: failed to set 'needs_check' flag in metadata: %s", self.name, flag_err)
                self.set_mode(Mode.FAIL)
                return
            self.set_mode(Mode.READ_ONLY)

    def run(self, op: str, fn: Callable[[ThinMetadata], Any]) -> Any:
        """Run a metadata operation under the lock; a failure of the metadata itself (I/O,
        corruption, no metadata space) goes through :meth:`metadata_failed` and raises EIO.
        Refusals (a device that exists or not, a busy snapshot, a bad argument) pass through."""
        with self.lock:
            if self.mode == Mode.FAIL:
                raise _eio("pool is in fail mode", self.name)
            self._quota = 0
            try:
                return fn(self.md)
            except (DeviceIOError, OSError, DMError) as err:
                self._fault(op, err)

    def _fault(self, op: str, err: BaseException) -> NoReturn:
        """:meth:`run`'s rule for ``err``, an error of metadata call ``op``: a failure of the
        metadata itself goes through :meth:`metadata_failed` and raises EIO; a refusal raises as it is."""
        if not _metadata_fault(err):
            raise err
        self.metadata_failed(op, err)
        raise _eio(f"metadata operation '{op}' failed: {err}", self.name) from err

    # -- modes ---------------------------------------------------------------------------------
    def event(self) -> None:
        """``dm_table_event`` on the live pool table."""
        if self._event is not None:
            self._event()

    def set_mode(self, new: Mode) -> None:
        """dm-thin.c ``set_pool_mode`` (lock held)."""
        self._quota = 0
        old = self.mode
        if new == Mode.WRITE and self.md.needs_check:
            log.error("%s: unable to switch pool to write mode until repaired.", self.name)
            new = Mode.READ_ONLY
        if old == Mode.FAIL:
            new = old
        if new == Mode.OUT_OF_DATA_SPACE and old != new:
            self._arm_no_space_timer()
        if new == Mode.WRITE:
            self.pf_error_if_no_space = self.pf.error_if_no_space
        if new != old:
            if new == Mode.FAIL:
                self.prison.forget_all()  # every I/O fails from now on (begin_io)
            self.mode = new
            word = _MODE_TEXT[new]
            if new == Mode.OUT_OF_DATA_SPACE:
                word += " (error IO)" if self.pf_error_if_no_space else " (queue IO)"
            log.warning("%s: switching pool to %s mode", self.name, word)
            self.event()
        self.space.notify_all()

    def _arm_no_space_timer(self) -> None:
        timeout = params.get_no_space_timeout()
        if self.pf_error_if_no_space or not timeout:
            return
        if self._no_space_timer is not None:
            self._no_space_timer.cancel()
        timer = threading.Timer(timeout, self._no_space_timeout)
        timer.daemon = True
        self._no_space_timer = timer
        timer.start()

    def _no_space_timeout(self) -> None:
        """``do_no_space_timeout``: queued writes fail from now on."""
        with self.lock:
            if self.mode == Mode.OUT_OF_DATA_SPACE and not self.pf_error_if_no_space:
                self.pf_error_if_no_space = True
                log.warning("%s: switching pool to out-of-data-space (error IO) mode", self.name)
                self.event()
                self.space.notify_all()

    def check_io(self) -> None:
        """Refuse I/O to a failed pool."""
        if self.mode == _FAIL:
            raise _eio("pool is in fail mode", self.name)

    # -- binding and resizing (pool_preresume) -------------------------------------------------
    def bind(self, features: Features, low_water: int, event: Callable[[], None], metadata: "DeviceHandle",
             data: "DeviceHandle", writable: bool = True) -> None:
        """``bind_control_target``: the table being resumed now drives the pool (``writable``:
        the table was not loaded read-only, so thin devices' writes may pass it)."""
        with self.lock:
            self._quota = 0
            self._event = event
            self.pf = features
            self.low_water_blocks = low_water
            self.data = data
            self._data_writable = writable
            dev = self.md.dev
            if isinstance(dev, EndpointMetadataDevice):
                dev.endpoint = metadata
                dev.writable = not features.read_only
            self.set_mode(Mode.READ_ONLY if features.read_only else Mode.WRITE)

    def resize(self, length: int) -> None:
        """``maybe_resize_data_dev`` and ``maybe_resize_metadata_dev``, then commit if either grew."""
        with self.lock:
            need_commit = False
            data_size = length // self.block_size
            have = self.md.nr_data_blocks
            if data_size < have:
                raise InvalidTable(f"pool target ({data_size} blocks) too small: expected {have}", operation="resume")
            if data_size > have:
                if self.md.needs_check or self.mode >= Mode.READ_ONLY:
                    log.error("%s: unable to grow the data device until repaired.", self.name)
                else:
                    if have:
                        log.info("%s: growing the data device from %d to %d blocks", self.name, have, data_size)
                    self.run("dm_pool_resize_data_dev", lambda md: md.resize_data(data_size))
                    need_commit = True
            meta_blocks = min(self.md.dev.refresh_size(), MAX_METADATA_SECTORS // BLOCK_SECTORS)
            if meta_blocks < self.md.nr_metadata_blocks:
                raise InvalidTable(f"metadata device ({meta_blocks} blocks) too small: expected "
                                   f"{self.md.nr_metadata_blocks}", operation="resume")
            if meta_blocks > self.md.nr_metadata_blocks:
                if self.md.needs_check or self.mode >= Mode.READ_ONLY:
                    log.error("%s: unable to grow the metadata device until repaired.", self.name)
                else:
                    self.run("dm_pool_resize_metadata_dev", lambda md: md.resize_metadata())
                    self.reserve = self._metadata_reserve()
                    need_commit = True
            if need_commit:
                self.try_commit()

    def resume(self) -> None:
        """``pool_resume``: the low water mark may fire again; queued writes retry; thin devices'
        I/O goes to the data device straight again (see :mod:`thin.targets.cells`)."""
        with self.lock:
            self.suspended = False
            self.low_water_triggered = False
            self._quota = 0
            self.prison.open_gate(self.data, self._data_writable)
            self.space.notify_all()

    def suspend_undo(self) -> None:
        """A suspend failed after ``presuspend``: back to :meth:`resume`'s state, the low water
        mark untouched."""
        with self.lock:
            self.suspended = False
            self.prison.open_gate(self.data, self._data_writable)

    # -- commits -------------------------------------------------------------------------------
    def commit(self, flushed_at: int | None = None) -> None:
        """Commit the transaction (dm-thin.c ``commit``); raises EIO when it cannot.

        The data device is flushed first (``metadata_pre_commit_callback``) unless ``flushed_at``
        is the :attr:`mapped` count read before a flush the caller made without the lock, and
        nothing was mapped since: every mapping counted there was made after its data write
        completed, so that flush made its data durable.
        """
        with self.lock:
            self._quota = 0
            if self.mode >= Mode.OUT_OF_METADATA_SPACE:
                raise _eio("cannot commit: the pool is read-only", self.name)

            def flush_data() -> None:
                if flushed_at != self.mapped:
                    self.data.flush()
            self.run("dm_pool_commit_metadata", lambda md: md.commit(pre_commit=flush_data))
            for d in self.devices.values():
                d.changed = False
            if self.mode < Mode.OUT_OF_METADATA_SPACE and (self.metadata_free() == 0 or self._metadata_floor()):
                log.error("%s: No free metadata blocks", self.name)
                self.set_mode(Mode.OUT_OF_METADATA_SPACE)
            if self.mode == Mode.OUT_OF_DATA_SPACE and self.md.free_data_blocks:
                self.set_mode(Mode.WRITE)

    def try_commit(self) -> bool:
        """Commit if the pool may; errors are logged (they already switched the mode)."""
        try:
            self.commit()
            return True
        except DMError as err:
            log.debug("%s: commit skipped: %s", self.name, err)
            return False

    def flush_and_commit(self, only_if: Callable[[], bool] | None = None) -> None:
        """:meth:`commit` with the data device flushed before the lock is taken, so writers keep
        looking up, allocating and mapping blocks while it writes back (only what was mapped
        meanwhile needs a second flush under the lock). ``only_if()`` is checked under the lock
        first (nothing is committed when it is false). A failed flush here is left for the
        commit's own flush, which fails the transaction as the kernel's pre-commit callback does."""
        mapped: int | None = self.mapped
        try:
            self.data.flush()
        except (DMError, OSError):
            mapped = None
        with self.lock:
            if only_if is None or only_if():
                self.commit(flushed_at=mapped)

    def _wants_commit(self) -> bool:
        return not self.suspended and self.mode < Mode.OUT_OF_METADATA_SPACE and self.md.dirty

    def _commit_loop(self) -> None:
        """``do_waker``: commit every ``COMMIT_PERIOD`` when something changed."""
        while not self._stop.wait(params.COMMIT_PERIOD):
            with self.lock:
                if not self._wants_commit():
                    continue
            try:
                self.flush_and_commit(self._wants_commit)
            except DMError as err:
                log.debug("%s: commit skipped: %s", self.name, err)

    def suspend(self) -> None:
        """``pool_presuspend``/``pool_postsuspend``: refuse new thin devices, send thin devices'
        I/O through the pool device (whose gate holds it while suspended) once the I/O that went
        to the data device straight is done, and commit."""
        with self.lock:
            self.suspended = True
        self.prison.close_gate()  # without the lock: that I/O may need it to finish
        with self.lock:
            if self.mode < Mode.OUT_OF_METADATA_SPACE and self.md.dirty:
                self.try_commit()

    # -- data blocks ---------------------------------------------------------------------------
    def alloc_data_block(self, wait_ok: Callable[[], bool]) -> int:
        """A new data block (dm-thin.c ``alloc_data_block``), waiting while the pool is out of data
        space and queues I/O. ``wait_ok()`` false stops the wait (a noflush suspend requeues).
        Raises ``NoSpace`` (ENOSPC) or ``DeviceIOError`` (EIO, read-only pool)."""
        with self.lock:
            while True:
                if self.mode >= Mode.OUT_OF_METADATA_SPACE:
                    raise _eio("pool is read-only: no new blocks", self.name)
                if self.mode == Mode.OUT_OF_DATA_SPACE:
                    if self.pf_error_if_no_space:
                        raise NoSpace("pool is out of data space", errno=errno.ENOSPC, device=self.name)
                    if not wait_ok():
                        raise NoSpace("requeued while out of data space", errno=errno.ENOSPC, device=self.name)
                    self.space.wait()
                    continue
                block = self._alloc_locked()
                if block is not None:
                    return block

    def _alloc_locked(self) -> int | None:
        # No room above the reserve for this block's mapping and the commit after it: commit
        # first, which may enter out-of-metadata-space (dm-thin.c commits right after such an
        # allocation; before it, the block never lands in a transaction that cannot commit).
        # Mappings waiting in core (ThinMetadata.map_new) have taken no metadata block yet
        # (_fold_cost bounds what they will take): when they could leave too little room, they
        # go in first and the rule applies to what they took, as it would have to each of them.
        md = self.md
        if self._quota > 0:
            self._quota -= 1
            try:
                return md.alloc_data_block()
            except NoSpace:  # every free block was freed in this very transaction
                self.set_mode(Mode.OUT_OF_DATA_SPACE)
                return None
        if self._room() <= _fold_cost(md.pending_inserts) + INSERT_COST:
            if md.pending:
                self.fold()
            if self._room() <= INSERT_COST:
                self.commit()
                if self.mode != Mode.WRITE:
                    return None
                md = self.md
        dsm = md.tm.dsm
        free = len(dsm.counts) - dsm.nr_allocated
        if free <= self.low_water_blocks and not self.low_water_triggered:
            log.warning("%s: reached low water mark for data device: sending event.", self.name)
            self.low_water_triggered = True
            self.event()
        if not free:
            self.commit()  # blocks freed in this transaction become free
            if not self.md.free_data_blocks:
                self.set_mode(Mode.OUT_OF_DATA_SPACE)
                return None
            md = self.md
            free = md.free_data_blocks
        # The allocations after this one that none of the steps above can stop: each leaves one
        # block less free (none comes back without a run(), a commit or a mode change, which end
        # the quota) and one more mapping waiting, which may take INSERT_COST blocks and change
        # a data and a metadata bitmap (so 3 more) of the room above the reserve.
        per = INSERT_COST + 3
        self._quota = max(0, min(free - 1 if self.low_water_triggered else free - self.low_water_blocks - 1,
                                 (self._room() - _fold_cost(md.pending_inserts) - INSERT_COST - 1) // per - 1))
        try:
            return md.alloc_data_block()
        except (DeviceIOError, OSError, DMError) as err:  # run()'s rules, inline
            if _metadata_fault(err) or not isinstance(err, NoSpace):
                self._fault("dm_pool_alloc_data_block", err)
            self.set_mode(Mode.OUT_OF_DATA_SPACE)  # every free block was freed in this very transaction
            return None

    def try_alloc_many(self, n: int) -> list[int]:
        """Up to ``n`` new data blocks for a run of whole-block writes, as many as the pool gives
        without waiting or failing (the caller handles the rest block by block, which waits or
        fails as the pool's mode says)."""
        with self.lock:
            return list(self._alloc_up_to(n)) if self.mode == _WRITE else []

    def _alloc_up_to(self, n: int) -> Sequence[int]:
        """:meth:`try_alloc_many`'s blocks, the lock held in write mode: :meth:`_alloc_batch`'s,
        then one by one while the pool gives them at once (a ``range`` when the batch is all)."""
        out = self._alloc_batch(n)
        if len(out) == n:
            return out
        more = list(out)
        while len(more) < n and self.mode == _WRITE:
            block = self._alloc_locked()
            if block is None:
                break
            more.append(block)
        return more

    def _alloc_batch(self, n: int) -> Sequence[int]:
        """Up to ``n`` blocks at once, as :meth:`_alloc_locked` would give them one by one, when
        none of its steps can fall due among them (an early commit for metadata room, the low
        water mark, an empty pool); else none. Data allocations take no metadata block: only the
        commit's cost may grow, by a changed data bitmap, at most ``n // 16320 + 2`` of them."""
        self._quota = 0
        md = self.md
        dsm = md.tm.dsm
        free = len(dsm.counts) - dsm.nr_allocated
        k = min(n, free)
        if k < 2 or free - k < self.low_water_blocks:
            return []
        cost = 2 * (k // ENTRIES_PER_BITMAP + 2) + INSERT_COST  # data bitmaps it may change, its insert
        if self._room() <= cost + _fold_cost(md.pending_inserts):
            if md.pending:
                self.fold()
            if self._room() <= cost:
                return []
        try:
            return md.alloc_data_blocks(k)
        except (DeviceIOError, OSError, DMError) as err:  # run()'s rules, inline
            self._fault("dm_pool_alloc_data_block", err)

    def alloc_unmapped(self, dev_id: int, begin: int, end: int) -> tuple[Sequence[int], int] | None:
        """For whole-block writes of ``[begin, end)``, their cells held, in one hold of the lock:
        ``None`` when a block there is mapped or the pool is not in write mode (the caller looks
        them up); else the new blocks :meth:`try_alloc_many` gives for them (maybe fewer) and
        the abort count they were taken at."""
        with self.lock:
            if self.mode != _WRITE:
                return None
            try:  # run()'s rules, inline
                if not self.md.unmapped(dev_id, begin, end):
                    return None
            except (DeviceIOError, OSError, DMError) as err:
                self._fault("dm_thin_find_mapped_range", err)
            return self._alloc_up_to(end - begin), self.aborts

    def release_block(self, block: int, aborts: int) -> None:
        """Give back a block whose preparation or write failed (taken when ``self.aborts`` was
        ``aborts``: an abort since then dropped the reference already)."""
        try:
            with self.lock:
                if aborts == self.aborts and self.mode != Mode.FAIL:
                    self.run("dm_pool_dec_data_range", lambda md: md.data_dec(block))
        except DMError as err:
            log.error("%s: cannot release data block %d: %s", self.name, block, err)

    def lookup_range(self, dev_id: int, begin: int, end: int) -> dict[int, Lookup]:
        """The mappings of ``[begin, end)``, by virtual block (one walk of the device's tree)."""
        def lookup(md: ThinMetadata) -> dict[int, Lookup]:
            snapped = md.snapshotted_time(dev_id)
            return {v: Lookup(b, t, snapped > t) for v, b, t in md.mappings(dev_id, begin, end)}
        return self.run("dm_thin_find_mapped_range", lookup)  # type: ignore[no-any-return]

    def lookup(self, dev_id: int, vblock: int) -> Lookup | None:
        """``dm_thin_find_block``."""
        return self.run("dm_thin_find_block",  # type: ignore[no-any-return]
                        lambda md: md.lookup(dev_id, vblock))

    def _find(self, dev_id: int, vblock: int) -> tuple[int, bool] | None:
        """``dm_thin_find_block`` with the lock held, as ``(data block, shared)``: :meth:`run`'s
        rules without its closure (the per-I/O path)."""
        if self.mode == _FAIL:
            raise _eio("pool is in fail mode", self.name)
        try:
            return self.md.find(dev_id, vblock)
        except (DeviceIOError, OSError, DMError) as err:
            self._fault("dm_thin_find_block", err)

    def begin_io(self, dev_id: int, vblock: int, write: bool) -> tuple[int, int | None, int | None, int, Any]:
        """``thin_bio_map`` for one block's I/O: the lookup under its cell, in one hold of the
        lock when no other I/O holds the cell; a block the prison knows mapped and not shared
        (:meth:`Prison.enter_mapped`) needs neither the lock nor the lookup.

        Returns ``(data block, None, None, 0, data device or None)`` when the I/O goes to a
        mapped block (for a write, one that is not shared): it is counted in flight there and
        the cell is free again; the caller sends it to the data device given, or through the pool
        device when that is ``None`` (the pool is suspended), then calls
        ``prison.leave(block, data device is not None)``. Otherwise the caller holds the cell
        (``prison.release((dev_id, vblock), data device is not None)`` when done) and gets
        ``(-1, shared data block or None, new block or None, self.aborts, data device or
        None)``: a read of an unmapped block gets no new block; a write gets the block
        ``provision_block``/``break_sharing`` allocate (``alloc_data_block``), and the data
        device to write it to while the pool's gate is open, or ``None`` when the pool cannot
        give one at once: the caller then goes :meth:`alloc_data_block`'s way, which waits or
        fails as the pool's mode says.
        """
        known = self.prison.enter_mapped((dev_id, vblock), write)  # no FAIL check: fail mode forgets them all
        if known is not None:
            return known[0], None, None, 0, known[1]
        return self.look_up_io(dev_id, vblock, write)

    def look_up_io(self, dev_id: int, vblock: int, write: bool) -> tuple[int, int | None, int | None, int, Any]:
        """:meth:`begin_io` of a block :meth:`Prison.enter_mapped` did not know."""
        key = (dev_id, vblock)
        prison = self.prison
        with self.lock:
            if self.mode == _FAIL:  # _find, inline: this runs for every block I/O
                raise _eio("pool is in fail mode", self.name)
            try:
                found = self.md.find(dev_id, vblock)
            except (DeviceIOError, OSError, DMError) as err:
                self._fault("dm_thin_find_block", err)
            block = found[0] if found is not None and (not write or not found[1]) else None
            route = prison.enter_unless_held(key, block, write)
            if route is not HELD:
                if block is not None:
                    if found is not None and not found[1]:
                        prison.know(key, block)
                    return block, None, None, 0, route
                if write and self.mode == _WRITE:  # _provision_block's commonest case, inline
                    try:
                        new = self._alloc_locked()
                    except BaseException:
                        prison.release(key, route is not None)
                        raise
                    if new is not None:
                        return -1, None if found is None else found[0], new, self.aborts, route
                return self._provision_block(key, found, False, route)
        prison.acquire(key)  # another I/O holds the cell: wait for it, then look again
        try:
            with self.lock:
                found = self._find(dev_id, vblock)
                if found is not None and (not write or not found[1]):
                    if not found[1]:
                        prison.know(key, found[0])
                    prison.enter(found[0])
                    prison.release(key)
                    return found[0], None, None, 0, None
                return self._provision_block(key, found, write)
        except BaseException:
            prison.release(key)
            raise

    def _provision_block(self, key: tuple[int, int], found: tuple[int, bool] | None,
                         write: bool, route: Any = None) -> tuple[int, int | None, int | None, int, Any]:
        """:meth:`begin_io`'s answer with the cell held (the lock held too). ``route`` is the
        data device the prison gave the write with the cell: it stays the caller's only with a
        new block, which it writes there (the caller then releases the cell with
        ``release(key, True)``); a write that must wait for a block gives it back first."""
        try:
            new = self._alloc_locked() if write and self.mode == _WRITE else None
        except BaseException:
            self.prison.release(key, route is not None)
            raise
        if new is None and route is not None:
            self.prison.leave_direct()
            route = None
        return -1, None if found is None else found[0], new, self.aborts, route

    def insert(self, state: DeviceState, vblock: int, block: int, aborts: int) -> None:
        """``dm_thin_insert_block``: map ``vblock`` to ``block`` (allocated when ``self.aborts``
        was ``aborts``) at the current time; EIO when an abort dropped the allocation since."""
        self.insert_many(state, ((vblock, block),), aborts)

    def unmap(self, state: DeviceState, vblock: int) -> int | None:
        """Remove a mapping for a discard; returns the data block to pass the discard down to, or
        ``None``. That block holds an extra reference until :meth:`discard_done`, so it cannot
        be reallocated while the discard is in flight (dm-thin.c ``passdown_double_checking``);
        a block another device still maps is not passed down."""
        def unmap(md: ThinMetadata) -> int | None:
            look = md.lookup(state.dev_id, vblock)
            if look is None:
                return None
            self.prison.forget((state.dev_id, vblock))
            md.remove(state.dev_id, vblock)
            state.changed = True
            if not self.pf.discard_passdown or md.data_ref_count(look.data_block):
                return None
            md.data_inc(look.data_block)
            return look.data_block
        with self.lock:
            if self.mode >= Mode.OUT_OF_METADATA_SPACE:
                return None
            return self.run("dm_thin_remove_range", unmap)  # type: ignore[no-any-return]

    def discard_done(self, block: int, aborts: int) -> None:
        """The passed-down discard of ``block`` completed: drop its extra reference."""
        self.release_block(block, aborts)

    def wake(self) -> None:
        """Wake writers waiting for data space (they re-check why they wait)."""
        with self.lock:
            self.space.notify_all()

    def insert_many(self, state: DeviceState, pairs: Sequence[tuple[int, int]], aborts: int, new: bool = False,
                    run: tuple[int, int, int] | None = None) -> None:
        """:meth:`insert` of every ``(vblock, block)`` pair under one lock. ``new``: every
        ``vblock`` was unmapped when looked up under its cell (held until now), so the mappings
        may wait in core until the next fold or commit (``ThinMetadata.map_new``). ``run``
        (with ``new``, ``pairs`` empty): ``(vblock, block, n)``, ``n`` consecutive virtual blocks
        onto ``n`` consecutive data blocks (a whole-block write's new run, ``map_run``)."""
        with self.lock:
            if aborts != self.aborts:
                raise _eio("the metadata transaction was aborted", self.name)
            if self.mode == _FAIL:
                raise _eio("pool is in fail mode", self.name)
            md = self.md
            one = pairs[0] if len(pairs) == 1 else None  # a block's write
            try:  # run()'s rules, inline: this runs for every new block
                if new:
                    if run is not None:
                        md.map_run(state.dev_id, *run)
                    elif one is not None:  # a first write's mapping
                        md.map_one(state.dev_id, one[0], one[1])
                    else:
                        md.map_new(state.dev_id, pairs)
                    if md.pending >= PENDING_MAX:
                        md.fold()
                else:
                    self._quota = 0  # it takes its metadata blocks now
                    md.insert_many(state.dev_id, pairs)
            except (DeviceIOError, OSError, DMError) as err:
                self._fault("dm_thin_insert_block", err)
            state.changed = True
            self.mapped += 1
            if one is not None:  # the prison knows it from now on (mapped at the current time: not shared)
                self.prison.know((state.dev_id, one[0]), one[1])

    def fold(self) -> None:
        """Put the mappings waiting in core into the btrees (``ThinMetadata.fold``)."""
        self.run("dm_thin_insert_block", lambda md: md.fold())

    # -- thin devices --------------------------------------------------------------------------
    def open_device(self, dev_id: int) -> DeviceState:
        """``dm_pool_open_thin_device``; ``DeviceNotFound`` (ENODATA) when it does not exist."""
        with self.lock:
            self.run("dm_pool_open_thin_device", lambda md: md.details(dev_id))
            state = self.devices.get(dev_id)
            if state is None:
                state = self.devices[dev_id] = DeviceState(dev_id)
            state.open_count += 1
            return state

    def close_device(self, state: DeviceState) -> None:
        with self.lock:
            state.open_count -= 1
            if state.open_count == 0 and self.devices.get(state.dev_id) is state:
                del self.devices[state.dev_id]

    # -- messages ------------------------------------------------------------------------------
    def message(self, argv: Sequence[str]) -> None:
        """dm-thin.c ``pool_message``; the change is committed before this returns."""
        msg = parse_pool_message(" ".join(argv))
        with self.lock:
            if self.mode >= Mode.OUT_OF_METADATA_SPACE:
                raise PoolNotWritable(f"{self.name}: unable to service pool target messages in READ_ONLY "
                                      "or FAIL mode", operation="message")
            if isinstance(msg, CreateThin):
                self.run("create_thin", lambda md: md.create_thin(msg.dev_id))
            elif isinstance(msg, CreateSnap):
                self.prison.forget_all()  # the origin's mappings become shared
                self.run("create_snap", lambda md: md.create_snap(msg.dev_id, msg.origin_id))
            elif isinstance(msg, Delete):
                state = self.devices.get(msg.dev_id)
                if state is not None and state.open_count:
                    raise DeviceBusy(f"thin device {msg.dev_id} is open", operation="message")
                self.prison.forget_all()
                self.run("delete", lambda md: md.delete(msg.dev_id))
            elif isinstance(msg, SetTransactionId):
                self.run("set_transaction_id", lambda md: md.set_transaction_id(msg.current, msg.new))
            elif isinstance(msg, ReserveMetadataSnap):
                self.run("reserve_metadata_snap", lambda md: md.reserve_metadata_snap())
            elif isinstance(msg, ReleaseMetadataSnap):
                self.run("release_metadata_snap", lambda md: md.release_metadata_snap())
            self.commit()

    # -- status --------------------------------------------------------------------------------
    def status(self) -> str:
        """The kernel's INFO text (``pool_status``); commits first unless suspended, as a status
        without ``--noflush`` does."""
        with self.lock:
            if self.mode == Mode.FAIL:
                return "Fail"
            if not self.suspended and self.mode < Mode.OUT_OF_METADATA_SPACE and self.md.dirty:
                self.try_commit()
            if self.mode == Mode.FAIL:
                return "Fail"
            md = self.md
            try:
                total_meta = md.nr_metadata_blocks
                used_meta = total_meta - self.metadata_free()
                dsm = md.tm.dsm
                meta_dev_blocks = min(md.dev.size // SECTOR, MAX_METADATA_SECTORS) // BLOCK_SECTORS
                if self.mode == Mode.OUT_OF_DATA_SPACE:
                    mode = PoolMode.OUT_OF_DATA_SPACE
                elif self.mode >= Mode.OUT_OF_METADATA_SPACE:
                    mode = PoolMode.READ_ONLY
                else:
                    mode = PoolMode.WRITE
                if not self.pf.discard_enabled:
                    discard = "ignore_discard"
                else:
                    discard = "discard_passdown" if self.pf.discard_passdown else "no_discard_passdown"
                st = ThinPoolStatus(md.trans_id, used_meta, total_meta, dsm.nr_allocated, dsm.nr_blocks,
                                    md.held_root or None, mode, discard,
                                    "error_if_no_space" if self.pf_error_if_no_space else "queue_if_no_space",
                                    md.needs_check, min(1024, meta_dev_blocks // 4))
            except DMError as err:
                log.error("%s: status query failed: %s", self.name, err)
                return "Error"
            return st.format()

    def thin_status(self, state: DeviceState) -> str:
        """``thin_status``: mapped sectors and the last sector of the highest mapped block."""
        with self.lock:
            if self.mode == Mode.FAIL:
                return "Fail"
            try:
                mapped = self.md.details(state.dev_id).mapped_blocks
                highest = self.md.highest_mapped(state.dev_id)
            except DMError as err:
                log.error("%s: thin status query failed: %s", self.name, err)
                return "Error"
            end = "-" if highest is None else str((highest + 1) * self.block_size - 1)
            return f"{mapped * self.block_size} {end}"

    # -- lifetime ------------------------------------------------------------------------------
    def destroy(self) -> None:
        """``__pool_destroy``: commit what is pending, stop the workers, close the metadata."""
        self.prison.close_gate()
        self._stop.set()
        self._committer.join()
        if self._no_space_timer is not None:
            self._no_space_timer.cancel()
        with self.lock:
            if self.mode < Mode.OUT_OF_METADATA_SPACE and self.md.dirty:
                self.try_commit()
            self.mode = max(self.mode, Mode.READ_ONLY)
            self.space.notify_all()
        self.kc.destroy()
        self.md.close()


def _fold_cost(inserts: int) -> int:
    """Metadata blocks the mappings kept in core may take when they go into the btrees, given
    the general inserts they count as (``ThinMetadata.pending_inserts``: one per mapping, fewer
    for runs of consecutive blocks): :data:`INSERT_COST` each, and a metadata bitmap changed per
    16320 of those blocks."""
    return INSERT_COST * inserts + (INSERT_COST * inserts) // ENTRIES_PER_BITMAP + 1 if inserts else 0


def _metadata_fault(err: BaseException) -> bool:
    """Whether an error from a metadata call is a failure of the metadata itself (I/O,
    corruption, metadata space) rather than a refusal (exists, missing, busy, bad argument)."""
    if isinstance(err, (CorruptMetadata, OSError)):
        return True
    if isinstance(err, NoSpace):
        return "metadata" in err.message
    return type(err) is DeviceIOError
