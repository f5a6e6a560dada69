"""``MirrorManager``: create, watch, resync, repair, split and grow mirrors on either backend.

The manager builds ``mirror`` tables and drives them through a ``DeviceMapper`` (the kernel through
libdevmapper, or the userspace engine). Leg and log references are paths or ``major:minor``, as
dmsetup takes them. Region sizes are in 512-byte sectors.

Resync: on the userspace engine the ``mirror`` target copies (``resync_rate`` / ``rebuild``
messages steer it); on the kernel the manager follows the kernel's own resync with the same
progress, or — for a mirror that is not active — ``resync_offline`` copies the regions the disk log
names as out of sync with kcopyd, so that ``activate`` brings the mirror up already in sync.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence, TypedDict, Unpack

from dmtools.backend import DeviceMapper
from dmtools.endpoint import Endpoint
from dmtools.errors import DMError, InvalidArgument, OperationCancelled, quietly
from dmtools.names import validate_name
from dmtools.status import parse_mirror_status
from dmtools.table import Table
from dmtools.target_values import MAX_NR_MIRRORS, CoreLog, DiskLog, Leg, Linear, Mirror, SyncMode, parse_devno
from kcopyd.progress import ProgressFn

from mirror.format import (SECTOR, LogImage, check_log_regions, check_region_size, drop_cache, format_log,
                           log_io_bytes, region_count)
from mirror.guard import UNMONITORED_PREFIX, guard_for
from mirror.reload import swap_table
from mirror.resync import OfflineResync, RecoveryFailed, ResyncResult, check_legs, raise_for

log = logging.getLogger(__name__)

__all__ = ["MirrorManager", "MirrorState", "DEFAULT_REGION_SIZE", "resync_offline"]

#: Seconds a resync may show a failed leg without progress before it is reported as failed (the
#: kernel's mirror does not say when it gave up on its regions).
STALL_SECONDS = 2.0
#: 512 KiB, the RHEL documentation's default mirror region (LVM's current default is 2 MiB).
DEFAULT_REGION_SIZE = 1024

#: region -> indexes of the legs that failed its copy (``MirrorManager.recovery_failures``)
Failures = dict[int, list[int]]
Regions = list[int]


@dataclass(frozen=True)
class MirrorState:
    """A mirror's table and status, as the manager reports it."""

    name: str
    backend: str
    length: int
    region_size: int | None
    legs: tuple[str, ...]
    health: str
    in_sync: int
    regions: int
    log_type: str
    log_device: str | None
    log_health: str | None
    features: tuple[str, ...]
    status_text: str
    table_text: str

    @property
    def percent(self) -> float:
        """Regions in sync, 0–100."""
        return 100.0 * self.in_sync / self.regions if self.regions else 100.0

    @property
    def fully_in_sync(self) -> bool:
        """True when every region is in sync."""
        return self.in_sync == self.regions

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "name": self.name,
            "backend": self.backend,
            "length_sectors": self.length,
            "region_size_sectors": self.region_size,
            "legs": [{"device": d, "health": h} for d, h in zip(self.legs, self.health)],
            "in_sync_regions": self.in_sync,
            "regions": self.regions,
            "percent_in_sync": round(self.percent, 2),
            "log": {"type": self.log_type, "device": self.log_device, "health": self.log_health},
            "features": list(self.features),
            "status": self.status_text,
            "table": self.table_text,
        }


