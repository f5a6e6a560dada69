"""Device I/O over the control socket: the daemon's per-connection handles and the client endpoint.

Used when a client cannot reach a device as a block device (no FUSE/loop exposure, e.g. an
unprivileged daemon). Every open handle counts in the device's open count; a connection that ends,
however it ends, closes its handles.
"""

from __future__ import annotations

import errno
import socket
import threading
from typing import TYPE_CHECKING, Any

from dmtools.endpoint import Endpoint
from dmtools.engine import protocol, rundir
from dmtools.errors import DaemonError, DeviceIOError, InvalidArgument, quietly

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.engine.engine import Engine

#: Largest single read or write request (bigger ones are split by the client).
MAX_IO = 4 << 20


class IOSession:
    """The open handles of one client connection (daemon side)."""

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self.handles: dict[int, Endpoint] = {}
        self._next = 1

    def _get(self, args: dict[str, Any]) -> Endpoint:
        handle = self.handles.get(args.get("handle", -1))
        if handle is None:
            raise InvalidArgument("no such handle", errno=errno.EBADF)
        return handle

    def handle(self, verb: str, args: dict[str, Any], payload: memoryview | None) -> tuple[Any, Any]:
        """Run an I/O verb; returns ``(result, reply payload or None)``."""
        if verb == "open":
            ep = self.engine.open_endpoint(args["name"], writable=bool(args.get("writable", True)))
            hid, self._next = self._next, self._next + 1
            self.handles[hid] = ep
            return hid, None
        ep = self._get(args)
        if verb == "close":
            del self.handles[args["handle"]]
            ep.close()
            return None, None
        if verb == "size":
            return ep.size, None
        if verb == "flush":
            ep.flush()
            return None, None
        offset = int(args.get("offset", 0))
        if verb == "read":
            length = int(args["length"])
            if not 0 <= length <= MAX_IO:
                raise InvalidArgument(f"read length {length} out of range")
            buf = bytearray(length)
            n = ep.readinto(buf, offset)
            return n, memoryview(buf)[:n]
        if verb == "write":
            if payload is None:
                raise InvalidArgument("write without data")
            return ep.write(payload, offset), None
        if verb == "zero":
            ep.zero(offset, int(args["length"]))
            return None, None
        if verb == "discard":
            ep.discard(offset, int(args["length"]))
            return None, None
        raise InvalidArgument(f"unknown I/O verb {verb!r}")

    def close(self) -> None:
        """Close every handle (the connection ended)."""
        quietly(*(ep.close for ep in self.handles.values()), errors=Exception)  # release every handle
        self.handles.clear()


class SocketEndpoint(Endpoint):
    """An engine device reached through the daemon's socket (its own connection)."""

    def __init__(self, socket_path: str, name: str, *, writable: bool = True) -> None:
        self.name = name
        self._writable = writable
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            rundir.connect(self._sock, socket_path)
        except OSError as err:
            self._sock.close()
            raise DaemonError(f"cannot reach the dmtools daemon: {err.strerror or err}",
                              errno=err.errno, operation="open", device=name) from err
        except BaseException:
            self._sock.close()
            raise
        self._stream = self._sock.makefile("rb")
        try:
            self._handle = self._call("open", None, name=name, writable=writable)[0]
        except BaseException:
            self._sock.close()
            raise

    def _call(self, verb: str, payload: Any, into: Any = None, **args: Any) -> tuple[Any, Any]:
        with self._lock:
            if self._sock.fileno() < 0:
                raise DeviceIOError("endpoint is closed", errno=errno.EBADF, operation=verb, device=self.name)
            try:
                protocol.send(self._sock, {"verb": verb, "args": args}, payload)
                reply = protocol.receive(self._stream)
                data = protocol.receive_payload(self._stream, reply, into)
            except OSError as err:
                raise DaemonError(f"lost the dmtools daemon: {err}", errno=err.errno,
                                  operation=verb, device=self.name) from err
        if reply is None:
            raise DaemonError("the dmtools daemon closed the connection",
                              errno=errno.ECONNRESET, operation=verb, device=self.name)
        if not reply.get("ok"):
            raise protocol.decode_error(reply.get("error") or {})
        return reply.get("result"), data

    @property
    def size(self) -> int:
        return int(self._call("size", None, handle=self._handle)[0])

    @property
    def read_only(self) -> bool:
        return not self._writable

    def readinto(self, buf: Any, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        total = 0
        while total < len(mv):
            want = min(MAX_IO, len(mv) - total)
            n, _ = self._call("read", None, into=mv[total : total + want], handle=self._handle,
                              offset=offset + total, length=want)
            total += int(n)
            if n < want:
                break
        return total

    def write(self, buf: Any, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        for pos in range(0, len(mv), MAX_IO):
            self._call("write", mv[pos : pos + MAX_IO], handle=self._handle, offset=offset + pos)
        return len(mv)

    def flush(self) -> None:
        self._call("flush", None, handle=self._handle)

    def zero(self, offset: int, length: int) -> None:
        self._call("zero", None, handle=self._handle, offset=offset, length=length)

    def discard(self, offset: int, length: int) -> None:
        self._call("discard", None, handle=self._handle, offset=offset, length=length)

    def close(self) -> None:
        """Close the handle and the connection (idempotent)."""
        if self._sock.fileno() < 0:
            return
        try:
            self._call("close", None, handle=self._handle)
        except DaemonError:
            pass
        finally:
            with self._lock:
                self._stream.close()
                self._sock.close()

    def __repr__(self) -> str:
        return f"SocketEndpoint({self.name!r})"
