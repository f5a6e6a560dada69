"""Mirrors: dirty-region logs in the kernel's format, the userspace ``mirror`` target, resync and
the ``MirrorManager`` (drivers/md/dm-raid1.c, drivers/md/dm-log.c semantics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmtools import lazy

if TYPE_CHECKING:  # pragma: no cover - loaded on first use, see __getattr__
    from dmtools.target_values import SyncMode
    from mirror.format import LogHeader, LogImage, LogReport, format_log, inspect
    from mirror.log import CoreDirtyLog, DiskDirtyLog, open_dirty_log
    from mirror.manager import MirrorManager, MirrorState
    from mirror.region import RegionState
    from mirror.resync import OfflineResync

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

__getattr__ = lazy.exports(
    __name__,
    {
        "LogHeader": "mirror.format:LogHeader",
        "LogImage": "mirror.format:LogImage",
        "LogReport": "mirror.format:LogReport",
        "SyncMode": "dmtools.target_values:SyncMode",
        "format_log": "mirror.format:format_log",
        "inspect": "mirror.format:inspect",
        "CoreDirtyLog": "mirror.log:CoreDirtyLog",
        "DiskDirtyLog": "mirror.log:DiskDirtyLog",
        "open_dirty_log": "mirror.log:open_dirty_log",
        "MirrorManager": "mirror.manager:MirrorManager",
        "MirrorState": "mirror.manager:MirrorState",
        "RegionState": "mirror.region:RegionState",
        "OfflineResync": "mirror.resync:OfflineResync",
    },
)
