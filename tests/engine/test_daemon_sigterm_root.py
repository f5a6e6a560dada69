"""SIGTERM to the daemon while a suspended device holds a write (root tier: FUSE + loop).

What a user expects of ``kill <daemon>``: the daemon exits within seconds, the held write fails
with EIO in the writer, and nothing of the daemon is left (socket, pid file, mapper links, FUSE
mount; the loop device goes at the writer's last close). Before the fix the daemon detached the
loop device while the device still held the write; the kernel's open of the loop device then
waited on that write, in the daemon's own thread, uninterruptibly: SIGTERM and even SIGKILL went
unanswered.
"""

from __future__ import annotations

import mmap
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmtools import loop
from dmtools.engine import Engine
from dmtools.engine.client import open_userspace
from dmtools.engine.expose import abort_fuse, clear_stale, mounted_at
from dmtools.engine.basic_targets import ZeroTarget
from dmtools.errors import DeviceIOError
from dmtools.linux import process_gone
from dmtools.testing.wait import wait_until

MiB = 1 << 20
#: Bound on the daemon's exit after SIGTERM (it takes about 2-3 s here).
EXIT_WITHIN = 15.0

#: A writer: open the device, say so, write one block and fsync (held by the suspended device),
#: report the outcome, then keep the device open until stdin closes.
WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
print("open", flush=True)
try:
    os.pwrite(fd, b"w" * 4096, 0)
    os.fsync(fd)
    print("written", flush=True)
except OSError as err:
    print("errno", err.errno, flush=True)
sys.stdin.read()
"""


def _fuse_abort(run_dir: str) -> None:
    """Fail every request of the FUSE mount under ``run_dir`` (fusectl), so a test that failed
    leaves no process waiting on it uninterruptibly."""
    abort_fuse(os.path.join(run_dir, "fuse"))


class Writer:
    """The writer process; ``line(timeout)`` is its next line, ``b""`` when none came in time."""

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        self._lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def line(self, timeout: float) -> bytes:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return b""

    def let_go(self) -> int:
        """Close its stdin (it then closes the device and exits); its exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(10)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "run")
    yield path
    _fuse_abort(path)
    clear_stale(path)


def _loops_under(run_dir: str) -> list[str]:
    prefix = os.path.realpath(os.path.join(run_dir, "fuse")) + "/"
    return [d.path for d in loop.list_loops() if (d.backing_file or "").startswith(prefix)]


@pytest.mark.root
@pytest.mark.parametrize("stacked", [False, True], ids=["held-by-device", "held-below-stack"])
def test_sigterm_fails_the_held_write_and_exits_cleanly(run_dir: str, make_image, stacked: bool) -> None:
    img = make_image(8 * MiB)
    client = open_userspace(run_dir)
    pid = client.ping()["pid"]
    writer: Writer | None = None
    try:
        client.create("held-dmtt", f"0 16384 linear {img} 0")
        target = "held-dmtt"
        if stacked:  # the write goes to the top device and waits in the suspended one below it
            client.create("top-dmtt", f"0 8192 linear {client.device_ref('held-dmtt')} 0")
            target = "top-dmtt"
        path = client.device_path(target)
        client.suspend("held-dmtt")
        writer = Writer(path)
        assert writer.line(10) == b"open\n"
        assert writer.line(0.5) == b""  # held by the suspended device
        client.close()

        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        while not process_gone(pid):
            assert time.monotonic() - started < EXIT_WITHIN, "the daemon ignored SIGTERM"
            time.sleep(0.05)
        assert writer.line(10) == b"errno 5\n"  # EIO
        for leftover in ("control.sock", "daemon.pid", "mapper/held-dmtt", "mapper/top-dmtt"):
            assert not os.path.lexists(os.path.join(run_dir, leftover)), leftover
        assert not mounted_at(os.path.join(run_dir, "fuse"))

        assert writer.let_go() == 0  # its last close detaches the loop device (autoclear)
        wait_until(lambda: not _loops_under(run_dir), lambda: f"loop devices left: {_loops_under(run_dir)}")
    finally:
        client.close()
        if not process_gone(pid):
            _fuse_abort(run_dir)
            os.kill(pid, signal.SIGKILL)
        if writer is not None:
            writer.kill()


