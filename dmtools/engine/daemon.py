"""``dmtools daemon``: owns userspace devices across CLI invocations and serves the control socket.

Start-up: take the pid-file lock (one daemon per run directory), clear the exposures a killed
daemon left (loop devices, FUSE mount, mapper links), bind ``control.sock`` (mode 0600; every
connection's peer uid must be the daemon's, checked with ``SO_PEERCRED``), then serve each client
on its own thread. A client that dies mid-call only loses its own reply. A ``subscribe`` request
turns its connection into a stream of the engine's events (an ``EventHub`` started with ``serve``,
woken after every verb that changes a device, closed at shutdown). ``SIGTERM``/``SIGINT`` or
the ``shutdown`` verb remove every device and exit, within seconds: I/O held by a suspended device
fails with EIO, and a watchdog ends a shutdown that still hangs (``SHUTDOWN_LIMIT``). Devices' data
lives on their underlying devices, so a restart is a reboot and managers re-activate from what is
on disk.

Run ``python -m dmtools.engine.daemon [--foreground] [--run-dir DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import faulthandler
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any, Callable

from dmtools.engine import protocol, rundir
from dmtools.engine.engine import Engine
from dmtools.engine.remote_io import IOSession
from dmtools.engine.services import Service, start_services, stop_services
from dmtools.errors import DaemonError, DeviceBusy, DMError, InvalidArgument
from dmtools.events.publish import EventHub

log = logging.getLogger("dmtools.daemon")

#: verbs after which the event hub rescans (they add, remove, rename, reload or (un)suspend a
#: device, or send a target message that may change its status).
CHANGING_VERBS = frozenset({"create", "load", "suspend", "resume", "remove", "clear", "rename", "message"})
#: Longest a daemon's shutdown may take (``run`` sets it; in-process daemons have none): past it
#: the daemon logs every thread's stack, aborts its FUSE connection (the I/O anything is still
#: waiting for fails), removes its socket and pid file and exits with status 1.
SHUTDOWN_LIMIT = 30.0
#: idle seconds between heartbeat lines on an event stream: a hung-up subscriber is noticed (its
#: next write fails) within this time, and clients may use any silence timeout above it.
EVENT_HEARTBEAT = 1.0


class Daemon:
    """The engine plus its control socket."""

    def __init__(self, run_dir: str | None = None, *, expose: bool | None = None) -> None:
        self.run_dir = os.path.abspath(run_dir or rundir.run_dir())
        self.socket_path = rundir.socket_path(self.run_dir)
        self.pid_path = rundir.pid_path(self.run_dir)
        self._expose = expose
        self._stop = threading.Event()
        self._lock_fd = -1
        self._server: socket.socket | None = None
        self.engine: Engine | None = None
        #: publishes the engine's events to ``subscribe`` connections while serving.
        self.hub: EventHub | None = None
        #: what the ``dmtools.services`` entry points started beside the engine (mirror monitoring)
        self.services: list[Service] = []
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()
        #: seconds ``shutdown`` may take before the watchdog ends the process (None: no watchdog).
        self.shutdown_limit: float | None = None
        #: how the watchdog ends the process (tests replace it).
        self.hard_exit: Callable[[int], object] = os._exit

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Lock, clean up after a killed predecessor, create the engine and bind the socket.

        Raises ``DaemonError`` (errno EEXIST) when another daemon holds the run directory, and
        (errno EPERM) when the run directory is not safe: not ours, or writable by others
        (:func:`rundir.check`); nothing is written there then.
        """
        rundir.ensure(self.run_dir)
        fd = rundir.open_file(self.pid_path, os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonError(f"a daemon already runs for {self.run_dir}", errno=errno.EEXIST,
                              operation="daemon") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        from dmtools.engine.expose import clear_dead_engines, clear_stale, exposure_possible

        expose = self._expose if self._expose is not None else exposure_possible() is None
        if expose:
            cleared = clear_stale(self.run_dir) + clear_dead_engines(self.run_dir)
            if cleared:
                log.warning("cleared stale exposures of a previous daemon: %s", ", ".join(cleared))
        self.engine = Engine(expose=expose, run_dir=self.run_dir)
        server = rundir.bind_socket(self.socket_path)
        server.settimeout(0.2)
        self._server = server

    def serve(self) -> None:
        """Accept clients until stopped, then shut down."""
        assert self._server is not None and self.engine is not None
        try:
            if self.hub is None:
                self.hub = EventHub(self.engine)
                self.hub.start()
            self.services = start_services(self.engine)
            while not self._stop.is_set():
                try:
                    conn, _ = self._server.accept()
                except socket.timeout:
                    continue
                except OSError as err:
                    if self._stop.is_set():
                        break
                    log.error("accept failed: %s", err)
                    continue
                conn.settimeout(None)
                threading.Thread(target=self._client, args=(conn,), name="dmtools-client", daemon=True).start()
        finally:
            self.shutdown()

    def stop(self) -> None:
        """Ask ``serve`` to return."""
        self._stop.set()

    def shutdown(self) -> None:
        """Remove every device, close the socket and release the lock (idempotent).

        Bounded: I/O held by suspended devices fails (``Engine.close``), and with
        ``shutdown_limit`` set a watchdog ends the process when the rest still hangs.
        """
        self._stop.set()
        done = threading.Event()
        if self.shutdown_limit is not None:
            threading.Thread(target=self._watchdog, args=(done, self.engine), daemon=True,
                             name="dmtools-shutdown-watchdog").start()
        try:
            self._shutdown()
        finally:
            done.set()

    def _watchdog(self, done: threading.Event, engine: Engine | None) -> None:
        assert self.shutdown_limit is not None
        if done.wait(self.shutdown_limit):
            return
        log.error("shutdown did not finish within %.0f s: aborting the FUSE connection and "
                  "exiting; the threads were:", self.shutdown_limit)
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(all_threads=True)  # stderr: the daemon's log
        exposure = engine.exposure if engine is not None else None
        if exposure is not None:
            exposure.abort()
        for path in (self.socket_path, self.pid_path):
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.hard_exit(1)

    def _shutdown(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            self._server = None
        if self.hub is not None:  # ends every event stream
            self.hub.close()
            self.hub = None
        stop_services(self.services)
        self.services = []
        with self._clients_lock:
            for conn in list(self._clients):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.pid_path)
            os.close(self._lock_fd)
            self._lock_fd = -1

    # --- clients ----------------------------------------------------------------------------
    def _client(self, conn: socket.socket) -> None:
        with self._clients_lock:
            self._clients.add(conn)
        session: IOSession | None = None
        try:
            uid = protocol.peer_uid(conn)
            if uid != os.geteuid():
                protocol.send(conn, {"ok": False, "error": protocol.encode_error(
                    DaemonError(f"uid {uid} may not use this daemon", errno=errno.EACCES))})
                return
            stream = conn.makefile("rb")
            while not self._stop.is_set():
                try:
                    request = protocol.receive(stream)
                    payload = protocol.receive_payload(stream, request)
                except DMError as err:
                    protocol.send(conn, {"ok": False, "error": protocol.encode_error(err)})
                    return
                if request is None:
                    return
                if isinstance(request, dict) and request.get("verb") == "subscribe":
                    self._subscribe(conn, request)
                    return  # the connection carried events only; the client hung up
                if isinstance(request, dict) and request.get("verb") in protocol.IO_VERBS:
                    if session is None:
                        assert self.engine is not None
                        session = IOSession(self.engine)
                    reply, out = self._io(session, request, payload)
                    protocol.send(conn, reply, out)
                    continue
                protocol.send(conn, self._handle(request))
        except OSError:
            return  # the client went away mid-call: only its reply is lost
        finally:
            if session is not None:
                session.close()
            with self._clients_lock:
                self._clients.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _subscribe(self, conn: socket.socket, request: dict[str, Any]) -> None:
        """Stream events on ``conn`` until the client hangs up or the daemon stops; a bad request
        gets the usual error reply instead."""
        hub = self.hub
        args = request.get("args") or {}
        if hub is None or not isinstance(args, dict) or args:
            err = (DaemonError("daemon is not serving events", errno=errno.ESHUTDOWN) if hub is None
                   else InvalidArgument("subscribe takes no arguments"))
            protocol.send(conn, {"ok": False, "error": protocol.encode_error(err)})
            return
        out = conn.makefile("wb")
        try:
            hub.stream(out, heartbeat=EVENT_HEARTBEAT)
        finally:
            with contextlib.suppress(OSError, ValueError):
                out.close()

    @staticmethod
    def _io(session: IOSession, request: dict[str, Any], payload: Any) -> tuple[dict[str, Any], Any]:
        try:
            verb = request["verb"]
            args = request.get("args") or {}
            if not isinstance(args, dict) or set(args) - set(protocol.IO_VERBS[verb]):
                raise InvalidArgument(f"{verb}: bad arguments")
            result, out = session.handle(verb, args, payload)
            return {"ok": True, "result": result}, out
        except Exception as err:  # noqa: BLE001 - every failure becomes the client's error
            if not isinstance(err, DMError):
                log.exception("I/O verb failed")
            return {"ok": False, "error": protocol.encode_error(err)}, None

    def _handle(self, request: Any) -> dict[str, Any]:
        try:
            if not isinstance(request, dict):
                raise InvalidArgument("request must be an object")
            verb = request.get("verb")
            args = request.get("args") or {}
            if verb not in protocol.VERBS or not isinstance(args, dict):
                raise InvalidArgument(f"unknown verb {verb!r}")
            unknown = set(args) - set(protocol.VERBS[verb])
            if unknown:
                raise InvalidArgument(f"{verb}: unknown arguments {sorted(unknown)}")
            try:
                result = self._call(verb, args)
            finally:
                if verb in CHANGING_VERBS and self.hub is not None:
                    self.hub.wake()  # subscribers hear of the change now, not at the next poll
            return {"ok": True, "result": protocol.encode_result(verb, result)}
        except Exception as err:  # noqa: BLE001 - every failure becomes the client's error
            if not isinstance(err, DMError):
                log.exception("verb failed")
            return {"ok": False, "error": protocol.encode_error(err)}

    def _call(self, verb: str, args: dict[str, Any]) -> Any:
        eng = self.engine
        if eng is None:
            raise DaemonError("daemon is shutting down", errno=errno.ESHUTDOWN)
        if verb == "ping":
            exposure = eng.exposure
            return {"pid": os.getpid(), "run_dir": self.run_dir, "devices": len(eng.list()),
                    "exposed": exposure is not None}
        if verb == "shutdown":
            if not args.get("force"):
                busy = [e.name for e in eng.list() if eng.info(e.name).open_count]
                if busy:
                    raise DeviceBusy(f"devices are open: {', '.join(busy)} (use --force)", operation="shutdown")
            self.stop()
            return None
        if verb in ("create", "load"):
            protocol.refuse_relative_paths(verb, args.get("table"))
        if verb == "table":
            return eng.table_text(args["name"], inactive=bool(args.get("inactive", False)))
        method = getattr(eng, verb)
        name = args.pop("name", None)
        positional = [name] if name is not None else []
        if verb == "message":
            positional += [args.pop("sector"), args.pop("message")]
        return method(*positional, **args)


def _daemonize() -> None:
    """Detach from the terminal (double fork, new session; terminal stdio to /dev/null)."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd == 0 or os.isatty(fd):
            os.dup2(null, fd)
    os.close(null)


def run(*, foreground: bool, run_dir: str | None = None, ready_fd: int = -1) -> int:
    """Start and serve a daemon; returns the exit status."""
    daemon = Daemon(run_dir)
    daemon.shutdown_limit = SHUTDOWN_LIMIT
    try:
        daemon.start()
    except DaemonError as err:
        print(f"dmtools daemon: {err}", file=sys.stderr)
        return 1
    # A daemon's working directory is nobody's: a relative path a client let through would not
    # name the caller's file (the protocol refuses them; see protocol.refuse_relative_paths).
    os.chdir("/")
    if not foreground:
        _daemonize()
        with contextlib.suppress(OSError):
            os.lseek(daemon._lock_fd, 0, os.SEEK_SET)
            os.ftruncate(daemon._lock_fd, 0)
            os.write(daemon._lock_fd, f"{os.getpid()}\n".encode())
    # Our handlers go in before the FUSE thread starts, so libfuse leaves them alone.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: daemon.stop())
    if ready_fd >= 0:
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
    daemon.serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dmtools.engine.daemon``."""
    parser = argparse.ArgumentParser(prog="dmtools daemon", description=__doc__.splitlines()[0])
    parser.add_argument("--foreground", action="store_true", help="stay attached to the terminal")
    parser.add_argument("--run-dir", default=None, help="socket, pid file and exposure directory")
    parser.add_argument("--ready-fd", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="dmtools daemon: %(message)s")
    return run(foreground=args.foreground, run_dir=args.run_dir, ready_fd=args.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
