"""Which snapshots belong to which origin, COW pairing for exception handover, and the origin gate.

The kernel keeps a hash of origins keyed by the origin's block device (``_origins`` in dm-snap.c);
``snapshot-origin`` finds the snapshots to copy into there. Here the key is the identity of the
device a handle points at: the engine device object, a block device number, or a file's inode.

Two tables of the same origin naming the same COW are a handover pair (dm-snap.c
``__find_snapshots_sharing_cow``): the active one is the *source*, the one not resumed yet the
*destination*. A COW used by a snapshot of a *different* origin is refused (the kernel does not
check this; two origins sharing one COW would corrupt it).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable

from dmtools.errors import InvalidTable

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.engine.target_driver import DeviceHandle

    from snapshot.targets.core import Snapshot

_lock = threading.RLock()
_origins: dict[Hashable, list["Snapshot"]] = {}

#: ``ti->error`` texts of dm-snap.c ``__validate_exception_handover``.
PAIRING_FAILED = "Snapshot cow pairing for exception table handover failed"
ALREADY_MERGING = "A snapshot is already merging."
NO_MERGE_SUPPORT = "Snapshot exception store does not support snapshot-merge."


def device_key(handle: "DeviceHandle") -> Hashable:
    """A key equal for every handle on the same underlying device."""
    inner: Any = handle.inner
    dev = getattr(inner, "device", None)
    if dev is not None:  # an engine device, resolved in-process
        return ("engine", id(dev))
    if handle.devno is not None:
        return ("blk", handle.devno)
    fd = inner.fileno()
    if fd is not None:
        st = os.fstat(fd)
        return ("file", st.st_dev, st.st_ino)
    return ("path", os.path.realpath(handle.path))


@dataclass
class Sharing:
    """What ``__find_snapshots_sharing_cow`` reports for one snapshot."""

    count: int = 0
    src: "Snapshot | None" = None
    dest: "Snapshot | None" = None
    merge: "Snapshot | None" = None


def find_sharing_cow(snap: "Snapshot") -> Sharing:
    """Snapshots of ``snap``'s origin on the same COW (``snap`` itself included once registered).

    States, as in the kernel: ``count 1, src`` a normal snapshot; ``count 2, src + dest`` a
    handover waiting for the destination's resume; ``count 2, src only`` handed over, the old
    table not destroyed yet; ``count 1, dest only`` the source went away without a handover.
    """
    out = Sharing()
    with _lock:
        for s in _origins.get(snap.origin_key, ()):
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


def _insert(snaps: list["Snapshot"], snap: "Snapshot") -> None:
    """``__insert_snapshot``: sorted by chunk size, largest first, after equal ones."""
    i = 0
    while i < len(snaps) and snaps[i].chunk_size >= snap.chunk_size:
        i += 1
    snaps.insert(i, snap)


def register(snap: "Snapshot") -> bool:
    """Add ``snap`` to its origin (``register_snapshot``); True when it is a handover destination.

    Raises ``InvalidTable`` with the kernel's texts for a second destination, a second merging
    snapshot or a store that cannot merge, and when another origin's snapshot uses the COW.
    """
    with _lock:
        for key, snaps in _origins.items():
            if key != snap.origin_key and any(s.cow_key == snap.cow_key for s in snaps):
                raise InvalidTable("COW device is already in use by a snapshot of another origin")
        found = find_sharing_cow(snap)
        if found.count == 2 or found.dest is not None:
            raise InvalidTable(PAIRING_FAILED)
        dest = False
        if found.src is not None:
            if snap.merge_target:
                if found.merge is not None:
                    raise InvalidTable(ALREADY_MERGING)
                if not found.src.store.can_merge:
                    raise InvalidTable(NO_MERGE_SUPPORT)
            dest = True
        _insert(_origins.setdefault(snap.origin_key, []), snap)
        return dest


def reregister(snap: "Snapshot") -> None:
    """Move ``snap`` to its place by (possibly new) chunk size (``reregister_snapshot``)."""
    with _lock:
        snaps = _origins.get(snap.origin_key)
        if snaps and snap in snaps:
            snaps.remove(snap)
            _insert(snaps, snap)


def unregister(snap: "Snapshot") -> None:
    """Forget ``snap`` (idempotent)."""
    with _lock:
        key = snap.origin_key
        snaps = _origins.get(key)
        if snaps and snap in snaps:
            snaps.remove(snap)
            if not snaps:
                del _origins[key]


def snapshots_of(origin: "DeviceHandle") -> list["Snapshot"]:
    """The snapshots registered on ``origin`` (a copy of the list)."""
    return snapshots_of_key(device_key(origin))


def snapshots_of_key(key: Hashable) -> list["Snapshot"]:
    """The snapshots registered on the origin with ``key`` (a copy of the list)."""
    with _lock:
        return list(_origins.get(key, ()))


def all_snapshots() -> list["Snapshot"]:
    """Every registered snapshot."""
    with _lock:
        return [s for snaps in _origins.values() for s in snaps]


class OriginGate:
    """Holds origin writes of one origin while exceptions are handed over.

    The kernel suspends the origin's mapped device internally (``dm_internal_suspend_fast``) during
    a handover: in-flight origin writes (and the copies they wait for) finish, new ones wait.
    ``do_origin`` runs inside ``enter``; ``frozen`` holds new entries and waits for the others.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.inflight = 0
        self.frozen = 0

    @contextmanager
    def enter(self) -> Iterator[None]:
        """Count one origin write for the duration of the block (waits while frozen)."""
        with self.cond:
            while self.frozen:
                self.cond.wait()
            self.inflight += 1
        try:
            yield
        finally:
            with self.cond:
                self.inflight -= 1
                if not self.inflight:
                    self.cond.notify_all()

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


_gates: dict[Hashable, OriginGate] = {}


def gate(key: Hashable) -> OriginGate:
    """The gate of the origin with ``key`` (created on first use, kept: it is small)."""
    with _lock:
        g = _gates.get(key)
        if g is None:
            g = _gates[key] = OriginGate()
        return g
