"""NbdEndpoint against real servers: sizes and flags, I/O, connections, extents, zeroing, flush."""

from __future__ import annotations

import errno
import functools
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from dmtools.errors import DeviceIOError, InvalidArgument
from dmtools.nbd import NbdConnectionError, NbdEndpoint, NbdUnavailable
from dmtools.testing.nbdserver import NbdServer
from dmtools.testing.threads import run_together

MiB = 1 << 20


def test_libnbd_is_libnbds() -> None:
    """The module named ``nbd`` is libnbd's (PyPI's ``nbd`` is an unrelated tool that would shadow it)."""
    from dmtools.nbd._lib import load

    try:
        nbd = load()
    except NbdUnavailable as err:
        pytest.skip(f"needs libnbd's Python bindings: {err}")
    assert nbd.NBD().get_version().startswith("1.")


def test_missing_bindings_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without libnbd an endpoint fails with one error naming the package to install."""
    from dmtools.nbd import _lib

    monkeypatch.setattr(_lib, "_module", None)
    monkeypatch.setitem(sys.modules, "nbd", None)  # import nbd → ImportError
    with pytest.raises(NbdUnavailable, match="python3-libnbd"):
        NbdEndpoint("nbd+unix:///?socket=/nonexistent")


def test_cli_missing_bindings_one_line(tmp_path: Path) -> None:
    """`dmtools copy` without libnbd: exit 1, one line naming python3-libnbd, no traceback."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "nbd.py").write_text("raise ImportError('hidden by the test')\n")
    src = tmp_path / "src.img"
    src.write_bytes(bytes(4096))
    env = dict(os.environ, PYTHONPATH=str(blocker))
    res = subprocess.run([sys.executable, "-m", "dmtools.cli.main", "copy", str(src),
                          "nbd+unix:///?socket=/nonexistent"], capture_output=True, text=True, env=env)
    assert res.returncode == 1
    assert "python3-libnbd" in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_connect_refused(tmp_path: Path) -> None:
    from dmtools.testing.nbdserver import missing_tools

    if missing_tools():
        pytest.skip(missing_tools())
    with pytest.raises(NbdConnectionError, match="cannot connect"):
        NbdEndpoint(f"nbd+unix:///?socket={tmp_path}/none.sock")


def test_refused_extra_connection_fails_the_endpoint(start_nbdkit: Callable[..., NbdServer]) -> None:
    """A server that takes three clients but advertises multi-conn: of the three extra connections,
    opened at once, one is refused; the endpoint is not made (all or nothing), with the server's
    refusal as the error, while three connections alone are fine."""
    srv = start_nbdkit(["memory", "64M", "limit=3"], filters=["limit"])
    with NbdEndpoint(srv.uri, connections=3) as ep:
        assert ep.connections == 3
    srv2 = start_nbdkit(["memory", "64M", "limit=3"], filters=["limit"])
    with pytest.raises(NbdConnectionError, match="cannot connect"):
        NbdEndpoint(srv2.uri, connections=4)


def test_memory_export_io_and_flags(start_nbdkit: Callable[..., NbdServer]) -> None:
    srv = start_nbdkit(["memory", "64M"])
    with NbdEndpoint(srv.uri, writable=True) as ep:
        assert ep.size == 64 * MiB
        assert ep.multi_conn and ep.connections == 4  # nbdkit memory advertises multi-conn
        assert not ep.read_only and ep.can_zero and ep.can_fast_zero and ep.can_flush
        data = os.urandom(3 * MiB + 512)
        assert ep.write(data, 5 * MiB) == len(data)
        buf = bytearray(len(data))
        assert ep.readinto(buf, 5 * MiB) == len(data)
        assert buf == data
        tail = bytearray(MiB)
        assert ep.readinto(tail, 64 * MiB - 4096) == 4096  # short only at the end
        with pytest.raises(DeviceIOError) as exc:
            ep.write(bytes(8192), 64 * MiB - 4096)
        assert exc.value.errno == errno.ENOSPC


