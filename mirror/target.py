"""The userspace ``mirror`` target (drivers/md/dm-raid1.c, target version 1.15.0).

Table: ``<log_type> <#log_args> <log_args...> <#mirrors> <dev> <offset>... [<#features> <feature>...]``
with a ``core`` or ``disk`` log (``mirror.log``), 2–9 legs and the features ``handle_errors`` and
``keep_log``. What it does, as the kernel does:

- writes go to every leg under the mark/clear protocol: the region is marked dirty and the log
  flushed before the data is written; it is marked clean (legs flushed first) by the worker some
  time after its writes completed (``CLEAN_DELAY`` and the constants below it). The log is written
  without the target's lock, one image at a time: writers whose marks are in one image share its
  flush (the kernel's kmirrord flushes once for all the writes of a pass), and a write waits only
  for the image holding its own regions' marks;
- writes to an out-of-sync (NOSYNC) region go to the default leg only; writes to a region under
  recovery wait until its recovery ends;
- reads come from the default leg, failing over to a leg without errors when the region is in sync;
- out-of-sync regions are copied from the default leg to the others by kcopyd. Unlike the kernel
  (``MAX_RECOVERY = 1``) several regions are in flight (``max_recovery``) and the copy can be held
  to a rate (bytes/s);
- leg failures are recorded with the kernel's health letters and raise device events when
  ``handle_errors`` is set; status text is the kernel's.

Messages (this target's own; the kernel's mirror has no message handler): ``resync_rate <bytes/s>``
(0 = unlimited; kept for the mapped device: a table loaded on it later starts with it),
``max_recovery <n>``, ``rebuild <leg>``, ``resync_all`` and ``recovery_failures``. ``resync_all``
marks every region out of sync and dirty on the log and holds recovery until the next resume (a
table about to be replaced by one with a new leg). ``rebuild`` resyncs one leg (a replaced one) from
the default leg: every region is marked dirty on the log first (a crash then resyncs every leg,
which is safe), and regions the other legs hold in sync are copied to the rebuilt leg only; reads
never use a leg being rebuilt. ``held_ios`` answers with the number of writes and flushes held after
a leg failure (``mirror.guard`` releases them), ``default_leg`` with the leg reads and resync come
from (it moves off a failed leg only while in sync, ``fail_mirror``). ``recovery_failures`` answers
with the regions whose last recovery failed and the legs that failed it (``<region>:<leg>[,<leg>]``
words, empty when none): with ``handle_errors`` such a region stays out of sync; without it the
kernel's rule marks it in sync anyway (dm-region-hash.c ``complete_resync_work(reg, errors_handled ?
0 : 1)``), and this record is the only trace that the legs do not hold its data.
"""

from __future__ import annotations

import enum
import errno
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from dmtools.engine.device import RequeueIO
from dmtools.engine.target_driver import SECTOR, DeviceHandle, TargetContext, TargetDriver
from dmtools.errors import DeviceIOError, DMError, InvalidArgument, InvalidTable
from dmtools.target_values import U32_MAX, U64_MAX, Mirror

from mirror.bitmap import Bitmap
from mirror.legio import LegWriters
from mirror.log import CoreDirtyLog, LogWrite, open_dirty_log
from mirror.region import RegionHash, RegionState

log = logging.getLogger(__name__)

__all__ = ["MirrorTarget", "MirrorLegState", "LegError", "DEFAULT_MAX_RECOVERY"]

#: Regions copied at once; the kernel's MAX_RECOVERY is 1.
DEFAULT_MAX_RECOVERY = 8
#: Bytes of recovery kept in flight at most, whatever the region size.
RECOVERY_BYTES_IN_FLIGHT = 16 << 20
#: Clean marks are written lazily (the kernel writes them at the next kmirrord pass). A region whose
#: writes completed stays marked dirty until the mirror has had no write for ``CLEAN_DELAY``
#: seconds, or it has waited ``CLEAN_MAX_DELAY`` seconds, or ``CLEAN_BACKLOG_BYTES`` of regions
#: wait: one leg flush (which every clean mark needs first) then covers many regions, and a region
#: written again soon needs no new dirty mark (a log flush). A crash in between only resyncs the
#: regions still marked, which is always safe.
CLEAN_DELAY = 0.2
CLEAN_MAX_DELAY = 2.0
CLEAN_BACKLOG_BYTES = 256 << 20
#: How far ahead of a write that needs a log flush the next regions are marked dirty with it; the
#: window doubles while the writes stay sequential, up to ``MARK_AHEAD_MAX_BYTES`` (the most a
#: crash adds to the resync).
MARK_AHEAD_BYTES = 2 << 20
MARK_AHEAD_MAX_BYTES = 64 << 20
#: Writes at least this large go to the legs in parallel (like dm-io's one bio per leg) while no
#: other write is in flight; with several in flight each goes to the legs in turn on its own thread.
PARALLEL_WRITE_BYTES = 64 << 10
#: ``TargetContext.target_state`` key of each mapped device's ``resync_rate``: a table loaded on the
#: device starts with it, so a reload that starts a resync (``MirrorManager.repair``) is held to the
#: rate from its first copy, as the kernel's throttle (a module parameter) holds every table.
RATE_STATE_KEY = "mirror-resync-rate"


