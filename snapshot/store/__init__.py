"""Exception stores: where a snapshot records which origin chunks live in which COW chunks."""

from __future__ import annotations

from dmtools.endpoint import Endpoint
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


def make_store(cow: Endpoint, store_type: str, chunk_size: int) -> ExceptionStore:
    """Build the store named by a table's third argument (``P``, ``PO``, ``N``; case-insensitive).

    Mirrors dm-exception-store.c: the first letter picks the type, the rest are options and only a
    persistent store accepts ``O``.
    """
    from dmtools.errors import InvalidTable

    if not store_type:
        raise InvalidTable("Invalid exception store type", operation="snapshot")
    kind, options = store_type[0].upper(), store_type[1:].upper()
    if kind == "P":
        if options not in ("", "O"):
            raise InvalidTable("Unsupported persistent store option", operation="snapshot")
        return PersistentStore(cow, chunk_size, overflow=options == "O")
    if kind == "N":
        if options:
            raise InvalidTable("Unsupported transient store option", operation="snapshot")
        return TransientStore(cow, chunk_size)
    raise InvalidTable(f"Exception store type '{store_type}' unknown", operation="snapshot")