class MirrorManager:
    """Mirror operations on ``dm`` (``dmtools.open()`` when omitted)."""

    def __init__(self, dm: DeviceMapper | None = None) -> None:
        if dm is None:
            import dmtools

            dm = dmtools.open()
        self.dm = dm

    # -- helpers --------------------------------------------------------------------------------
    @property
    def userspace(self) -> bool:
        return self.dm.backend == "userspace"

    def open_ref(self, ref: str | Endpoint, *, writable: bool = False) -> Endpoint:
        """Open a leg or log reference: an engine device number, a path or a kernel ``major:minor``."""
        if isinstance(ref, Endpoint):
            return ref
        devno = parse_devno(ref) if self.userspace else None
        if devno is not None:
            for entry in self.dm.list():
                if (entry.major, entry.minor) == devno:
                    return self.dm.open_endpoint(entry.name, writable=writable)
        from dmtools.blockdev import open_endpoint

        return open_endpoint(ref, writable=writable)

    def _check_devices(self, legs: Sequence[str | Endpoint], log: str | Endpoint | None, operation: str,
                       *, in_use: Sequence[str] = (), new: str | None = None, skip: int | None = None) -> None:
        """Legs, log and a new leg must not share bytes (any spelling, ``dmtools.inputs``); the roles
        in ``in_use`` must not be mapped by a live table. Raises ``DeviceConflict``/``DeviceBusy``."""
        from dmtools.inputs import check_devices

        roles = _roles(legs, log, new=new, skip=skip)
        check_devices(roles, backends=[self.dm], operation=operation, in_use=in_use,
                      missing_ok=[r for r in roles if r.startswith("leg ")] if new else ())

    def _mirror(self, name: str) -> tuple[int, Mirror]:
        table = self.dm.table(name)
        if len(table.lines) != 1 or not isinstance(table.lines[0].target, Mirror):
            raise InvalidArgument("not a mirror device (one mirror target expected)", operation="mirror", device=name)
        return table.lines[0].length, table.lines[0].target

    # -- create / status / remove ---------------------------------------------------------------
    def create(self, name: str, legs: Sequence[str], *, log: str = "core", region_size: int = DEFAULT_REGION_SIZE,
               nosync: bool = False, handle_errors: bool = True, keep_log: bool = False,
               keep_log_contents: bool = False, uuid: str = "", monitor: bool = True) -> MirrorState:
        """Create mirror ``name`` over ``legs`` (2–9 devices of one size) and activate it.

        ``log`` is ``"core"`` or a log device. A disk log is formatted (every region out of sync,
        or in sync with ``nosync``) unless ``keep_log_contents`` (``activate``) trusts what it holds.
        ``nosync`` skips the initial resync (the legs are known to be identical or blank).
        ``handle_errors`` (the default, as LVM's monitored mirrors) makes leg failures fail over and
        raise events, keeps a region whose copy failed out of sync (so a read of it goes to a leg
        that holds its data, or fails) and, without ``keep_log``, holds writes after a leg failure
        until the mirror is reconfigured; ``keep_log`` keeps them completing while the failed regions
        stay out of sync. ``handle_errors=False`` is the kernel's unsafe case: failures are only
        counted, and a region whose copy failed is marked in sync all the same.
        ``monitor`` (as ``lvchange --monitor y``): on the userspace engine a mirror with
        ``handle_errors`` is watched from creation by ``mirror.guard`` — in the daemon, or in this
        process for an in-process engine — so a write held after a leg failure is released (the
        failed leg dropped, or the I/O ended with EIO when the data lives only on it) within a
        guard period. ``monitor=False`` leaves it to another monitor (``dmtools monitor``): its uuid
        then starts with ``UNMONITORED_PREFIX``. A kernel mirror is watched by a ``dmtools monitor``
        process with the ``remove`` policy, which ``mirror create`` starts (``mirror.monitor.start``).
        Everything is checked before anything is written; raises ``InvalidArgument`` (legs of
        different sizes, bad region size, too-small log), ``CorruptMetadata`` (a kept log that is not
        a mirror log) or the backend's errors. All-or-nothing: the device is removed if activation fails.
        """
        validate_name(name)
        if self.dm.exists(name):
            from dmtools.errors import DeviceExists

            raise DeviceExists("device already exists", operation="create", device=name)
        self._check_devices(legs, log, "create", in_use=("*",))
        with ExitStack() as stack:
            eps = [stack.enter_context(self.open_ref(ref)) for ref in legs]
            length = check_legs(eps)
        if keep_log and not handle_errors:
            raise InvalidArgument("keep_log requires handle_errors", operation="create", device=name)
        features = ("handle_errors",) * handle_errors + ("keep_log",) * keep_log
        with held([*legs, None if log == "core" else log], "create", devnos=not self.userspace):
            mlog = self._new_log(log, region_size, length, "create", nosync=nosync, keep=keep_log_contents)
        target = Mirror(mlog, tuple(Leg(ref, 0) for ref in legs), features)
        if not monitor and not uuid.startswith(UNMONITORED_PREFIX):
            uuid = UNMONITORED_PREFIX + (uuid or secrets.token_hex(8))
        self.dm.create(name, Table.single(length, target), uuid=uuid)
        if monitor:
            self._monitor()
        return self.status(name)

    def _new_log(self, log: str, region_size: int, length: int, operation: str, *, nosync: bool = False,
                 keep: bool = False) -> CoreLog | DiskLog:
        """The log of a new mirror of ``length`` sectors: ``core``, or a disk log device formatted
        (every region out of sync, or in sync with ``nosync``) unless ``keep`` trusts what it holds
        (a foreign or corrupt log is refused; nothing is written)."""
        check_region_size(region_size, length)
        if log == "core":
            return CoreLog(region_size, SyncMode.NOSYNC if nosync else SyncMode.DEFAULT)
        nr = region_count(length, region_size)
        with self.open_ref(log, writable=True) as lep:
            need = log_io_bytes(nr, lep.logical_block_size)
            if need > lep.size:
                raise InvalidArgument(f"log device too small: need {need} bytes, has {lep.size}",
                                      operation=operation, device=log)
            if keep:
                check_log_regions(LogImage.read(lep).header.nr_regions, length, region_size, log)
            else:
                format_log(lep, nr, in_sync=nosync)
        return DiskLog(log, region_size)

    def _monitor(self) -> None:
        """Make sure this process's guard runs when the mirrors live in it (an in-process engine)."""
        guard_for(self.dm)

    def activate(self, name: str, legs: Sequence[str], *, log: str, region_size: int = DEFAULT_REGION_SIZE,
                 handle_errors: bool = True, monitor: bool = True) -> MirrorState:
        """Activate an existing mirror on its disk log, trusting the log (after ``resync_offline``)."""
        return self.create(name, legs, log=log, region_size=region_size, handle_errors=handle_errors,
                           keep_log_contents=True, monitor=monitor)

    def status(self, name: str) -> MirrorState:
        """Table and status of mirror ``name``."""
        length, target = self._mirror(name)
        lines = self.dm.status(name)
        st = parse_mirror_status(lines[0].params)
        return MirrorState(name=name, backend=self.dm.backend, length=length, region_size=target.region_size,
                           legs=st.devices, health=st.health, in_sync=st.in_sync, regions=st.regions,
                           log_type=st.log_type, log_device=st.log_device,
                           log_health=st.log_health.value if st.log_health else None, features=target.features,
                           status_text=lines[0].params, table_text=target.params)

    def list(self) -> list[MirrorState]:
        """Every device whose table is one mirror target."""
        out = []
        for entry in self.dm.list():
            try:
                out.append(self.status(entry.name))
            except DMError:
                continue
        return out

    def remove(self, name: str) -> None:
        """Remove mirror ``name`` (its legs and log are left as they are).

        A passing opener is waited for (``remove(retry=True)``: the open count, up to
        ``dmtools.backend.REMOVE_WAIT`` seconds); ``DeviceBusy`` while it is still open then.
        """
        self._mirror(name)
        self.dm.remove(name, retry=True)

    # -- resync ---------------------------------------------------------------------------------
    def recovery_failures(self, name: str) -> Failures | None:
        """Regions of ``name`` whose last recovery failed, each with the legs that failed it.

        The userspace target keeps this record (its ``recovery_failures`` message) even where the
        kernel's rule marks such a region in sync (a mirror without ``handle_errors``). ``None`` on
        the kernel, whose mirror does not say.
        """
        if not self.userspace:
            return None
        text = self.dm.message(name, 0, "recovery_failures") or ""
        out: Failures = {}
        for word in text.split():
            region, _, legs = word.partition(":")
            out[int(region)] = [int(x) for x in legs.split(",") if x]
        return out

    def resync(self, name: str, *, rate: int | None = None, leg: int | None = None, progress: ProgressFn | None = None,
               timeout: float | None = None, cancel: threading.Event | None = None, poll: float = 0.1,
               operation: str = "resync") -> MirrorState:
        """Bring mirror ``name`` in sync and report progress as ``progress(done_bytes, total_bytes)``.

        On the userspace engine the target is driven: ``rate`` (bytes/s) holds the copy for the
        duration of the call and ``leg`` rebuilds that leg only. On the kernel the kernel's own resync
        is followed (its rate is the ``dm_mirror.raid1_resync_throttle`` module parameter, so ``rate``
        and ``leg`` are refused there; use ``resync_offline`` for an inactive mirror).

        Never reports a region in sync without its data: raises ``RecoveryFailed`` (regions and legs
        named) when a copy failed — the source could not be read or a leg written. With
        ``handle_errors`` those regions stay out of sync and the failed leg shows ``S``/``D``; without
        it the kernel's rule marks them in sync anyway, which the userspace target records and the
        manager reports (on the kernel only a failure letter seen while waiting tells; give mirrors
        ``handle_errors``, the default of ``create``). Raises ``OperationCancelled`` on timeout or cancel.
        """
        if not self.userspace and (rate is not None or leg is not None):
            raise InvalidArgument(
                "the kernel's mirror resync has no per-device rate or leg choice; "
                "resync an inactive mirror with resync_offline instead",
                operation=operation,
                device=name,
            )
        if rate is not None and rate <= 0:
            raise InvalidArgument(f"rate must be positive, not {rate}", operation=operation, device=name)
        state = self.status(name)
        if leg is not None and not 0 < leg < len(state.legs):
            raise InvalidArgument(f"leg {leg} cannot be rebuilt (legs 1..{len(state.legs) - 1})",
                                  operation=operation, device=name)
        if rate is not None:
            self.dm.message(name, 0, f"resync_rate {rate}")
        if leg is not None:
            self.dm.message(name, 0, f"rebuild {leg}")
        try:
            return self._wait_in_sync(name, operation, progress=progress, timeout=timeout, cancel=cancel, poll=poll)
        finally:
            if rate is not None:
                quietly(lambda: self.dm.message(name, 0, "resync_rate 0"))

    def _wait_in_sync(self, name: str, operation: str, *, progress: ProgressFn | None, timeout: float | None,
                      cancel: threading.Event | None, poll: float) -> MirrorState:
        """Poll ``name`` until it is in sync; raise ``RecoveryFailed`` as soon as a copy failed."""
        state = self.status(name)
        region_bytes = (state.region_size or 1) * SECTOR
        total = state.length * SECTOR
        seen_failed: set[int] = set()  # legs seen with S/D/F (the kernel resets them at full sync)
        deadline = None if timeout is None else time.monotonic() + timeout
        moved: tuple[float, tuple[int, int]] | None = None  # when the counts last changed, and them
        while True:
            state = self.status(name)
            bad = {i for i, h in enumerate(state.health) if h in "SDF"}
            seen_failed |= bad
            failures = self.recovery_failures(name)
            unsafe = "handle_errors" not in state.features
            if progress is not None and not (unsafe and seen_failed and failures is None and state.fully_in_sync):
                # what was copied: without handle_errors a failed copy counts as in sync (the kernel's
                # rule), the target's record takes it out again; the kernel's cannot, so it is not shown
                copied = state.in_sync - (len(failures) if unsafe and failures else 0)
                progress(min(total, max(0, copied) * region_bytes), total)
            if state.fully_in_sync:
                if failures:  # marked in sync by the rule of a mirror without handle_errors
                    raise self._failed(operation, state, failures, "marked in sync without its data "
                                       "(no handle_errors)")
                if failures is None and seen_failed and unsafe:
                    raise self._failed(operation, state, None, "the kernel marked them in sync without "
                                       "handle_errors", legs=seen_failed)
                return state
            if failures and not unsafe and state.in_sync + len(failures) >= state.regions:
                raise self._failed(operation, state, failures)  # what failed stays out of sync: done
            counts = (state.in_sync, len(failures or ()))
            now = time.monotonic()
            if not bad or moved is None or moved[1] != counts:
                moved = (now, counts)
            elif now - moved[0] >= STALL_SECONDS:  # a failed leg, and nothing moves any more
                raise self._failed(operation, state, failures)
            if cancel is not None and cancel.is_set():
                raise OperationCancelled(f"{operation} cancelled; it resumes from the log", operation=operation,
                                         device=name)
            if deadline is not None and time.monotonic() >= deadline:
                raise OperationCancelled(f"{operation} not finished after {timeout} s ({state.percent:.1f}%)",
                                         operation=operation, device=name)
            time.sleep(poll)

    def _failed(self, operation: str, state: MirrorState, failures: Failures | None,
                detail: str = "", legs: set[int] | None = None) -> RecoveryFailed:
        """The error for a resync whose copies failed: regions from the target's record (userspace)
        or, on the kernel, from its disk log when that names exactly the regions out of sync."""
        regions: Regions | None
        if failures is not None:
            regions = sorted(failures)
            failed_legs = {i for lg in failures.values() for i in lg}
        else:
            regions = self._kernel_out_of_sync(state)
            failed_legs = set()
        failed_legs |= legs or {i for i, h in enumerate(state.health) if h in "SDF"}
        return RecoveryFailed(operation, regions=regions, legs=sorted(failed_legs), source=0,
                              leg_names=state.legs, detail=detail, operation=operation, device=state.name)

    def _kernel_out_of_sync(self, state: MirrorState) -> Regions | None:
        """Dirty regions of a kernel mirror's disk log, when they are exactly the regions out of sync."""
        if state.log_type != "disk" or not state.log_device:
            return None
        try:
            with self.open_ref(state.log_device) as lep:
                drop_cache(lep)  # the kernel writes its log below the page cache
                image = LogImage.read(lep)
        except DMError:
            return None
        dirty = [r for r in image.out_of_sync() if r < state.regions]
        return dirty if len(dirty) == state.regions - state.in_sync else None

    def resync_offline(self, legs: Sequence[str | Endpoint], log: str | Endpoint | None,
                       **options: Unpack[OfflineOptions]) -> ResyncResult:
        """``resync_offline`` (below) that opens references as this manager does and refuses devices
        its backend maps."""
        return resync_offline(legs, log, opener=self.open_ref, backends=[self.dm], **options)

    # -- repair / split / add_leg ---------------------------------------------------------------
    def _leg_index(self, target: Mirror, leg: int | str) -> int:
        if isinstance(leg, int):
            if not 0 <= leg < len(target.legs):
                raise InvalidArgument(f"no leg {leg} (0..{len(target.legs) - 1})", operation="mirror")
            return leg
        for i, lg in enumerate(target.legs):
            if lg.device == leg:
                return i
        raise InvalidArgument(f"{leg} is not a leg of this mirror", operation="mirror")

    def _check_new_leg(self, ref: str, length: int) -> None:
        with self.open_ref(ref) as ep:
            if ep.size < length * SECTOR:
                raise InvalidArgument(f"new leg {ref} has {ep.size} bytes, the mirror needs {length * SECTOR}",
                                      operation="mirror", device=ref)

    def _rebuild(self, name: str, length: int, target: Mirror, legs: tuple[Leg, ...], progress: ProgressFn | None,
                 rate: int | None, wait: bool, operation: str) -> MirrorState:
        """Load ``legs`` (one of them new and blank) and resync every region to every leg, as the
        kernel path always did: the table goes live with a ``sync`` disk log (every region out of
        sync, written to the log before recovery starts) or a core log without ``nosync``, so the new
        leg never counts as in sync, in memory or on disk, before its regions are copied, and a read
        goes only to a leg that holds its data. On the userspace engine the old table is told
        ``resync_all`` first: the disk log holds every region dirty before the new table is even
        loaded, so a crash at any point leaves a log that resyncs the new leg.
        Before, the userspace engine loaded the legs on the log as it was and only then sent
        ``rebuild``: in between the blank leg was in sync (a read after a leg 0 failure was served
        from it, and a crash left the log trusting it). Then the ``sync`` argument is dropped, so that
        later activations trust the log again. The copy runs with handle_errors: without it dm-raid1
        marks a region whose copy failed in sync (dm-region-hash.c complete_resync_work)."""
        mlog = target.log
        if not isinstance(mlog, (CoreLog, DiskLog)):
            raise InvalidArgument(f"{mlog.log_type} logs are not managed here", operation=operation, device=name)
        features = tuple(dict.fromkeys(("handle_errors", *target.features)))
        copying = replace(mlog, sync=SyncMode.FORCESYNC if isinstance(mlog, DiskLog) else SyncMode.DEFAULT)
        rate = rate if self.userspace else None  # the kernel's rate is its module parameter
        if rate is not None and rate <= 0:
            raise InvalidArgument(f"rate must be positive, not {rate}", operation=operation, device=name)
        copy_table = Table.single(length, Mirror(copying, legs, features))
        try:
            if rate is not None:  # the device's rate: the new table copies at it from its first region
                self.dm.message(name, 0, f"resync_rate {rate}")
            if self.userspace:  # the log on disk trusts no region before the new leg joins
                self.dm.message(name, 0, "resync_all")
            swap_table(self.dm, name, copy_table)
        except BaseException:
            if rate is not None:
                quietly(lambda: self.dm.message(name, 0, "resync_rate 0"))
            if self.userspace:  # resync_all holds recovery until a resume: the old legs resync
                quietly(lambda: self.dm.suspend(name, noflush=True), lambda: self.dm.resume(name))
            raise
        if not wait:  # the copy goes on at ``rate``, which stays the device's until a resync changes it
            return self.status(name)
        self.resync(name, rate=rate, progress=progress, operation=operation)
        kept = replace(mlog, sync=SyncMode.DEFAULT) if mlog.sync is SyncMode.FORCESYNC else mlog
        final = Table.single(length, Mirror(kept, legs, target.features))
        if str(final) == str(copy_table):
            return self.status(name)
        swap_table(self.dm, name, final)
        if isinstance(kept, CoreLog) and kept.sync is SyncMode.DEFAULT:  # resyncs at every load
            return self.resync(name, rate=rate, operation=operation)
        return self.status(name)

    def repair(self, name: str, leg: int | str, new_leg: str, *, rate: int | None = None,
               progress: ProgressFn | None = None, wait: bool = True) -> MirrorState:
        """Replace leg ``leg`` (index or reference) by ``new_leg`` and resync it.

        Every region is copied from leg 0 to every other leg, on either backend (``_rebuild``: the
        new leg is never in sync before it is copied). The default leg (0) cannot be replaced while
        it is the only source; replace another leg, or ``split`` first.
        """
        length, target = self._mirror(name)
        index = self._leg_index(target, leg)
        if index == 0:
            raise InvalidArgument("leg 0 is the resync source; repair another leg", operation="repair", device=name)
        self._check_new_leg(new_leg, length)
        self._check_devices([lg.device for lg in target.legs], next(iter(target.log.devices), None), "repair",
                            in_use=("the new leg",), new=new_leg, skip=index)
        legs = list(target.legs)
        legs[index] = Leg(new_leg, 0)
        return self._rebuild(name, length, target, tuple(legs), progress, rate, wait, "repair")

    def add_leg(self, name: str, new_leg: str, *, log: str = "core", region_size: int = DEFAULT_REGION_SIZE,
                rate: int | None = None, progress: ProgressFn | None = None, wait: bool = True,
                handle_errors: bool = True) -> MirrorState:
        """Add ``new_leg``: a linear volume becomes a 2-leg mirror (with ``handle_errors`` unless
        told otherwise), a mirror gains a leg (at most 9)."""
        table = self.dm.table(name)
        if len(table.lines) != 1:
            raise InvalidArgument("only single-target devices can gain a leg", operation="add_leg", device=name)
        length, tgt = table.lines[0].length, table.lines[0].target
        self._check_new_leg(new_leg, length)
        legs_now = [lg.device for lg in tgt.legs] if isinstance(tgt, Mirror) else list(tgt.devices)
        log_now = next(iter(tgt.log.devices), None) if isinstance(tgt, Mirror) else log
        self._check_devices(legs_now, log_now, "add_leg",
                            in_use=("the new leg",) + (("--log",) if not isinstance(tgt, Mirror) else ()), new=new_leg)
        if isinstance(tgt, Linear):
            with held([new_leg, None if log == "core" else log], "add_leg", devnos=not self.userspace):
                mlog = self._new_log(log, region_size, length, "add_leg")
            mirror = Mirror(mlog, (Leg(tgt.device, tgt.offset), Leg(new_leg, 0)), ("handle_errors",) * handle_errors)
            swap_table(self.dm, name, Table.single(length, mirror))
            self._monitor()
            if not wait:
                return self.status(name)
            return self.resync(name, progress=progress, rate=rate, operation="add_leg")
        if isinstance(tgt, Mirror):
            if len(tgt.legs) >= MAX_NR_MIRRORS:
                raise InvalidArgument(f"a mirror has at most {MAX_NR_MIRRORS} legs", operation="add_leg", device=name)
            legs = tgt.legs + (Leg(new_leg, 0),)
            return self._rebuild(name, length, tgt, legs, progress, rate, wait, "add_leg")
        raise InvalidArgument(f"cannot add a leg to a {tgt.target_type} device", operation="add_leg", device=name)

    def split(self, name: str, leg: int | str, new_name: str, *, force: bool = False) -> str:
        """Detach leg ``leg`` as standalone linear device ``new_name``; the mirror keeps the others.

        The mirror must be fully in sync (``force`` overrides). A mirror left with one leg becomes a
        linear device. Returns ``new_name``. All or nothing: ``new_name`` taken is refused before the
        mirror changes, and the mirror is given its leg back when the new device cannot be made.
        """
        validate_name(new_name)
        if self.dm.exists(new_name):
            from dmtools.errors import DeviceExists

            raise DeviceExists("device already exists", operation="split", device=new_name)
        length, target = self._mirror(name)
        index = self._leg_index(target, leg)
        state = self.status(name)
        if not state.fully_in_sync and not force:
            raise InvalidArgument(f"mirror is not in sync ({state.percent:.1f}%); resync first or force",
                                  operation="split", device=name)
        if state.health[index] != "A" and not force:
            raise InvalidArgument(f"leg {index} has health {state.health[index]}", operation="split", device=name)
        split_leg = target.legs[index]
        rest = tuple(lg for i, lg in enumerate(target.legs) if i != index)
        if len(rest) >= 2:
            new_table = Table.single(length, Mirror(target.log, rest, target.features))
        else:
            new_table = Table.single(length, Linear(rest[0].device, rest[0].offset))
        swap_table(self.dm, name, new_table)
        try:
            self.dm.create(new_name, Table.single(length, Linear(split_leg.device, split_leg.offset)))
        except BaseException:
            # all or nothing: the mirror gets its leg back (a name taken meanwhile, the leg claimed)
            quietly(lambda: swap_table(self.dm, name, Table.single(length, target)))
            raise
        return new_name