@pytest.mark.root
def test_closing_an_exposed_engine_fails_the_held_write(tmp_path: Path, make_image) -> None:
    """The in-process engine does the same at ``close``: bounded, the held write gets EIO."""
    run_dir = str(tmp_path / "run")
    eng = Engine(expose=True, run_dir=run_dir)
    writer: Writer | None = None
    try:
        eng.create("held-dmtt", f"0 16384 linear {make_image(8 * MiB)} 0")
        path = eng.device_path("held-dmtt")
        eng.suspend("held-dmtt")
        writer = Writer(path)
        assert writer.line(10) == b"open\n"
        assert writer.line(0.5) == b""
        closer = threading.Thread(target=eng.close, daemon=True)
        closer.start()
        closer.join(EXIT_WITHIN)
        assert not closer.is_alive(), "Engine.close hung on the held write"
        assert writer.line(10) == b"errno 5\n"
        assert not mounted_at(os.path.join(run_dir, "fuse"))
    finally:
        _fuse_abort(run_dir)
        if writer is not None:
            writer.kill()
        eng.close()
        clear_stale(run_dir)


def test_close_fails_io_held_by_a_suspended_device_and_below_a_stack(make_image) -> None:
    """Unit tier (no exposure): readers waiting on a suspended device, directly and through a
    device stacked on it, get an error from ``close`` instead of waiting for ever."""
    eng = Engine()
    eng.create("low", f"0 2048 linear {make_image(MiB)} 0")
    eng.create("top", f"0 1024 linear {eng.device_ref('low')} 0")
    eng.suspend("low")
    outcomes: list[object] = []
    endpoints = [eng.open_endpoint(name) for name in ("low", "top")]

    def read(ep) -> None:
        try:
            ep.readinto(bytearray(4096), 0)
            outcomes.append("read")
        except DeviceIOError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=read, args=(ep,), daemon=True) for ep in endpoints]
    for t in threads:
        t.start()
    time.sleep(0.2)
    assert outcomes == []  # both held
    started = time.monotonic()
    eng.close()
    for t in threads:
        t.join(10)
    assert time.monotonic() - started < 10
    assert len(outcomes) == 2 and all(isinstance(o, DeviceIOError) for o in outcomes)
    for ep in endpoints:
        ep.close()


class _Stuck(ZeroTarget):
    """A target whose presuspend hangs until released: a shutdown that cannot finish."""

    name = "stuck"
    release = threading.Event()

    def presuspend(self) -> None:
        self.release.wait(30)


def test_watchdog_ends_a_shutdown_that_hangs(tmp_path: Path) -> None:
    from dmtools.engine.daemon import Daemon

    daemon = Daemon(str(tmp_path / "run"), expose=False)
    daemon.start()
    assert daemon.engine is not None
    daemon.engine.register_target(_Stuck)
    daemon.engine.create("stuck-dmtt", "0 8 stuck")
    exits: list[int] = []
    exited = threading.Event()
    daemon.shutdown_limit = 0.5
    daemon.hard_exit = lambda status: (exits.append(status), exited.set())
    stopper = threading.Thread(target=daemon.shutdown, daemon=True)
    try:
        stopper.start()
        assert exited.wait(10), "the watchdog did not fire"
        assert exits == [1]
        assert not os.path.exists(daemon.socket_path) and not os.path.exists(daemon.pid_path)
    finally:
        _Stuck.release.set()
        stopper.join(10)
    assert not stopper.is_alive()


def test_a_shutdown_in_time_never_fires_the_watchdog(tmp_path: Path) -> None:
    from dmtools.engine.daemon import Daemon

    daemon = Daemon(str(tmp_path / "run"), expose=False)
    daemon.start()
    exits: list[int] = []
    daemon.shutdown_limit = 0.3
    daemon.hard_exit = exits.append
    daemon.shutdown()
    time.sleep(0.6)  # past the limit: a watchdog still waiting would fire now
    assert exits == []


@pytest.mark.root
def test_abort_fuse_fails_the_exposures_io_and_close_still_works(tmp_path: Path, make_image) -> None:
    """The watchdog's last resort, for real: after ``abort`` the loop device's I/O fails (instead
    of waiting for a server that cannot answer) and the engine still closes."""
    run_dir = str(tmp_path / "run")
    eng = Engine(expose=True, run_dir=run_dir)
    try:
        eng.create("ab-dmtt", f"0 2048 linear {make_image(MiB)} 0")
        path = eng.device_path("ab-dmtt")
        assert eng.exposure is not None and eng.exposure.abort()
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            with pytest.raises(OSError):
                os.preadv(fd, [mmap.mmap(-1, 4096)], 0)
        finally:
            os.close(fd)
    finally:
        closer = threading.Thread(target=eng.close, daemon=True)
        closer.start()
        closer.join(EXIT_WITHIN)
        assert not closer.is_alive()
        clear_stale(run_dir)
    assert not mounted_at(os.path.join(run_dir, "fuse"))
