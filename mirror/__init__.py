"""Mirrors: dirty-region logs in the kernel's format, the userspace ``mirror`` target, resync and
the ``MirrorManager`` (drivers/md/dm-raid1.c, drivers/md/dm-log.c semantics)."""

from __future__ import annotations

from typing import Any

from dmtools.target_values import SyncMode
from mirror.format import LogHeader, LogImage, LogReport, format_log, inspect
from mirror.log import CoreDirtyLog, DiskDirtyLog, open_dirty_log
from mirror.region import RegionState

__all__ = [
    "CoreDirtyLog",
    "DiskDirtyLog",
    "LogHeader",
    "LogImage",
    "LogReport",
    "MirrorManager",
    "MirrorState",
    "OfflineResync",
    "RegionState",
    "SyncMode",
    "format_log",
    "inspect",
    "open_dirty_log",
]


def __getattr__(name: str) -> Any:
    # The manager pulls in kcopyd and the backends; load it on first use.
    if name in ("MirrorManager", "MirrorState"):
        import mirror.manager

        return getattr(mirror.manager, name)
    if name == "OfflineResync":
        from mirror.resync import OfflineResync

        return OfflineResync
    raise AttributeError(name)
