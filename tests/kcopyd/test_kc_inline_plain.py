"""``Client.run``'s copy in C (kcopyd.inline._plain_copy, fastio.c ``dmk_copy``) against its Python
lean path: the same jobs on fresh files give the same bytes, job fields, progress and errors; and
whatever is not plain (a suspend gate, a wrapper, a region past an end, regions sharing bytes)
takes the Python path."""

from __future__ import annotations

import os
import resource
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kcopyd
import kcopyd.inline as inline
from dmtools.blockdev import BlockDevice
from dmtools.endpoint import Endpoint, ForwardingEndpoint
from dmtools.engine.backing import DIRECT_MIN, BackingDevice
from dmtools.errors import InvalidArgument
from dmtools.testing.faults import FaultyEndpoint
from kc_helpers import TIMEOUT, pattern

FILE = 256 * 1024
JOB = 64 * 1024
S = JOB // 512  # sectors of a job


class Spy:
    """The C functions, with each answer of ``dmk_copy``/``dmk_copy1`` recorded (-1: handed back)."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.answers: list[int] = []

    def dmk_copy1(self, *args: Any) -> int:
        self.answers.append(int(self.lib.dmk_copy1(*args)))
        return self.answers[-1]

    def dmk_copy(self, *args: Any) -> int:
        self.answers.append(int(self.lib.dmk_copy(*args)))
        return self.answers[-1]


class RawFd(Endpoint):
    """A descriptor used as it is: plain for kcopyd, and its own ``readinto``/``write`` are one
    system call each on it (left short when short), so both paths meet the same errors."""

    def __init__(self, path: Path, flags: int) -> None:
        self.fd = os.open(path, flags | os.O_CLOEXEC)
        self.name = str(path)

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def readinto(self, buf: Any, offset: int) -> int:
        return os.preadv(self.fd, [buf], offset)

    def write(self, buf: Any, offset: int) -> int:
        return os.pwrite(self.fd, buf, offset)

    def plain_fd(self, length: int, write: bool) -> int:
        return self.fd

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def clib() -> Any:
    lib = inline._c_functions()
    assert lib, "the fastio library could not be built (see the log): this host has a C compiler"
    return lib


Build = Callable[[Path], dict[str, Endpoint]]
Job = Callable[[kcopyd.Client, dict[str, Endpoint]], kcopyd.Job]


def files(*names: str, raw: dict[str, int] | None = None) -> Build:
    """Files of ``FILE`` bytes (``pattern`` with a seed per file), opened as ``BlockDevice``s, or as
    :class:`RawFd` with the open flags given in ``raw``."""
    def build(d: Path) -> dict[str, Endpoint]:
        eps: dict[str, Endpoint] = {}
        for i, name in enumerate(names):
            path = d / f"{name}.img"
            if not path.exists():
                path.write_bytes(pattern(FILE, seed=i + 1))
            if raw and name in raw:
                eps[name] = RawFd(path, raw[name])
            else:
                eps[name] = BlockDevice(path, writable=True)
        return eps
    return build


def outcome(tmp: Path, build: Build, job: Job, *, kc: kcopyd.Client | None = None) -> dict[str, Any]:
    """Run ``job`` on fresh files in ``tmp``: the job's fields (or the error raised) and every file."""
    tmp.mkdir(parents=True)
    eps = build(tmp)
    client = kc or kcopyd.Client(num_pages=64, threads=2)
    before = client.progress
    try:
        try:
            j = job(client, eps)
            res: dict[str, Any] = {"fields": (j.ok, j.read_err, j.write_err, j.flags, j.progress, j.done)}
        except InvalidArgument as err:
            res = {"raised": (type(err), str(err).replace(str(tmp), "TMP"))}
        res["progress"] = kcopyd.Progress(client.progress.done - before.done, client.progress.total - before.total)
    finally:
        for ep in eps.values():
            ep.close()
        if kc is None:
            client.destroy()
    res["files"] = {p.name: p.read_bytes() for p in sorted(tmp.iterdir())}
    return res


def both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clib: Any, build: Build, job: Job,
         **kw: Any) -> tuple[dict[str, Any], list[int]]:
    """The outcome of ``job`` through C (the answers ``dmk_copy`` gave) and through Python, checked
    equal; returns the C one."""
    spy = Spy(clib)
    monkeypatch.setattr(inline, "_clib", spy)
    in_c = outcome(tmp_path / "c", build, job, **kw)
    monkeypatch.setattr(inline, "_clib", False)
    in_python = outcome(tmp_path / "py", build, job, **kw)
    assert in_c == in_python
    return in_c, spy.answers


