"""``dmtools monitor``: what dmeventd does for LVM's snapshots and mirrors, on either backend.

A :class:`Monitor` runs a :class:`~dmtools.events.watcher.Watcher` and applies policies to each
device's events, every policy off unless configured, globally or per device
(:class:`PolicySettings`, :class:`MonitorConfig`):

- **warn**: report snapshot usage crossing the given percentages (dmeventd: 80, 85, 90, 95);
- **snapshot auto-extend**: when a snapshot's usage reaches ``autoextend_threshold`` %, grow its COW
  by ``autoextend_percent`` % (LVM's ``snapshot_autoextend_threshold``/``_percent``, default 20 %)
  when the COW lives on a regular file or a loop-backed file, directly or through a linear ``-cow``
  device (the snapshot manager's stack), and reload the snapshot through exception handover with
  the snapshot layer's ``refresh`` (the ``snapshot-refresh`` policy,
  ``snapshot.manager:SnapshotManager``). See :func:`extend_snapshot`;
- **mirror degraded**: on a failed leg, keep running and report it;
- **mirror repair**: on a failed leg, replace it by the spare device named in advance and resync
  it. The repair itself belongs to the mirror layer, which ``dmtools`` does not import: it is
  found under the ``dmtools.policies`` entry-point group as ``mirror-repair``, an object that,
  called with the backend, returns something with
  ``repair(name, leg_index, spare, wait=False)`` — ``mirror.manager:MirrorManager`` fits.

Policy actions are decided as :class:`~dmtools.events.store.Plan` values committed with the events
that caused them, run, and reported as :class:`~dmtools.events.types.PolicyAction` events, each
step journaled: a monitor killed before a plan ran runs it at its next start; one killed while a
plan ran reports it as interrupted (outcome unknown). :meth:`Monitor.run` hands every event to a
:class:`~dmtools.events.delivery.Sink` exactly once across restarts.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from dmtools.backend import DeviceMapper
from dmtools.errors import DMError, InvalidArgument
from dmtools.events.delivery import CursorSink, Sink
from dmtools.events.state import DeviceState, parse_thresholds
from dmtools.events.store import Plan, StateStore
from dmtools.events.types import Event, LegHealthChanged, PolicyAction
from dmtools.events.watcher import Batch, Watcher
from dmtools.status import SnapshotState

__all__ = [
    "PolicySettings",
    "MonitorConfig",
    "Monitor",
    "ExtendResult",
    "extend_snapshot",
    "load_policy",
    "MIRROR_POLICIES",
    "POLICY_GROUP",
]

log = logging.getLogger(__name__)

#: Entry-point group where upper layers provide policy implementations.
POLICY_GROUP = "dmtools.policies"
MIRROR_POLICIES = ("none", "degraded", "repair")
SECTOR = 512
_DEVNO = re.compile(r"^(\d+):(\d+)$")
_LOOP = re.compile(r"^loop(\d+)$")


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySettings:
    """The policies for one device (or the defaults for all).

    ``warn``: usage percentages to report (empty: none). ``autoextend_threshold``: usage percent
    at which to grow the COW (``None``: never; LVM's 100 means off, so does ``None``).
    ``autoextend_percent``: growth as a percentage of the current COW size. ``mirror_policy``:
    ``none``, ``degraded`` or ``repair``; ``spare``: the device a repair puts in a failed leg's
    place (path or ``major:minor``).
    """

    warn: tuple[int, ...] = ()
    autoextend_threshold: int | None = None
    autoextend_percent: int = 20
    mirror_policy: str = "none"
    spare: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "warn", parse_thresholds(self.warn))
        t = self.autoextend_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 100):
            raise InvalidArgument(f"autoextend threshold must be a percentage 1..100, not {t!r}")
        if t == 100:
            object.__setattr__(self, "autoextend_threshold", None)  # LVM: 100 disables
        p = self.autoextend_percent
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise InvalidArgument(f"autoextend percent must be a positive integer, not {p!r}")
        if self.mirror_policy not in MIRROR_POLICIES:
            raise InvalidArgument(f"mirror policy must be one of {', '.join(MIRROR_POLICIES)}, "
                                  f"not {self.mirror_policy!r}")
        if self.mirror_policy == "repair" and not self.spare:
            raise InvalidArgument("the repair policy needs a spare device (--spare DEV)")

    def merged(self, overrides: Mapping[str, Any]) -> "PolicySettings":
        """These settings with ``overrides`` (field name → value) applied; unknown keys refused."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise InvalidArgument(f"unknown policy settings: {', '.join(sorted(unknown))}")
        values = dataclasses.asdict(self)
        values.update(overrides)
        if isinstance(values["warn"], str):
            values["warn"] = parse_thresholds(values["warn"])
        return PolicySettings(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        data = dataclasses.asdict(self)
        data["warn"] = list(self.warn)
        return data


@dataclass(frozen=True)
class MonitorConfig:
    """Default policy settings and per-device overrides."""

    defaults: PolicySettings = field(default_factory=PolicySettings)
    devices: Mapping[str, PolicySettings] = field(default_factory=dict)

    def for_device(self, name: str) -> PolicySettings:
        """The settings that apply to device ``name``."""
        return self.devices.get(name, self.defaults)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], defaults: PolicySettings | None = None) -> "MonitorConfig":
        """``{"defaults": {...}, "devices": {"NAME": {...}}}``; device entries override defaults."""
        if not isinstance(data, Mapping):
            raise InvalidArgument("monitor configuration must be a JSON object")
        unknown = set(data) - {"defaults", "devices"}
        if unknown:
            raise InvalidArgument(f"unknown configuration keys: {', '.join(sorted(unknown))}")
        base = (defaults or PolicySettings()).merged(data.get("defaults") or {})
        devices = {str(name): base.merged(over or {})
                   for name, over in (data.get("devices") or {}).items()}
        return cls(base, devices)

    @classmethod
    def load(cls, path: str, defaults: PolicySettings | None = None) -> "MonitorConfig":
        """Read a JSON configuration file."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as err:
            raise InvalidArgument(f"cannot read {path}: {err.strerror}", errno=err.errno) from err
        except ValueError as err:
            raise InvalidArgument(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data, defaults)


def load_policy(name: str) -> Any:
    """The implementation registered as ``name`` in the ``dmtools.policies`` entry points.

    Raises ``InvalidArgument`` naming what is missing.
    """
    for ep in entry_points(group=POLICY_GROUP):
        if ep.name == name:
            try:
                return ep.load()
            except (ImportError, AttributeError) as err:
                raise InvalidArgument(f"policy {name!r} cannot be loaded from {ep.value}: {err}") from err
    raise InvalidArgument(
        f"no {name!r} policy is installed (entry point group {POLICY_GROUP}); "
        "the mirror package provides it"
    )


# --- snapshot auto-extend -----------------------------------------------------------------------


@dataclass(frozen=True)
class ExtendResult:
    """What :func:`extend_snapshot` grew: the COW from ``old_bytes`` to ``new_bytes``."""

    snapshot: str
    file: str
    loop: str | None
    cow_device: str | None
    old_bytes: int
    new_bytes: int
    #: True when the snapshot table was reloaded through exception handover (``refresh``).
    handover: bool = False


def _loop_of_devno(major: int, minor: int) -> str | None:
    try:
        name = os.path.basename(os.path.realpath(f"/sys/dev/block/{major}:{minor}"))
    except OSError:
        return None
    return f"/dev/{name}" if _LOOP.match(name) else None


def _backing(ref: str) -> tuple[str, str | None]:
    """``(file, loop device or None)`` behind a COW reference; ``InvalidArgument`` otherwise."""
    devno: tuple[int, int] | None = None
    m = _DEVNO.match(ref)
    if m:
        devno = (int(m.group(1)), int(m.group(2)))
    else:
        try:
            st = os.stat(ref)
        except OSError as err:
            raise InvalidArgument(f"COW {ref}: {err.strerror}", errno=err.errno) from err
        if stat.S_ISREG(st.st_mode):
            return os.path.abspath(ref), None
        if stat.S_ISBLK(st.st_mode):
            devno = (os.major(st.st_rdev), os.minor(st.st_rdev))
    loop_path = _loop_of_devno(*devno) if devno else None
    if loop_path is None:
        raise InvalidArgument(f"COW {ref} is not a file or a loop-backed file; cannot extend it")
    from dmtools import loop

    dev = loop.info(loop_path)
    if dev.sizelimit:
        raise InvalidArgument(f"{loop_path} has a size limit ({dev.sizelimit} bytes); cannot extend")
    if not dev.backing_file or not os.path.isfile(dev.backing_file):
        raise InvalidArgument(f"{loop_path} is not backed by a regular file ({dev.backing_file})")
    return dev.backing_file, loop_path


def _grow_file(path: str, size: int) -> None:
    """Make ``path`` at least ``size`` bytes, allocated (``posix_fallocate``; sparse where unsupported)."""
    current = os.stat(path).st_size
    if current >= size:
        return
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            os.posix_fallocate(fd, current, size - current)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise DMError(f"cannot grow {path} to {size} bytes: {err.strerror}",
                              errno=err.errno, operation="extend") from err
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def extend_snapshot(dm: DeviceMapper, name: str, percent: int, *, target_start: int = 0,
                    refresh: Callable[[str], object] | None = None) -> ExtendResult:
    """Grow the COW of snapshot ``name`` by ``percent`` % of its size (rounded up to whole chunks).

    The COW may be a regular file, a loop device over one, or a device of this backend holding a
    single ``linear`` line over either (``S-cow``). Steps: grow the file (allocated), refresh the
    loop device's capacity (``LOOP_SET_CAPACITY``), then make the snapshot use the new space:

    - with ``refresh`` (``SnapshotManager(dm).refresh``, found by :class:`Monitor` under the
      ``snapshot-refresh`` policy name) and a one-line snapshot table, as ``lvextend`` of a
      snapshot does: the ``-cow`` device and the snapshot table are reloaded, the snapshot's
      exceptions passing to its new table by the kernel's handover rules (dm-snap.c
      ``snapshot_resume``; kernel.md §2.9), with the origin, the snapshot and ``-cow`` suspended in
      that order and resumed bottom-up, the origin last (libdm's order, §2.11);
    - else: with the origin and the snapshot suspended, the ``-cow`` device alone is reloaded with
      the longer linear line; the snapshot then sees the size at its next allocation
      (dm-snap-persistent.c ``persistent_prepare_exception`` reads the COW size each time, as do
      the userspace targets).

    Growing the file is not undone when a later step fails (the space is simply unused); every
    device suspended here is resumed, and an inactive table loaded here is cleared. Raises
    ``InvalidArgument`` when the COW is not on a file, ``DMError`` when a step fails.
    """
    from dmtools.table import Table
    from dmtools.target_values import Linear, Snapshot, SnapshotOrigin

    if percent < 1:
        raise InvalidArgument("extension percent must be at least 1")
    table = dm.table(name)
    line = next((ln for ln in table.lines if int(ln.start) == target_start), None)
    if line is None or not isinstance(line.target, Snapshot) or line.target.target_type != "snapshot":
        raise InvalidArgument("not a snapshot target", operation="extend", device=name)
    snap = line.target
    by_devno = {f"{e.major}:{e.minor}": e.name for e in dm.list()}
    cow_dev = by_devno.get(snap.cow)
    if cow_dev is not None:
        cow_table = dm.table(cow_dev)
        if len(cow_table.lines) != 1 or not isinstance(cow_table.lines[0].target, Linear):
            raise InvalidArgument(f"COW device {cow_dev} is not a single linear mapping; cannot extend",
                                  operation="extend", device=name)
        cow_line = cow_table.lines[0]
        linear = cow_line.target
        assert isinstance(linear, Linear)
        under, offset, cow_bytes = linear.device, int(linear.offset), int(cow_line.length) * SECTOR
    else:
        under, offset, cow_bytes = snap.cow, 0, -1
    path, loop_path = _backing(under)
    file_size = os.stat(path).st_size
    if cow_bytes < 0:
        cow_bytes = file_size
    chunk = int(snap.chunk_size) * SECTOR
    grow = max(chunk, math.ceil(cow_bytes * percent / 100 / chunk) * chunk)
    new_cow = cow_bytes + grow
    _grow_file(path, offset * SECTOR + new_cow)
    if loop_path is not None:
        from dmtools import loop

        size = loop.set_capacity(loop_path)
        if size < offset * SECTOR + new_cow:
            raise DMError(f"{loop_path} reports {size} bytes after LOOP_SET_CAPACITY, "
                          f"{offset * SECTOR + new_cow} needed", operation="extend", device=name)
    if refresh is not None and len(table.lines) == 1:
        refresh(name)
        if cow_dev is not None:
            mapped = int(dm.table(cow_dev).lines[0].length) * SECTOR
            if mapped < new_cow:
                raise DMError(f"{cow_dev} maps {mapped} bytes after the refresh, {new_cow} needed",
                              operation="extend", device=name)
        return ExtendResult(name, path, loop_path, cow_dev, cow_bytes, new_cow, handover=True)
    origin = None
    for dev_name in by_devno.values():
        if dev_name == name:
            continue
        try:
            lines = dm.table(dev_name).lines
        except DMError:
            continue
        if len(lines) == 1 and isinstance(lines[0].target, SnapshotOrigin) \
                and lines[0].target.origin == snap.origin:
            origin = dev_name
            break
    suspended: list[str] = []
    loaded: str | None = None
    try:
        for to_suspend in (origin, name):
            if to_suspend is not None:
                dm.suspend(to_suspend)
                suspended.append(to_suspend)
        if cow_dev is not None:
            dm.load(cow_dev, Table.single(new_cow // SECTOR, Linear(under, offset)))
            loaded = cow_dev
            dm.resume(cow_dev)
            loaded = None
    finally:
        if loaded is not None:
            try:
                dm.clear(loaded)
            except DMError:
                log.warning("could not clear the inactive table of %s", loaded)
        for dev_name in reversed(suspended):  # the snapshot first, then its origin
            dm.resume(dev_name)
    return ExtendResult(name, path, loop_path, cow_dev, cow_bytes, new_cow)


# --- the monitor --------------------------------------------------------------------------------


PolicyLoader = Callable[[str], Any]


class Monitor:
    """A watcher plus policies. ``events()`` yields every event and policy action, in order.

    ``config``: the policy settings. ``policy_loader``: finds upper-layer implementations by name
    (default :func:`load_policy`; tests pass their own). ``store``: persisted state (locked) for
    catch-up across restarts.
    """

    def __init__(
        self,
        dm: DeviceMapper,
        config: MonitorConfig | None = None,
        *,
        names: Sequence[str] | None = None,
        store: StateStore | None = None,
        poll_interval: float = 1.0,
        uevents: bool | None = None,
        event_numbers: bool = True,
        policy_loader: PolicyLoader = load_policy,
    ) -> None:
        self.dm = dm
        self.config = config or MonitorConfig()
        self._loader = policy_loader
        self._repairers: dict[str, Any] = {}
        self._spares_used: set[str] = set()
        self._failures: dict[tuple[str, str], str] = {}
        self._delivered = 0
        self.watcher = Watcher(dm, names=names, thresholds=self._thresholds, store=store,
                               poll_interval=poll_interval, uevents=uevents,
                               event_numbers=event_numbers)
        # Refuse a repair policy that cannot work before anything happens.
        settings = [self.config.defaults, *self.config.devices.values()]
        if any(s.mirror_policy == "repair" for s in settings):
            self._repairer()

    def _thresholds(self, name: str) -> Sequence[int]:
        return self.config.for_device(name).warn

    def _refresher(self) -> Callable[[str], object] | None:
        """``refresh(name)`` of the snapshot layer (``snapshot-refresh`` policy), or ``None`` when
        it is not installed (auto-extend then reloads ``-cow`` only and says so)."""
        if "snapshot" not in self._repairers:
            try:
                self._repairers["snapshot"] = self._loader("snapshot-refresh")(self.dm).refresh
            except InvalidArgument as err:
                log.warning("auto-extend without handover: %s", err)
                self._repairers["snapshot"] = None
        refresh: Callable[[str], object] | None = self._repairers["snapshot"]
        return refresh

    def _repairer(self) -> Any:
        if "mirror" not in self._repairers:
            self._repairers["mirror"] = self._loader("mirror-repair")(self.dm)
        return self._repairers["mirror"]

    # --- policies ---------------------------------------------------------------------------
    def _action(self, plan: Plan, ok: bool, detail: str) -> PolicyAction:
        state = self.watcher.known.get(plan.device)
        return PolicyAction(device=plan.device, uuid=state.uuid if state else "",
                            devno=state.devno if state else "", source="policy",
                            policy=plan.policy, action=plan.action, ok=ok, detail=detail)

    def _once(self, key: tuple[str, str], message: str) -> bool:
        """True the first time ``key`` fails with ``message`` (failures are reported once)."""
        if self._failures.get(key) == message:
            return False
        self._failures[key] = message
        return True

    def _plan_autoextend(self, state: DeviceState, settings: PolicySettings) -> list[Plan]:
        threshold = settings.autoextend_threshold
        if threshold is None:
            return []
        out: list[Plan] = []
        for t in state.targets:
            if t.target_type != "snapshot":
                continue
            snap = t.snapshot()
            if snap is None or snap.state is not SnapshotState.ACTIVE or snap.percent is None:
                continue
            if snap.percent >= threshold:
                out.append(Plan(state.name, "snapshot-autoextend", "extend",
                                {"percent": settings.autoextend_percent, "target_start": t.start,
                                 "at": round(snap.percent, 1)}))
        return out

    def _plan_mirror(self, state: DeviceState, events: Sequence[Event],
                     settings: PolicySettings) -> list[Plan]:
        if settings.mirror_policy == "none":
            return []
        # A leg that starts failing (from A, or from R to a worse letter); D -> S is no news.
        failed = [e for e in events if isinstance(e, LegHealthChanged) and e.failed
                  and (e.old == "A" or (e.old == "R" and e.new != "R"))]
        out: list[Plan] = []
        for ev in failed:
            args = {"leg": ev.leg, "leg_device": ev.leg_device, "health": ev.new}
            if settings.mirror_policy == "degraded" or ev.new == "R":
                # A read error leaves the data intact (dm-raid1.c): report, never repair.
                out.append(Plan(state.name, "mirror-degraded", "report", args))
            else:
                out.append(Plan(state.name, "mirror-repair", "repair",
                                {**args, "spare": settings.spare or ""}))
        return out

    def plan(self, batch: Batch) -> list[Plan]:
        """The policy actions one device's batch calls for (decided, not run)."""
        state = batch.new
        if state is None:
            return []
        settings = self.config.for_device(state.name)
        return [*self._plan_autoextend(state, settings),
                *self._plan_mirror(state, batch.events, settings)]

    def _extend(self, plan: Plan) -> PolicyAction | None:
        args = plan.args
        key = (plan.device, f"extend@{args.get('target_start', 0)}")
        try:
            res = extend_snapshot(self.dm, plan.device, int(args["percent"]),
                                  target_start=int(args.get("target_start", 0)),
                                  refresh=self._refresher())
        except DMError as err:
            if not self._once(key, str(err)):
                return None
            return self._action(plan, False, f"at {args.get('at')}%: {err}")
        self._failures.pop(key, None)
        self.watcher.wake("policy")
        how = "snapshot reloaded through handover" if res.handover else \
            "-cow reloaded, snapshot table kept (no snapshot-refresh policy installed)"
        return self._action(plan, True,
                            f"at {args.get('at')}% COW grown {res.old_bytes} -> {res.new_bytes} "
                            f"bytes (+{args['percent']}%, {res.file}); {how}")

    def _repair(self, plan: Plan) -> PolicyAction:
        args = plan.args
        leg = f"leg {args['leg']} ({args['leg_device']})"
        spare = str(args.get("spare", ""))
        if spare in self._spares_used:
            return self._action(plan, False, f"{leg} failed but spare {spare} is already used; "
                                "running degraded")
        try:
            self._repairer().repair(plan.device, int(args["leg"]), spare, wait=False)
        except DMError as err:
            return self._action(plan, False, f"{leg} -> {spare}: {err}")
        self._spares_used.add(spare)
        self.watcher.wake("policy")
        return self._action(plan, True, f"{leg} replaced by {spare}; resyncing")

    def execute(self, plan: Plan) -> list[Event]:
        """Run one plan; return the action it reports (none for a failure already reported)."""
        if plan.policy == "snapshot-autoextend":
            action = self._extend(plan)
        elif plan.policy == "mirror-repair":
            action = self._repair(plan)
        elif plan.policy == "mirror-degraded":
            action = self._action(plan, True, f"leg {plan.args['leg']} ({plan.args['leg_device']}) "
                                  f"failed ({plan.args['health']}); the mirror keeps running without it")
        else:
            action = self._action(plan, False, "unknown policy (written by another version?)")
        return [action] if action is not None else []

    def _run(self, plan: Plan) -> list[Event]:
        """Run ``plan`` with its journal records around it; return the numbered actions.

        A plan that had started before a restart is not run again: its outcome is unknown, and
        it is reported as interrupted (autoextend looks at the snapshot again on the next scan).
        """
        store = self.watcher.store
        if plan.started:
            events: list[Event] = [self._action(plan, False, "interrupted by a monitor stop; "
                                                "outcome unknown, check the device")]
        else:
            if store is not None:
                plan = store.start(plan)
            events = self.execute(plan)
        if store is None:
            return self.watcher.number(events)
        return store.finish(plan, events)

    def apply(self, batch: Batch) -> list[Event]:
        """Decide and run the policies on one device's batch; return the actions (unnumbered,
        nothing journaled: :meth:`events`, :meth:`run` and :meth:`step` journal them)."""
        return [e for plan in self.plan(batch) for e in self.execute(plan)]

    # --- running ----------------------------------------------------------------------------
    def _stream(self, after: int, batches: Iterable[Batch]) -> Iterator[Event]:
        """Numbered events above ``after``: those an earlier run committed but did not hand out,
        the actions of plans it left open, then each batch's events and actions. Every event
        is committed before it is yielded."""
        watcher = self.watcher
        yield from watcher.pending(after)
        if watcher.store is not None:
            for plan in watcher.store.open_plans():
                yield from self._run(plan)
        for batch in batches:
            events, plans = watcher.commit(batch, plans=self.plan(batch))
            yield from events
            for plan in plans:
                yield from self._run(plan)
            if watcher.store is not None:
                watcher.store.compact(self._delivered)

    def run(self, sink: Sink, *, timeout: float | None = None,
            stop: threading.Event | None = None, once: bool = False) -> int:
        """Hand every event and policy action to ``sink`` as it happens, each exactly once
        across restarts as far as ``sink`` can tell (see :mod:`dmtools.events.delivery`);
        with ``once``, one scan. Returns how many events were handed out."""
        batches = self.watcher.scan() if once else self.watcher.batches(timeout=timeout, stop=stop)
        return self._deliver(sink, batches)

    def _deliver(self, sink: Sink, batches: Iterable[Batch]) -> int:
        start = sink.last_seq()
        count = 0
        self._delivered = start
        for event in self._stream(start, batches):
            sink.write(event)
            self._delivered = event.seq
            count += 1
        return count

    def step(self, reason: str = "poll") -> list[Event]:
        """Scan once, apply the policies and remember the result; return every event in order
        (with a store, first those an earlier run did not hand out; the cursor moves past all)."""
        events: list[Event] = []
        self._deliver(CursorSink(self.watcher.store, events.append), self.watcher.scan(reason))
        return events

    def events(self, *, timeout: float | None = None,
               stop: threading.Event | None = None) -> Iterator[Event]:
        """Events and policy actions as they happen, until ``timeout`` or ``stop``; each is
        handed out once the previous one was taken (the store's cursor follows)."""
        sink = CursorSink(self.watcher.store, lambda event: None)
        self._delivered = sink.last_seq()
        pending: Event | None = None
        try:
            for event in self._stream(sink.last_seq(),
                                      self.watcher.batches(timeout=timeout, stop=stop)):
                pending = event
                yield event
                sink.write(event)
                self._delivered = event.seq
                pending = None
        finally:
            if pending is not None:  # closed after taking it
                sink.write(pending)

    def close(self) -> None:
        """Stop the watcher's listeners."""
        self.watcher.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
