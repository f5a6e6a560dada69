"""Userspace ``snapshot-origin``, ``snapshot`` and ``snapshot-merge`` targets for the engine.

Register them under the ``dmtools.targets`` entry points::

    snapshot-origin = "snapshot.targets:SnapshotOriginTarget"
    snapshot = "snapshot.targets:SnapshotTarget"
    snapshot-merge = "snapshot.targets:SnapshotMergeTarget"
"""

from __future__ import annotations

from snapshot.targets.merge import SnapshotMergeTarget
from snapshot.targets.origin import SnapshotOriginTarget, do_origin
from snapshot.targets.snap import SnapshotTarget

__all__ = ["SnapshotMergeTarget", "SnapshotOriginTarget", "SnapshotTarget", "TARGETS", "do_origin"]

#: target type name -> class, for engines that register classes directly.
TARGETS = {
    "snapshot-origin": SnapshotOriginTarget,
    "snapshot": SnapshotTarget,
    "snapshot-merge": SnapshotMergeTarget,
}
