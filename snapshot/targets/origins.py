"""The snapshot targets' state shared across tables: dm-snap.c's module globals, one set per engine.

The kernel keeps a hash of origins keyed by the origin's block device (``_origins`` in dm-snap.c);
``snapshot-origin`` finds the snapshots to copy into there. Here the key is the identity of the
device a handle points at: the engine device object, a block device number, or a file's inode.
Each engine has its own :class:`OriginRegistry` (``origins_of(engine)``, made on first use), as
each kernel has its own module: two engines in one process never see each other's snapshots.

Two tables of the same origin naming the same COW are a handover pair (dm-snap.c
``__find_snapshots_sharing_cow``): the active one is the *source*, the one not resumed yet the
*destination*. A COW used by a snapshot of a *different* origin is refused (the kernel does not
check this; two origins sharing one COW would corrupt it).

``snapshot_cow_threshold`` (dm-snap.c ``cow_threshold``, ``DEFAULT_COW_THRESHOLD`` = 2048) caps the
chunks being copied on write per snapshot: an origin write (and a snapshot write) waits while more
than this many copies are in flight. Like the kernel's 0644 module parameter it applies at once
when changed (:meth:`OriginRegistry.set_cow_threshold`). A registry starts from
``DMTOOLS_SNAPSHOT_COW_THRESHOLD`` as its engine's first snapshot table finds it, e.g.
``DMTOOLS_SNAPSHOT_COW_THRESHOLD=512 dmtools daemon start``. The current kernel compares an
unsigned count with the int parameter: 0 lets one copy run at a time, a negative value never
throttles.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Hashable, Protocol, TypeVar

from dmtools.engine.passthrough import WriteThrough
from dmtools.engine.target_driver import DeviceHandle
from dmtools.errors import InvalidTable
from dmtools.units import SECTOR

log = logging.getLogger("snapshot")

#: the key of this state in ``Engine.target_state``.
STATE_KEY = "snapshot"
#: dm-snap.c ``DEFAULT_COW_THRESHOLD``.
DEFAULT_COW_THRESHOLD = 2048
#: environment variable a new registry reads (the daemon's engine: set it when starting the daemon).
ENV_COW_THRESHOLD = "DMTOOLS_SNAPSHOT_COW_THRESHOLD"

#: ``ti->error`` texts of dm-snap.c ``__validate_exception_handover``.
PAIRING_FAILED = "Snapshot cow pairing for exception table handover failed"
ALREADY_MERGING = "A snapshot is already merging."
NO_MERGE_SUPPORT = "Snapshot exception store does not support snapshot-merge."


class Member(Protocol):
    """What the registry reads of a snapshot (``snapshot.targets.core.CopyOnWrite``)."""

    origin_key: Hashable
    cow_key: Hashable
    active: bool
    merge_target: bool

    @property
    def chunk_size(self) -> int: ...

    @property
    def can_merge(self) -> bool: ...

    def wake_throttled(self) -> None: ...

    def c_first_write(self) -> "tuple[int, Any, int] | bool | None": ...

    def arm(self) -> None: ...


S = TypeVar("S", bound=Member)


def device_key(handle: DeviceHandle) -> Hashable:
    """A key equal for every handle on the same underlying device."""
    inner = handle.inner
    dev = inner.device
    if dev is not None:  # an engine device, resolved in-process
        return ("engine", id(dev))
    if handle.devno is not None:
        return ("blk", handle.devno)
    fd = inner.fileno()
    if fd is not None:
        st = os.fstat(fd)
        return ("file", st.st_dev, st.st_ino)
    return ("path", os.path.realpath(handle.path))


def threshold_from_env() -> int:
    """``DMTOOLS_SNAPSHOT_COW_THRESHOLD`` read now, or the kernel's default."""
    text = os.environ.get(ENV_COW_THRESHOLD, "").strip()
    if not text:
        return DEFAULT_COW_THRESHOLD
    try:
        return int(text)
    except ValueError:
        log.warning("%s=%r is not an integer; using %d", ENV_COW_THRESHOLD, text, DEFAULT_COW_THRESHOLD)
        return DEFAULT_COW_THRESHOLD


