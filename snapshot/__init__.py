"""Snapshots: the kernel's dm-snapshot on either engine, its COW format, merge and offline tools.

* ``SnapshotManager(dm)``: LVM's snapshot stack on any ``DeviceMapper`` backend;
* ``snapshot.store``: the persistent (kernel on-disk format) and transient exception stores;
* ``snapshot.targets``: the userspace ``snapshot-origin``, ``snapshot`` and ``snapshot-merge``;
* ``inspect`` / ``export``: read a COW and rebuild a snapshot's view without device-mapper.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmtools import lazy

if TYPE_CHECKING:  # pragma: no cover - loaded on first use, see __getattr__
    from snapshot.manager import SnapshotInfo, SnapshotManager
    from snapshot.offline import CowInfo, ExportResult, export, inspect
    from snapshot.store import ExceptionStore, PersistentStore, TransientStore, Usage

__getattr__, __all__ = lazy.package(__name__, {
    "snapshot.manager": "SnapshotInfo SnapshotManager",
    "snapshot.offline": "CowInfo ExportResult export inspect",
    "snapshot.store": "ExceptionStore PersistentStore TransientStore Usage",
})
