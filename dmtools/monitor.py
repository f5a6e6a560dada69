"""``dmtools monitor``: what dmeventd does for LVM's snapshots and mirrors, on either backend.

A :class:`Monitor` runs a :class:`~dmtools.events.watcher.Watcher` and applies policies to each
device's events, every policy off unless configured, globally or per device
(:class:`PolicySettings`, :class:`MonitorConfig`):

- **warn**: report snapshot usage crossing the given percentages (dmeventd: 80, 85, 90, 95);
- **snapshot auto-extend**: when a snapshot's usage reaches ``autoextend_threshold`` %, grow its COW
  by ``autoextend_percent`` % (LVM's ``snapshot_autoextend_threshold``/``_percent``, default 20 %).
  Extending belongs to the snapshot layer: the ``snapshot-extend`` policy, an object that, called
  with the backend, returns something with ``extend(name, percent)`` —
  ``snapshot.manager:SnapshotManager`` fits (a file-backed COW grown, reloaded through handover);
- **thin pool auto-extend**: when a thin pool's data or metadata usage reaches
  ``thin_autoextend_threshold`` %, grow that device by ``thin_autoextend_percent`` % (LVM's
  ``thin_pool_autoextend_threshold``/``_percent``, what dmeventd's thin plugin runs). The ``thin-extend``
  policy (``thin.manager:ThinPoolManager``: ``autoextend(pool, percent, data=…, metadata=…)``) grows
  the file behind the device and reloads the pool's layers;
- **mirror degraded**: on a failed leg, keep running and report it;
- **mirror repair**: on a failed leg, replace it by the spare device named in advance and resync
  it. The repair itself belongs to the mirror layer, which ``dmtools`` does not import: it is
  found under the ``dmtools.policies`` entry-point group as ``mirror-repair``, an object that,
  called with the backend, returns something with
  ``repair(name, leg_index, spare, wait=False)`` — ``mirror.manager:MirrorManager`` fits. When
  the spare is already used or the repair fails, the failed leg is removed instead (LVM's
  ``mirror_image_fault_policy = "allocate"`` falls back to removing too);
- **mirror remove**: on a failed leg, reload the mirror without it (LVM's
  ``mirror_image_fault_policy = "remove"``, what dmeventd's mirror plugin runs), so that the
  writes dm-raid1 holds after a leg failure (``handle_errors``) complete on the other legs; when
  the failed leg is the only one holding some regions' data, the held writes are ended with EIO
  instead. The ``mirror-remove`` policy of the mirror layer (``mirror.guard:MirrorGuard``: called
  with the backend, it has ``check(name, in_sync_before=...)``) does it.

Policy actions are decided as :class:`~dmtools.events.store.Plan` values committed with the events
that caused them, run, and reported as :class:`~dmtools.events.types.PolicyAction` events, each
step journaled: a monitor killed before a plan ran runs it at its next start; one killed while a
plan ran reports it as interrupted (outcome unknown). :meth:`Monitor.run` hands every event to a
:class:`~dmtools.events.delivery.Sink` exactly once across restarts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from dmtools.backend import DeviceMapper
from dmtools.closing import Closing
from dmtools.errors import DMError, InvalidArgument
from dmtools.events.defaults import MIRROR_POLICIES
from dmtools.events.delivery import CursorSink, Sink
from dmtools.events.state import DeviceState, parse_thresholds
from dmtools.events.store import Plan, StateStore
from dmtools.events.types import Event, LegHealthChanged, PolicyAction
from dmtools.events.watcher import Batch, Watcher
from dmtools.plugins import entry_points
from dmtools.status import SnapshotState
from dmtools.units import int_in

__all__ = ["PolicySettings", "MonitorConfig", "Monitor", "load_policy", "MIRROR_POLICIES", "POLICY_GROUP"]

log = logging.getLogger(__name__)

#: Entry-point group where upper layers provide policy implementations.
POLICY_GROUP = "dmtools.policies"


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySettings:
    """The policies for one device (or the defaults for all).

    ``warn``: usage percentages to report (empty: none). ``autoextend_threshold``: usage percent
    at which to grow the COW (``None``: never; LVM's 100 means off, so does ``None``).
    ``autoextend_percent``: growth as a percentage of the current COW size. ``mirror_policy``:
    ``none``, ``degraded``, ``repair`` or ``remove``; ``spare``: the device a repair puts in a
    failed leg's place (path or ``major:minor``).
    """

    warn: tuple[int, ...] = ()
    autoextend_threshold: int | None = None
    autoextend_percent: int = 20
    mirror_policy: str = "none"
    spare: str | None = None
    thin_autoextend_threshold: int | None = None
    thin_autoextend_percent: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "warn", parse_thresholds(self.warn))
        for prefix in ("", "thin_"):
            t = getattr(self, f"{prefix}autoextend_threshold")
            if t is not None and not int_in(t, 1, 100):
                raise InvalidArgument(f"{prefix}autoextend threshold must be a percentage 1..100, not {t!r}")
            if t == 100:
                object.__setattr__(self, f"{prefix}autoextend_threshold", None)  # LVM: 100 disables
            p = getattr(self, f"{prefix}autoextend_percent")
            if not int_in(p, 1):
                raise InvalidArgument(f"{prefix}autoextend percent must be a positive integer, not {p!r}")
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
        devices = {str(name): base.merged(over or {}) for name, over in (data.get("devices") or {}).items()}
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
    for ep in entry_points(POLICY_GROUP):
        if ep.name == name:
            try:
                return ep.load()
            except (ImportError, AttributeError) as err:
                raise InvalidArgument(f"policy {name!r} cannot be loaded from {ep.value}: {err}") from err
    raise InvalidArgument(
        f"no {name!r} policy is installed (entry point group {POLICY_GROUP}); "
        "the snapshot and mirror packages provide them"
    )


# --- the monitor --------------------------------------------------------------------------------


def _mirror_in_sync(state: DeviceState | None, *, alive: bool = True) -> bool:
    """True when ``state`` is one mirror line fully in sync (and, with ``alive``, every leg ``A``)."""
    if state is None or len(state.targets) != 1:
        return False
    st = state.targets[0].mirror()
    return st is not None and st.in_sync == st.regions and (not alive or set(st.health) == {"A"})


PolicyLoader = Callable[[str], Any]


class Monitor(Closing):
    """A watcher plus policies. ``events()`` yields every event and policy action, in order.

    ``config``: the policy settings. ``policy_loader``: finds upper-layer implementations by name
    (default :func:`load_policy`; tests pass their own). ``store``: persisted state (locked) for
    catch-up across restarts.
    """

    def __init__(self, dm: DeviceMapper, config: MonitorConfig | None = None, *, names: Sequence[str] | None = None,
                 store: StateStore | None = None, poll_interval: float = 1.0, uevents: bool | None = None,
                 event_numbers: bool = True, policy_loader: PolicyLoader = load_policy) -> None:
        self.dm = dm
        self.config = config or MonitorConfig()
        self._loader = policy_loader
        self._repairers: dict[str, Any] = {}
        self._spares_used: set[str] = set()
        self._failures: dict[tuple[str, str], str] = {}
        self._delivered = 0
        self.watcher = Watcher(dm, names=names, thresholds=self._thresholds, store=store, poll_interval=poll_interval,
                               uevents=uevents, event_numbers=event_numbers)
        # Refuse a repair policy that cannot work before anything happens.
        settings = [self.config.defaults, *self.config.devices.values()]
        if any(s.mirror_policy == "repair" for s in settings):
            self._policy("mirror-repair")
        if any(s.mirror_policy == "remove" for s in settings):
            self._policy("mirror-remove")

    def _thresholds(self, name: str) -> Sequence[int]:
        return self.config.for_device(name).warn

    def _policy(self, name: str) -> Any:
        """The upper layer's ``name`` policy bound to this backend (made on first use)."""
        if name not in self._repairers:
            self._repairers[name] = self._loader(name)(self.dm)
        return self._repairers[name]

    # --- policies ---------------------------------------------------------------------------
    def _action(self, plan: Plan, ok: bool, detail: str) -> PolicyAction:
        state = self.watcher.known.get(plan.device)
        return PolicyAction(device=plan.device, uuid=state.uuid if state else "", devno=state.devno if state else "",
                            source="policy", policy=plan.policy, action=plan.action, ok=ok, detail=detail)

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

    def _plan_thin(self, state: DeviceState, settings: PolicySettings) -> list[Plan]:
        threshold = settings.thin_autoextend_threshold
        if threshold is None:
            return []
        out: list[Plan] = []
        for t in state.targets:
            pool = t.thin_pool()
            data = None if pool is None else pool.data_percent
            if pool is None or data is None:
                continue  # Fail, or read-only without counts: nothing to extend by policy
            meta = pool.metadata_percent or 0.0
            if data >= threshold or meta >= threshold:
                # LVM's layout: the thin-pool target is NAME-tpool; the manager knows the pool as NAME.
                name = state.name[: -len("-tpool")] if state.name.endswith("-tpool") else state.name
                out.append(Plan(state.name, "thin-autoextend", "extend", {
                    "pool": name, "percent": settings.thin_autoextend_percent, "data": data >= threshold,
                    "metadata": meta >= threshold, "at": [round(data, 1), round(meta, 1)]}))
        return out

    def _plan_mirror(self, state: DeviceState, events: Sequence[Event],
                     settings: PolicySettings, old: DeviceState | None = None) -> list[Plan]:
        if settings.mirror_policy == "none":
            return []
        # A leg that starts failing (from A, or from R to a worse letter); D -> S is no news.
        failed = [e for e in events if isinstance(e, LegHealthChanged) and e.failed
                  and (e.old == "A" or (e.old == "R" and e.new != "R"))]
        out: list[Plan] = []
        if settings.mirror_policy == "remove" and failed:
            # One reload drops every failed leg. A read error (R) holds no write while the mirror
            # is in sync; out of sync, writes to the regions not yet copied are held (dm-raid1.c).
            if any(e.new != "R" for e in failed) or not _mirror_in_sync(state, alive=False):
                return [Plan(state.name, "mirror-remove", "drop", {
                    "legs": [e.leg for e in failed], "health": "".join(e.new for e in failed),
                    "in_sync_before": _mirror_in_sync(old)})]
        for ev in failed:
            args = {"leg": ev.leg, "leg_device": ev.leg_device, "health": ev.new,
                    "in_sync_before": _mirror_in_sync(old)}
            if settings.mirror_policy == "degraded" or ev.new == "R":
                # A read error leaves the data intact (dm-raid1.c): report, never repair.
                out.append(Plan(state.name, "mirror-degraded", "report", args))
            else:
                out.append(Plan(state.name, "mirror-repair", "repair", {**args, "spare": settings.spare or ""}))
        return out

    def plan(self, batch: Batch) -> list[Plan]:
        """The policy actions one device's batch calls for (decided, not run)."""
        state = batch.new
        if state is None:
            return []
        settings = self.config.for_device(state.name)
        return [*self._plan_autoextend(state, settings), *self._plan_thin(state, settings),
                *self._plan_mirror(state, batch.events, settings, batch.old)]

    def _extend(self, plan: Plan) -> PolicyAction | None:
        args = plan.args
        key = (plan.device, f"extend@{args.get('target_start', 0)}")
        try:
            res = self._policy("snapshot-extend").extend(plan.device, int(args["percent"]))
        except DMError as err:
            if not self._once(key, str(err)):
                return None
            return self._action(plan, False, f"at {args.get('at')}%: {err}")
        self._failures.pop(key, None)
        self.watcher.wake("policy")
        return self._action(plan, True,
                            f"at {args.get('at')}% COW grown {res.old_bytes} -> {res.new_bytes} "
                            f"bytes (+{args['percent']}%, {res.file}); snapshot reloaded through handover")

    def _extend_thin(self, plan: Plan) -> PolicyAction | None:
        args = plan.args
        key = (plan.device, "thin-extend")
        data, meta = args["at"]
        try:
            info = self._policy("thin-extend").autoextend(args["pool"], int(args["percent"]), data=bool(args["data"]),
                                                    metadata=bool(args["metadata"]))
        except DMError as err:
            if not self._once(key, str(err)):
                return None
            return self._action(plan, False, f"at data {data}%, metadata {meta}%: {err}")
        self._failures.pop(key, None)
        self.watcher.wake("policy")
        grown = " and ".join(w for w in ("data", "metadata") if args[w])
        return self._action(plan, True, f"at data {data}%, metadata {meta}%: {grown} grown by {args['percent']}%; "
                            f"pool {args['pool']} now {info.data_sectors} data and {info.metadata_sectors} metadata sectors")

    def _drop(self, plan: Plan, why: str = "") -> PolicyAction:
        """The ``mirror-remove`` policy: the failed legs dropped (or the held writes ended)."""
        try:  # DMError includes InvalidArgument: no mirror-remove policy installed (repair's fallback)
            result = self._policy("mirror-remove").check(plan.device,
                                           in_sync_before=bool(plan.args.get("in_sync_before")))
        except DMError as err:
            return self._action(plan, False, f"{why}removing the failed leg failed: {err}")
        actions = [a for a in getattr(self._policy("mirror-remove"), "actions", []) if a[0] == plan.device]
        detail = actions[-1][2] if actions and result in ("dropped", "released") else result
        self.watcher.wake("policy")
        return self._action(plan, result == "dropped", f"{why}{detail}")

    def _repair(self, plan: Plan) -> PolicyAction:
        args = plan.args
        leg = f"leg {args['leg']} ({args['leg_device']})"
        spare = str(args.get("spare", ""))
        if spare in self._spares_used:
            return self._drop(plan, f"{leg} failed but spare {spare} is already used: ")
        try:
            self._policy("mirror-repair").repair(plan.device, int(args["leg"]), spare, wait=False)
        except DMError as err:
            return self._drop(plan, f"{leg} -> {spare}: {err}; ")
        self._spares_used.add(spare)
        self.watcher.wake("policy")
        return self._action(plan, True, f"{leg} replaced by {spare}; resyncing")

    def execute(self, plan: Plan) -> list[Event]:
        """Run one plan; return the action it reports (none for a failure already reported)."""
        if plan.policy == "snapshot-autoextend":
            action = self._extend(plan)
        elif plan.policy == "thin-autoextend":
            action = self._extend_thin(plan)
        elif plan.policy == "mirror-repair":
            action = self._repair(plan)
        elif plan.policy == "mirror-remove":
            action = self._drop(plan)
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

    def events(self, *, timeout: float | None = None, stop: threading.Event | None = None) -> Iterator[Event]:
        """Events and policy actions as they happen, until ``timeout`` or ``stop``; each is
        handed out once the previous one was taken (the store's cursor follows)."""
        sink = CursorSink(self.watcher.store, lambda event: None)
        self._delivered = sink.last_seq()
        pending: Event | None = None
        try:
            for event in self._stream(sink.last_seq(), self.watcher.batches(timeout=timeout, stop=stop)):
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