def test_source_connections_follow_the_cpus() -> None:
    """A copy reads an export on one connection per CPU it may run on, at most
    DEFAULT_CONNECTIONS (nbdcopy's rule), in the thread's own affinity: one CPU gives one."""
    from dmtools.nbd.endpoint import DEFAULT_CONNECTIONS, source_connections

    cpus = sorted(os.sched_getaffinity(0))
    assert source_connections() == min(DEFAULT_CONNECTIONS, len(cpus))
    got: list[int] = []

    def pinned() -> None:
        os.sched_setaffinity(0, {cpus[-1]})  # this thread only
        got.append(source_connections())

    t = threading.Thread(target=pinned)
    t.start()
    t.join()
    assert got == [1]
    assert source_connections() == min(DEFAULT_CONNECTIONS, len(cpus))  # the caller's is unchanged


def test_long_reads_and_writes_are_split(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """A 40 MiB read or write goes out as requests of REQUEST_SIZE (far below the protocol's
    32 MiB limit: a server allocates each request's payload), every connection carrying some."""
    from dmtools.nbd.endpoint import REQUEST_SIZE

    log = tmp_path / "split.log"
    srv = start_nbdkit(["memory", "64M", f"logfile={log}"], filters=["log"])
    data = os.urandom(40 * MiB)
    with NbdEndpoint(srv.uri, writable=True) as ep:
        assert ep.connections == 4
        ep.write(data, 0)
        buf = bytearray(40 * MiB)
        ep.readinto(buf, 0)
        assert buf == data
    text = log.read_text()
    for op in ("Write", "Read"):
        reqs = [(int(conn), int(off, 16), int(n, 16)) for conn, off, n in
                re.findall(rf"connection=(\d+) {op} id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)", text)]
        assert sorted((off, n) for _, off, n in reqs) == [(i, REQUEST_SIZE) for i in range(0, 40 * MiB, REQUEST_SIZE)]
        assert len({conn for conn, _, _ in reqs}) == 4, op


def test_qemu_nbd_single_connection(tmp_path: Path, start_qemu_nbd: Callable[..., NbdServer]) -> None:
    """qemu-nbd's default (-e 1) refuses multi-conn: one connection, still several requests in flight."""
    img = tmp_path / "q.img"
    img.write_bytes(os.urandom(8 * MiB))
    srv = start_qemu_nbd(img)
    with NbdEndpoint(srv.uri) as ep:
        assert not ep.multi_conn and ep.connections == 1
        assert ep.read_only  # opened for reading
        buf = bytearray(8 * MiB)
        ep.readinto(buf, 0)
        assert buf == img.read_bytes()
        with pytest.raises(DeviceIOError, match="open for reading only"):
            ep.write(b"x" * 512, 0)


@pytest.mark.parametrize("connections", [1, 4])
def test_threads_sharing_connections_each_get_their_reply(start_nbdkit: Callable[..., NbdServer],
                                                          connections: int) -> None:
    """Sixteen threads on one or four connections: whichever thread drives a connection, every
    request completes with its own data (the delay filter keeps several in flight at once, so the
    driving role changes hands while others wait)."""
    srv = start_nbdkit(["memory", "16M", "rdelay=2ms", "wdelay=2ms"], filters=["delay"])
    blocks = [os.urandom(64 << 10) for _ in range(256)]
    with NbdEndpoint(srv.uri, writable=True, connections=connections) as ep:
        assert ep.connections == connections

        def write(first: int) -> None:
            for i in range(first, len(blocks), 16):
                ep.write(blocks[i], i * (64 << 10))

        def check(first: int) -> None:
            buf = bytearray(64 << 10)
            for i in range(first, len(blocks), 16):
                assert ep.readinto(buf, i * (64 << 10)) == len(buf)
                assert buf == blocks[i], f"block {i}"

        for body in (write, check):
            run_together([functools.partial(body, t) for t in range(16)])


@pytest.mark.parametrize("connections, tls", [(1, False), (4, False), (4, True)])
def test_threads_with_several_requests_each_are_never_left_undriven(
        tmp_path: Path, start_nbdkit: Callable[..., NbdServer], connections: int, tls: bool) -> None:
    """Eight threads each reading and writing 4 MiB, which goes out as several requests, on one or
    four connections, plain and with TLS (where GnuTLS may hold decrypted bytes that poll(2) does
    not see): a driver handing the connection on must wake a thread that waits (not one still
    waiting for another of its requests), and commands issued while it sleeps must still go out,
    or a request sits undriven until its timeout. Every call ends well within the timeout, with
    its own data."""
    from dmtools.nbd.endpoint import REQUEST_SIZE

    size = 4 * MiB
    assert size // REQUEST_SIZE >= 4  # each call is several requests
    options: list[str] = []
    if tls:
        keys = tmp_path / "keys.psk"
        keys.write_text(f"alice:{os.urandom(32).hex()}\n")
        keys.chmod(0o600)
        options = ["--tls=require", f"--tls-psk={keys}"]
    srv = start_nbdkit(["memory", "32M", "rdelay=1ms", "wdelay=1ms"], filters=["delay"], options=options)
    uri = f"nbds+unix://alice@/?socket={srv.socket}&tls-psk-file={keys}" if tls else srv.uri
    timeout = 20.0
    data = [os.urandom(size) for _ in range(8)]
    with NbdEndpoint(uri, writable=True, connections=connections, timeout=timeout) as ep:
        assert ep.writes_by_kernel is not tls
        slowest = [0.0]

        def timed(fn: Callable[[], object]) -> None:
            t0 = time.monotonic()
            fn()
            slowest[0] = max(slowest[0], time.monotonic() - t0)

        def body(t: int) -> None:
            buf = bytearray(size)
            for _ in range(3):
                timed(lambda: ep.write(data[t], t * size))
                timed(lambda: ep.readinto(buf, t * size))
                assert buf == data[t], f"thread {t}"

        run_together([functools.partial(body, t) for t in range(8)], timeout=4 * timeout)
        assert slowest[0] < timeout / 2, f"a call took {slowest[0]:.1f} s"


def test_stream_read_runs_completions_on_one_pump_per_connection(start_nbdkit: Callable[..., NbdServer]) -> None:
    """stream_read: a batch's done(errno) runs once, on the pump thread of the connection that
    carried all its reads, with the data in place; batches queued from a pump go on; the pumps
    spread over the connections, stop once idle and at close; bad parts raise at once."""
    srv = start_nbdkit(["memory", "8M"])
    data = os.urandom(8 * MiB)
    with NbdEndpoint(srv.uri, writable=True) as w:
        w.write(data, 0)
    ep = NbdEndpoint(srv.uri)
    try:
        assert ep.connections == 4
        step = ep.request_size // 4
        bufs = [bytearray(MiB) for _ in range(8)]
        landed: list[tuple[int, int, str]] = []
        all_done = threading.Event()

        def batch(i: int) -> list[tuple[memoryview, int]]:
            mv = memoryview(bufs[i])
            return [(mv[k : k + step], i * MiB + k) for k in range(0, MiB, step)]

        def done_for(i: int) -> Callable[[int], None]:
            def done(err: int) -> None:
                landed.append((i, err, threading.current_thread().name))
                if i < 7 and i % 2 == 0:  # the odd ones are queued from the pumps themselves
                    ep.stream_read(batch(i + 1), done_for(i + 1))
                if len(landed) == len(bufs):
                    all_done.set()
            return done

        for i in range(0, 8, 2):
            ep.stream_read(batch(i), done_for(i))
        assert all_done.wait(30)
        assert sorted(i for i, _, _ in landed) == list(range(8))  # each batch once
        assert all(err == 0 for _, err, _ in landed)
        assert {name.split(" ")[0] for _, _, name in landed} == {"nbd-pump"}
        assert len({name for _, _, name in landed}) > 1  # spread over the connections
        for i, b in enumerate(bufs):
            assert bytes(b) == data[i * MiB : (i + 1) * MiB]
        for bad in ([(bytearray(4096), len(data) - 512)], [(bytearray(ep.request_size + 4096), 0)], []):
            with pytest.raises(InvalidArgument):
                ep.stream_read(bad, lambda err: None)
        t0 = time.monotonic()
        while any(t.name.startswith("nbd-pump") for t in threading.enumerate()) and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        assert not [t for t in threading.enumerate() if t.name.startswith("nbd-pump")]
        ep.stream_read([(bufs[0], 0)], lambda err: None)  # a new pump, stopped by close
    finally:
        ep.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("nbd-pump")]