@contextmanager
def held(refs: Sequence[str | Endpoint | None], operation: str, *, devnos: bool = False) -> Iterator[None]:
    """Claim (``dmtools.claims``) the devices ``refs`` name by a path (``devnos``: also a kernel
    ``major:minor``) for the length of the block, as a table would: one that is mounted, held
    ``O_EXCL`` or claimed by another engine or tool raises ``DeviceBusy`` before the block writes
    anything. Released at its end, so that the table then made can claim them itself."""
    from dmtools.claims import Holder

    holder = Holder(f"dmtools mirror {operation}")
    try:
        for ref in refs:
            if isinstance(ref, (str, os.PathLike)) and os.path.exists(ref):
                holder.claim(os.fspath(ref), device=operation)
            elif devnos and isinstance(ref, str) and parse_devno(ref) is not None:
                from dmtools.blockdev import resolve_devno

                holder.claim(resolve_devno(ref), device=operation)
        yield
    finally:
        holder.close()


def _roles(legs: Sequence[str | Endpoint], log: str | Endpoint | None, *, new: str | None = None,
           skip: int | None = None) -> dict[str, Any]:
    """A mirror's devices by role for ``dmtools.inputs.check_devices`` (``the new leg``, ``leg N``
    but ``skip``, ``--log``); endpoints given as objects are left out."""
    roles: dict[str, Any] = {} if new is None else {"the new leg": new}
    roles.update({f"leg {i}": r for i, r in enumerate(legs) if i != skip and not isinstance(r, Endpoint)})
    if log not in (None, "core") and not isinstance(log, Endpoint):
        roles["--log"] = log
    return roles


