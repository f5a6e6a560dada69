"""The daemon's control-socket protocol: one JSON object per line, request → reply.

Request: ``{"verb": "create", "args": {...}}``. Reply: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": {"class": "DeviceExists", "message": ..., "errno": ..., "operation": ...,
"device": ...}}``. The verbs are ``DeviceMapper``'s, plus ``ping``, ``shutdown`` and ``subscribe``
(the connection then streams events instead of replies). Values that are dataclasses
(``DeviceInfo``, ``DeviceEntry``, ``StatusLine`` of ``status`` and ``measure``, ``Versions``)
travel as dicts; tables travel as text.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import socket
import struct
from typing import TYPE_CHECKING, Any, BinaryIO

from dmtools import errors
from dmtools.backend import DeviceEntry, DeviceInfo, StatusLine, Versions
from dmtools.linux import DEVNO
from dmtools.nbd.uri import absolute_paths, is_nbd_uri, relative_paths

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.table import Table

#: Longest accepted message (a table of many thousand lines fits easily).
MAX_MESSAGE = 16 << 20

#: Verbs a client may send, with the argument names each takes.
VERBS: dict[str, tuple[str, ...]] = {
    "create": ("name", "table", "uuid", "readonly"),
    "load": ("name", "table", "readonly"),
    "suspend": ("name", "noflush"),
    "resume": ("name",),
    "remove": ("name", "retry", "deferred"),
    "clear": ("name",),
    "rename": ("name", "new_name"),
    "info": ("name", "open_count"),
    "table": ("name", "inactive"),
    "status": ("name", "inactive"),
    "measure": ("name", "inactive"),
    "message": ("name", "sector", "message"),
    "deps": ("name",),
    "list": (),
    "targets": (),
    "version": (),
    "wait_event": ("name", "event_nr", "timeout"),
    "device_path": ("name",),
    "device_ref": ("name",),
    "ping": (),
    "shutdown": ("force",),
    #: turns the connection into a stream of events (``dmtools.events.publish``): no reply, one
    #: JSON event per line until the client hangs up; the connection then carries nothing else.
    "subscribe": (),
}

#: I/O on a device through the socket (for clients without an exposed block device). A request
#: or reply with ``"nbytes": N`` is followed by N raw bytes. Handles belong to their connection
#: and count in the device's open count until closed or the connection ends.
IO_VERBS: dict[str, tuple[str, ...]] = {
    "open": ("name", "writable"),
    "close": ("handle",),
    "read": ("handle", "offset", "length"),
    "write": ("handle", "offset"),
    "flush": ("handle",),
    "zero": ("handle", "offset", "length"),
    "discard": ("handle", "offset", "length"),
    "size": ("handle",),
}


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_relative_path(ref: str) -> bool:
    """Whether a table's device reference is a relative path (not ``MAJ:MIN``, a URI or ``/…``)."""
    return not (ref.startswith("/") or DEVNO.fullmatch(ref) or _URI.match(ref))


def absolute_reference(ref: str, cwd: str | None = None) -> str:
    """``ref`` with a relative path made absolute in ``cwd`` (the caller's working directory).

    ``MAJ:MIN``, URIs and absolute paths are returned as given, but for the relative paths in an
    NBD URI's query (``?socket=``, the TLS files), made absolute. A relative path is joined to the
    directory, as the kernel's ``lookup_bdev`` would resolve it for the process that loads the
    table; ``..`` is kept as written (a symlinked directory may stand before it), only ``.``
    components and doubled slashes are dropped.
    """
    if not is_relative_path(ref):
        return absolute_paths(ref, cwd if cwd is not None else os.getcwd()) if is_nbd_uri(ref) else ref
    joined = os.path.join(cwd if cwd is not None else os.getcwd(), ref)
    if ".." in joined.split("/"):
        return joined
    return os.path.normpath(joined)


def absolute_table(table: "Table | str") -> "Table":
    """``table`` (a ``Table`` or its text) with every relative device path made absolute in the
    calling process's working directory: what a client sends to the daemon, which has its own."""
    from dmtools.table import Table

    parsed = Table.parse(table) if isinstance(table, str) else table
    cwd = os.getcwd()
    return parsed.map_devices(lambda ref: absolute_reference(ref, cwd))