def region(ep: Endpoint, block: int, count: int = S) -> kcopyd.Region:
    return kcopyd.Region(ep, block * S, count)


@pytest.mark.parametrize("shape", ["within one endpoint", "to another file", "to three destinations",
                                   "two endpoints on one file"])
def test_copies_match_the_python_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clib: Any,
                                      shape: str) -> None:
    def job(kc: kcopyd.Client, e: dict[str, Endpoint]) -> kcopyd.Job:
        if shape == "within one endpoint":  # a thin pool breaking sharing of a block
            return kc.run(region(e["a"], 1), region(e["a"], 3))
        if shape == "to another file":
            return kc.run(region(e["a"], 0), [region(e["b"], 2)], kcopyd.WRITE_SEQ | kcopyd.IGNORE_ERROR)
        if shape == "to three destinations":
            return kc.run(region(e["a"], 2), [region(e["b"], 0), region(e["a"], 0), region(e["b"], 3)])
        twin = BlockDevice(e["a"].name, writable=True)
        e["twin"] = twin  # closed with the others
        return kc.run(region(e["a"], 0), [region(twin, 2)])

    res, answers = both(tmp_path, monkeypatch, clib, files("a", "b"), job)
    assert answers == [0]  # done in C, every destination written
    a, b = pattern(FILE, seed=1), pattern(FILE, seed=2)
    blk = slice(0, JOB)
    want = {"within one endpoint": {"a.img": a[:3 * JOB] + a[JOB:2 * JOB], "b.img": b},
            "to another file": {"a.img": a, "b.img": b[:2 * JOB] + a[blk] + b[3 * JOB:]},
            "to three destinations": {"a.img": a[2 * JOB:3 * JOB] + a[JOB:],
                                      "b.img": a[2 * JOB:3 * JOB] + b[JOB:3 * JOB] + a[2 * JOB:3 * JOB]},
            "two endpoints on one file": {"a.img": a[:2 * JOB] + a[blk] + a[3 * JOB:], "b.img": b}}[shape]
    assert res["files"] == want
    flags = kcopyd.WRITE_SEQ if shape == "to another file" else 0  # WRITE_SEQ clears IGNORE_ERROR
    assert res["fields"] == (True, False, 0, flags, kcopyd.Progress(JOB, JOB), True)
    assert res["progress"] == kcopyd.Progress(JOB, JOB)


def test_short_reads_and_writes_are_continued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clib: Any) -> None:
    clib.dmk_set_max_io(1000)  # every pread/pwrite of C gives at most 1000 bytes: 66 of each per copy
    try:
        res, answers = both(tmp_path, monkeypatch, clib, files("a", "b"),
                            lambda kc, e: kc.run(region(e["a"], 1), [region(e["b"], 0), region(e["b"], 2)]))
    finally:
        clib.dmk_set_max_io(0)
    a, b = pattern(FILE, seed=1), pattern(FILE, seed=2)
    assert answers == [0]
    assert res["files"]["b.img"] == a[JOB:2 * JOB] + b[JOB:2 * JOB] + a[JOB:2 * JOB] + b[3 * JOB:]


def test_a_short_write_then_an_error_fails_that_destination_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 clib: Any) -> None:
    """RLIMIT_FSIZE makes the kernel write part of a request past it short and refuse the rest
    (EFBIG): the destination there fails after its first bytes are written, the other is written."""
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN  # Python's default: EFBIG, no signal
    limit = 3 * JOB + 1536

    def job(kc: kcopyd.Client, e: dict[str, Endpoint]) -> kcopyd.Job:
        old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
        try:
            return kc.run(region(e["a"], 0), [region(e["b"], 3), region(e["b"], 1)])
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)

    res, answers = both(tmp_path, monkeypatch, clib, files("a", "b"), job)
    assert answers == [0b01]
    a, b = pattern(FILE, seed=1), pattern(FILE, seed=2)
    assert res["fields"] == (False, False, 0b01, 0, kcopyd.Progress(JOB, JOB), True)
    assert res["files"]["b.img"] == b[:JOB] + a[:JOB] + b[2 * JOB:3 * JOB] + a[:1536] + b[3 * JOB + 1536:]


