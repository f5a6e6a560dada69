"""The regular file behind a snapshot's COW, and growing it (what ``lvextend`` of a snapshot does to
its LV, for a COW kept in a file: directly, or through a loop device)."""

from __future__ import annotations

from dataclasses import dataclass

from dmtools.file_backing import backing_file, grow_file

__all__ = ["ExtendResult", "backing_file", "grow_file"]


@dataclass(frozen=True)
class ExtendResult:
    """What :meth:`snapshot.SnapshotManager.extend` grew: the COW from ``old_bytes`` to ``new_bytes``."""

    snapshot: str
    file: str
    loop: str | None
    cow_device: str | None
    old_bytes: int
    new_bytes: int
    #: the snapshot table was reloaded through exception handover (always, for now).
    handover: bool = True
