"""Root tier: the exposure's C data path (``dmtools.engine.fastpath``) through real loop devices and
FUSE: taken (its counters), the same bytes as the Python path, held by suspend, switched by a
reload at resume, EIO from a failing backing device, and removal still refused while open."""

from __future__ import annotations

import errno
import os
import random
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmtools._ffi import fastio
from dmtools.blockdev import aligned_buffer
from dmtools.engine import Engine
from dmtools.errors import DeviceBusy
from dmtools.testing.blockio import read_direct as _pread
from dmtools.testing.blockio import write_direct as _pwrite
from dmtools.testing.threads import Worker
from dmtools.testing.wait import wait_until

pytestmark = pytest.mark.root

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _built() -> None:
    if fastio.load() is None:
        pytest.skip(f"the C fast path cannot be built here: {fastio.unavailable()} "
                    "(scripts/setup-env installs gcc)")


def _engine(run_dir: str) -> Iterator[Engine]:
    eng = Engine(expose=True, run_dir=run_dir)
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture
def xengine(tmp_path: Path) -> Iterator[Engine]:
    yield from _engine(str(tmp_path / "run"))


def _stats(eng: Engine, name: str) -> dict[str, int]:
    assert eng.exposure is not None
    return eng.exposure.fast_stats(name)


