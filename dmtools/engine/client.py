"""``UserspaceClient``: the ``DeviceMapper`` verbs over the daemon's control socket.

``open_userspace()`` connects to the daemon for the calling user (``/run/dmtools`` for root),
starting it on demand; this is what ``dmtools.open("userspace")`` returns.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from dmtools.backend import DeviceEntry, DeviceInfo, DeviceMapper, StatusLine, Versions
from dmtools.engine import protocol, rundir
from dmtools.errors import DaemonError, DMError
from dmtools.linux import process_gone

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Iterator

    from dmtools.endpoint import Endpoint
    from dmtools.events.types import Event
    from dmtools.table import Table

#: How long ``open_userspace`` waits for a daemon it started.
START_TIMEOUT = 20.0
#: How long ``UserspaceClient.shutdown`` waits for the daemon to exit: the daemon's own bound on
#: its shutdown (``dmtools.engine.daemon.SHUTDOWN_LIMIT``, 30 s, then its watchdog exits), and more.
EXIT_TIMEOUT = 40.0


class UserspaceClient(DeviceMapper):
    """A connection to the userspace engine's daemon; thread-safe (calls are serialised)."""

    backend = "userspace"

    def __init__(self, run_dir: str | None = None) -> None:
        self.run_dir = os.path.abspath(run_dir or rundir.run_dir())
        self.socket_path = rundir.socket_path(self.run_dir)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = self._connect()
        self._stream = self._sock.makefile("rb")

    def _connect(self) -> socket.socket:
        rundir.check(self.run_dir)
        with contextlib.suppress(FileNotFoundError):  # connect() says ENOENT: none serves yet
            rundir.check_socket(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            rundir.connect(sock, self.socket_path)
        except OSError as err:
            sock.close()
            raise DaemonError(f"cannot reach the dmtools daemon at {self.socket_path}: "
                              f"{err.strerror or err}", errno=err.errno, operation="connect") from err
        except BaseException:
            sock.close()
            raise
        return sock

    def call(self, verb: str, **args: Any) -> Any:
        """Send one request and return its decoded result (raising the daemon's error)."""
        with self._lock:
            if self._sock is None:
                raise DaemonError("client is closed", errno=errno.EBADF, operation=verb)
            try:
                protocol.send(self._sock, {"verb": verb, "args": args})
                reply = protocol.receive(self._stream)
            except OSError as err:
                raise DaemonError(f"lost the dmtools daemon: {err}", errno=err.errno, operation=verb) from err
        return _unpack(verb, reply)

    # --- DeviceMapper -------------------------------------------------------------------------
    def create(self, name: str, table: "Table | str | None" = None, *, uuid: str = "",
               readonly: bool = False) -> DeviceInfo:
        """As ``DeviceMapper.create``; relative device paths are resolved in the caller's
        working directory before the table reaches the daemon."""
        text = None if table is None else str(protocol.absolute_table(table))
        result: DeviceInfo = self.call("create", name=name, table=text, uuid=uuid, readonly=readonly)
        return result

    def load(self, name: str, table: "Table | str", *, readonly: bool = False) -> None:
        """As ``DeviceMapper.load``; relative device paths are made absolute as for ``create``."""
        self.call("load", name=name, table=str(protocol.absolute_table(table)), readonly=readonly)

    def suspend(self, name: str, *, noflush: bool = False) -> None:
        self.call("suspend", name=name, noflush=noflush)

    def resume(self, name: str) -> None:
        self.call("resume", name=name)

    def remove(self, name: str, *, retry: bool = False, deferred: bool = False) -> None:
        self.call("remove", name=name, retry=retry, deferred=deferred)

    def clear(self, name: str) -> None:
        self.call("clear", name=name)

    def rename(self, name: str, new_name: str) -> None:
        self.call("rename", name=name, new_name=new_name)

    def info(self, name: str, *, open_count: bool = True) -> DeviceInfo:
        result: DeviceInfo = self.call("info", name=name, open_count=open_count)
        return result

    def table(self, name: str, *, inactive: bool = False) -> "Table":
        from dmtools.table import Table

        return Table.parse(self.call("table", name=name, inactive=inactive))

    def status(self, name: str, *, inactive: bool = False) -> list[StatusLine]:
        result: list[StatusLine] = self.call("status", name=name, inactive=inactive)
        return result

    def measure(self, name: str, *, inactive: bool = False) -> list[StatusLine]:
        result: list[StatusLine] = self.call("measure", name=name, inactive=inactive)
        return result

    def message(self, name: str, sector: int, message: str) -> str | None:
        result: str | None = self.call("message", name=name, sector=sector, message=message)
        return result

    def deps(self, name: str) -> list[tuple[int, int]]:
        result: list[tuple[int, int]] = self.call("deps", name=name)
        return result

    def list(self) -> list[DeviceEntry]:
        result: list[DeviceEntry] = self.call("list")
        return result

    def targets(self) -> dict[str, tuple[int, int, int]]:
        result: dict[str, tuple[int, int, int]] = self.call("targets")
        return result

    def version(self) -> Versions:
        result: Versions = self.call("version")
        return result

    def wait_event(self, name: str, event_nr: int = 0, timeout: float | None = None) -> int:
        # On its own connection, so other calls are not stuck behind the wait.
        other = UserspaceClient(self.run_dir)
        try:
            result: int = other.call("wait_event", name=name, event_nr=event_nr, timeout=timeout)
            return result
        finally:
            other.close()

    def device_path(self, name: str) -> str:
        result: str = self.call("device_path", name=name)
        return result

    def device_ref(self, name: str) -> str:
        result: str = self.call("device_ref", name=name)
        return result

    def open_endpoint(self, name: str, *, writable: bool = True) -> "Endpoint":
        """The device as an endpoint: its block device when exposed, else I/O over the socket.

        Either way the endpoint counts in the device's open count until closed.
        """
        from dmtools.blockdev import BlockDevice
        from dmtools.engine.remote_io import SocketEndpoint

        try:
            path = self.device_path(name)
        except DMError as err:
            if err.errno != errno.ENODEV:
                raise
            return SocketEndpoint(self.socket_path, name, writable=writable)
        return BlockDevice(path, writable=writable)

    def ping(self) -> dict[str, Any]:
        """Daemon pid, run directory, device count and whether devices are exposed."""
        result: dict[str, Any] = self.call("ping")
        return result

    def shutdown(self, *, force: bool = False, timeout: float = EXIT_TIMEOUT) -> int:
        """Stop the daemon (``DeviceBusy`` while devices are open, unless ``force``) and return its
        pid once it has exited: removed its devices and exposures and released the run directory,
        so a daemon started next does not race it (the verb answers before that). ``DaemonError``
        (ETIMEDOUT) when it has not exited within ``timeout`` seconds."""
        pid: int = self.ping()["pid"]
        self.call("shutdown", force=force)
        deadline = time.monotonic() + timeout
        while not _exited(pid, rundir.pid_path(self.run_dir)):
            if time.monotonic() >= deadline:
                raise DaemonError(f"the dmtools daemon (pid {pid}) did not exit within {timeout:g} s of "
                                  "its shutdown", errno=errno.ETIMEDOUT, operation="shutdown")
            time.sleep(0.02)
        return pid

    def events(self, *, timeout: float | None = None) -> "Iterator[Event]":
        """The daemon's device events as they happen, on a connection of their own.

        A generator (:func:`dmtools.events.publish.subscribe`): it connects when first advanced and
        ends when the daemon stops; ``close()`` it to hang up. With ``timeout`` a daemon silent for
        that long (no event, no heartbeat) raises ``DMError``; ``DaemonError`` if it cannot connect.
        """
        from dmtools.events.publish import subscribe

        return subscribe(self.socket_path, timeout=timeout)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._stream.close()
                    self._sock.close()
                self._sock = None

    def __repr__(self) -> str:
        return f"UserspaceClient({self.socket_path!r})"


def _exited(pid: int, pid_path: str) -> bool:
    """The daemon of ``pid`` has exited; one serving on a thread of this process, once its pid file
    is gone."""
    return not os.path.exists(pid_path) if pid == os.getpid() else process_gone(pid)


def _unpack(verb: str, reply: Any) -> Any:
    if reply is None:
        raise DaemonError("the dmtools daemon closed the connection", errno=errno.ECONNRESET, operation=verb)
    if not isinstance(reply, dict):
        raise DaemonError("malformed reply", errno=errno.EPROTO, operation=verb)
    if not reply.get("ok"):
        raise protocol.decode_error(reply.get("error") or {})
    return protocol.decode_result(verb, reply.get("result"))


def start_daemon(run_dir: str | None = None, timeout: float = START_TIMEOUT) -> None:
    """Start a daemon in the background and wait until it serves (or another one already does)."""
    import subprocess  # only here: a command that finds the daemon running never needs it

    directory = rundir.ensure(run_dir or rundir.run_dir())
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "dmtools.engine.daemon", "--run-dir", directory, "--ready-fd", str(w)]
    log_path = os.path.join(directory, "daemon.log")
    log = rundir.open_file(log_path, os.O_WRONLY | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                pass_fds=(w,), start_new_session=True, close_fds=True)
    finally:
        os.close(log)
    os.close(w)
    try:
        deadline = time.monotonic() + timeout
        data = b""
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DaemonError(f"the dmtools daemon did not start within {timeout:.0f}s "
                                  f"(see {log_path})", errno=errno.ETIMEDOUT, operation="start")
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 64)
            if not chunk:
                break  # it exited: failed, or another daemon already runs
            data += chunk
    finally:
        os.close(r)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)


def open_userspace(run_dir: str | None = None, *, start: bool = True) -> UserspaceClient:
    """Connect to the userspace engine's daemon, starting it when none runs (``start``)."""
    try:
        return UserspaceClient(run_dir)
    except DaemonError as err:
        if not start or err.errno not in (errno.ENOENT, errno.ECONNREFUSED):
            raise
    start_daemon(run_dir)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            return UserspaceClient(run_dir)
        except DMError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