class OfflineOptions(TypedDict, total=False):
    """The options of ``resync_offline`` that ``MirrorManager.resync_offline`` passes on."""

    region_size: int
    rate: int | None
    rebuild: int | None
    source: int
    full: bool
    progress: ProgressFn | None
    cancel: threading.Event | None


def resync_offline(legs: Sequence[str | Endpoint], log: str | Endpoint | None, *,
                   region_size: int = DEFAULT_REGION_SIZE, rate: int | None = None, rebuild: int | None = None,
                   source: int = 0, full: bool = False, progress: ProgressFn | None = None,
                   cancel: threading.Event | None = None, opener: Callable[..., Endpoint] | None = None,
                   backends: Sequence[DeviceMapper] = ()) -> ResyncResult:
    """Resync an inactive mirror's legs from its disk log with kcopyd (see ``mirror.resync``): legs
    and log are paths or endpoints; ``log=None`` means a core log (every region is copied).

    Raises the validation errors of ``OfflineResync`` before writing anything, and
    ``RecoveryFailed``/``OperationCancelled`` when regions failed or the run was cancelled (those
    regions stay out of sync on the log).

    Legs and log that share bytes raise ``DeviceConflict``, and one that a live table of
    ``backends`` maps ``DeviceBusy`` (an inactive mirror's devices), before anything is opened."""
    from dmtools.inputs import check_devices

    check_devices(_roles(legs, log), backends=backends, operation="resync", in_use=("*",))
    if opener is None:
        from dmtools.blockdev import open_endpoint

        opener = open_endpoint
    with ExitStack() as stack:
        stack.enter_context(held([*legs, log], "resync"))  # no engine, mount or tool meanwhile
        eps = [stack.enter_context(opener(ref, writable=True)) for ref in legs]
        lep = stack.enter_context(opener(log, writable=True)) if log is not None else None
        rs = OfflineResync(eps, lep, region_size=region_size, rate=rate, rebuild=rebuild, source=source, full=full)
        result = rs.run(progress=progress, cancel=cancel)
    raise_for(result, source=source,
              leg_names=[ref if isinstance(ref, str) else (ref.name or f"leg {i}") for i, ref in enumerate(legs)])
    return result

