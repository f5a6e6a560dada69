"""Exceptions complete in allocation order, with one grouped metadata commit (dm-snap.c)."""

from __future__ import annotations

import struct

from dmtools.engine.target_driver import DeviceHandle
from dmtools.testing.memory import MemoryEndpoint
from snapshot.store import PersistentStore
from snapshot.targets.core import CopyOnWrite

CB = 4096


def test_out_of_order_copies_commit_in_allocation_order() -> None:
    origin = DeviceHandle(MemoryEndpoint(64 * CB, "origin"), "origin", -1, -1, "/nonexistent/origin")
    cow_ep = MemoryEndpoint(64 * CB, "cow")
    cow = DeviceHandle(cow_ep, "cow", -1, -1, "/nonexistent/cow")
    store = PersistentStore(cow, 8)
    store.read_metadata()
    snap = CopyOnWrite(origin, cow, store, 64 * CB, name="t", event=lambda: None)
    try:
        with snap.cond:
            first = snap._alloc_locked(5)
            second = snap._alloc_locked(9)
        cow_ep.journal.clear()
        snap._complete([second], True)  # finishes first, must wait for the older one
        assert not second.done and store.records == 0 and cow_ep.journal == []
        snap._complete([first], True)
        assert first.ok and second.ok
        writes = [e for e in cow_ep.journal if e[0] == "write"]
        assert writes == [("write", "cow", CB, CB)]  # one grouped area write for both
        assert bytes(cow_ep.data[CB : CB + 32]) == struct.pack("<QQQQ", 5, 2, 9, 3)
        assert snap.table.lookup(5) == 2 and snap.table.lookup(9) == 3
    finally:
        snap.destroy()
