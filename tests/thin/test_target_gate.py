"""The pool's gate (``thin.targets.cells``): block I/O of thin devices goes to the data device
straight while the pool is live, yet a suspended pool still holds it, as the kernel's pool does
(a thin bio is remapped to the pool device, which holds it while suspended), and a pool's
suspend completes only once the I/O already sent to the data device is done, as the engine's
drain of a device's in-flight I/O does.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from dmtools.errors import DeviceIOError
from target_rig import BB, PoolRig, pattern, read


def _gate_data_writes(monkeypatch: Any, rig: PoolRig, gate: Any, events: list[str]) -> None:
    """Every write that reaches the pool's data device waits for ``gate()``, then is logged."""
    data = rig.in_core().data
    write = data.write

    def gated_write(buf: Any, offset: int) -> int:
        gate()
        n = write(buf, offset)
        events.append(f"write {offset // BB}")
        return int(n)

    monkeypatch.setattr(data, "write", gated_write)


def _suspend_in_thread(rig: PoolRig, events: list[str]) -> threading.Thread:
    """A thread suspending the pool, then logging it; returned after half a second of it."""
    def suspend() -> None:
        rig.dm.suspend(rig.name)
        events.append("suspended")

    suspender = threading.Thread(target=suspend)
    suspender.start()
    suspender.join(0.5)
    return suspender


def test_suspended_pool_holds_writes_to_mapped_and_new_blocks(rig: PoolRig, monkeypatch: Any) -> None:
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)  # block 0 mapped; block 1 not
    events: list[str] = []
    _gate_data_writes(monkeypatch, rig, lambda: None, events)
    rig.dm.suspend(rig.name)
    writers = [threading.Thread(target=t.write, args=(pattern(2, 4096), 0)),
               threading.Thread(target=t.write, args=(pattern(3, 4096), BB + 4096))]
    for w in writers:
        w.start()
    for w in writers:
        w.join(0.5)
    assert all(w.is_alive() for w in writers) and events == []  # held: nothing reached the data device
    rig.dm.resume(rig.name)
    for w in writers:
        w.join(10)
    assert not any(w.is_alive() for w in writers)
    assert sorted(events) == ["write 0", "write 1"]
    assert read(t, 0, 8192) == pattern(2, 4096) + pattern(1, 4096)
    assert read(t, BB, 8192) == bytes(4096) + pattern(3, 4096)


def test_pool_suspend_waits_for_writes_sent_to_the_data_device(rig: PoolRig, monkeypatch: Any) -> None:
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    inside, release = threading.Event(), threading.Event()
    events: list[str] = []

    def gate() -> None:
        inside.set()
        assert release.wait(10)

    _gate_data_writes(monkeypatch, rig, gate, events)
    writer = threading.Thread(target=t.write, args=(pattern(2, 4096), 0))
    writer.start()
    assert inside.wait(10)

    suspender = _suspend_in_thread(rig, events)
    assert suspender.is_alive() and events == []  # waiting for the write inside the data device
    release.set()
    writer.join(10)
    suspender.join(10)
    assert not writer.is_alive() and not suspender.is_alive()
    assert events == ["write 0", "suspended"]
    rig.dm.resume(rig.name)
    assert read(t, 0, 8192) == pattern(2, 4096) + pattern(1, 4096)


def test_a_run_of_new_blocks_is_held_by_a_suspended_pool_and_waited_for_by_a_suspend(
        rig: PoolRig, monkeypatch: Any) -> None:
    """A write of whole new blocks (one write of the run, the data device given with the run's
    cells): held while the pool is suspended; sent while it is live, and a suspend then waits
    for it."""
    t = rig.thin(1, "t1")
    events: list[str] = []
    inside, release = threading.Event(), threading.Event()
    gated = [False]

    def gate() -> None:
        if gated[0]:
            inside.set()
            assert release.wait(10)

    _gate_data_writes(monkeypatch, rig, gate, events)
    rig.dm.suspend(rig.name)
    writer = threading.Thread(target=t.write, args=(pattern(2, 2 * BB), 0))
    writer.start()
    writer.join(0.5)
    assert writer.is_alive() and events == []  # held: nothing reached the data device
    rig.dm.resume(rig.name)
    writer.join(10)
    assert not writer.is_alive() and events == ["write 0"]
    gated[0] = True
    writer = threading.Thread(target=t.write, args=(pattern(3, 2 * BB), 2 * BB))
    writer.start()
    assert inside.wait(10)
    suspender = _suspend_in_thread(rig, events)
    assert suspender.is_alive() and events == ["write 0"]  # waiting for the write inside the data device
    release.set()
    writer.join(10)
    suspender.join(10)
    assert not writer.is_alive() and not suspender.is_alive()
    assert events == ["write 0", "write 2", "suspended"]
    rig.dm.resume(rig.name)
    assert read(t, 0, 4 * BB) == pattern(2, 2 * BB) + pattern(3, 2 * BB)


def test_a_read_only_pool_table_passes_reads_and_refuses_writes(engine: Any, tmp_path: Any) -> None:
    """A pool table loaded read-only (``dmsetup create -r``): thin reads of mapped blocks reach
    the data device, thin writes are refused as the pool device refuses them, mapped or not."""
    rig = PoolRig(engine, tmp_path)
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    for ep in rig.endpoints:
        ep.close()
    rig.endpoints.clear()
    engine.remove("t1")
    rig.thins.clear()
    table = engine.table(rig.name)
    engine.remove(rig.name)
    engine.create(rig.name, table, readonly=True)
    t = rig.thin(1, "t1", create=False)
    for offset in (0, BB):  # mapped, then unmapped
        with pytest.raises(DeviceIOError, match="read-only"):
            t.write(pattern(2, 4096), offset)
    assert read(t, 0, BB) == pattern(1, BB)
    rig.close()
