"""Which snapshots belong to which origin, and which COW devices are in use.

The kernel keeps a hash of origins keyed by the origin's block device (``_origins`` in dm-snap.c);
``snapshot-origin`` finds the snapshots to copy into there. Here the key is the identity of the
device a handle points at: the engine device object, a block device number, or a file's inode.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Hashable

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.engine.target import DeviceHandle

    from snapshot.targets.core import Snapshot

_lock = threading.RLock()
_origins: dict[Hashable, list["Snapshot"]] = {}
_cows: dict[Hashable, "Snapshot"] = {}


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


def register(snap: "Snapshot") -> None:
    """Add ``snap`` to its origin and claim its COW; raises ``ValueError`` if the COW is in use."""
    with _lock:
        cow_key = snap.cow_key
        if cow_key in _cows:
            raise ValueError("COW device is already in use by another snapshot")
        _cows[cow_key] = snap
        snaps = _origins.setdefault(snap.origin_key, [])
        snaps.append(snap)
        # the kernel keeps them sorted by chunk size, largest first
        snaps.sort(key=lambda s: -s.chunk_size)


def unregister(snap: "Snapshot") -> None:
    """Forget ``snap`` (idempotent)."""
    with _lock:
        key = snap.origin_key
        snaps = _origins.get(key)
        if snaps and snap in snaps:
            snaps.remove(snap)
            if not snaps:
                del _origins[key]
        cow_key = snap.cow_key
        if _cows.get(cow_key) is snap:
            del _cows[cow_key]


def snapshots_of(origin: "DeviceHandle") -> list["Snapshot"]:
    """The snapshots registered on ``origin`` (a copy of the list)."""
    with _lock:
        return list(_origins.get(device_key(origin), ()))
