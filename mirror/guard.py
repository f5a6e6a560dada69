"""``MirrorGuard``: the monitoring a mirror with ``handle_errors`` gets from creation, on the userspace engine.

With ``handle_errors`` and without ``keep_log``, dm-raid1 holds a write that failed on a leg (and
any write to an out-of-sync region after a leg failure) until userspace reconfigures the mirror
(dm-raid1.c ``hold_bio``): LVM activates such mirrors monitored, and dmeventd's mirror plugin
then runs ``lvconvert --repair``, whose default ``mirror_image_fault_policy = "remove"`` drops the
failed leg. The guard does the same for every monitored mirror of one userspace engine, in the
process that owns the engine (the daemon, or the library user's process):

- a leg shows ``D``, ``S`` or ``F`` (``R`` leaves the data intact, as dmeventd ignores it, unless
  writes are held): when the legs that remain hold all the data — the mirror is in sync, or the
  default leg is not among the failed (every write and every resync goes through it; it moves off
  a failed leg only while the mirror is in sync, dm-raid1.c ``fail_mirror``) — the failed legs are
  dropped: the mirror is reloaded over the others (a ``linear`` device when one remains) with a
  ``noflush`` suspend, and the held writes are requeued to the new table and land there;
- when the failed leg is the default leg of a mirror out of sync, the data of the regions not yet
  copied lives only on it: no table can serve them, so the held I/O is ended with EIO by a plain
  suspend and resume (``hold_bio`` at suspend), as it will be each time it is held again. Reads of
  those regions fail with EIO (dm-raid1.c ``do_reads``); the mirror keeps its table for a repair.

No write therefore waits longer than one guard period plus a reload. A mirror is monitored unless
its uuid starts with ``UNMONITORED_PREFIX`` (``mirror create --no-monitor``): another monitor
(``dmtools monitor --mirror-policy repair``) can then own its failures.

**The kernel backend.** The same rules drop a failed leg of a kernel mirror: ``dmtools monitor``
with the ``remove`` (or ``repair``) mirror policy calls :meth:`MirrorGuard.check` as the
``mirror-remove`` policy (``mirror create`` starts such a monitor for each mirror it makes,
``mirror.monitor``). dm-raid1 does not say how many writes it holds nor which leg is the default,
so on the kernel:

- any failed leg may hold writes: ``fail_mirror`` sets ``leg_failure`` for every error type, after
  which a write to a region out of sync is held (``do_writes``). An ``R`` leg is therefore acted on
  while the mirror is out of sync, and left alone when it is in sync (no write can be held then);
- the default leg is leg 0 of the table (``DEFAULT_MIRROR``) unless the mirror was fully in sync with
  every leg alive just before the failure (``in_sync_before``, from the monitor's previous look):
  ``fail_mirror`` then moved it to the first leg without errors, and every leg still alive holds
  all the data;
- when the default leg failed out of sync, a plain suspend and resume ends the writes held so far
  with EIO, and the guard repeats it every period while that lasts (:meth:`MirrorGuard.watch`).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from dmtools.backend import DeviceMapper
from dmtools.errors import DMError
from dmtools.status import parse_mirror_status
from dmtools.table import Table
from dmtools.target_values import CoreLog, Linear, Mirror, SyncMode

from mirror.reload import swap_table

log = logging.getLogger(__name__)

__all__ = ["MirrorGuard", "UNMONITORED_PREFIX", "GUARD_INTERVAL", "guard_for", "start_service"]

#: A mirror whose uuid starts with this is left to another monitor.
UNMONITORED_PREFIX = "DMTOOLS-UNMONITORED-"
#: Seconds between two looks at the mirrors (and the longest a failure waits to be seen).
GUARD_INTERVAL = 0.25
#: Seconds between two looks at a kernel mirror whose held writes must be ended again and again
#: (each look suspends and resumes it; the failure itself is seen at once through its event).
KERNEL_INTERVAL = 1.0
#: ``MirrorGuard.check`` results that need no action
NOT_WATCHED, HEALTHY, WAITING = "not watched", "healthy", "waiting"

_guards: "weakref.WeakKeyDictionary[Any, MirrorGuard]" = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()


class MirrorGuard:
    """Watches every monitored mirror of a userspace engine ``dm``; see the module docstring.

    ``start()`` runs it on a daemon thread until ``stop()``; ``check(name)`` looks at one mirror
    once and returns what it did (see its docstring).
    """

    def __init__(self, dm: DeviceMapper, *, interval: float | None = None, persistent: bool = False,
                 tells_held: bool | None = None) -> None:
        self.dm = dm
        #: the target answers ``held_ios`` and ``default_leg`` (our userspace target; the kernel's
        #: dm-raid1 has no message handler)
        self.tells_held = dm.backend != "kernel" if tells_held is None else tells_held
        #: only these devices are looked at (``watch``); ``None``: every device of ``dm``
        self.names: set[str] | None = None if self.tells_held else set()
        if interval is None:
            interval = GUARD_INTERVAL if self.tells_held else KERNEL_INTERVAL
        self.interval: float = interval
        #: keep running with no mirror to watch (the daemon's guard); else the thread ends then
        #: and ``start`` begins a new one
        self.persistent = persistent
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._kicked = False
        #: device -> ((major, minor, event_nr) at the last look, whether it is a watched mirror)
        self._quiet: dict[str, tuple[tuple[int, int, int], bool]] = {}
        #: what the guard did, in order: ``(device, action, detail)``
        self.actions: list[tuple[str, str, str]] = []

    # -- running ----------------------------------------------------------------------------
    def start(self) -> "MirrorGuard":
        """Make sure the guard thread runs (a new mirror is watched from its next pass)."""
        with self._lock:
            self._kicked = True
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="mirror-guard", daemon=True)
                self._thread.start()
        return self

    def watch(self, name: str) -> "MirrorGuard":
        """Look at ``name`` every period from now on (a guard limited to the devices it is given)."""
        with self._lock:
            if self.names is not None:
                self.names.add(name)
        return self.start()

    def stop(self) -> None:
        """Stop the guard thread and wait for it."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    self._kicked = False
                if self._stop.wait(self.interval):
                    return
                try:
                    watched = self.check_all()
                except Exception:  # noqa: BLE001 - the guard outlives a bad pass (the engine closing)
                    log.exception("mirror guard pass failed")
                    watched = 1
                with self._lock:
                    if not watched and not self.persistent and not self._kicked:
                        return  # nothing to watch: ``start`` begins a new thread when needed
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def check_all(self) -> int:
        """Look at every monitored mirror that may need it; return how many mirrors there are.

        A device whose last look found nothing to do (not a watched mirror, or all legs alive) is
        looked at again only after its event number moved: dm-raid1 raises an event when a leg
        fails with ``handle_errors`` (``fail_mirror``). A mirror with a failed leg is looked at on
        every pass, since writes may be held after the failure without a new event.
        """
        count = 0
        entries = self.dm.list()
        for entry in entries:
            if self.names is None and entry.uuid.startswith(UNMONITORED_PREFIX):
                continue  # left to another monitor (which may run a guard given its names)
            if self.names is not None and entry.name not in self.names:
                continue
            key = (entry.major, entry.minor, entry.event_nr)
            quiet = self._quiet.get(entry.name)
            if quiet is not None and quiet[0] == key:
                count += quiet[1]
                continue
            try:
                result = self.check(entry.name)
            except DMError as err:  # removed or reloaded meanwhile: next pass
                log.debug("mirror guard: %s: %s", entry.name, err)
                continue
            count += result != NOT_WATCHED
            if result in (NOT_WATCHED, HEALTHY):
                self._quiet[entry.name] = (key, result == HEALTHY)
            else:
                self._quiet.pop(entry.name, None)
        names = {e.name for e in entries}
        for gone in set(self._quiet) - names:
            del self._quiet[gone]
        return count

    # -- one mirror ---------------------------------------------------------------------------
    def check(self, name: str, *, in_sync_before: bool = False) -> str:
        """Act on mirror ``name`` when a failed leg holds (or would hold) its writes; return what was
        done: ``"dropped"`` or ``"released"``; else ``"healthy"`` (every leg alive), ``"waiting"``
        (a failed leg, nothing held) or ``"not watched"`` (not one single ``mirror`` line with
        ``handle_errors`` and without ``keep_log``). ``in_sync_before``: on a target that does not
        tell its default leg (the kernel's), the mirror was fully in sync with every leg alive at the
        last look before the failure (see the module docstring)."""
        table = self.dm.table(name)
        if len(table.lines) != 1 or not isinstance(table.lines[0].target, Mirror):
            return NOT_WATCHED
        line = table.lines[0]
        target = line.target
        assert isinstance(target, Mirror)
        if not target.handle_errors or target.keep_log:
            return NOT_WATCHED
        st = parse_mirror_status(self.dm.status(name)[0].params)
        in_sync = st.in_sync == st.regions
        failed = [i for i, h in enumerate(st.health) if h in "DSF"]
        held: int | None = self._held(name) if self.tells_held else None
        if not failed and (held or (held is None and not in_sync)):
            failed = [i for i, h in enumerate(st.health) if h != "A"]
        if not failed:
            return HEALTHY if set(st.health) == {"A"} else WAITING
        remaining = [leg for i, leg in enumerate(target.legs) if i not in failed]
        if not remaining:
            return WAITING  # every leg failed: dm-raid1 fails the I/O itself, nothing is held
        if self.tells_held:
            default = self._default(name)
        else:  # dm-raid1.c fail_mirror: the default moves off a failed leg only while in sync
            default = next(i for i in range(len(target.legs)) if i not in failed) if in_sync_before else 0
        if in_sync or default not in failed:
            if len(remaining) >= 2:
                mlog = target.log
                if isinstance(mlog, CoreLog) and mlog.sync is SyncMode.NOSYNC and not in_sync:
                    # a reloaded nosync core log would trust every region: resync them all instead
                    mlog = CoreLog(mlog.region)
                new = Table.single(line.length, Mirror(mlog, tuple(remaining), target.features))
            else:
                new = Table.single(line.length, Linear(remaining[0].device, remaining[0].offset))
            if self.dm.table(name).lines[0].target != target:
                return WAITING  # reconfigured meanwhile (a repair): look again next time
            swap_table(self.dm, name, new)
            detail = (f"legs {', '.join(str(i) for i in failed)} ({st.health}) dropped; "
                      f"{len(remaining)} leg{'s' if len(remaining) > 1 else ''} left")
            log.warning("mirror %s: %s", name, detail)
            self.actions.append((name, "dropped", detail))
            return "dropped"
        if held == 0:
            return WAITING
        # The default leg failed out of sync: its regions exist nowhere else. End the held I/O.
        self.dm.suspend(name)
        self.dm.resume(name)
        what = "held I/O" if held is None else f"{held} held I/O"
        detail = (f"source leg {default} failed out of sync ({st.in_sync}/{st.regions} regions in sync): "
                  f"{what} ended with EIO")
        if not self.tells_held:
            self.watch(name)  # writes are held again after the resume: end them every period
        if not self.actions or self.actions[-1][:2] != (name, "released"):  # once per episode
            log.warning("mirror %s: %s", name, detail)
            self.actions.append((name, "released", detail))
        return "released"

    def _default(self, name: str) -> int:
        """The default leg: every write and every resync goes through it, so it holds all the data."""
        try:
            return int(self.dm.message(name, 0, "default_leg") or 0)
        except (DMError, ValueError):
            return 0

    def _held(self, name: str) -> int:
        try:
            return int(self.dm.message(name, 0, "held_ios") or 0)
        except (DMError, ValueError):
            return 0


def guard_for(dm: DeviceMapper) -> MirrorGuard | None:
    """The running guard of a userspace engine in this process (started on first use); ``None`` for
    the kernel and for a daemon's client (the daemon runs its own, see ``start_service``)."""
    from dmtools.engine import Engine

    if not isinstance(dm, Engine):
        return None
    with _guards_lock:
        guard = _guards.get(dm)
        if guard is None:
            guard = _guards[dm] = MirrorGuard(dm).start()
        return guard


def start_service(engine: Any) -> MirrorGuard | None:
    """``dmtools.services`` entry point: the daemon's guard, running as long as the daemon."""
    from dmtools.engine import Engine

    if not isinstance(engine, Engine):
        return None
    with _guards_lock:
        guard = _guards[engine] = MirrorGuard(engine, persistent=True)
    return guard.start()
