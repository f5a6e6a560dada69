"""Exception stores: where a snapshot records which origin chunks live in which COW chunks."""

from __future__ import annotations

from dmtools.endpoint import Endpoint
from dmtools.target_values import StoreMode
from snapshot.store.base import CommitCallback, ExceptionStore, Usage
from snapshot.store.format import (
    SNAP_MAGIC,
    SNAPSHOT_DISK_VERSION,
    DiskHeader,
    area_location,
    exceptions_per_area,
    skip_metadata,
)
from snapshot.store.persistent import PersistentStore
from snapshot.store.table import ExceptionTable
from snapshot.store.transient import TransientStore

__all__ = [
    "SNAPSHOT_DISK_VERSION",
    "SNAP_MAGIC",
    "CommitCallback",
    "DiskHeader",
    "ExceptionStore",
    "ExceptionTable",
    "PersistentStore",
    "TransientStore",
    "Usage",
    "area_location",
    "exceptions_per_area",
    "make_store",
    "skip_metadata",
]


def make_store(cow: Endpoint, mode: StoreMode, chunk_size: int) -> ExceptionStore:
    """The store a table's ``mode`` names, on ``cow`` (chunk size in sectors; 0: from the header)."""
    if mode is StoreMode.TRANSIENT:
        return TransientStore(cow, chunk_size)
    return PersistentStore(cow, chunk_size, overflow=mode is StoreMode.PERSISTENT_OVERFLOW)
