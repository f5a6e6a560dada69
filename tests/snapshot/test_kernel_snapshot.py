"""Kernel tier (run in the VM: ``scripts/vmtest``): our COW format against the kernel's dm-snapshot.

* a COW written by our userspace target is activated by the kernel's ``snapshot`` and reads the same,
  also one written through our exposed node, whose first writes the FUSE worker makes in C;
* a COW written by the kernel is read the same by our target and by ``export``;
* the kernel merges a COW we wrote;
* ``SnapshotManager`` on the kernel backend creates, reports (kernel status text), merges, removes.
Chunk sizes 4 KiB and 64 KiB.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmtools.engine import Engine
from dmtools.errors import InvalidTable
from dmtools.testing.blockio import read_direct, read_uncached, write_direct, write_synced
from snapshot import SnapshotManager, export, inspect

pytestmark = pytest.mark.kernel

SIZE = 4 << 20
COW_SIZE = 5 << 20  # the whole origin plus header and metadata, for either chunk size
CHUNKS = [8, 128]


@pytest.fixture
def tag(kernel_tag: str) -> str:
    """A unique name prefix; every kernel device starting with it is removed afterwards."""
    return kernel_tag


def _read(path: str, size: int = SIZE) -> bytes:
    return read_uncached(path, size)


def _workload(rng: random.Random) -> list[tuple[bool, int, bytes]]:
    """(to_snapshot, offset, data): origin writes mostly, a few snapshot writes, sector aligned."""
    out = []
    for _ in range(60):
        off = rng.randrange(0, SIZE // 512 - 300) * 512
        out.append((rng.random() < 0.2, off, rng.randbytes(rng.choice([512, 4096, 65536, 100 * 512]))))
    return out


def _userspace_stack(tmp: Path, chunk: int, seed: int) -> tuple[bytes, bytes, Path, Path]:
    """Run a workload on our engine with file-backed origin and COW; return (origin view,
    snapshot view, origin file, COW file)."""
    rng = random.Random(seed)
    origin = tmp / "dmtt-origin.img"
    origin.write_bytes(rng.randbytes(SIZE))
    cow = tmp / "dmtt-cow.img"
    with open(cow, "wb") as f:
        f.truncate(COW_SIZE)
    eng = Engine()
    try:
        eng.create("vol", f"0 {SIZE // 512} linear {origin} 0")
        mgr = SnapshotManager(eng)
        mgr.create("vol", str(cow), "s", chunk_size=chunk)
        with eng.open_endpoint("vol") as ov, eng.open_endpoint("s") as sv:
            for to_snap, off, data in _workload(rng):
                (sv if to_snap else ov).write(data, off)
        views = []
        for name in ("vol", "s"):
            buf = bytearray(SIZE)
            with eng.open_endpoint(name, writable=False) as ep:
                ep.readinto(buf, 0)
            views.append(bytes(buf))
        mgr.remove("s")
    finally:
        eng.close()
    return views[0], views[1], origin, cow


@pytest.mark.parametrize("chunk", CHUNKS)
def test_kernel_reads_our_cow(kernel_dm: Any, tmp_path: Path, make_loop: Callable[..., Any], tag: str, chunk: int) -> None:
    origin_view, snap_view, origin, cow = _userspace_stack(tmp_path, chunk, 1)
    _kernel_reads(kernel_dm, make_loop, tag, (origin, cow, chunk), origin_view, snap_view)


def _kernel_reads(kernel_dm: Any, make_loop: Callable[..., Any], tag: str, files: tuple[Path, Path, int],
                  origin_view: bytes, snap_view: bytes) -> None:
    """The kernel's ``snapshot`` over ``(origin, cow, chunk)`` counts what ``inspect`` reads of
    the COW, shows ``snap_view``, and the origin holds ``origin_view``."""
    origin, cow, chunk = files
    ol, cl = make_loop(origin), make_loop(cow)
    kernel_dm.create(f"{tag}-s", f"0 {SIZE // 512} snapshot {ol.path} {cl.path} P {chunk}")
    status = kernel_dm.status(f"{tag}-s")[0].params
    assert status.split()[0].split("/")[0] == str(inspect(cl.path).sectors_allocated)
    assert _read(kernel_dm.device_path(f"{tag}-s")) == snap_view
    assert _read(ol.path) == origin_view


def test_kernel_reads_a_cow_written_through_our_node(kernel_dm: Any, exposed_engine: Engine, tmp_path: Path,
                                                     make_loop: Callable[..., Any], tag: str) -> None:
    """First writes of 4 and 8 KiB through the exposed origin (the FUSE worker's copies and
    commits in C, several concurrent writers): the kernel's ``snapshot`` reads the COW the same."""
    import threading

    rng = random.Random(5)
    data = rng.randbytes(SIZE)
    origin = tmp_path / "dmtt-origin.img"
    origin.write_bytes(data)
    cow = tmp_path / "dmtt-cow.img"
    with open(cow, "wb") as f:
        f.truncate(COW_SIZE)
    eng = exposed_engine
    eng.create("vol", f"0 {SIZE // 512} linear {origin} 0")
    mgr = SnapshotManager(eng)
    mgr.create("vol", str(cow), "s", chunk_size=8)
    node = eng.device_path("vol")
    chunks = rng.sample(range(SIZE // 4096 - 1), 300)
    writes = [(c * 4096, rng.randbytes(4096 * rng.choice([1, 1, 2]))) for c in chunks]
    for off, buf in writes[:4]:  # (the first ones arm C: the store zeroes ahead in Python)
        write_direct(node, buf, off)

    def run(k: int) -> None:
        for off, buf in writes[4 + k :: 4]:
            write_direct(node, buf, off)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert eng.exposure is not None and eng.exposure.fast_stats("vol")["first_writes"] > 100
    origin_view = read_direct(node, SIZE, 0)
    assert read_direct(eng.device_path("s"), SIZE, 0) == data
    mgr.remove("s")
    eng.remove("vol")
    _kernel_reads(kernel_dm, make_loop, tag, (origin, cow, 8), origin_view, data)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_we_read_the_kernels_cow(kernel_dm: Any, tmp_path: Path, make_loop: Callable[..., Any], tag: str, chunk: int) -> None:
    rng = random.Random(2)
    origin = tmp_path / "dmtt-origin.img"
    origin.write_bytes(rng.randbytes(SIZE))
    cow = tmp_path / "dmtt-cow.img"
    with open(cow, "wb") as f:
        f.truncate(COW_SIZE)
    ol, cl = make_loop(origin), make_loop(cow)
    vol = f"{tag}-vol"
    kernel_dm.create(vol, f"0 {SIZE // 512} linear {ol.path} 0")
    mgr = SnapshotManager(kernel_dm)
    info = mgr.create(vol, cl.path, f"{tag}-s", chunk_size=chunk)
    assert info.status.format() == f"{2 * chunk}/{COW_SIZE // 512} {2 * chunk}"
    for to_snap, off, data in _workload(rng):
        write_synced(kernel_dm.device_path(f"{tag}-s" if to_snap else vol), data, off)
    snap_view = _read(kernel_dm.device_path(f"{tag}-s"))
    origin_view = _read(kernel_dm.device_path(vol))
    kernel_status = kernel_dm.status(f"{tag}-s")[0].params
    mgr.remove(f"{tag}-s")
    # offline export of the kernel's COW
    export(ol.path, cl.path, tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == snap_view
    info2 = inspect(cl.path)
    assert info2.status == kernel_status and info2.chunk_size == chunk
    # our userspace target on the same COW
    kernel_dm.remove(vol, retry=True)  # udev may still be probing what we wrote
    eng = Engine()
    try:
        eng.create("vol", f"0 {SIZE // 512} linear {ol.path} 0")
        SnapshotManager(eng).activate("vol", cl.path, "s")
        assert eng.status("s")[0].params == kernel_status
        buf = bytearray(SIZE)
        with eng.open_endpoint("s", writable=False) as ep:
            ep.readinto(buf, 0)
        assert bytes(buf) == snap_view
        with eng.open_endpoint("vol", writable=False) as ep:
            ep.readinto(buf, 0)
        assert bytes(buf) == origin_view
    finally:
        eng.close()


@pytest.mark.parametrize("chunk", CHUNKS)
def test_kernel_merges_our_cow(kernel_dm: Any, tmp_path: Path, make_loop: Callable[..., Any], tag: str, chunk: int) -> None:
    _, snap_view, origin, cow = _userspace_stack(tmp_path, chunk, 3)
    ol, cl = make_loop(origin), make_loop(cow)
    vol = f"{tag}-vol"
    kernel_dm.create(vol, f"0 {SIZE // 512} linear {ol.path} 0")
    mgr = SnapshotManager(kernel_dm)
    mgr.activate(vol, cl.path, f"{tag}-s")
    seen: list[tuple[int, int]] = []
    mgr.merge(f"{tag}-s", progress=lambda d, t: seen.append((d, t)), timeout=120)
    assert _read(kernel_dm.device_path(vol)) == snap_view
    assert kernel_dm.table(vol).lines[0].target.target_type == "linear"
    assert seen[-1][0] == seen[-1][1]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_manager_on_the_kernel(kernel_dm: Any, tmp_path: Path, make_loop: Callable[..., Any], tag: str, chunk: int) -> None:
    rng = random.Random(4)
    data = rng.randbytes(SIZE)
    origin = tmp_path / "dmtt-origin.img"
    origin.write_bytes(data)
    ol = make_loop(origin)
    cows = []
    for i in range(2):
        p = tmp_path / f"dmtt-cow{i}.img"
        with open(p, "wb") as f:
            f.truncate(COW_SIZE)
        cows.append(make_loop(p))
    vol = f"{tag}-vol"
    kernel_dm.create(vol, f"0 {SIZE // 512} linear {ol.path} 0")
    mgr = SnapshotManager(kernel_dm)
    mgr.create(vol, cows[0].path, f"{tag}-a", chunk_size=chunk)
    assert kernel_dm.table(vol).lines[0].target.target_type == "snapshot-origin"
    write_synced(kernel_dm.device_path(vol), b"K" * 65536, 0)
    after = _read(kernel_dm.device_path(vol))
    mgr.create(vol, cows[1].path, f"{tag}-b", chunk_size=chunk)  # taken after the write
    infos = {i.name: i for i in mgr.list()}
    used = 2 * chunk + max(1, 65536 // (chunk * 512)) * chunk
    assert infos[f"{tag}-a"].status.format() == f"{used}/{COW_SIZE // 512} {2 * chunk}"
    assert infos[f"{tag}-a"].status.format() == kernel_dm.status(f"{tag}-a")[0].params
    mgr.merge(f"{tag}-a", timeout=120)
    assert _read(kernel_dm.device_path(vol)) == data
    assert _read(kernel_dm.device_path(f"{tag}-b")) == after
    assert kernel_dm.table(vol).lines[0].target.target_type == "snapshot-origin"
    mgr.remove(f"{tag}-b")
    assert kernel_dm.table(vol).lines[0].target.target_type == "linear"
    assert sorted(e.name for e in kernel_dm.list() if e.name.startswith(tag)) == [vol]


def test_bad_tables_give_the_kernels_words(kernel_dm: Any, make_image: Callable[..., Path],
                                           make_loop: Callable[..., Any], tag: str) -> None:
    """Both engines refuse the same bad snapshot tables with dm-snap.c's ``ti->error`` text: the value
    types' texts (the same on both, nothing reaches a device) and the drivers' device checks."""
    ol = make_loop(make_image(SIZE, name="o"))
    cl = make_loop(make_image(COW_SIZE, name="c"))
    c4k = make_loop(make_image(COW_SIZE, name="c4k"), block_size=4096)
    by_value = [f"{ol.devno} {cl.devno} X 8", f"{ol.devno} {cl.devno} P 12", f"{ol.devno} {cl.devno} P 8 1 bogus"]
    by_driver = {f"{ol.devno} {ol.path} P 8": "snapshot: COW device cannot be the same as origin device",
                 f"{ol.devno} {c4k.devno} P 1": "snapshot: Couldn't create exception store"}
    eng = Engine()
    try:
        for params in [*by_value, *by_driver]:
            table = f"0 {SIZE // 512} snapshot {params}"
            with pytest.raises(InvalidTable) as ours:
                eng.create("bad", table)
            with pytest.raises(InvalidTable) as kernels:
                kernel_dm.create(f"{tag}-bad", table)
            if params in by_driver:
                words = by_driver[params]
                assert ours.value.message.startswith(words) and words in kernels.value.message, params
            else:
                assert ours.value.message == kernels.value.message, params
            assert not eng.exists("bad") and not kernel_dm.exists(f"{tag}-bad")
    finally:
        eng.close()
    for cow in (cl, c4k):  # nothing was written to the COWs
        with open(cow.path, "rb") as f:
            assert f.read(4096) == bytes(4096)


def test_a_change_waits_for_the_origins_lock(kernel_dm: Any, tmp_path: Path, make_image: Callable[..., Path],
                                             make_loop: Callable[..., Any], tag: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel backend's managers share the origin's lock in the run directory: while one
    holds it (another process's change, as an LVM command holds the VG lock), a create of the
    same origin waits on it (seen in /proc/locks), then goes through."""
    import os
    import threading
    import time

    monkeypatch.setenv("DMTOOLS_RUN_DIR", str(tmp_path / "run"))
    ol, cl = make_loop(make_image(SIZE, name="o")), make_loop(make_image(COW_SIZE, name="c"))
    vol = f"{tag}-vol"
    kernel_dm.create(vol, f"0 {SIZE // 512} linear {ol.path} 0")
    holder, mgr = SnapshotManager(kernel_dm), SnapshotManager(kernel_dm)
    errors: list[BaseException] = []

    def create() -> None:
        try:
            mgr.create(vol, cl.path, f"{tag}-s")
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    with holder.origin_lock(vol):
        ino = f":{os.stat(Path(holder.lock_directory()) / f'snapshot-origin.{vol}').st_ino} "
        worker = threading.Thread(target=create)
        worker.start()
        deadline = time.monotonic() + 60
        while True:
            with open("/proc/locks") as f:
                if any(" -> " in line and ino in line for line in f):
                    break
            assert worker.is_alive() and time.monotonic() < deadline
            time.sleep(0.001)
        assert not kernel_dm.exists(f"{tag}-s")
    worker.join(60)
    assert errors == [] and kernel_dm.table(vol).lines[0].target.target_type == "snapshot-origin"
    mgr.remove(f"{tag}-s")
    assert sorted(e.name for e in kernel_dm.list() if e.name.startswith(tag)) == [vol]


@pytest.mark.parametrize("case", ["long cow uuid", "cow uuid taken"])
def test_a_cow_uuid_that_cannot_be_had_leaves_the_cow_alone(kernel_dm: Any, make_image: Callable[..., Path],
                                                            make_loop: Callable[..., Any], tag: str, case: str) -> None:
    """On the kernel backend too, ``create`` refuses a ``NAME-cow`` uuid (``ORIGIN_UUID-NAME-cow``)
    over 128 bytes or one a live device has (its uuid as the kernel lists it) before it zeroes
    the COW's header."""
    from dmtools.errors import DeviceExists, InvalidName

    ol, cl = make_loop(make_image(SIZE, name="o")), make_loop(make_image(COW_SIZE, name="c", fill=b"\x5a"))
    vol, uuid = f"{tag}-vol", f"{tag}-U" + ("u" * 90 if case == "long cow uuid" else "")
    kernel_dm.create(vol, f"0 {SIZE // 512} linear {ol.path} 0", uuid=uuid)
    name = f"{tag}-" + ("p" * 40 if case == "long cow uuid" else "a-b")
    if case == "cow uuid taken":  # what origin UUID-a's snapshot b would have
        kernel_dm.create(f"{tag}-b-cow", "0 8 zero", uuid=f"{uuid}-{tag}-a-b-cow")
    with pytest.raises(InvalidName if case == "long cow uuid" else DeviceExists):
        SnapshotManager(kernel_dm).create(vol, cl.path, name)
    with open(cl.path, "rb") as f:
        assert f.read(4096) == b"\x5a" * 4096
    assert kernel_dm.table(vol).lines[0].target.target_type == "linear" and not kernel_dm.exists(f"{name}-cow")