def refuse_relative_paths(verb: str, table_text: Any) -> None:
    """Raise ``InvalidArgument`` when a table sent to the daemon names a device by a relative path.

    The daemon's working directory is not the caller's, so such a path would name another file
    (issue 15: ``dev/loop14`` mapped the real ``/dev/loop14``), and an NBD URI's relative socket
    another server; clients send absolute paths.
    """
    if not isinstance(table_text, str):
        return  # no table (create without one), or a type error the engine reports
    from dmtools.table import Table

    try:
        devices = Table.parse(table_text).devices()
    except errors.DMError:
        return  # the engine reports the table's own error
    relative = [ref for ref in devices if is_relative_path(ref) or relative_paths(ref)]
    if relative:
        raise errors.InvalidArgument(
            f"relative device path {relative[0]!r}: the daemon cannot resolve it in the caller's "
            "working directory; give an absolute path", operation=verb)


def send(sock: socket.socket, obj: Any, payload: Any = None) -> None:
    """Send one message, followed by ``payload`` bytes (announced as ``nbytes``) if given."""
    if payload is not None:
        obj = dict(obj, nbytes=memoryview(payload).nbytes)
    sock.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    if payload is not None:
        sock.sendall(payload)


def receive_payload(stream: BinaryIO, message: Any, into: Any = None) -> memoryview | None:
    """Read the raw bytes announced by ``message`` (into ``into`` when given)."""
    n = message.get("nbytes") if isinstance(message, dict) else None
    if not n:
        return None
    if not isinstance(n, int) or n < 0 or n > MAX_MESSAGE:
        raise errors.DaemonError(f"bad payload size {n!r}", errno=errno.EPROTO)
    buf = memoryview(into).cast("B")[:n] if into is not None else memoryview(bytearray(n))
    got = 0
    while got < n:
        k = stream.readinto(buf[got:])  # type: ignore[attr-defined]
        if not k:
            raise errors.DaemonError("connection closed inside a payload", errno=errno.EPROTO)
        got += k
    return buf


def receive(stream: BinaryIO) -> Any | None:
    """Read one message; ``None`` at end of stream. Raises ``DaemonError`` on garbage."""
    line = stream.readline(MAX_MESSAGE + 1)
    if not line:
        return None
    if len(line) > MAX_MESSAGE or not line.endswith(b"\n"):
        raise errors.DaemonError("message too long or truncated", errno=errno.EMSGSIZE)
    try:
        return json.loads(line)
    except ValueError as err:
        raise errors.DaemonError(f"malformed message: {err}", errno=errno.EPROTO) from err


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end (``SO_PEERCRED``)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def encode_error(err: BaseException) -> dict[str, Any]:
    """An exception as the wire dict (non-dmtools errors become ``DMError``)."""
    if isinstance(err, errors.DMError):
        return {"class": type(err).__name__, "message": err.message, "errno": err.errno,
                "operation": err.operation, "device": err.device}
    if isinstance(err, OSError):
        return {"class": "DMError", "message": str(err), "errno": err.errno, "operation": None, "device": None}
    return {"class": "DMError", "message": f"{type(err).__name__}: {err}", "errno": None,
            "operation": None, "device": None}


def decode_error(data: dict[str, Any]) -> errors.DMError:
    """The exception a wire dict describes (only ``dmtools.errors`` classes are built)."""
    cls = getattr(errors, str(data.get("class")), errors.DMError)
    if not (isinstance(cls, type) and issubclass(cls, errors.DMError)):
        cls = errors.DMError
    return cls(str(data.get("message", "")), errno=data.get("errno"),
               operation=data.get("operation"), device=data.get("device"))


def encode_result(verb: str, value: Any) -> Any:
    """A verb's return value as JSON data."""
    if verb == "table":
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [encode_result(verb, v) for v in value]
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: encode_result(verb, v) for k, v in value.items()}
    return value


def decode_result(verb: str, data: Any) -> Any:
    """Rebuild a verb's return value from JSON data."""
    if verb in ("create", "info"):
        return DeviceInfo(**data)
    if verb == "list":
        return [DeviceEntry(**d) for d in data]
    if verb in ("status", "measure"):
        return [StatusLine(**d) for d in data]
    if verb == "version":
        return Versions(**data)
    if verb == "deps":
        return [(int(a), int(b)) for a, b in data]
    if verb == "targets":
        return {k: (int(v[0]), int(v[1]), int(v[2])) for k, v in data.items()}
    return data
