"""Device-mapper events: typed changes of devices, snapshots and mirrors, from any backend.

``Watcher(dm).events()`` yields :mod:`dmtools.events.types` values as devices change; see
:mod:`dmtools.events.watcher` for where they come from (uevents through pyudev, device event
numbers, status polling) and :mod:`dmtools.events.store` for catching up across restarts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmtools import lazy

if TYPE_CHECKING:  # pragma: no cover - loaded on first use, see __getattr__
    from dmtools.events.publish import EventHub, Subscription, read_events, write_event
    from dmtools.events.sources import EventNumberWaiter, UEvent, UeventSource, identity, sysfs_identity
    from dmtools.events.state import DEFAULT_THRESHOLDS, DeviceState, TargetState, capture, derive, parse_thresholds
    from dmtools.events.store import StateStore, default_root, last_events
    from dmtools.events.types import (EVENT_TYPES, DeviceAdded, DeviceRemoved, DeviceRenamed, DeviceResumed,
                                      DeviceSuspended, Event, LegHealthChanged, LogHealthChanged, MergeFailed,
                                      MergeFinished, PolicyAction, ResyncFinished, Severity, SnapshotInvalidated,
                                      SnapshotOverflowed, SnapshotUsageCrossed)
    from dmtools.events.watcher import Batch, Watcher
    from dmtools.linux import udev_running

__getattr__, __all__ = lazy.package(__name__, {
    "dmtools.events.publish": "EventHub Subscription read_events write_event",
    "dmtools.events.sources": "EventNumberWaiter UEvent UeventSource identity sysfs_identity",
    "dmtools.linux": "udev_running",
    "dmtools.events.state": "DEFAULT_THRESHOLDS DeviceState TargetState capture derive parse_thresholds",
    "dmtools.events.store": "StateStore default_root last_events",
    "dmtools.events.types": "EVENT_TYPES DeviceAdded DeviceRemoved DeviceRenamed DeviceResumed DeviceSuspended Event "
                            "LegHealthChanged LogHealthChanged MergeFailed MergeFinished PolicyAction ResyncFinished "
                            "Severity SnapshotInvalidated SnapshotOverflowed SnapshotUsageCrossed",
    "dmtools.events.watcher": "Batch Watcher",
})
