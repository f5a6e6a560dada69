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
    from dmtools.events.sources import EventNumberWaiter, UEvent, UeventSource, identity, sysfs_identity, udev_running
    from dmtools.events.state import DEFAULT_THRESHOLDS, DeviceState, TargetState, capture, derive, parse_thresholds
    from dmtools.events.store import StateStore, default_root, last_events
    from dmtools.events.types import (
        EVENT_TYPES, DeviceAdded, DeviceRemoved, DeviceRenamed, DeviceResumed, DeviceSuspended, Event, LegHealthChanged,
        LogHealthChanged, MergeFailed, MergeFinished, PolicyAction, ResyncFinished, Severity, SnapshotInvalidated,
        SnapshotOverflowed, SnapshotUsageCrossed,
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

__getattr__ = lazy.exports(
    __name__,
    {
        "EventHub": "dmtools.events.publish:EventHub",
        "Subscription": "dmtools.events.publish:Subscription",
        "read_events": "dmtools.events.publish:read_events",
        "write_event": "dmtools.events.publish:write_event",
        "EventNumberWaiter": "dmtools.events.sources:EventNumberWaiter",
        "UEvent": "dmtools.events.sources:UEvent",
        "UeventSource": "dmtools.events.sources:UeventSource",
        "identity": "dmtools.events.sources:identity",
        "sysfs_identity": "dmtools.events.sources:sysfs_identity",
        "udev_running": "dmtools.events.sources:udev_running",
        "DEFAULT_THRESHOLDS": "dmtools.events.state:DEFAULT_THRESHOLDS",
        "DeviceState": "dmtools.events.state:DeviceState",
        "TargetState": "dmtools.events.state:TargetState",
        "capture": "dmtools.events.state:capture",
        "derive": "dmtools.events.state:derive",
        "parse_thresholds": "dmtools.events.state:parse_thresholds",
        "StateStore": "dmtools.events.store:StateStore",
        "default_root": "dmtools.events.store:default_root",
        "last_events": "dmtools.events.store:last_events",
        "EVENT_TYPES": "dmtools.events.types:EVENT_TYPES",
        "DeviceAdded": "dmtools.events.types:DeviceAdded",
        "DeviceRemoved": "dmtools.events.types:DeviceRemoved",
        "DeviceRenamed": "dmtools.events.types:DeviceRenamed",
        "DeviceResumed": "dmtools.events.types:DeviceResumed",
        "DeviceSuspended": "dmtools.events.types:DeviceSuspended",
        "Event": "dmtools.events.types:Event",
        "LegHealthChanged": "dmtools.events.types:LegHealthChanged",
        "LogHealthChanged": "dmtools.events.types:LogHealthChanged",
        "MergeFailed": "dmtools.events.types:MergeFailed",
        "MergeFinished": "dmtools.events.types:MergeFinished",
        "PolicyAction": "dmtools.events.types:PolicyAction",
        "ResyncFinished": "dmtools.events.types:ResyncFinished",
        "Severity": "dmtools.events.types:Severity",
        "SnapshotInvalidated": "dmtools.events.types:SnapshotInvalidated",
        "SnapshotOverflowed": "dmtools.events.types:SnapshotOverflowed",
        "SnapshotUsageCrossed": "dmtools.events.types:SnapshotUsageCrossed",
        "Batch": "dmtools.events.watcher:Batch",
        "Watcher": "dmtools.events.watcher:Watcher",
    },
)