class LegError(enum.IntEnum):
    """``enum dm_raid1_error``: bit numbers in a leg's ``error_type``."""

    WRITE = 0
    FLUSH = 1
    SYNC = 2
    READ = 3


class MirrorLegState:
    """One leg of a live mirror: its device and error record (dm-raid1.c ``struct mirror``)."""

    def __init__(self, index: int, dev: DeviceHandle, offset: int) -> None:
        self.index = index
        self.dev = dev
        self.offset = offset
        self.base = offset * SECTOR
        self.error_count = 0
        self.error_type = 0

    def health(self) -> str:
        """``device_status_char``: A, or the most severe error seen (F > D > S > R), U otherwise."""
        if not self.error_count:
            return "A"
        for bit, char in ((LegError.FLUSH, "F"), (LegError.WRITE, "D"), (LegError.SYNC, "S"), (LegError.READ, "R")):
            if self.error_type & (1 << bit):
                return char
        return "U"


def _unsigned(word: str, maximum: int) -> int | None:
    """A message's unsigned decimal argument, ``None`` when it is not one or exceeds ``maximum``."""
    return int(word) if word.isascii() and word.isdigit() and int(word) <= maximum else None


def _rates(ctx: TargetContext) -> "weakref.WeakKeyDictionary[Any, int]":
    """Each mapped device's ``resync_rate`` in bytes/s (``RATE_STATE_KEY``); absent means 0."""
    return ctx.target_state(RATE_STATE_KEY, weakref.WeakKeyDictionary)


def _io_error(message: str, device: str | None = None) -> DeviceIOError:
    return DeviceIOError(message, errno=errno.EIO, operation="io", device=device)


