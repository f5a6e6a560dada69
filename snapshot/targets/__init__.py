"""Userspace ``snapshot-origin``, ``snapshot`` and ``snapshot-merge`` targets for the engine.

Registered under the ``dmtools.targets`` entry points (``pyproject.toml``); each is built from its
typed table value. Kernel behaviours beyond the I/O paths live in their own modules: ``handover``
(reloading a snapshot table without losing its exceptions: refresh, snapshot -> snapshot-merge; its
docstring gives the dm verb sequences) and ``origins`` (dm-snap.c's module state, one per engine:
the origins and their snapshots, and ``snapshot_cow_threshold``, set with
``origins_of(engine).set_cow_threshold(n)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from snapshot.targets.core import CopyOnWrite, do_origin, origins_of
from snapshot.targets.merge import SnapshotMergeTarget
from snapshot.targets.origin import SnapshotOriginTarget
from snapshot.targets.origins import OriginRegistry
from snapshot.targets.snap import SnapshotTarget

if TYPE_CHECKING:
    from dmtools.engine.target_driver import TargetDriver

__all__ = [
    "CopyOnWrite",
    "OriginRegistry",
    "SnapshotMergeTarget",
    "SnapshotOriginTarget",
    "SnapshotTarget",
    "TARGETS",
    "do_origin",
    "origins_of",
]

#: target type name -> class, for engines that register classes directly.
TARGETS: dict[str, type[TargetDriver]] = {
    "snapshot-origin": SnapshotOriginTarget,
    "snapshot": SnapshotTarget,
    "snapshot-merge": SnapshotMergeTarget,
}
