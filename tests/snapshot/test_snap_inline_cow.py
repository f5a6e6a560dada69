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
        until(lambda: snap.in_progress == writers and rig.gate.in_flight == writers, "every writer to copy")
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


class CountingOrigin(MemoryEndpoint):
    """An origin that counts its reads."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.reads: list[tuple[int, int]] = []

    def readinto(self, buf: Any, offset: int) -> int:
        self.reads.append((offset, len(memoryview(buf))))
        return super().readinto(buf, offset)


class GatedCows:
    """Holds the COWs' data writes (not their metadata areas) until ``gate`` is set."""

    def __init__(self, rig: Rig) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = 0
        for cow in rig.cows:
            self._hold(cow)

    def _hold(self, cow: ThreadRecordingCow) -> None:
        plain = cow.write

        def write(buf: Any, offset: int) -> int:
            if offset == CB:  # metadata area 0
                return plain(buf, offset)
            with self.lock:
                self.in_flight += 1
            try:
                assert self.gate.wait(WAIT), "the gate never opened"
                return plain(buf, offset)
            finally:
                with self.lock:
                    self.in_flight -= 1

        cow.write = write  # type: ignore[method-assign]


def test_the_snapshots_of_one_origin_read_it_once_and_copy_at_once() -> None:
    rig = Rig(3, CountingOrigin(_original(), "origin"))
    cows = GatedCows(rig)
    try:
        writer = threading.Thread(target=rig.origin_write, args=(7 * CB, b"X" * CB), daemon=True)
        writer.start()
        # one origin write, three snapshots: one read of the origin, their COW writes in flight together
        until(lambda: cows.in_flight == 3, "three COW writes at once")
        assert rig.origin_ep.reads == [(7 * CB, CB)]
        assert writer.is_alive()
        cows.gate.set()
        writer.join(WAIT)
        assert not writer.is_alive()
        assert rig.origin_ep.reads == [(7 * CB, CB)]
        assert len({cow.writers[0] for cow in rig.cows}) == 3  # three threads
        last_flush = max(i for i, e in enumerate(rig.journal) if e[0] == "flush")
        assert rig.journal[-1] == ("write", "origin", 7 * CB, CB) and last_flush == len(rig.journal) - 2
        for snap, cow, store in zip(rig.snaps, rig.cows, rig.stores):
            new = snap.table.lookup(7)
            assert new is not None and store.records == 1
            assert bytes(cow.data[new * CB : (new + 1) * CB]) == _original()[7 * CB : 8 * CB]
            # each COW: its copy, then PREFLUSH, its record, FUA, in that order
            mine = [e[0] for e in rig.journal if e[1] == cow.name]
            assert mine == ["write", "flush", "write", "flush"]
    finally:
        cows.gate.set()
        rig.close()


def test_one_read_serves_snapshots_that_need_different_chunks() -> None:
    rig = Rig(2, CountingOrigin(_original(), "origin"))
    try:
        rig.snaps[1].table.insert(3, 9)  # snapshot 1 already holds chunk 3: only snapshot 0 copies it
        rig.origin_write(2 * CB, b"Y" * 3 * CB)  # chunks 2..4
        assert rig.origin_ep.reads == [(2 * CB, 3 * CB)]
        for snap, cow in zip(rig.snaps, rig.cows):
            for c in (2, 4):
                new = snap.table.lookup(c)
                assert new is not None
                assert bytes(cow.data[new * CB : (new + 1) * CB]) == _original()[c * CB : (c + 1) * CB]
        assert rig.snaps[1].table.lookup(3) == 9 and rig.stores[1].records == 2
    finally:
        rig.close()


def test_a_failed_shared_read_invalidates_every_snapshot_and_the_write_goes_on() -> None:
    rig = Rig(3, MemoryEndpoint(_original(), "origin"))
    try:
        rig.origin_ep.fail_reads = True
        rig.origin_write(4 * CB, b"Z" * CB)
        for snap in rig.snaps:
            assert not snap.valid and not snap.pending and snap.in_progress == 0
            assert not snap.store.valid
        assert ("write", "origin", 4 * CB, CB) in rig.journal
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