def test_a_source_read_error_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clib: Any) -> None:
    build = files("a", "b", raw={"a": os.O_WRONLY})  # pread fails: EBADF
    res, answers = both(tmp_path, monkeypatch, clib, build, lambda kc, e: kc.run(region(e["a"], 0), region(e["b"], 1)))
    assert answers == [-2]
    assert res["fields"] == (False, True, 0, 0, kcopyd.Progress(0, JOB), True)
    assert res["files"] == {"a.img": pattern(FILE, seed=1), "b.img": pattern(FILE, seed=2)}


def test_a_source_read_error_with_ignore_error_is_salvaged_in_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     clib: Any) -> None:
    build = files("a", "b", raw={"a": os.O_WRONLY})
    res, answers = both(tmp_path, monkeypatch, clib, build,
                        lambda kc, e: kc.run(region(e["a"], 0), region(e["b"], 1), kcopyd.IGNORE_ERROR))
    assert answers == [-1]  # handed back before any write: the Python path zero-fills what it cannot read
    b = pattern(FILE, seed=2)
    assert res["fields"] == (False, True, 0, kcopyd.IGNORE_ERROR, kcopyd.Progress(JOB, JOB), True)
    assert res["files"]["b.img"] == b[:JOB] + bytes(JOB) + b[2 * JOB:]


def test_one_failing_destination_sets_its_bit_and_the_others_are_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clib: Any) -> None:
    build = files("a", "b", "c", raw={"b": os.O_RDONLY})  # pwrite fails: EBADF
    res, answers = both(tmp_path, monkeypatch, clib, build,
                        lambda kc, e: kc.run(region(e["a"], 1), [region(e["c"], 0), region(e["b"], 0),
                                                                 region(e["c"], 2)]))
    assert answers == [0b010]
    a, c = pattern(FILE, seed=1), pattern(FILE, seed=3)
    assert res["fields"] == (False, False, 0b010, 0, kcopyd.Progress(JOB, JOB), True)
    assert res["files"] == {"a.img": a, "b.img": pattern(FILE, seed=2),
                            "c.img": a[JOB:2 * JOB] + c[JOB:2 * JOB] + a[JOB:2 * JOB] + c[3 * JOB:]}


@pytest.mark.parametrize("where", ["source", "destination"])
def test_ranges_at_and_past_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clib: Any, where: str) -> None:
    last = FILE // 512 - S

    def job(past: int) -> Job:
        def run(kc: kcopyd.Client, e: dict[str, Endpoint]) -> kcopyd.Job:
            src, dst = kcopyd.Region(e["a"], 0, S), kcopyd.Region(e["b"], 0, S)
            if where == "source":
                src = kcopyd.Region(e["a"], last + past, S)
            else:
                dst = kcopyd.Region(e["b"], last + past, S)
            return kc.run(src, dst)
        return run

    res, answers = both(tmp_path / "end", monkeypatch, clib, files("a", "b"), job(0))
    assert answers == [0] and res["fields"][0]  # ends at the end: done in C
    res, answers = both(tmp_path / "past", monkeypatch, clib, files("a", "b"), job(1))
    assert answers == [-1]  # one sector past: handed back, and refused as the Python path refuses it
    assert res["raised"][0] is InvalidArgument and "ends beyond the device" in res["raised"][1]
    assert res["files"] == {"a.img": pattern(FILE, seed=1), "b.img": pattern(FILE, seed=2)}
    assert res["progress"] == kcopyd.Progress(0, 0)


@pytest.mark.parametrize("case", ["memmove forward", "memmove backward", "destinations overlap",
                                  "destinations overlap through two endpoints"])
