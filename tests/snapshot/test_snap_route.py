"""A first write's I/O on the files under the origin and COW devices (``snapshot.route``): one
system call each, inside the devices' suspend gates, following their live tables, and through
the device stack where a table is anything but one ``linear`` segment over a file."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
from snap_stack import Stack

from dmtools.errors import DeviceIOError
from snapshot.route import Route
from snapshot.targets.core import CopyOnWrite, origins_of

CB = 4096  # chunk size 8 sectors
CHUNKS = 64
WAIT = 30.0


def _origin_bytes() -> bytes:
    return bytes((i * 7 + j) % 251 for i in range(CHUNKS) for j in range(CB))


class Calls:
    """Counts the ``os`` calls that move bytes, per descriptor: ``(name, fd)`` pairs in order."""

    NAMES = ("pwrite", "pwritev", "preadv", "fdatasync")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, before: Callable[[str, int], None] | None = None) -> None:
        self.log: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        for name in self.NAMES:
            real = getattr(os, name)

            def wrapper(fd: int, *args: Any, _real: Any = real, _name: str = name) -> Any:
                if before is not None:
                    before(_name, fd)
                with self.lock:
                    self.log.append((_name, fd))
                return _real(fd, *args)

            monkeypatch.setattr(os, name, wrapper)

    def names(self) -> list[str]:
        with self.lock:
            return [n for n, _ in self.log]


def _stack(engine: Any, tmp_path: Path, cow_table: Callable[[Path], str] | None = None) -> tuple[Stack, Path]:
    """An origin with one persistent snapshot whose COW is the engine device ``t-cow`` (one linear
    segment over a COW file, unless ``cow_table`` gives another table for it)."""
    st = Stack(engine, tmp_path, _origin_bytes())
    cow = st.cow_file("s", 4 * CHUNKS * CB)
    table = cow_table(cow) if cow_table else f"0 {4 * CHUNKS * 8} linear {cow} 0"
    engine.create("t-cow", table)
    st.add_snapshot("s", 0, cow=engine.device_ref("t-cow"))
    return st, cow


def _snap(engine: Any) -> CopyOnWrite:
    (snap,) = origins_of(engine).all_snapshots()
    return snap


def _check_views(st: Stack, written: dict[int, bytes]) -> None:
    """The origin holds ``written`` over the original bytes; the snapshot still the original."""
    original = _origin_bytes()
    origin = bytearray(original)
    for chunk, data in written.items():
        origin[chunk * CB : chunk * CB + len(data)] = data
    assert st.read(st.base) == bytes(origin)
    assert st.read("s") == original


def test_a_first_write_is_one_system_call_per_io(engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st, cow = _stack(engine, tmp_path)
    snap = _snap(engine)
    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 5 * CB + 512)  # the first one (zeroing ahead, the area's first write)
        calls = Calls(monkeypatch)
        ep.write(b"b" * 512, 9 * CB + 1024)
        monkeypatch.undo()
    # the origin chunk read, the copy and the record written, PREFLUSH and FUA, then the origin
    assert calls.names() == ["preadv", "pwrite", "fdatasync", "pwrite", "fdatasync", "pwrite"]
    assert snap.table.lookup(9) is not None and snap.store.records == 2
    data9 = bytearray(_origin_bytes()[9 * CB : 10 * CB])
    data9[1024:1536] = b"b" * 512
    data5 = bytearray(_origin_bytes()[5 * CB : 6 * CB])
    data5[512:1024] = b"a" * 512
    _check_views(st, {5: bytes(data5), 9: bytes(data9)})
    # the copy and the record are in the COW file itself, where the snapshot reloads them from
    new = snap.table.lookup(9)
    assert new is not None
    assert cow.read_bytes()[new * CB : (new + 1) * CB] == _origin_bytes()[9 * CB : 10 * CB]


def test_a_suspended_cow_holds_routed_io(engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st, _ = _stack(engine, tmp_path)
    cow_device = _snap(engine).cow.inner.device
    (cow_file, _), = cow_device.live.targets[0].file_layout().legs
    cow_fd = cow_file.inner.fileno()
    seen: list[bool] = []

    def before(name: str, fd: int) -> None:
        if fd == cow_fd and threading.current_thread() is writer:  # not the suspend's own flush
            seen.append(cow_device.suspended)

    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * CB, 3 * CB)  # routes learnt
        writer = threading.Thread(target=ep.write, args=(b"b" * 512, 11 * CB), daemon=True)
        Calls(monkeypatch, before)
        engine.suspend("t-cow")
        writer.start()
        writer.join(0.3)
        held = writer.is_alive()
        engine.resume("t-cow")
        writer.join(WAIT)
        monkeypatch.undo()
    assert held, "a first write went on while its COW device was suspended"
    assert not writer.is_alive()
    assert seen and not any(seen)
    data11 = bytearray(_origin_bytes()[11 * CB : 12 * CB])
    data11[:512] = b"b" * 512
    _check_views(st, {3: b"a" * CB, 11: bytes(data11)})


def test_a_reloaded_cow_table_is_followed(engine: Any, tmp_path: Path) -> None:
    st, cow = _stack(engine, tmp_path)
    snap = _snap(engine)
    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 2 * CB)
        # the COW's bytes move to another file, 1 MiB in; its device follows them
        moved = tmp_path / "moved.cow"
        engine.suspend(st.base)
        engine.suspend("t-cow")
        with open(moved, "wb") as f:
            f.seek(1 << 20)
            f.write(cow.read_bytes())
        engine.load("t-cow", f"0 {4 * CHUNKS * 8} linear {moved} {(1 << 20) // 512}")
        engine.resume("t-cow")
        engine.resume(st.base)
        before = cow.read_bytes()
        ep.write(b"b" * 512, 7 * CB)
    assert cow.read_bytes() == before  # nothing written to the old file
    snap.sync()
    new = snap.table.lookup(7)
    assert new is not None
    assert moved.read_bytes()[(1 << 20) + new * CB : (1 << 20) + (new + 1) * CB] == _origin_bytes()[7 * CB : 8 * CB]
    data2 = bytearray(_origin_bytes()[2 * CB : 3 * CB])
    data2[:512] = b"a" * 512
    data7 = bytearray(_origin_bytes()[7 * CB : 8 * CB])
    data7[:512] = b"b" * 512
    _check_views(st, {2: bytes(data2), 7: bytes(data7)})


def test_a_cow_of_two_segments_goes_through_its_device(engine: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    half = 2 * CHUNKS * 8
    st, _ = _stack(engine, tmp_path, lambda cow: f"0 {half} linear {cow} 0\n{half} {half} linear {cow} {half}")
    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 4 * CB)
        calls = Calls(monkeypatch)
        ep.write(b"b" * 512, 8 * CB)
        monkeypatch.undo()
    # the COW's copy and record are the backing file's pwritev (its flushes one per segment);
    # the origin's read and write still one call each
    names = calls.names()
    assert names.count("pwritev") == 2 and names.count("pwrite") == 1 and names.count("preadv") == 1
    assert names.count("fdatasync") >= 2 and names[-1] == "pwrite"
    data4 = bytearray(_origin_bytes()[4 * CB : 5 * CB])
    data4[:512] = b"a" * 512
    data8 = bytearray(_origin_bytes()[8 * CB : 9 * CB])
    data8[:512] = b"b" * 512
    _check_views(st, {4: bytes(data4), 8: bytes(data8)})


def test_a_failed_fdatasync_raises_once(engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    st, _ = _stack(engine, tmp_path)
    route = Route(_snap(engine).cow)
    calls: list[int] = []

    def failing(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(DeviceIOError) as info:
        route.flush()
    assert info.value.errno == errno.EIO
    assert len(calls) == 1  # a second fdatasync could report success for what the first lost


def test_a_method_replaced_on_the_handle_is_called(engine: Any, tmp_path: Path) -> None:
    st, _ = _stack(engine, tmp_path)
    snap = _snap(engine)
    cow = snap.cow
    plain = cow.write
    seen: list[tuple[int, int]] = []

    def probe(buf: Any, offset: int) -> int:
        seen.append((offset, len(buf)))
        return plain(buf, offset)

    cow.write = probe  # type: ignore[method-assign]
    try:
        with engine.open_endpoint(st.base) as ep:
            ep.write(b"c" * 512, 13 * CB)
    finally:
        del cow.write
    new = snap.table.lookup(13)
    assert new is not None and (new * CB, CB) in seen
    data = bytearray(_origin_bytes()[13 * CB : 14 * CB])
    data[:512] = b"c" * 512
    _check_views(st, {13: bytes(data)})


def test_a_failed_metadata_pwrite_goes_through_the_device(engine: Any, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    st, cow = _stack(engine, tmp_path)
    snap = _snap(engine)
    real = os.pwrite
    failed: list[int] = []

    def pwrite(fd: int, buf: Any, at: int) -> int:
        if at == CB and not failed:  # metadata area 0, once
            failed.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, buf, at)

    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 6 * CB)
        monkeypatch.setattr(os, "pwrite", pwrite)
        calls = Calls(monkeypatch)
        ep.write(b"b" * 512, 10 * CB)
        monkeypatch.undo()
    assert failed
    # PREFLUSH, the failed pwrite, then the device's flush and FUA write (write, flush) of the area
    names = calls.names()
    assert names[names.index("pwrite", 2):] == ["pwrite", "fdatasync", "pwritev", "fdatasync", "pwrite"]
    new = snap.table.lookup(10)
    assert new is not None and snap.store.records == 2 and snap.valid
    area = cow.read_bytes()[CB : 2 * CB]
    assert int.from_bytes(area[16:24], "little") == 10 and int.from_bytes(area[24:32], "little") == new


@pytest.mark.parametrize("fast", [True, False], ids=["fast-flushes", "slow-flushes"])
def test_snapshots_copy_on_the_writers_thread_where_flushes_are_fast(engine: Any, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    fast: bool) -> None:
    from snapshot.targets import core

    st = Stack(engine, tmp_path, _origin_bytes())
    for name in ("a", "b", "c"):
        st.add_snapshot(name, 4 * CHUNKS * CB)
    snaps = origins_of(engine).all_snapshots()
    cow_fds = {snap.cow.inner.fileno() for snap in snaps}
    with engine.open_endpoint(st.base) as ep:
        ep.write(b"a" * 512, 1 * CB)  # every COW's flush measured once
        assert all(snap.store.flush_cost is not None and snap.store.flush_cost >= 0 for snap in snaps)
        monkeypatch.setattr(core, "PARALLEL_FLUSH_SECONDS", float("inf") if fast else 0.0)
        threads: list[int] = []
        real = os.pwrite

        def pwrite(fd: int, buf: Any, at: int) -> int:
            if fd in cow_fds and len(buf) == CB and at % CB == 0 and at >= 2 * CB:
                threads.append(threading.get_ident())
            return real(fd, buf, at)

        monkeypatch.setattr(os, "pwrite", pwrite)
        writer_ident: list[int] = []

        def write() -> None:
            writer_ident.append(threading.get_ident())
            ep.write(b"b" * 512, 20 * CB)

        writer = threading.Thread(target=write)
        writer.start()
        writer.join(WAIT)
        monkeypatch.undo()
    assert not writer.is_alive()
    assert len(threads) >= 3  # the three copies (and areas)
    if fast:
        assert set(threads) == set(writer_ident)
    else:
        assert set(threads) - set(writer_ident)  # the pool took some
    data20 = bytearray(_origin_bytes()[20 * CB : 21 * CB])
    data20[:512] = b"b" * 512
    data1 = bytearray(_origin_bytes()[CB : 2 * CB])
    data1[:512] = b"a" * 512
    original = _origin_bytes()
    origin = bytearray(original)
    origin[CB : 2 * CB] = data1
    origin[20 * CB : 21 * CB] = data20
    assert st.read(st.base) == bytes(origin)
    for name in ("a", "b", "c"):
        assert st.read(name) == original


def test_a_durable_write_is_written_and_flushed_in_one_pass_through_the_gate(
        engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, cow = _stack(engine, tmp_path)
    route = _snap(engine).cow_io
    device = route._device
    assert device is not None
    entered: list[int] = []
    real_enter = device._enter

    def enter(offset: int) -> Any:
        entered.append(offset)
        return real_enter(offset)

    monkeypatch.setattr(device, "_enter", enter)
    calls = Calls(monkeypatch)
    data = b"d" * CB
    assert route.write_durable(memoryview(data), 3 * CB) == CB
    # the write and its flush on one descriptor, under one entry of the gate: a reload between
    # them could not send the flush to another file
    assert calls.names() == ["pwrite", "fdatasync"]
    assert calls.log[0][1] == calls.log[1][1]
    assert entered == [3 * CB]
    with open(cow, "rb") as f:
        f.seek(3 * CB)
        assert f.read(CB) == data
