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

__getattr__, __all__ = lazy.package(__name__, {
    "mirror.format": "LogHeader LogImage LogReport format_log inspect",
    "dmtools.target_values": "SyncMode",
    "mirror.log": "CoreDirtyLog DiskDirtyLog open_dirty_log",
    "mirror.manager": "MirrorManager MirrorState",
    "mirror.region": "RegionState",
    "mirror.resync": "OfflineResync",
})