def test_close_tells_every_pump_to_stop_before_waiting_for_one(start_nbdkit: Callable[..., NbdServer],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """close(): the pumps of all connections are told to stop first, then waited for, so they
    wind down together; the reads still in flight fail with ESHUTDOWN and no pump is left."""
    srv = start_nbdkit(["memory", "8M", "rdelay=200ms"], filters=["delay"])
    ep = NbdEndpoint(srv.uri)
    errs: list[int] = []
    try:
        for i in range(ep.connections):  # each on the least busy connection: one per connection
            ep.stream_read([(bytearray(4096), i * 4096)], errs.append)
        pumps = [c for c in ep._conns if c.pump is not None]
        assert len(pumps) == ep.connections > 1
        told_at_first_join: list[list[bool]] = []
        join = threading.Thread.join

        def spy(self: threading.Thread, timeout: float | None = None) -> None:
            if self.name.startswith("nbd-pump") and not told_at_first_join:
                told_at_first_join.append([c._stopping for c in pumps])
            join(self, timeout)

        monkeypatch.setattr(threading.Thread, "join", spy)
    finally:
        ep.close()
    assert told_at_first_join == [[True] * len(pumps)]
    assert sorted(errs) == [errno.ESHUTDOWN] * len(pumps)
    assert not [t for t in threading.enumerate() if t.name.startswith("nbd-pump")]


def test_stream_read_error_is_the_servers_errno(start_nbdkit: Callable[..., NbdServer]) -> None:
    """A batch with failing reads: done runs once, with the server's errno."""
    srv = start_nbdkit(["memory", "1M", "error-pread-rate=100%", "error=ENOSPC"], filters=["error"])
    got: list[int] = []
    ev = threading.Event()

    def done(err: int) -> None:
        got.append(err)
        ev.set()

    ep = NbdEndpoint(srv.uri)
    try:
        ep.stream_read([(bytearray(4096), 0), (bytearray(4096), 4096)], done)
        assert ev.wait(30)
        ep.close()  # the pump has run done before it stops: nothing more comes
    finally:
        ep.close()
    assert got == [errno.ENOSPC]


def test_read_only_export(start_nbdkit: Callable[..., NbdServer]) -> None:
    srv = start_nbdkit(["memory", "1M"], options=["-r"])
    with NbdEndpoint(srv.uri, writable=True) as ep:
        assert ep.read_only
        with pytest.raises(DeviceIOError, match="read-only") as exc:
            ep.write(bytes(512), 0)
        assert exc.value.errno == errno.EPERM


def test_data_extents(start_nbdkit: Callable[..., NbdServer]) -> None:
    """BLOCK_STATUS: written ranges are data, the rest holes (nbdkit memory allocates 32 KiB pages)."""
    srv = start_nbdkit(["memory", "64M"])
    with NbdEndpoint(srv.uri, writable=True) as ep:
        assert ep.data_extents(0, 64 * MiB) == []
        ep.write(b"\1" * 4096, 8 * MiB)
        ep.write(b"\2" * 65536, 40 * MiB)
        assert ep.data_extents(0, 64 * MiB) == [(8 * MiB, 32768), (40 * MiB, 65536)]
        assert ep.data_extents(8 * MiB + 4096, MiB) == [(8 * MiB + 4096, 32768 - 4096)]
        ep.zero(40 * MiB, 65536)  # punches the hole again (WRITE_ZEROES without NO_HOLE)
        assert ep.data_extents(0, 64 * MiB) == [(8 * MiB, 32768)]


def test_no_extents_is_unknown(start_nbdkit: Callable[..., NbdServer]) -> None:
    srv = start_nbdkit(["memory", "1M"], options=["--no-sr"])  # no structured replies: no BLOCK_STATUS
    with NbdEndpoint(srv.uri) as ep:
        assert ep.data_extents(0, 1 << 20) is None


def test_fast_zero_refused_falls_back(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """A server whose zeroing is not fast answers FAST_ZERO with ENOTSUP: plain WRITE_ZEROES follows,
    and later zeroing goes straight to it."""
    log = tmp_path / "zero.log"
    srv = start_nbdkit(["memory", "4M", f"logfile={log}", "zeromode=plugin", "fastzeromode=slow"],
                       filters=["log", "nozero"])
    with NbdEndpoint(srv.uri, writable=True, connections=1) as ep:
        assert ep.can_fast_zero
        ep.write(b"\xff" * (2 * MiB), 0)
        ep.zero(0, MiB)
        ep.zero(MiB, MiB)
        buf = bytearray(2 * MiB)
        ep.readinto(buf, 0)
        assert buf == bytes(2 * MiB)
    zeros = re.findall(r" Zero id=\d+ offset=(0x[0-9a-f]+) count=0x100000 trim=\d fua=\d fast=(\d)", log.read_text())
    assert zeros == [("0x0", "1"), ("0x0", "0"), ("0x100000", "0")]


def test_flush_on_close(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """Writes are followed by FLUSH on every connection when the endpoint closes; reads flush nothing."""
    log = tmp_path / "flush.log"
    srv = start_nbdkit(["memory", "4M", f"logfile={log}"], filters=["log"])
    with NbdEndpoint(srv.uri) as ep:
        ep.readinto(bytearray(4096), 0)
    assert "Flush" not in log.read_text()
    with NbdEndpoint(srv.uri, writable=True) as ep:
        ep.write(b"x" * 4096, 0)
        n = ep.connections
    assert len(re.findall(r"connection=\d+ Flush id", log.read_text())) == n


@pytest.mark.parametrize("fua", [True, False])
def test_durable_write_is_one_fua_write_when_offered(tmp_path: Path, start_nbdkit: Callable[..., NbdServer],
                                                     fua: bool) -> None:
    """``write_durable`` (REQ_FUA): one WRITE with the FUA flag and no FLUSH when the server offers
    FUA; a plain WRITE then a FLUSH when it does not (nbdkit's fua filter, whose default hides it)."""
    log = tmp_path / "fua.log"
    srv = start_nbdkit(["memory", "4M", f"logfile={log}", *(["fuamode=pass"] if fua else [])], filters=["log", "fua"])
    with NbdEndpoint(srv.uri, writable=True, connections=1) as ep:
        assert ep.can_fua is fua
        assert ep.write_durable(b"d" * 4096, 8192) == 4096
        sent = re.findall(r"connection=\d+ (Write|Flush) id=\d+(?: offset=0x2000 count=0x1000 fua=(\d))?",
                          log.read_text())
        assert sent == ([("Write", "1")] if fua else [("Write", "0"), ("Flush", "")])
        buf = bytearray(4096)
        ep.readinto(buf, 8192)
        assert buf == b"d" * 4096


def test_bad_uri_before_connecting() -> None:
    with pytest.raises(InvalidArgument, match="socket"):
        NbdEndpoint("nbd+unix:///x")