class MirrorTarget(TargetDriver):
    """``mirror``: see the module docstring."""

    name = "mirror"
    version = (1, 15, 0)  # dm-raid1.c
    value_type = Mirror

    def __init__(self, ctx: TargetContext, start: int, length: int, value: Mirror) -> None:
        super().__init__(ctx, start, length, ())
        opened: dict[str, DeviceHandle] = {}

        def open_device(ref: str) -> DeviceHandle:
            opened[ref] = ctx.get_device(ref)
            return opened[ref]

        try:  # dm-raid1.c mirror_ctr: the log first, then the legs
            self.log: CoreDirtyLog = open_dirty_log(value.log, length, open_device)
        except InvalidTable as err:
            raise self.fail(err.message) from err
        self.legs: list[MirrorLegState] = []
        for i, (ref, offset) in enumerate(value.legs):
            dev = open_device(ref)
            self.devices.append(dev)
            self.check_area(dev, offset, length)
            self.legs.append(MirrorLegState(i, dev, offset))
        #: the table as the kernel prints it back: devices as ``major:minor``
        self.value = value.map_devices(lambda ref: opened[ref].name)
        self.region_size = self.log.region_size
        self.region_bytes = self.region_size * SECTOR
        self.nr_regions = self.log.region_count
        self.log.flush_legs = self._flush_legs
        in_flight = max(1, min(DEFAULT_MAX_RECOVERY, RECOVERY_BYTES_IN_FLIGHT // self.region_bytes))
        self.rh = RegionHash(self.log, in_flight)
        #: regions marked dirty ahead of a writer that pays a log flush (at first; see MARK_AHEAD_*)
        self.mark_ahead = max(1, min(8, MARK_AHEAD_BYTES // self.region_bytes))
        self._ahead = self.mark_ahead
        self._ahead_max = max(self.mark_ahead, MARK_AHEAD_MAX_BYTES // self.region_bytes)
        self._clean_backlog = max(8, CLEAN_BACKLOG_BYTES // self.region_bytes)
        #: the last time a write started or completed (clean marks wait for a quiet moment)
        self._last_io = 0.0
        self._writing = 0  # writes between their dirty marks and their completion
        #: a log write runs without the lock (one at a time; see ``_write_log``)
        self._flushing = False
        self._in_flight: LogWrite | None = None
        self.cond = threading.Condition(threading.Lock())
        self.default = 0
        self.in_sync = False
        self.log_failure = False
        self.leg_failure = False
        self.suspended = True
        #: writes held after a leg failure (handle_errors without keep_log) give up at suspend
        self._holds_released = False
        #: writes and flushes held now (the ``held_ios`` message answers with it)
        self.held = 0
        self.rate = _rates(ctx).get(ctx.device, 0)  # bytes/s, 0 = unlimited
        self._next_copy = 0.0
        self._copying: set[int] = set()
        self._retiring = False
        self._wake = False
        self._stop = False
        self._worker: threading.Thread | None = None
        self._kc: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._writers: LegWriters | None = None
        #: legs being rebuilt, and the regions where only they need the copy.
        self.rebuild_legs: set[int] = set()
        self.partial = Bitmap(self.nr_regions)
        #: region -> bit mask of the legs that failed its last recovery (kept until a copy succeeds)
        self.recovery_failures: dict[int, int] = {}

    # -- features and legs ------------------------------------------------------------------------
    @property
    def errors_handled(self) -> bool:
        """``handle_errors``: leg failures fail over and raise events."""
        return self.value.handle_errors

    @property
    def keep_log(self) -> bool:
        """``keep_log``: writes go on after a leg failure (the regions stay out of sync)."""
        return self.value.keep_log

    def _valid_leg(self) -> MirrorLegState | None:
        return next((leg for leg in self.legs if not leg.error_count), None)

    def _fail_leg(self, leg: MirrorLegState, kind: LegError) -> None:
        """``fail_mirror``: record the error; with handle_errors fail over and raise an event."""
        self.leg_failure = True
        leg.error_count += 1
        bit = 1 << kind
        if leg.error_type & bit:
            return
        leg.error_type |= bit
        if not self.errors_handled:
            return
        if leg.index == self.default:
            if not self.in_sync and not self.keep_log:
                log.error("Primary mirror (%s) failed while out-of-sync: Reads may fail.", leg.dev.name)
            else:
                new = self._valid_leg()
                if new is not None:
                    self.default = new.index
                else:
                    log.warning("All sides of mirror have failed.")
        self._event()

    def _event(self) -> None:
        try:
            self.ctx.event()
        except Exception:  # noqa: BLE001 - an event must never fail the I/O path
            log.exception("mirror event failed")

    def _choose_leg(self) -> MirrorLegState | None:
        """The default leg, or walking backwards from it the first leg without errors."""
        i = self.default
        for _ in range(len(self.legs)):
            if not self.legs[i].error_count and i not in self.rebuild_legs:
                return self.legs[i]
            i = (i - 1) % len(self.legs)
        return None

    @staticmethod
    def _flush_leg(leg: MirrorLegState) -> bool:
        try:
            leg.dev.flush()
            return True
        except (OSError, DMError):
            return False

    def _flush_leg_devices(self) -> list[MirrorLegState]:
        """Flush every leg (in parallel); return the legs whose flush failed. Needs no lock."""
        pool = self._pool
        if pool is None:
            return [leg for leg in self.legs if not self._flush_leg(leg)]
        results = list(pool.map(self._flush_leg, self.legs))
        return [leg for leg, ok in zip(self.legs, results) if not ok]

    def _flush_legs(self) -> None:
        """``mirror_flush``: an empty flush to every leg (the log calls it before a clean mark)."""
        failed = self._flush_leg_devices()
        if failed:
            for leg in failed:
                self._fail_leg(leg, LegError.FLUSH)
            raise _io_error("mirror leg flush failed", failed[0].dev.name)

    # -- I/O helpers ------------------------------------------------------------------------------
    def _split(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """``(region, offset, nbytes)`` pieces of a byte range, cut at region boundaries."""
        out = []
        end = offset + length
        while offset < end:
            region = offset // self.region_bytes
            n = min(end, (region + 1) * self.region_bytes) - offset
            out.append((region, offset, n))
            offset += n
        return out

    @staticmethod
    def _leg_read(leg: MirrorLegState, buf: memoryview, offset: int) -> None:
        got = leg.dev.readinto(buf, leg.base + offset)
        if got != len(buf):
            raise _io_error(f"short read ({got} of {len(buf)} bytes)", leg.dev.name)

    @staticmethod
    def _write_leg(leg: MirrorLegState, buf: memoryview, offset: int) -> int:
        try:
            leg.dev.write(buf, leg.base + offset)
        except (OSError, DMError) as err:
            log.debug("write to %s failed: %s", leg.dev.name, err)
            return 1 << leg.index
        return 0

    def _write_legs(self, legs: list[MirrorLegState], buf: memoryview, offset: int, parallel: bool = True) -> int:
        """Write to every leg, in parallel for large writes; return the error bits (bit = leg index)."""
        writers = self._writers
        if writers is None or not parallel or len(buf) < PARALLEL_WRITE_BYTES:
            bits = 0
            for leg in legs:
                bits |= self._write_leg(leg, buf, offset)
            return bits
        reqs = [(leg, writers.submit(i, self._write_leg, leg, buf, offset)) for i, leg in enumerate(legs[1:])]
        bits = self._write_leg(legs[0], buf, offset)
        for leg, req in reqs:
            got = req.wait()
            bits |= got if got >= 0 else 1 << leg.index
        return bits

    # -- reads ------------------------------------------------------------------------------------
    def read(self, buf: memoryview, offset: int) -> None:
        mv = memoryview(buf).cast("B")
        base = offset
        for region, off, n in self._split(offset, len(mv)):
            self._read_region(region, mv[off - base : off - base + n], off)

    def _read_region(self, region: int, buf: memoryview, offset: int) -> None:
        while True:
            with self.cond:
                if self.rh.in_sync(region):
                    leg = self._choose_leg()
                else:
                    leg = self.legs[self.default]
                    if leg.error_count:
                        leg = None
            if leg is None:
                raise _io_error("no mirror leg available for the read")
            try:
                self._leg_read(leg, buf, offset)
                return
            except (OSError, DMError):
                with self.cond:
                    self._fail_leg(leg, LegError.READ)
                    default_ok = not self.legs[self.default].error_count
                    retry = default_ok or (self.log.in_sync(region) and self._choose_leg() is not None)
                if not retry:
                    log.error("Read failure on mirror device %s.  Failing I/O.", leg.dev.name)
                    raise
                log.warning("Read failure on mirror device %s. Trying alternative device.", leg.dev.name)

    # -- writes -----------------------------------------------------------------------------------
    def write(self, buf: memoryview, offset: int) -> None:
        mv = memoryview(buf).cast("B")
        pieces = self._split(offset, len(mv))
        regions = [p[0] for p in pieces]
        with self.cond:
            # Writes to a region under recovery are delayed until its recovery ends.
            while any(self.rh.state(r) is RegionState.RECOVERING for r in regions):
                self.cond.wait()
            self._note_in_sync()  # as the kmirrord pass that would dispatch this write does first
            states = [self.rh.state(r) for r in regions]
            for r in regions:
                self.rh.inc(r)
            self._writing += 1
            self._last_io = now = time.monotonic()
            if self.log.persistent and self.log.touched_dirtied:
                self._mark_ahead(regions, now)
            # dirty marks durable before any data write (dm-raid1.c do_writes: dm_rh_flush)
            self._make_marks_durable(regions)
            log_failure = self.log_failure
            nosync_fails = self.leg_failure and self.errors_handled and not self.keep_log
            default = self.legs[self.default]
            parallel = self._writing == 1
        failures: list[int] = []
        error: BaseException | None = None
        try:
            run: list[int] = []  # pieces in sync, written to every leg together
            for i, ((region, off, n), state) in enumerate(zip(pieces, states)):
                if state is RegionState.NOSYNC:
                    if self.rebuild_legs and self.partial.test(region):
                        with self.cond:  # the other legs miss this write now: copy to all of them
                            self.partial.clear(region)
                    if nosync_fails:
                        failures.append(region)
                    else:
                        default.dev.write(mv[off - offset : off - offset + n], default.base + off)
                    continue
                if log_failure and self.errors_handled:
                    failures.append(region)
                    continue
                run.append(i)
                if i + 1 < len(pieces) and states[i + 1] is not RegionState.NOSYNC:
                    continue  # the next piece joins this run
                failures.extend(self._write_run([pieces[j] for j in run], mv, offset, parallel))
                run = []
            if failures:
                self._do_failures(failures)
        except BaseException as err:  # noqa: BLE001 - re-raised after the pending counts drop
            error = err
        finally:
            now = time.monotonic()
            with self.cond:
                self._writing -= 1
                self._last_io = now
                wake = False
                for r in regions:
                    wake = self.rh.dec(r, now) or wake
                if wake or (len(self.rh.clean) >= self._clean_backlog and not self._wake):
                    self._wake_worker()
        if error is not None:
            raise error

    def _mark_ahead(self, regions: list[int], now: float) -> None:
        """This write pays a log flush anyway: let it carry the next regions' marks too.

        The window doubles while writes continue one another (the region before this write is
        in the hash: written or marked recently), else it starts again from ``mark_ahead``.
        """
        if regions[0] > 0 and regions[0] - 1 in self.rh.regions:
            self._ahead = min(2 * self._ahead, self._ahead_max)
        else:
            self._ahead = self.mark_ahead
        last = regions[-1]
        for r in range(last + 1, min(self.nr_regions, last + 1 + self._ahead)):
            self.rh.mark_ahead(r, now)

    def _write_run(self, run: list[tuple[int, int, int]], mv: memoryview, base: int, parallel: bool) -> list[int]:
        """Write consecutive in-sync pieces to every leg with one write per leg; return the regions
        that failed on some leg. A leg that fails the joined write is written again piece by
        piece, so exactly the regions it cannot hold fail (as one bio per region would)."""
        start, end = run[0][1], run[-1][1] + run[-1][2]
        bits = self._write_legs(self.legs, mv[start - base : end - base], start, parallel)
        if not bits:
            return []
        failed: set[int] = set()
        for leg in self.legs:
            if not bits & (1 << leg.index):
                continue
            if len(run) == 1:
                failed.add(run[0][0])
            else:
                for region, off, n in run:
                    if self._write_leg(leg, mv[off - base : off - base + n], off):
                        failed.add(region)
        with self.cond:
            for leg in self.legs:
                if bits & (1 << leg.index):
                    self._fail_leg(leg, LegError.WRITE)
        return sorted(failed) or [run[0][0]]

    # -- the log: one write at a time, without the lock ------------------------------------------
    def _marks_durable(self, regions: list[int]) -> bool:
        unflushed = self.log.unflushed
        if any(r in unflushed for r in regions):
            return False
        pending = self._in_flight
        return pending is None or not any(r in pending.marked for r in regions)

    def _make_marks_durable(self, regions: list[int]) -> None:
        """(Lock held.) Return once the dirty marks of ``regions`` are on the log device.

        Writers batch their flushes: the first one takes the log image and writes it without the
        lock; those whose marks it holds wait for it, and marks made meanwhile go in the next
        one. A failed log write sets ``log_failure`` (the caller acts on it) and ends the wait.
        """
        if not self.log.persistent:
            self.log.flush()  # the core log: nothing to write
            return
        while not self._marks_durable(regions):
            if self._flushing:
                self.cond.wait()
            elif not self._write_log():
                return

    def _write_log(self) -> bool:
        """(Lock held, no log write in flight.) Write the log's pending changes without the lock.

        A clean bit is set in memory only after the legs were flushed (the worker's pass), or by a
        flush that flushes them itself (``update_states``), so the image needs no leg flush here.
        """
        pending = self.log.take_image(legs_flushed=True)
        if pending is None:
            return True
        self._flushing, self._in_flight = True, pending
        ok = True
        self.cond.release()
        try:
            self.log.write_image(pending)
        except (OSError, DMError):
            ok = False
        finally:
            self.cond.acquire()
            self._flushing, self._in_flight = False, None
            if not ok:
                self.log.restore(pending)
                self.log_failure = True
            self.cond.notify_all()
        return ok

    def _wait_log_idle(self) -> None:
        """(Lock held.) Wait for a log write in flight: the caller writes the log under the lock."""
        while self._flushing:
            self.cond.wait()

    def _do_failures(self, regions: list[int]) -> None:
        """``do_failures``: the regions go NOSYNC; the write fails, is held, or completes."""
        with self.cond:
            if not self.log_failure:
                self.in_sync = False
                for r in regions:
                    self.rh.mark_nosync(r)
                self.cond.notify_all()
            if self._valid_leg() is None or (self.keep_log and self.log_failure):
                raise _io_error("all mirror legs failed" if self._valid_leg() is None else "mirror log failed")
            if self.errors_handled and not self.keep_log:
                # Held until a suspend lets userspace (a manager, dmeventd) replace the leg.
                self._hold("write")


    def flush(self) -> None:
        """PREFLUSH to every leg (in parallel); a failure marks the leg D and later clean marks NOSYNC."""
        bits = 0
        for leg in self._flush_leg_devices():
            bits |= 1 << leg.index
        if not bits:
            return
        with self.cond:
            for leg in self.legs:
                if bits & (1 << leg.index):
                    self._fail_leg(leg, LegError.WRITE)
            self.rh.flush_failure = True
            if self._valid_leg() is None:
                raise _io_error("flush failed on every mirror leg")
            if self.errors_handled and not self.keep_log:
                self._hold("flush")

    def _hold(self, what: str) -> None:
        """Hold the I/O (lock held) until a suspend releases it, then end it (dm-raid1.c
        ``hold_bio``): requeued to the next table during a noflush suspend (so a leg replaced by
        dmeventd/LVM receives it), else EIO. ``what`` names the I/O in the error."""
        self.held += 1
        try:
            while not self._holds_released:
                self.cond.wait()
        finally:
            self.held -= 1
        if self.ctx.noflush_suspending:
            raise RequeueIO(f"{what} held after a leg failure, requeued at a noflush suspend",
                            device=self.ctx.device_name)
        raise _io_error(f"{what} held after a leg failure, failed at suspend")

    def discard(self, offset: int, length: int) -> None:
        """Discard on every leg; a failure is reported as unsupported and degrades nothing."""
        for leg in self.legs:
            try:
                leg.dev.discard(leg.base + offset, length)
            except (OSError, DMError) as err:
                raise DeviceIOError("discard failed", errno=errno.EOPNOTSUPP, operation="discard",
                                    device=leg.dev.name) from err

    # -- worker (kmirrord) ------------------------------------------------------------------------
    def _wake_worker(self) -> None:
        self._wake = True
        self.cond.notify_all()

    def _run(self) -> None:
        """kmirrord: one pass per wake-up; an unexpected error is logged and the worker goes on."""
        while True:
            try:
                if not self._pass():
                    return
            except Exception:  # noqa: BLE001 - the worker must survive a bug in one pass
                log.exception("mirror worker pass failed")
                time.sleep(0.1)

    def _pass(self) -> bool:
        """Retire regions, start copies, detect sync; False when the target is being destroyed."""
        to_copy: list[int] = []
        with self.cond:
            while not self._wake and not self._stop and not self._due():
                self.cond.wait(self._worker_timeout())
            if self._stop:
                return False
            self._wake = False
            batch = self.rh.collect(clean_before=self._clean_before(time.monotonic()))
            self._retiring = bool(batch)
        # The legs are flushed before any clean mark, without the lock: writes go on meanwhile
        # (a region written during the flush keeps its dirty mark).
        flushed = False
        failed: list[MirrorLegState] = []
        if batch.needs_leg_flush and self.log.persistent:
            failed = self._flush_leg_devices()
            flushed = not failed
        with self.cond:
            if failed:
                for leg in failed:
                    self._fail_leg(leg, LegError.FLUSH)
                self.log.leg_flush_failed()
            try:
                self.rh.apply(batch, self.errors_handled, legs_flushed=flushed or not self.log.persistent, flush=False)
                self._flush_log()
            finally:
                self._retiring = False
            self.cond.notify_all()  # delayed writes may go now
            if not self.suspended:
                self.rh.recovery_prepare()
                while self.rh.quiesced and self._rate_ready():
                    region = self.rh.recovery_start()
                    assert region is not None
                    self._charge(self._region_len(region))
                    self._copying.add(region)
                    to_copy.append(region)
            self._note_in_sync()
            default = self.legs[self.default]
        for run in self._runs(to_copy):
            self._recover(run, default)
        return True

    def _note_in_sync(self) -> None:
        """(Lock held.) ``do_recovery``'s last step: once every region is in sync, raise an event,
        set ``in_sync`` and forget the legs' errors.

        The kernel runs it in every kmirrord pass, before that pass dispatches its writes
        (``do_mirror``: ``do_recovery`` then ``do_writes``), and the constructor's wake-up runs a
        pass as the table is loaded. Our writes run on the caller's thread, not in the worker's
        pass, so ``resume`` and every write call it too: else a write reaching the mirror before
        the worker's first pass, or while the pass that ended the resync writes the log without
        the lock, would find ``in_sync`` still False, and a failure of the default leg would keep
        it the default (``fail_mirror``) although the other legs hold all the data, and the guard
        would end the held write with EIO instead of dropping the leg."""
        if not self.in_sync and self.log.get_sync_count() == self.nr_regions:
            self._event()
            self.in_sync = True
            for leg in self.legs:
                leg.error_count = leg.error_type = 0
            self.leg_failure = False
            self.rebuild_legs.clear()
            self.cond.notify_all()

    def _runs(self, regions: list[int]) -> list[list[int]]:
        """``regions`` cut into the kcopyd jobs that copy them. Between regular files (kcopyd's
        ``copy_file_range`` path, every leg written through the page cache) adjacent regions with
        the same destinations go in one job: its per-job costs (submission, plan, callback) are
        paid once per run, and the legs' inode lock sees one writer, not one per region
        (measured, 512 MiB full resync in 512 KiB regions, 4 alternating rounds: 0.68-0.70 s and
        0.31-0.40 s CPU with a job per region, against a raw kcopyd copy's 0.50-0.56 s and 0.19 s).
        Other legs keep a job per region."""
        from kcopyd.lanes import one_writer

        if not all(one_writer(leg.dev) for leg in self.legs):
            return [[r] for r in regions]
        with self.cond:
            only = {r: self.partial.test(r) for r in regions}
        runs: list[list[int]] = []
        for r in sorted(regions):
            if runs and runs[-1][-1] == r - 1 and only[runs[-1][-1]] == only[r]:
                runs[-1].append(r)
            else:
                runs.append([r])
        return runs

    def _flush_log(self) -> None:
        """(Lock held.) Write the log's pending changes (the worker's clean marks), batched with
        the writers' flushes: done once an image holding them is taken."""
        while self.log.changes_pending:
            if self._flushing:
                self.cond.wait()
            elif not self._write_log():
                return

    def _clean_before(self, now: float) -> float:
        """Which clean regions this pass retires: all of them over the backlog; those clean for
        ``CLEAN_DELAY`` at least when retirement is due (the regions just marked ahead of a
        writer stay for it); none otherwise."""
        if len(self.rh.clean) >= self._clean_backlog:
            return now
        retire = self._retire_at(now)
        return now - CLEAN_DELAY if retire is not None and retire <= now else float("-inf")

    def _retire_at(self, now: float) -> float | None:
        """When the clean regions are due for retirement (``None``: none waits)."""
        if not self.rh.clean:
            return None
        if len(self.rh.clean) >= self._clean_backlog:
            return now
        first = next(iter(self.rh.clean.values()))
        return min(first + CLEAN_MAX_DELAY, max(first, self._last_io) + CLEAN_DELAY)

    def _worker_timeout(self) -> float | None:
        now = time.monotonic()
        timeouts = []
        if self.rh.quiesced and self.rate:
            timeouts.append(max(0.0, self._next_copy - now) + 0.001)
        retire = self._retire_at(now)
        if retire is not None:
            timeouts.append(max(0.0, retire - now) + 0.001)
        elif self.rh.regions:  # writes in flight: their regions go clean without a wake-up
            timeouts.append(CLEAN_DELAY)
        return min(timeouts) if timeouts else None

    def _due(self) -> bool:
        """Work the worker must do now: a copy the rate allows, ended recoveries, clean regions
        due for retirement."""
        if self.rh.quiesced and self._rate_ready():
            return True
        if self.rh.recovered or self.rh.failed_recovered:
            return True
        retire = self._retire_at(time.monotonic())
        return retire is not None and retire <= time.monotonic()

    def _rate_ready(self) -> bool:
        return not self.rate or time.monotonic() >= self._next_copy

    def _charge(self, nbytes: int) -> None:
        if self.rate:
            now = time.monotonic()
            self._next_copy = max(self._next_copy, now - 0.05) + nbytes / self.rate

    def _region_len(self, region: int) -> int:
        """Sectors of ``region``: the last one may be short (dm-raid1.c ``recover``)."""
        if region == self.nr_regions - 1:
            tail = self.length & (self.region_size - 1)
            return (tail or self.region_size) * SECTOR
        return self.region_bytes

    def _recover(self, run: list[int], source: MirrorLegState) -> None:
        """Copy the adjacent regions ``run`` from the default leg to every other leg with kcopyd."""
        from kcopyd.client import IGNORE_ERROR
        from kcopyd.region import Region

        nbytes = sum(self._region_len(r) for r in run)
        sector = run[0] * self.region_size
        src = Region(source.dev, source.offset + sector, nbytes // SECTOR)
        with self.cond:
            only = self.partial.test(run[0])
        if only:
            dests = [leg for leg in self.legs if leg is not source and leg.index in self.rebuild_legs]
        else:
            dests = [leg for leg in self.legs if leg is not source]
        regions = [Region(leg.dev, leg.offset + sector, nbytes // SECTOR) for leg in dests]
        flags = 0 if self.errors_handled else IGNORE_ERROR
        try:
            self._kc.copy(src, regions, flags=flags, notify=self._recovery_complete, context=(run, source, dests))
        except DMError as err:
            log.error("cannot start recovery of regions %d-%d: %s", run[0], run[-1], err)
            self._recovery_complete(True, 0, (run, source, dests))

    def _recovery_complete(self, read_err: bool, write_err: int,
                           context: tuple[list[int], MirrorLegState, list[MirrorLegState]]) -> None:
        run, source, dests = context
        if (read_err or write_err) and len(run) > 1:
            # copy the run's regions one by one: only those that really fail end as failures
            for region in run:
                self._recover([region], source)
            return
        with self.cond:
            if read_err:
                log.error("Unable to read primary mirror during recovery")
                self._fail_leg(source, LegError.SYNC)
            if write_err:
                log.error("Write error during recovery (error = 0x%x)", write_err)
                for bit, leg in enumerate(dests):
                    if write_err & (1 << bit):
                        self._fail_leg(leg, LegError.SYNC)
            ok = not (read_err or write_err)
            for region in run:
                self._copying.discard(region)
                if ok:
                    self.partial.clear(region)
                    self.recovery_failures.pop(region, None)
                else:
                    bits = 1 << source.index if read_err else 0
                    for bit, leg in enumerate(dests):
                        if write_err & (1 << bit):
                            bits |= 1 << leg.index
                    self.recovery_failures[region] = bits
                self.rh.recovery_end(region, ok)
            self._wake_worker()

    # -- lifecycle --------------------------------------------------------------------------------
    def presuspend(self) -> None:
        """Release held writes, stop recovery and wait for the copies in flight."""
        with self.cond:
            self.suspended = True
            self._holds_released = True
            self._stop_recovery()

    def _stop_recovery(self) -> None:
        """(Lock held.) Stop recovery until the next resume, wait for the copies in flight and
        settle the regions they ended."""
        self.rh.recovery_stopped = True
        self.cond.notify_all()
        while self.rh.quiesced:
            region = self.rh.quiesced[0]
            self.rh.abandon(region)
        # copies in flight, a retirement half done, or a log write (the log is written below)
        while self._copying or self._retiring or self._flushing:
            self.cond.wait()
        # Regions still waiting for writes to drain are given up: they stay out of sync.
        for region in list(self.rh.recovering):
            if region not in self.rh.recovered and region not in self.rh.failed_recovered:
                self.rh.abandon(region)
        try:
            self.rh.update_states(self.errors_handled)
        except (OSError, DMError):
            self.log_failure = True
        self.cond.notify_all()

    def presuspend_undo(self) -> None:
        self.resume()

    def postsuspend(self) -> None:
        """Flush the log (``dm-log.c``: postsuspend is ``disk_flush``)."""
        with self.cond:
            self._wait_log_idle()
            self.log.postsuspend()

    def resume(self) -> None:
        """Re-read the log (disk: the kernel's resume rules) and (re)start recovery."""
        with self.cond:
            self._wait_log_idle()
            self.log.resume()
            if self._kc is None:
                from kcopyd.client import Client

                self._kc = Client(num_pages=max(1024, 2 * self.region_bytes // 4096))
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=2 * (len(self.legs) - 1), thread_name_prefix="mirror-io")
            if self._writers is None:
                self._writers = LegWriters(len(self.legs) - 1, f"mirror-leg-{self.ctx.device_name}")
            self._note_in_sync()  # before any I/O (the kernel's pass at table load)
            self.suspended = False
            self._holds_released = False
            self.rh.recovery_stopped = False
            self._wake_worker()
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name=f"kmirrord-{self.ctx.device_name}", daemon=True)
                self._worker.start()

    def destroy(self) -> None:
        with self.cond:
            self._holds_released = True
            self.rh.recovery_stopped = True
            while self._copying:
                self.cond.wait()
            self._stop = True
            self.cond.notify_all()
        if self._worker is not None:
            self._worker.join()
        if self._kc is not None:
            self._kc.destroy()
            self._kc = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._writers is not None:
            self._writers.close()
            self._writers = None

    # -- text and control -------------------------------------------------------------------------
    def status(self) -> str:
        """``<#mirrors> <dev>... <in_sync>/<nr_regions> 1 <health> <log status>``."""
        from dmtools.status import MirrorStatus

        with self.cond:
            log_words = self.log.status_info().split()[1:]
            return MirrorStatus(tuple(leg.dev.name for leg in self.legs), self.log.get_sync_count(), self.nr_regions,
                                "".join(leg.health() for leg in self.legs), tuple(log_words)).format()

    def ima_status(self) -> str:
        """STATUSTYPE_IMA text of ``mirror_status`` (dm-raid1.c).

        ``…,nr_mirrors=N``, then ``,mirror_device_<i>=<dev>,mirror_device_<i>_status=<health>`` per
        leg, ``,handle_errors=y|n,keep_log=y|n,log_type_status=`` and ``;``. The log's part is
        empty: both dm-log.c logs (core and disk) emit nothing for STATUSTYPE_IMA.
        """
        with self.cond:
            legs = "".join(f",mirror_device_{leg.index}={leg.dev.name},"
                           f"mirror_device_{leg.index}_status={leg.health()}" for leg in self.legs)
        yn = {True: "y", False: "n"}
        return (f"{self.ima_prefix()},nr_mirrors={len(self.legs)}{legs}"
                f",handle_errors={yn[self.errors_handled]},keep_log={yn[self.keep_log]}"
                ",log_type_status=;")

    def table_params(self) -> str:
        """``<log table> <#mirrors> <dev> <offset>... [<n> handle_errors keep_log]``."""
        return self.value.params

    def message(self, args: Sequence[str]) -> str | None:
        """``resync_rate <bytes/s>`` (0 = unlimited), ``max_recovery <n>``, ``rebuild <leg>``,
        ``resync_all``, or the queries ``recovery_failures``, ``held_ios`` and ``default_leg``."""
        queries = {"recovery_failures": self.format_failures, "held_ios": lambda: str(self.held),
                   "default_leg": lambda: str(self.default)}
        if len(args) == 1 and args[0] in queries:
            with self.cond:
                return queries[args[0]]()
        if args == ["resync_all"]:
            with self.cond:
                self._resync_all()
            return None
        if len(args) != 2 or args[0] not in ("rebuild", "resync_rate", "max_recovery"):
            raise InvalidArgument(f"unrecognised mirror message {' '.join(args)!r}", operation="message")
        value = _unsigned(args[1], U64_MAX if args[0] == "resync_rate" else U32_MAX)
        with self.cond:
            if args[0] == "rebuild":
                if value is None or value >= len(self.legs) or value == self.default:
                    raise InvalidArgument(f"cannot rebuild leg {args[1]!r}", operation="message")
                self._start_rebuild(value)
                return None
            if value is None or (args[0] == "max_recovery" and value < 1):
                raise InvalidArgument(f"invalid {args[0]} value {args[1]!r} (max_recovery is at least 1)",
                                      operation="message")
            if args[0] == "resync_rate":
                self.rate = value
                _rates(self.ctx)[self.ctx.device] = value
                self._next_copy = time.monotonic()
            else:
                self.rh.max_recovery = value
            self._wake_worker()
        return None

    def format_failures(self) -> str:
        """The ``recovery_failures`` answer: ``<region>:<leg>[,<leg>]`` words in region order."""
        words = []
        for region in sorted(self.recovery_failures):
            bits = self.recovery_failures[region]
            legs = ",".join(str(leg.index) for leg in self.legs if bits & (1 << leg.index))
            words.append(f"{region}:{legs}")
        return " ".join(words)

    def _mark_all_out_of_sync(self, partial: bool = False) -> None:
        """(Lock held, no log write in flight.) Every region out of sync and marked dirty (flushed
        by the caller); ``partial``: the regions in sync so far need the copy on the rebuilt legs
        only."""
        for r in range(self.nr_regions):
            if partial and r not in self.rh.regions and self.log.in_sync(r):
                self.partial.set(r)
            reg = self.rh.regions.get(r)
            if reg is not None and reg.state in (RegionState.CLEAN, RegionState.DIRTY):
                self.rh.mark_nosync(r)  # never cleared before it is copied
            self.log.mark_region(r)
            if self.log.in_sync(r):
                self.log.set_region_sync(r, False)
        self.in_sync = False

    def _resync_all(self) -> None:
        """(Lock held.) ``resync_all``: every region out of sync and marked dirty on the log before
        this returns, and no recovery (which would mark them clean again) until the next resume: a
        table about to be replaced by one with a new, blank leg (``MirrorManager.repair``), so that
        no log on disk trusts that leg whatever moment the process dies. A log that cannot be
        written is recorded as failed (``D`` in status), as a write's mark would be; the repair
        goes on, as the kernel's does on a failed log."""
        self._stop_recovery()
        self._wait_log_idle()  # the log is written below, under the lock
        self._mark_all_out_of_sync()
        try:
            self.log.flush()
        except (OSError, DMError) as err:
            self.log_failure = True
            log.error("cannot mark every region out of sync on the mirror log: %s", err)

    def _start_rebuild(self, index: int) -> None:
        """Mark every region dirty and out of sync; remember where only ``index`` needs a copy."""
        self._wait_log_idle()  # the log is written below, under the lock
        self.rebuild_legs.add(index)
        self.recovery_failures.clear()  # every region is copied again
        self._mark_all_out_of_sync(partial=True)
        try:
            self.log.flush()  # dirty marks durable before any copy
        except (OSError, DMError):
            self.log_failure = True
        self.log.sync_search = 0  # restart the resync scan from region 0
        self._wake_worker()

    # -- introspection for managers and tests -----------------------------------------------------
    def health(self) -> str:
        """Health letters, one per leg."""
        with self.cond:
            return "".join(leg.health() for leg in self.legs)

    def wait_in_sync(self, timeout: float) -> bool:
        """Block until every region is in sync (or ``timeout`` seconds); True when in sync."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.log.get_sync_count() != self.nr_regions or not self.in_sync:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.1))
            return True