def test_regions_sharing_bytes_take_the_python_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clib: Any,
                                                    case: str) -> None:
    def job(kc: kcopyd.Client, e: dict[str, Endpoint]) -> kcopyd.Job:
        a = e["a"]
        if case == "memmove forward":
            return kc.run(kcopyd.Region(a, 8, S), kcopyd.Region(a, 0, S))
        if case == "memmove backward":
            return kc.run(kcopyd.Region(a, 0, S), kcopyd.Region(a, 8, S))
        if case == "destinations overlap":
            return kc.run(kcopyd.Region(e["b"], 0, S), [kcopyd.Region(a, 0, S), kcopyd.Region(a, S - 1, S)])
        twin = BlockDevice(a.name, writable=True)
        e["twin"] = twin
        return kc.run(kcopyd.Region(e["b"], 0, S), [kcopyd.Region(a, 0, S), kcopyd.Region(twin, S - 1, S)])

    res, answers = both(tmp_path, monkeypatch, clib, files("a", "b"), job)
    assert answers == [-1]
    a = pattern(FILE, seed=1)
    if case.startswith("memmove"):
        src, dst = (8 * 512, 0) if case == "memmove forward" else (0, 8 * 512)
        want = bytearray(a)
        want[dst:dst + JOB] = a[src:src + JOB]
        assert res["files"]["a.img"] == bytes(want) and res["fields"][0]
    else:
        assert res["raised"][0] is InvalidArgument and "share bytes" in res["raised"][1]
        assert res["files"]["a.img"] == a


def test_a_throttled_client_copies_in_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clib: Any) -> None:
    kc = kcopyd.Client(num_pages=64, threads=2, rate=1 << 30)
    try:
        res, answers = both(tmp_path, monkeypatch, clib, files("a", "b"),
                            lambda kc, e: kc.run(region(e["a"], 0), region(e["b"], 0)), kc=kc)
    finally:
        kc.destroy()
    assert answers == [] and res["fields"][0]


def test_plain_fd_says_plain_only_for_plain_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(bytes(FILE))
    with BlockDevice(path, writable=True) as rw, BlockDevice(path) as ro, BlockDevice(path, direct=True) as odirect:
        fd = rw.fileno()
        assert rw.plain_fd(JOB, True) == fd and rw.plain_fd(JOB, False) == fd
        assert ro.plain_fd(JOB, True) == -1 and ro.plain_fd(JOB, False) == ro.fileno()
        assert odirect.plain_fd(JOB, False) == -1  # alignment rules: not plain
        assert ForwardingEndpoint(rw).plain_fd(JOB, True) == fd
        assert FaultyEndpoint(rw).plain_fd(JOB, False) == -1

        class Counting(ForwardingEndpoint):
            def write(self, buf: Any, offset: int) -> int:
                return self.inner.write(buf, offset)

        assert Counting(rw).plain_fd(JOB, True) == -1  # a wrapper with its own I/O is never bypassed
        probed = ForwardingEndpoint(rw)
        monkeypatch.setattr(probed, "write", rw.write)  # a test's probe on the instance
        assert probed.plain_fd(JOB, True) == -1
    assert rw.plain_fd(JOB, True) == -1  # closed
    backing = BackingDevice(str(path), writable=True)
    try:
        assert backing.plain_fd(DIRECT_MIN - 512, True) == backing.fileno()
        assert backing.plain_fd(DIRECT_MIN, False) == backing.fileno()
        # big writes go through its O_DIRECT twin (when the file system has O_DIRECT)
        assert backing.plain_fd(DIRECT_MIN, True) == (-1 if backing.direct_fileno() else backing.fileno())
    finally:
        backing.close()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Any]:
    from dmtools.engine import Engine

    dm = Engine()
    try:
        yield dm
    finally:
        dm.close()


