"""Device-mapper events: typed changes of devices, snapshots and mirrors, from any backend.

``Watcher(dm).events()`` yields :mod:`dmtools.events.types` values as devices change; see
:mod:`dmtools.events.watcher` for where they come from (uevents through pyudev, device event
numbers, status polling) and :mod:`dmtools.events.store` for catching up across restarts.
"""

from __future__ import annotations

from dmtools.events.publish import EventHub, Subscription, read_events, write_event
from dmtools.events.sources import EventNumberWaiter, UEvent, UeventSource, identity, sysfs_identity, udev_running
from dmtools.events.state import DEFAULT_THRESHOLDS, DeviceState, TargetState, capture, derive, parse_thresholds
from dmtools.events.store import StateStore, default_root, last_events
from dmtools.events.types import (
    EVENT_TYPES,
    DeviceAdded,
    DeviceRemoved,
    DeviceRenamed,
    DeviceResumed,
    DeviceSuspended,
    Event,
    LegHealthChanged,
    LogHealthChanged,
    MergeFailed,
    MergeFinished,
    PolicyAction,
    ResyncFinished,
    Severity,
    SnapshotInvalidated,
    SnapshotOverflowed,
    SnapshotUsageCrossed,
)
from dmtools.events.watcher import Batch, Watcher

__all__ = [
    "Batch", "DEFAULT_THRESHOLDS", "DeviceAdded", "DeviceRemoved", "DeviceRenamed", "DeviceResumed",
    "DeviceState", "DeviceSuspended", "EVENT_TYPES", "Event", "EventHub", "EventNumberWaiter",
    "LegHealthChanged", "LogHealthChanged", "MergeFailed", "MergeFinished", "PolicyAction",
    "ResyncFinished", "Severity", "SnapshotInvalidated", "SnapshotOverflowed",
    "SnapshotUsageCrossed", "StateStore", "Subscription", "TargetState", "UEvent", "UeventSource",
    "Watcher", "capture", "default_root", "derive", "identity", "last_events", "parse_thresholds",
    "read_events", "sysfs_identity", "udev_running", "write_event",
]
