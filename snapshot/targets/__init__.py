"""Userspace ``snapshot-origin``, ``snapshot`` and ``snapshot-merge`` targets for the engine.

Register them under the ``dmtools.targets`` entry points::

    snapshot-origin = "snapshot.targets:SnapshotOriginTarget"
    snapshot = "snapshot.targets:SnapshotTarget"
    snapshot-merge = "snapshot.targets:SnapshotMergeTarget"

Kernel behaviours beyond the I/O paths live in their own modules: ``handover`` (reloading a
snapshot table without losing its exceptions: refresh, snapshot -> snapshot-merge; its docstring
gives the dm verb sequences) and ``params`` (``snapshot_cow_threshold``, the module parameter,
settable in-process or through ``DMTOOLS_SNAPSHOT_COW_THRESHOLD`` for the daemon).
"""

from __future__ import annotations

from snapshot.targets.merge import SnapshotMergeTarget
from snapshot.targets.params import get_cow_threshold, set_cow_threshold
from snapshot.targets.origin import SnapshotOriginTarget, do_origin
from snapshot.targets.snap import SnapshotTarget

__all__ = [
    "SnapshotMergeTarget",
    "SnapshotOriginTarget",
    "SnapshotTarget",
    "TARGETS",
    "do_origin",
    "get_cow_threshold",
    "set_cow_threshold",
]

#: target type name -> class, for engines that register classes directly.
TARGETS = {
    "snapshot-origin": SnapshotOriginTarget,
    "snapshot": SnapshotTarget,
    "snapshot-merge": SnapshotMergeTarget,
}
