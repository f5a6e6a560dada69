"""What extending a snapshot's COW did (``lvextend`` of a snapshot, for a COW kept in a file: directly,
or through a loop device; the growing is :mod:`dmtools.file_backing`'s)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ExtendResult"]


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