def test_a_suspended_engine_device_holds_the_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clib: Any,
                                                  engine: Any) -> None:
    """An engine device's endpoint passes its suspend gate: never plain, so a copy to it waits in
    the Python path until the device resumes."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(pattern(FILE, seed=1))
    b.write_bytes(pattern(FILE, seed=2))
    engine.create("kc5lin", f"0 {FILE // 512} linear {b} 0")
    spy = Spy(clib)
    monkeypatch.setattr(inline, "_clib", spy)
    with BlockDevice(a) as src, engine.open_endpoint("kc5lin") as dev, kcopyd.Client(num_pages=64, threads=2) as kc:
        assert dev.plain_fd(JOB, True) == -1 and dev.plain_fd(JOB, False) == -1
        engine.suspend("kc5lin")
        jobs: list[kcopyd.Job] = []
        copier = threading.Thread(target=lambda: jobs.append(kc.run(region(src, 1), region(dev, 2))))
        copier.start()
        copier.join(0.3)
        held = copier.is_alive()
        engine.resume("kc5lin")
        copier.join(TIMEOUT)
        assert held and jobs and jobs[0].ok
        dev.flush()
    engine.remove("kc5lin")
    assert spy.answers == []
    want = pattern(FILE, seed=2)
    assert b.read_bytes() == want[:2 * JOB] + pattern(FILE, seed=1)[JOB:2 * JOB] + want[3 * JOB:]


def test_thin_copies_an_external_origin_block_in_c(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clib: Any,
                                                  engine: Any) -> None:
    """A partial write to an unprovisioned block of a thin device with an external origin copies
    the origin's block in C (the origin and the data device are plain files); the origin keeps
    its bytes. (A shared block's copy is the thin target's own: tests/thin/test_target_break_sharing.py.)"""
    meta, data, origin = tmp_path / "meta", tmp_path / "data", tmp_path / "origin"
    meta.write_bytes(bytes(4 << 20))
    data.write_bytes(bytes(8 << 20))
    old = pattern(FILE, seed=4)
    origin.write_bytes(old)
    engine.create("kc5pool", f"0 {(8 << 20) // 512} thin-pool {meta} {data} 128 0")
    engine.message("kc5pool", 0, "create_thin 0")
    engine.create("kc5thin", f"0 {FILE // 512} thin {engine.device_ref('kc5pool')} 0 {origin}")
    spy = Spy(clib)
    monkeypatch.setattr(inline, "_clib", spy)
    with engine.open_endpoint("kc5thin") as ep:
        ep.write(b"x" * 4096, JOB + 8192)
        ep.flush()
        got = bytearray(FILE)
        ep.readinto(got, 0)
    assert spy.answers == [0]
    assert bytes(got) == old[:JOB + 8192] + b"x" * 4096 + old[JOB + 12288:]
    assert origin.read_bytes() == old
    for name in ("kc5thin", "kc5pool"):
        engine.remove(name)


@pytest.mark.root
def test_a_block_device_end_is_its_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clib: Any,
                                        make_dev: Any) -> None:
    """On a block device the end C checks is BLKGETSIZE64's: a job ending there is copied in C,
    one past it is refused as the Python path refuses it; a zoned one is written in Python, in
    order (WRITE_SEQ)."""
    loop = make_dev("loop", FILE, pattern(FILE, seed=5))
    spy = Spy(clib)
    monkeypatch.setattr(inline, "_clib", spy)
    last = FILE // 512 - S
    with BlockDevice(loop.path, writable=True) as dev, kcopyd.Client(num_pages=64, threads=2) as kc:
        assert kc.run(kcopyd.Region(dev, 0, S), kcopyd.Region(dev, last, S)).ok
        with pytest.raises(InvalidArgument, match="ends beyond the device"):
            kc.run(kcopyd.Region(dev, 0, S), kcopyd.Region(dev, last + 1, S))
        dev.__dict__["_zoned"] = True  # what sysfs says of a zoned device (read once per endpoint)
        assert dev.plain_fd(JOB, True) == -1 and dev.plain_fd(JOB, False) == dev.fileno()
        job = kc.run(kcopyd.Region(dev, 0, S), kcopyd.Region(dev, last, S), kcopyd.IGNORE_ERROR)
        assert job.ok and job.flags == kcopyd.WRITE_SEQ  # forced in Python for the zoned destination
        dev.flush()
    assert spy.answers == [0, -1]  # the zoned destination's job is not asked of C
    data = pattern(FILE, seed=5)
    assert loop.read() == data[:FILE - JOB] + data[:JOB]


def test_jobs_of_several_sizes_in_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clib: Any) -> None:
    """A small job after a large one, and a large one after a small one, each copy their own bytes
    in C (each has a buffer of its size)."""
    big = 512 * 1024
    path = tmp_path / "f.img"
    data = pattern(4 * big, seed=7)
    path.write_bytes(data)
    spy = Spy(clib)
    monkeypatch.setattr(inline, "_clib", spy)
    with BlockDevice(path, writable=True) as ep, kcopyd.Client(num_pages=64, threads=2) as kc:
        for n, src, dst in ((JOB, 0, 3 * big), (big, big, 2 * big), (JOB, 2 * big + JOB, big)):
            assert kc.run(kcopyd.Region(ep, src // 512, n // 512), kcopyd.Region(ep, dst // 512, n // 512)).ok
    assert spy.answers == [0, 0, 0]
    want = bytearray(data)
    want[3 * big:3 * big + JOB] = data[:JOB]
    want[2 * big:3 * big] = data[big:2 * big]
    want[big:big + JOB] = want[2 * big + JOB:2 * big + 2 * JOB]
    assert path.read_bytes() == bytes(want)