def _flush(dev: str) -> None:
    """Flush ``dev`` (a durable write's flush: the engine's targets flush their devices)."""
    fd = os.open(dev, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file(path: Path, size: int) -> str:
    path.write_bytes(os.urandom(size))
    return str(path)


def _ops(seed: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of writes of every size FUSE sees, 512-aligned, some crossing chunks."""
    rng = random.Random(seed)
    out = []
    for _ in range(60):
        n = rng.choice([512, 4096, 8192, 65536, 3 * 65536 + 512, MiB])
        out.append((rng.randrange(0, (size - n) // 512 + 1) * 512, n))
    return out


def test_c_path_moves_the_same_bytes_as_the_python_path(tmp_path, monkeypatch):
    tables = {}
    seed = os.urandom(4 * MiB)
    for variant in ("c", "py"):
        d = tmp_path / variant
        d.mkdir()
        for name in ("lin", "a", "b"):
            (d / f"{name}.img").write_bytes(seed)
        tables[variant] = {
            "lin": f"0 8192 linear {d / 'lin.img'} 0",
            "str": f"0 8192 striped 2 128 {d / 'a.img'} 0 {d / 'b.img'} 0",
        }
    engines = {}
    gens = []
    try:
        for variant in ("c", "py"):
            if variant == "py":
                monkeypatch.setenv("DMTOOLS_FAST_IO", "0")  # read when the FUSE mount starts
            gen = _engine(str(tmp_path / f"run-{variant}"))
            gens.append(gen)
            eng = engines[variant] = next(gen)
            for name, table in tables[variant].items():
                eng.create(f"{name}-{variant}-dmtt", table)
        for name in ("lin", "str"):
            for off, n in _ops(hash(name) & 0xFFFF, 4 * MiB):
                data = os.urandom(n)
                for variant, eng in engines.items():
                    dev = eng.device_path(f"{name}-{variant}-dmtt")
                    _pwrite(dev, data, off)
                    assert _pread(dev, n, off) == data
            c_dev = engines["c"].device_path(f"{name}-c-dmtt")
            py_dev = engines["py"].device_path(f"{name}-py-dmtt")
            for off in range(0, 4 * MiB, MiB):
                assert _pread(c_dev, MiB, off) == _pread(py_dev, MiB, off)
            # the Python engine's own reads (Device.read) see what C wrote
            with engines["c"].open_endpoint(f"{name}-c-dmtt") as ep:
                got = bytearray(4 * MiB)
                ep.readinto(got, 0)
            assert bytes(got) == _pread(py_dev, 4 * MiB, 0)
            stats = _stats(engines["c"], f"{name}-c-dmtt")
            assert stats["writes"] >= 60 and stats["reads"] >= 60 and stats["errors"] == 0
            assert _stats(engines["py"], f"{name}-py-dmtt") == {}
        for name in ("lin", "a", "b"):
            assert (tmp_path / "c" / f"{name}.img").read_bytes() == \
                (tmp_path / "py" / f"{name}.img").read_bytes()
    finally:
        for gen in gens:
            gen.close()


def test_suspend_holds_c_writes_until_resume(xengine, tmp_path):
    img = _file(tmp_path / "s.img", 4 * MiB)
    xengine.create("sus-dmtt", f"0 8192 linear {img} 0")
    dev = xengine.device_path("sus-dmtt")
    _pwrite(dev, b"\1" * MiB, 0)
    assert _stats(xengine, "sus-dmtt")["writes"] >= 1
    xengine.suspend("sus-dmtt")
    before = _stats(xengine, "sus-dmtt")
    with open(img, "rb") as f:
        old = f.read(MiB)
    pattern = os.urandom(MiB)
    writer = Worker(_pwrite, dev, pattern, 0)
    # The request reached the C entry, found no map and went to Python, where the gate holds it.
    wait_until(lambda: _stats(xengine, "sus-dmtt")["fallbacks"] > before["fallbacks"], "the held write")
    assert writer.is_alive()
    with open(img, "rb") as f:
        assert f.read(MiB) == old
    assert _stats(xengine, "sus-dmtt")["writes"] == before["writes"]
    xengine.resume("sus-dmtt")
    writer.result(20)
    with open(img, "rb") as f:
        assert f.read(MiB) == pattern
    after = _stats(xengine, "sus-dmtt")["writes"]
    _pwrite(dev, pattern, MiB)
    assert _stats(xengine, "sus-dmtt")["writes"] > after  # C again after the resume


def test_reload_switches_maps_at_resume(xengine, tmp_path):
    old_img = _file(tmp_path / "old.img", 4 * MiB)
    new_img = _file(tmp_path / "new.img", 4 * MiB)
    xengine.create("rel-dmtt", f"0 8192 linear {old_img} 0")
    dev = xengine.device_path("rel-dmtt")
    stop = threading.Event()
    done: list[int] = []

    def write() -> None:
        buf = aligned_buffer(4096)
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        try:
            seq = 0
            while not stop.is_set():
                seq += 1
                buf[:8] = struct.pack("<Q", seq)
                assert os.pwritev(fd, [buf], 0) == 4096
                done.append(seq)
        finally:
            os.close(fd)

    writer = Worker(write)
    try:
        wait_until(lambda: len(done) >= 20, "writes to the old table")
        on_old = _stats(xengine, "rel-dmtt")  # then the count: a write counted before is in it
        count = len(done)
        xengine.load("rel-dmtt", f"0 8192 linear {new_img} 0")
        wait_until(lambda: len(done) >= count + 20, "writes while the new table waits")
        issued_before = done[-1]
        waiting = _stats(xengine, "rel-dmtt")
        xengine.resume("rel-dmtt")
        resumed = _stats(xengine, "rel-dmtt")
        with open(old_img, "rb") as f:
            old_seq = struct.unpack("<Q", f.read(8))[0]
        mark = len(done)
        wait_until(lambda: len(done) >= mark + 20, "writes to the new table")
        on_new = _stats(xengine, "rel-dmtt")
    finally:
        stop.set()
        writer.result(20)
    with open(old_img, "rb") as f:
        assert struct.unpack("<Q", f.read(8))[0] == old_seq  # nothing reached it after resume
    with open(new_img, "rb") as f:
        assert struct.unpack("<Q", f.read(8))[0] == done[-1]
    assert issued_before <= old_seq < done[-1]
    # C before the resume and from its return on (the map is installed by then): only the writes
    # of the resume itself, held by its suspend or issued before the gate's new map, ran in Python
    # (how many depends on the scheduler: 31 of 455 under load).
    assert on_old["writes"] >= 20 and waiting["fallbacks"] == on_old["fallbacks"]
    assert waiting["writes"] >= on_old["writes"] + 19
    assert on_new["fallbacks"] == resumed["fallbacks"] and on_new["writes"] >= resumed["writes"] + 19


@pytest.fixture
def lower(tmp_path: Path) -> Iterator[Engine]:
    """A second engine whose exposed device is the backing block device of the first's."""
    yield from _engine(str(tmp_path / "lower-run"))


def test_a_failing_backing_device_gives_eio(lower, xengine, tmp_path):
    lower.create("low-dmtt", f"0 8192 linear {_file(tmp_path / 'low.img', 4 * MiB)} 0")
    other = _file(tmp_path / "other.img", 4 * MiB)
    low = os.path.realpath(lower.device_path("low-dmtt"))
    xengine.create("up-dmtt", f"0 8192 linear {low} 0")
    xengine.create("ups-dmtt", f"0 8192 striped 2 128 {low} 0 {other} 0")
    up, ups = xengine.device_path("up-dmtt"), xengine.device_path("ups-dmtt")
    _pwrite(up, b"\2" * MiB, 0)
    assert _stats(xengine, "up-dmtt")["writes"] >= 1 and _stats(xengine, "up-dmtt")["errors"] == 0
    lower.load("low-dmtt", "0 8192 error")
    lower.resume("low-dmtt")
    for dev in (up, ups):
        with pytest.raises(OSError) as exc:
            _pread(dev, MiB, MiB)
        assert exc.value.errno == errno.EIO
        # A write reaches the device, or its page cache as the Python path's small writes do:
        # then its flush (a durable write flushes, drivers/block/loop.c) reports the error.
        with pytest.raises(OSError) as exc:
            _pwrite(dev, b"\3" * MiB, 2 * MiB, os.O_DSYNC)
        assert exc.value.errno == errno.EIO
    for name in ("up-dmtt", "ups-dmtt"):
        assert _stats(xengine, name)["errors"] >= 1  # tried in C, reported by Python
    assert xengine.status("ups-dmtt")[0].params.endswith("DA")  # counted per stripe, as before
    assert _pread(ups, 65536, 65536) == _pread(other, 65536, 0)  # the good stripe still reads


def test_remove_is_refused_while_the_device_is_open(xengine, tmp_path):
    xengine.create("open-dmtt", f"0 8192 linear {_file(tmp_path / 'o.img', 4 * MiB)} 0")
    dev = xengine.device_path("open-dmtt")
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    try:
        with pytest.raises(DeviceBusy):
            xengine.remove("open-dmtt")
        buf = aligned_buffer(65536)
        buf[:] = os.urandom(65536)
        writes = _stats(xengine, "open-dmtt")["writes"]
        assert os.pwritev(fd, [buf], 0) == 65536  # still served, in C
        assert _stats(xengine, "open-dmtt")["writes"] == writes + 1
    finally:
        os.close(fd)
    xengine.remove("open-dmtt")
    assert _stats(xengine, "open-dmtt") == {}


def test_read_only_device_reads_in_c_and_refuses_writes(xengine, tmp_path):
    data = os.urandom(4 * MiB)
    img = tmp_path / "ro.img"
    img.write_bytes(data)
    xengine.create("ro-dmtt", f"0 8192 linear {img} 0", readonly=True)
    dev = xengine.device_path("ro-dmtt")
    assert _pread(dev, MiB, MiB) == data[MiB : 2 * MiB]
    assert _stats(xengine, "ro-dmtt")["reads"] >= 1
    with pytest.raises(OSError) as exc:
        _pwrite(dev, b"\4" * MiB, 0)
    assert exc.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)  # by the loop device
    assert img.read_bytes() == data


def test_suspend_waits_for_the_c_request_in_flight(lower, xengine, tmp_path):
    low_img = tmp_path / "low2.img"
    low_img.write_bytes(bytes(4 * MiB))
    lower.create("low2-dmtt", f"0 8192 linear {low_img} 0")
    xengine.create("up2-dmtt", f"0 8192 linear {os.path.realpath(lower.device_path('low2-dmtt'))} 0")
    up = xengine.device_path("up2-dmtt")
    # the upper device's C writes (of DIRECT_MIN bytes or more) now wait inside the lower device
    lower.suspend("low2-dmtt")
    held = lower.exposure.fast_stats("low2-dmtt")["fallbacks"]  # type: ignore[union-attr]
    pattern = os.urandom(MiB)
    writer = Worker(_pwrite, up, pattern, 0)
    wait_until(lambda: lower.exposure.fast_stats("low2-dmtt")["fallbacks"] > held,  # type: ignore[union-attr]
           "the upper device's write to reach the suspended lower one")
    # noflush: nothing but the drain of I/O in flight holds the suspend (a flush would wait for
    # the lower device too)
    suspender = Worker(xengine.suspend, "up2-dmtt", noflush=True)
    suspender.join(0.5)
    assert suspender.is_alive()  # waiting for the C request in flight, not past it
    assert xengine.info("up2-dmtt").suspended
    lower.resume("low2-dmtt")
    suspender.result(20)
    # The loop device cuts the write where its 128 segments end (512 KiB to all of it, as the
    # pages lie): a piece reaching the upper device after its suspend began waits for the resume.
    xengine.resume("up2-dmtt")
    writer.result(20)
    # A piece under DIRECT_MIN went into the lower device's page cache (fastio.c run_flush, as
    # BackingDevice.write), done at once: durable, in the image, once flushed.
    _flush(up)
    assert low_img.read_bytes()[:MiB] == pattern


def _python_thread_states() -> int:
    """The thread states of this interpreter (CPython's list, walked with the GIL held)."""
    import ctypes

    api = ctypes.pythonapi
    api.PyThreadState_Get.restype = ctypes.c_void_p
    api.PyThreadState_GetInterpreter.restype = ctypes.c_void_p
    api.PyThreadState_GetInterpreter.argtypes = [ctypes.c_void_p]
    api.PyInterpreterState_ThreadHead.restype = ctypes.c_void_p
    api.PyInterpreterState_ThreadHead.argtypes = [ctypes.c_void_p]
    api.PyThreadState_Next.restype = ctypes.c_void_p
    api.PyThreadState_Next.argtypes = [ctypes.c_void_p]
    ts = api.PyInterpreterState_ThreadHead(api.PyThreadState_GetInterpreter(api.PyThreadState_Get()))
    n = 0
    while ts:
        n += 1
        ts = api.PyThreadState_Next(ts)
    return n


def test_each_worker_keeps_one_python_thread_state_for_its_life(tmp_path: Path) -> None:
    """The FUSE workers' Python callbacks find a thread state of their own (not one made and
    freed per request: ctypes's PyGILState_Ensure in a thread without one), freed when the
    session ends."""
    img = tmp_path / "low.img"
    with open(img, "wb") as f:
        f.truncate(MiB)
    before = _python_thread_states()
    eng = Engine(expose=True, run_dir=str(tmp_path / "run"))
    try:
        eng.create("low-dmtt", f"0 {MiB // 512} linear {img} 0")
        eng.create("top-dmtt", f"0 {MiB // 512} linear {eng.device_path('low-dmtt')} 0")
        _pwrite(eng.device_path("top-dmtt"), b"t" * 4096, 8192)  # (over an engine device: Python)
        assert _stats(eng, "top-dmtt")["fallbacks"] >= 1
        during = _python_thread_states()
    finally:
        eng.close()
    from dmtools.engine.expose import FUSE_THREADS

    assert during >= before + FUSE_THREADS  # (one per worker, and the session's own threads)
    assert _python_thread_states() == before
    assert img.read_bytes()[8192 : 8192 + 4096] == b"t" * 4096