@dataclass
class Sharing(Generic[S]):
    """What ``__find_snapshots_sharing_cow`` reports for one snapshot."""

    count: int = 0
    src: S | None = None
    dest: S | None = None
    merge: S | None = None


class OriginGate:
    """Holds origin writes of one origin while exceptions are handed over.

    The kernel suspends the origin's mapped device internally (``dm_internal_suspend_fast``) during
    a handover: in-flight origin writes (and the copies they wait for) finish, new ones wait.
    ``do_origin`` runs inside ``enter``; ``frozen`` holds new entries and waits for the others.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # cond's: taken directly by join and leave (cheaper)
        self.cond = threading.Condition(self._lock)
        self.inflight = 0
        self.frozen = 0
        #: the origin's snapshots (``OriginRegistry.snapshots_of_key``), a tuple the registry
        #: replaces under its lock whenever they change: an origin write reads it after ``join``
        #: (so not during a handover's freeze), without the registry's lock.
        self.snaps: tuple[Any, ...] = ()

    def join(self) -> None:
        """Count one origin write in (waits while frozen); ``leave`` counts it out."""
        lock = self._lock  # (acquire and release: half the cost of a with statement)
        lock.acquire()
        try:
            while self.frozen:
                self.cond.wait()
            self.inflight += 1
        finally:
            lock.release()

    def leave(self) -> None:
        """Count one origin write out; the last one wakes a waiting ``freeze``."""
        lock = self._lock
        lock.acquire()
        try:
            self.inflight -= 1
            if self.frozen and not self.inflight:
                self.cond.notify_all()
        finally:
            lock.release()

    @contextmanager
    def enter(self) -> Iterator[None]:
        """Count one origin write for the duration of the block (waits while frozen)."""
        self.join()
        try:
            yield
        finally:
            self.leave()

    @contextmanager
    def freeze(self) -> Iterator[None]:
        """Hold new origin writes and wait until the ones in flight finished."""
        with self.cond:
            self.frozen += 1
            self.cond.wait_for(lambda: self.inflight == 0)
        try:
            yield
        finally:
            with self.cond:
                self.frozen -= 1
                self.cond.notify_all()


class OriginRegistry(Generic[S]):
    """One engine's origins, their snapshots and gates, and its ``snapshot_cow_threshold``."""

    def __init__(self, cow_threshold: int | None = None) -> None:
        self._lock = threading.RLock()
        self._origins: dict[Hashable, list[S]] = {}
        self._gates: dict[Hashable, OriginGate] = {}
        #: per origin: the C data path's write-through sets of its snapshot-origin tables, how
        #: many changes of its snapshots were begun (a mark's ticket), how many are under way.
        self._writes: dict[Hashable, list[WriteThrough]] = {}
        self._epochs: dict[Hashable, int] = {}
        self._changing: dict[Hashable, int] = {}
        #: per origin: the epoch its sets' first writes were last installed at (first_writes)
        self._first_at: dict[Hashable, int] = {}
        self._cow_threshold = threshold_from_env() if cow_threshold is None else cow_threshold

    # -- snapshot_cow_threshold -------------------------------------------------------------------
    @property
    def cow_threshold(self) -> int:
        """The current ``snapshot_cow_threshold``."""
        return self._cow_threshold

    def set_cow_threshold(self, value: int) -> int:
        """Set ``snapshot_cow_threshold`` (any int, as the kernel's); returns the previous value.

        Writers waiting at the old threshold re-check the new one at once.
        """
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"snapshot_cow_threshold must be an int, not {type(value).__name__}")
        old, self._cow_threshold = self._cow_threshold, value
        for snap in self.all_snapshots():
            snap.wake_throttled()
        return old

    def over_threshold(self, in_progress: int) -> bool:
        """True when ``in_progress`` copies exceed the threshold (dm-snap.c's unsigned comparison)."""
        limit = self._cow_threshold
        return limit >= 0 and in_progress > limit

    # -- membership -------------------------------------------------------------------------------
    def find_sharing_cow(self, snap: S) -> Sharing[S]:
        """Snapshots of ``snap``'s origin on the same COW (``snap`` itself included once registered).

        States, as in the kernel: ``count 1, src`` a normal snapshot; ``count 2, src + dest`` a
        handover waiting for the destination's resume; ``count 2, src only`` handed over, the old
        table not destroyed yet; ``count 1, dest only`` the source went away without a handover.
        """
        out: Sharing[S] = Sharing()
        with self._lock:
            for s in self._origins.get(snap.origin_key, ()):
                if s.merge_target:
                    out.merge = s
                if s.cow_key != snap.cow_key:
                    continue
                if s.active:
                    out.src = s
                else:
                    out.dest = s
                out.count += 1
        return out

    @staticmethod
    def _insert(snaps: list[S], snap: S) -> None:
        """``__insert_snapshot``: sorted by chunk size, largest first, after equal ones."""
        i = 0
        while i < len(snaps) and snaps[i].chunk_size >= snap.chunk_size:
            i += 1
        snaps.insert(i, snap)

    def register(self, snap: S) -> bool:
        """Add ``snap`` to its origin (``register_snapshot``); True when it is a handover destination.

        Raises ``InvalidTable`` with the kernel's texts for a second destination, a second merging
        snapshot or a store that cannot merge, and when another origin's snapshot uses the COW.
        """
        with self._lock:
            for key, snaps in self._origins.items():
                if key != snap.origin_key and any(s.cow_key == snap.cow_key for s in snaps):
                    raise InvalidTable("COW device is already in use by a snapshot of another origin")
            found = self.find_sharing_cow(snap)
            if found.count == 2 or found.dest is not None:
                raise InvalidTable(PAIRING_FAILED)
            if found.src is not None and snap.merge_target:
                if found.merge is not None:
                    raise InvalidTable(ALREADY_MERGING)
                if not found.src.can_merge:
                    raise InvalidTable(NO_MERGE_SUPPORT)
            self._insert(self._origins.setdefault(snap.origin_key, []), snap)
            self._gate_locked(snap.origin_key).snaps = tuple(self._origins[snap.origin_key])
            return found.src is not None

    def reregister(self, snap: S) -> None:
        """Move ``snap`` to its place by (possibly new) chunk size (``reregister_snapshot``)."""
        with self._lock:
            snaps = self._origins.get(snap.origin_key)
            if snaps and snap in snaps:
                snaps.remove(snap)
                self._insert(snaps, snap)
                self._gate_locked(snap.origin_key).snaps = tuple(self._origins[snap.origin_key])

    def unregister(self, snap: S) -> None:
        """Forget ``snap`` (idempotent)."""
        with self._lock:
            key = snap.origin_key
            snaps = self._origins.get(key)
            if snaps and snap in snaps:
                snaps.remove(snap)
                if not snaps:
                    del self._origins[key]
                self._gate_locked(key).snaps = tuple(snaps)
                if self._first_at.pop(key, None) is not None:  # (its C state may be in them)
                    for writes in self._writes.get(key, ()):
                        writes.first_writes([])

    def snapshots_of_key(self, key: Hashable) -> list[S]:
        """The snapshots registered on the origin with ``key`` (a copy of the list)."""
        with self._lock:
            return list(self._origins.get(key, ()))

    def origin_gate(self, key: Hashable) -> OriginGate:
        """:meth:`gate`, without the lock once the gate exists (gates are never dropped): an
        origin write's, which reads the snapshots from its ``snaps`` once it joined."""
        return self._gates.get(key) or self.gate(key)

    def all_snapshots(self) -> list[S]:
        """Every registered snapshot."""
        with self._lock:
            return [s for snaps in self._origins.values() for s in snaps]

    def gate(self, key: Hashable) -> OriginGate:
        """The gate of the origin with ``key`` (created on first use, kept: it is small)."""
        with self._lock:
            return self._gate_locked(key)

    def _gate_locked(self, key: Hashable) -> OriginGate:
        g = self._gates.get(key)
        if g is None:
            g = self._gates[key] = OriginGate()
            g.snaps = tuple(self._origins.get(key, ()))
        return g

    # -- writes that need no copy (the exposure's C data path: dmtools.engine.passthrough) -------
    def attach_writes(self, key: Hashable, writes: WriteThrough) -> None:
        """Keep ``writes`` (of a snapshot-origin table of the origin ``key``) in step with the
        origin's snapshots: :meth:`cow_change` empties it."""
        with self._lock:
            self._writes.setdefault(key, []).append(writes)
            writes.on_install = functools.partial(self._installed, key)

    def detach_writes(self, key: Hashable, writes: WriteThrough) -> None:
        """Forget ``writes`` (its table goes)."""
        with self._lock:
            sets = self._writes.get(key, [])
            if writes in sets:
                sets.remove(writes)
            if not sets:
                self._writes.pop(key, None)

    def exposed(self, key: Hashable) -> bool:
        """The origin ``key`` has a table in the C data path (a write-through set)."""
        return bool(self._writes.get(key))

    def _installed(self, key: Hashable) -> None:
        """A map with a write-through set of origin ``key`` was installed: arm its snapshots'
        first writes in C and hand them to the set."""
        for snap in self.snapshots_of_key(key):  # (each under its own lock, not the registry's)
            snap.arm()
        self.first_writes(key)

    def first_current(self, key: Hashable) -> bool:
        """The first writes of origin ``key`` were installed (:meth:`first_writes`) since its
        snapshots last changed (a hint, read without the lock)."""
        return self._first_at.get(key, -1) == self._epochs.get(key, 0)

    def first_writes(self, key: Hashable) -> None:
        """Give the write-through sets of origin ``key`` (the C data path's) the first writes of
        its snapshots, in the order ``do_origin`` copies them: every one an origin write copies
        into (:meth:`Member.c_first_write`), where each has its C state and its COW device a slot
        of the set's session; else none. Nothing while a change of the snapshots is under way
        (:meth:`cow_change` withdraws them: the next call after it installs them again)."""
        with self._lock:
            sets = self._writes.get(key, ())
            if self._changing.get(key):
                return
            entries: list[tuple[int, Any, int]] = []
            for snap in self._origins.get(key, ()):
                entry = snap.c_first_write()
                if entry is None:
                    continue  # (no copy into it)
                if isinstance(entry, bool):  # (C cannot make its copies: none are made in C)
                    entries = []
                    break
                entries.append(entry)
            for writes in sets:
                session = writes.session
                if entries and session is not None and all(slot.session is session for _, slot, _ in entries):
                    writes.first_writes([(state, slot.handle, cb) for state, slot, cb in entries])
                else:
                    writes.first_writes([])
            self._first_at[key] = self._epochs.get(key, 0)

    def ticket(self, key: Hashable) -> int | None:
        """Taken before an origin write's ``do_origin``: the write's :meth:`mark` counts only if no
        change of the origin's snapshots began since. ``None`` while one is under way."""
        with self._lock:
            return None if self._changing.get(key) else self._epochs.get(key, 0)

    def mark(self, key: Hashable, ticket: int, writes: WriteThrough, offset: int, length: int) -> None:
        """After ``do_origin`` of ``[offset, offset+length)`` returned: every snapshot's chunks
        touching the range have durable exceptions (or the snapshot is invalid), so writes there
        need no copy, unless a change began since ``ticket``. The range grows to the chunks it
        touches in every snapshot (all of the origin when it has none)."""
        with self._lock:
            if self._changing.get(key) or self._epochs.get(key, 0) != ticket:
                return
            lo, hi = 0, writes.size
            for snap in self._origins.get(key, ()):
                cb = snap.chunk_size * SECTOR
                if cb:
                    lo = max(lo, offset // cb * cb)
                    hi = min(hi, -(-(offset + length) // cb) * cb)
            writes.mark(lo, hi - lo)

    @contextmanager
    def cow_change(self, key: Hashable) -> Iterator[None]:
        """Around a change after which writes to the origin ``key`` may need copies they did not
        need before (a snapshot resumed or handed over, a merge, an invalidation): first the
        origin's write-through sets are emptied, once the C writes relying on them are done; no
        mark with a ticket from before the change's end counts."""
        with self._lock:
            self._epochs[key] = self._epochs.get(key, 0) + 1
            self._changing[key] = self._changing.get(key, 0) + 1
            sets = list(self._writes.get(key, ()))
        try:
            for writes in sets:
                writes.clear()
            yield
        finally:
            with self._lock:
                self._epochs[key] += 1
                self._changing[key] -= 1
                if not self._changing[key]:
                    del self._changing[key]
