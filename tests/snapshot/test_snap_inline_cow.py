"""Copy-on-write on the writer's thread (issue 12): no kcopyd job and no hand-off for a first write,
the durability order of dm-snap-persistent.c kept, one commit for every writer waiting (group
commit), and the snapshots of one origin copying at once.

Copies are held in flight by an origin whose reads wait at a gate; every wait is for an observable
state with a deadline.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from dmtools.engine.target_driver import DeviceHandle
from dmtools.testing.memory import GatedEndpoint, Journal, MemoryEndpoint
from snapshot.store import PersistentStore
from snapshot.targets import handover, origins
from snapshot.targets.core import CopyOnWrite, do_origin

from snap_helpers import WAIT, until

CB = 4096
CHUNKS = 64
class ThreadRecordingCow(MemoryEndpoint):
    """A COW that notes which thread wrote each chunk's data."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.writers: list[int] = []

    def write(self, buf: Any, offset: int) -> int:
        self.writers.append(threading.get_ident())
        return super().write(buf, offset)


class Rig:
    """``nsnaps`` active persistent snapshots of one origin, their I/O in one journal."""

    def __init__(self, nsnaps: int, origin_ep: MemoryEndpoint) -> None:
        tag = uuid.uuid4().hex[:8]
        self.journal: Journal = origin_ep.journal
        self.origin_ep = origin_ep
        self.gate = origin_ep if isinstance(origin_ep, GatedEndpoint) else GatedEndpoint(0, open=True)
        self.origin = DeviceHandle(origin_ep, "origin", -1, -1, f"/nonexistent/{tag}/origin")
        self.registry: origins.OriginRegistry[CopyOnWrite] = origins.OriginRegistry(origins.DEFAULT_COW_THRESHOLD)
        self.cows: list[ThreadRecordingCow] = []
        self.snaps: list[CopyOnWrite] = []
        self.stores: list[PersistentStore] = []
        for i in range(nsnaps):
            cow_ep = ThreadRecordingCow(2 * CHUNKS * CB, f"cow{i}", self.journal)
            cow = DeviceHandle(cow_ep, f"cow{i}", -1, -1, f"/nonexistent/{tag}/cow{i}")
            store = PersistentStore(cow, CB // 512)
            snap = CopyOnWrite(self.origin, cow, store, CHUNKS * CB, name=f"t{tag}{i}",
                               event=lambda: None, origins=self.registry)
            assert not snap.register()
            store.read_metadata()
            handover.resume(snap)  # active
            cow_ep.writers.clear()  # the new store's header and first area
            self.cows.append(cow_ep)
            self.snaps.append(snap)
            self.stores.append(store)
        self.journal.clear()

    def origin_write(self, offset: int, data: bytes) -> None:
        """What ``snapshot-origin`` does with a write."""
        do_origin(self.registry, self.origin, offset, len(data), limit=True)
        self.origin.write(memoryview(data), offset)

    def close(self) -> None:
        self.gate.gate.set()
        for snap in self.snaps:
            snap.destroy()


def _original() -> bytes:
    return bytes(i % 251 for i in range(CHUNKS * CB))


@pytest.fixture
def one() -> Iterator[Rig]:
    rig = Rig(1, MemoryEndpoint(_original(), "origin"))
    try:
        yield rig
    finally:
        rig.close()


def test_first_write_copies_on_the_writers_thread_durably_before_the_origin_write(one: Rig) -> None:
    one.origin_write(5 * CB + 512, b"N" * 1024)
    snap, cow = one.snaps[0], one.cows[0]
    new = snap.table.lookup(5)
    assert new is not None
    assert cow.writers == [threading.get_ident()] * 2  # the copy and the area: this thread, no hand-off
    assert snap.kc.progress.total == 0  # no kcopyd job
    data_at, area_at = new * CB, CB  # COW chunk 1 is the first metadata area
    assert one.journal == [
        ("write", "cow0", data_at, CB),  # the copy
        ("flush", "cow0", 0, 0),  # REQ_PREFLUSH: the copy durable before its record
        ("write", "cow0", area_at, CB),  # the record
        ("flush", "cow0", 0, 0),  # REQ_FUA: the record durable before the origin write
        ("write", "origin", 5 * CB + 512, 1024),
    ]
    assert bytes(cow.data[data_at : data_at + CB]) == _original()[5 * CB : 6 * CB]
    assert not snap.pending and snap.in_progress == 0


def test_a_failed_copy_invalidates_and_the_origin_write_goes_on(one: Rig) -> None:
    one.origin_ep.fail_reads = True
    one.origin_write(2 * CB, b"N" * CB)
    snap = one.snaps[0]
    assert not snap.valid and not snap.pending and snap.in_progress == 0
    assert ("write", "origin", 2 * CB, CB) in one.journal
    assert not snap.store.valid  # the header says so: valid = 0


def test_waiting_writers_share_one_commit() -> None:
    writers = 6
    rig = Rig(1, GatedEndpoint(_original(), "origin"))
    try:
        snap = rig.snaps[0]
        threads = [threading.Thread(target=rig.origin_write, args=(c * 3 * CB, b"W" * CB), daemon=True)
                   for c in range(writers)]
        for t in threads:
            t.start()
        # every writer allocated its exception and holds its copy in flight at the gate
        until(lambda: snap.in_progress == writers and rig.gate.in_flight == writers,
              "every writer to copy")
        assert not [e for e in rig.journal if e[1] == "cow0"]
        rig.gate.gate.set()
        for t in threads:
            t.join(WAIT)
            assert not t.is_alive()
        area_writes = [e for e in rig.journal if e[0] == "write" and e[1] == "cow0" and e[2] == CB]
        flushes = [e for e in rig.journal if e[0] == "flush"]
        assert len(area_writes) == 1 and len(flushes) == 2  # one group commit for all six
        assert [snap.table.lookup(c * 3) is not None for c in range(writers)] == [True] * writers
        assert sorted(o for o, _ in rig.stores[0].iter_records()) == [c * 3 for c in range(writers)]
        last_flush = rig.journal.index(flushes[-1])
        origin_writes = [i for i, e in enumerate(rig.journal) if e[1] == "origin"]
        assert len(origin_writes) == writers and min(origin_writes) > last_flush
    finally:
        rig.close()


def test_the_snapshots_of_one_origin_copy_at_once() -> None:
    rig = Rig(3, GatedEndpoint(_original(), "origin"))
    try:
        writer = threading.Thread(target=rig.origin_write, args=(7 * CB, b"X" * CB), daemon=True)
        writer.start()
        # one origin write, three snapshots: their copies are in flight together
        until(lambda: rig.gate.in_flight == 3, "three copies at once")
        assert writer.is_alive()
        rig.gate.gate.set()
        writer.join(WAIT)
        assert not writer.is_alive()
        last_flush = max(i for i, e in enumerate(rig.journal) if e[0] == "flush")
        assert rig.journal[-1] == ("write", "origin", 7 * CB, CB) and last_flush == len(rig.journal) - 2
        for snap, cow, store in zip(rig.snaps, rig.cows, rig.stores):
            new = snap.table.lookup(7)
            assert new is not None and store.records == 1
            assert bytes(cow.data[new * CB : (new + 1) * CB]) == _original()[7 * CB : 8 * CB]
    finally:
        rig.close()


def test_copy_buffers_are_distinct_when_nested_and_bounded_per_thread() -> None:
    from snapshot.targets import core

    seen: dict[str, Any] = {}

    def run() -> None:
        with core._copy_buffer(CB) as outer, core._copy_buffer(CB) as inner:  # a nested copy
            seen["nested_distinct"] = outer is not inner
        for n in range(1, 300):  # runs of every length
            with core._copy_buffer(n * CB) as buf:
                assert len(buf) == n * CB
        seen["kept"] = core._BUFFERS.kept
        with core._copy_buffer(CB) as again:
            seen["reused"] = again is outer or again is inner

    t = threading.Thread(target=run)
    t.start()
    t.join(WAIT)
    assert seen == {"nested_distinct": True, "kept": seen["kept"], "reused": True}
    assert 0 < seen["kept"] <= core._CopyBuffers.KEEP_BYTES
