"""``snapshot_cow_threshold`` (dm-snap.c ``wait_for_in_progress``): writers wait while more copies
than the threshold are in flight, and go on when completions (or a raised threshold) allow it.

Copies are held in flight by an origin whose reads block until the test opens a gate; every wait
here is for an observable state (a counter, a pending exception) with a deadline.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dmtools.engine.target_driver import DeviceHandle
from dmtools.testing.memory import GatedEndpoint, MemoryEndpoint
from snapshot.store import PersistentStore
from dmtools.engine import Engine
from snapshot.targets import handover, origins
from snapshot.targets.core import CopyOnWrite, do_origin, origins_of

from snap_helpers import WAIT, until

CB = 4096
CHUNKS = 64
@pytest.fixture
def threshold(rig: Any) -> Callable[[int], int]:
    """Set ``snapshot_cow_threshold`` of the rig's registry (its own: no other test sees it)."""
    return rig[2].origins.set_cow_threshold  # type: ignore[no-any-return]


@pytest.fixture
def rig() -> Iterator[tuple[GatedEndpoint, DeviceHandle, CopyOnWrite]]:
    tag = uuid.uuid4().hex[:8]
    origin_ep = GatedEndpoint(CHUNKS * CB, "origin")
    origin = DeviceHandle(origin_ep, "origin", -1, -1, f"/nonexistent/{tag}/origin")
    cow = DeviceHandle(MemoryEndpoint(2 * CHUNKS * CB, "cow"), "cow", -1, -1, f"/nonexistent/{tag}/cow")
    store = PersistentStore(cow, CB // 512)
    snap = CopyOnWrite(origin, cow, store, CHUNKS * CB, name=f"t{tag}", event=lambda: None,
                       origins=origins.OriginRegistry(origins.DEFAULT_COW_THRESHOLD))
    assert not snap.register()
    store.read_metadata()
    handover.resume(snap)  # active
    try:
        yield origin_ep, origin, snap
    finally:
        origin_ep.gate.set()
        snap.destroy()


def start(target: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def test_default_is_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    assert origins.DEFAULT_COW_THRESHOLD == 2048
    monkeypatch.delenv(origins.ENV_COW_THRESHOLD, raising=False)
    assert origins.threshold_from_env() == 2048


def test_origin_writers_wait_at_the_threshold(rig: Any, threshold: Callable[[int], int]) -> None:
    gate_ep, origin, snap = rig
    threshold(2)
    first = start(lambda: do_origin(snap.origins, origin, 0, 3 * CB, limit=True))  # 3 copies > 2
    until(lambda: snap.in_progress == 3, "three copies in flight")
    second = start(lambda: do_origin(snap.origins, origin, 10 * CB, CB, limit=True))
    until(lambda: snap.throttled == 1, "the second writer to wait")
    assert 10 not in snap.pending and second.is_alive()  # it waits before allocating
    gate_ep.gate.set()  # the copies complete, the count drops to 0 <= 2: the writer goes on
    first.join(WAIT)
    second.join(WAIT)
    assert not first.is_alive() and not second.is_alive()
    assert [snap.table.lookup(c) is not None for c in (0, 1, 2, 10)] == [True] * 4
    assert snap.in_progress == 0 and snap.throttled == 0


def test_raising_the_threshold_releases_waiters(rig: Any, threshold: Callable[[int], int]) -> None:
    gate_ep, origin, snap = rig
    threshold(0)  # one copy at a time
    first = start(lambda: do_origin(snap.origins, origin, 0, CB, limit=True))
    until(lambda: snap.in_progress == 1, "one copy in flight")
    assert not snap.origins.over_threshold(0) and snap.origins.over_threshold(1)
    second = start(lambda: do_origin(snap.origins, origin, 5 * CB, CB, limit=True))
    until(lambda: snap.throttled == 1, "the second writer to wait")
    threshold(8)  # applies at once, as the kernel's 0644 parameter
    until(lambda: 5 in snap.pending, "the second writer to allocate")
    assert snap.in_progress == 2
    gate_ep.gate.set()
    first.join(WAIT)
    second.join(WAIT)
    assert not first.is_alive() and not second.is_alive()
    assert snap.table.lookup(0) is not None and snap.table.lookup(5) is not None


def test_snapshot_writes_wait_too(rig: Any, threshold: Callable[[int], int]) -> None:
    gate_ep, origin, snap = rig
    threshold(1)
    first = start(lambda: do_origin(snap.origins, origin, 0, 2 * CB, limit=True))
    until(lambda: snap.in_progress == 2, "two copies in flight")
    writer = start(lambda: snap.write(memoryview(b"s" * 512), 20 * CB))
    until(lambda: snap.throttled == 1, "the snapshot writer to wait")
    assert 20 not in snap.pending
    gate_ep.gate.set()
    first.join(WAIT)
    writer.join(WAIT)
    assert not first.is_alive() and not writer.is_alive()
    new = snap.table.lookup(20)
    assert new is not None


def test_merge_path_and_negative_threshold_do_not_wait(rig: Any, threshold: Callable[[int], int]) -> None:
    gate_ep, origin, snap = rig
    threshold(0)
    first = start(lambda: do_origin(snap.origins, origin, 0, CB, limit=True))
    until(lambda: snap.in_progress == 1, "one copy in flight")
    # without limit (snapshot-merge's origin path, re-driven writes) nothing waits
    second = start(lambda: do_origin(snap.origins, origin, 3 * CB, CB))
    until(lambda: 3 in snap.pending, "the unthrottled writer to allocate")
    threshold(-1)  # negative: the kernel's unsigned comparison never throttles
    assert not snap.origins.over_threshold(1 << 40)
    third = start(lambda: do_origin(snap.origins, origin, 7 * CB, CB, limit=True))
    until(lambda: 7 in snap.pending, "the writer to allocate")
    gate_ep.gate.set()
    for t in (first, second, third):
        t.join(WAIT)
        assert not t.is_alive()


def test_threshold_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(origins.ENV_COW_THRESHOLD, "512")
    assert origins.threshold_from_env() == 512
    monkeypatch.setenv(origins.ENV_COW_THRESHOLD, "lots")
    assert origins.threshold_from_env() == origins.DEFAULT_COW_THRESHOLD
    monkeypatch.delenv(origins.ENV_COW_THRESHOLD)
    assert origins.threshold_from_env() == origins.DEFAULT_COW_THRESHOLD
    with pytest.raises(TypeError):
        origins.OriginRegistry().set_cow_threshold("8")  # type: ignore[arg-type]


def test_each_engine_has_its_own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    # read when an engine first needs it, not at import: the environment of that moment counts
    monkeypatch.setenv(origins.ENV_COW_THRESHOLD, "512")
    first = Engine()
    monkeypatch.setenv(origins.ENV_COW_THRESHOLD, "64")
    second = Engine()
    try:
        assert origins_of(second).cow_threshold == 64 and origins_of(first).cow_threshold == 64
        assert origins_of(first) is origins_of(first) and origins_of(first) is not origins_of(second)
        origins_of(first).set_cow_threshold(7)
        assert origins_of(first).cow_threshold == 7 and origins_of(second).cow_threshold == 64
    finally:
        first.close()
        second.close()
