"""The NBD fixed-newstyle handshake, done here for sockets that are handed to the kernel's nbd.ko.

The kernel client speaks only simple replies (drivers/block/nbd.c logs any other reply magic as
"Wrong magic" and drops the socket), so the handshake asks for nothing else: no structured
replies, no metadata contexts, no TLS, no extended headers — as nbd-client does. It sends
``NBD_OPT_GO`` asking for ``NBD_INFO_BLOCK_SIZE`` (then bound by the sizes it gets), and falls back
to ``NBD_OPT_EXPORT_NAME`` for a server that does not know GO. Layouts and numbers are those of
NetworkBlockDevice/nbd doc/proto.md ("Fixed newstyle negotiation", "Option types").
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from dmtools.nbd.errors import NbdConnectionError
from dmtools.nbd.uri import NbdUri

__all__ = ["ExportInfo", "connect_socket", "negotiate", "FLAG_READ_ONLY", "FLAG_CAN_MULTI_CONN"]

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_GO = 7
# Replies; errors have bit 31 set.
REP_ACK = 1
REP_INFO = 3
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
_REP_ERRORS = {
    REP_ERR | 1: "unsupported option",
    REP_ERR | 2: "refused by policy",
    REP_ERR | 3: "invalid request",
    REP_ERR | 4: "unsupported on this platform",
    REP_ERR | 5: "the server requires TLS",
    REP_ERR | 6: "no such export",
    REP_ERR | 7: "the server is shutting down",
    REP_ERR | 8: "the server requires block size negotiation",
    REP_ERR | 9: "request too big",
}
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3
# Transmission flags (include/uapi/linux/nbd.h has the same bits).
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_CAN_MULTI_CONN = 1 << 8

#: Longest export name sent (the protocol's limit is 4096 bytes).
MAX_NAME = 4096


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake learnt: size in bytes, transmission flags, block sizes (0 = not given)."""

    size: int
    flags: int
    min_block: int = 0
    preferred_block: int = 0
    max_block: int = 0

    @property
    def read_only(self) -> bool:
        """True when the server refuses writes."""
        return bool(self.flags & FLAG_READ_ONLY)

    @property
    def multi_conn(self) -> bool:
        """True when the server allows several connections to the export."""
        return bool(self.flags & FLAG_CAN_MULTI_CONN)


class _Conn:
    def __init__(self, sock: socket.socket, where: str) -> None:
        self.sock = sock
        self.where = where

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise NbdConnectionError("the server closed the connection during the handshake",
                                         operation="nbd", device=self.where)
            out += chunk
        return bytes(out)

    def option(self, opt: int, data: bytes) -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def connect_socket(uri: NbdUri, timeout: float = 30.0) -> socket.socket:
    """A connected socket to the server of ``uri`` (TCP with TCP_NODELAY and keepalive, or Unix).

    TLS URIs are refused: the kernel cannot speak TLS, and a userspace TLS proxy is not provided.
    """
    if uri.tls:
        raise NbdConnectionError("the kernel's NBD client cannot use TLS (nbds://); attach a plain "
                                 "export, or copy through kcopyd instead", operation="nbd", device=uri.text)
    try:
        if uri.transport == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(uri.socket)
        elif uri.transport == "tcp":
            sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        else:
            raise NbdConnectionError(f"the kernel's NBD client takes TCP or Unix sockets, not {uri.transport}",
                                     operation="nbd", device=uri.text)
    except OSError as err:
        raise NbdConnectionError(f"cannot connect: {err.strerror or err}", errno=err.errno, operation="nbd",
                                 device=uri.text) from err
    return sock


def negotiate(sock: socket.socket, export: str, where: str = "") -> ExportInfo:
    """Run the fixed-newstyle handshake on ``sock`` for ``export``; the socket is then in transmission.

    Raises ``NbdConnectionError`` when the server is not a newstyle NBD server, refuses the
    export, or closes the connection.
    """
    c = _Conn(sock, where)
    name = export.encode()
    if len(name) > MAX_NAME:
        raise NbdConnectionError("export name longer than 4096 bytes", operation="nbd", device=where)
    try:
        magic, opt_magic, hflags = struct.unpack(">QQH", c.recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdConnectionError("not a newstyle NBD server", operation="nbd", device=where)
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise NbdConnectionError("the server does not speak fixed newstyle NBD", operation="nbd", device=where)
        no_zeroes = bool(hflags & FLAG_NO_ZEROES)
        sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0)))
        c.option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE))
        size = flags = None
        sizes = (0, 0, 0)
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", c.recv(20))
            if magic != REPLY_MAGIC or opt != OPT_GO:
                raise NbdConnectionError("bad option reply from the server", operation="nbd", device=where)
            data = c.recv(length) if length else b""
            if rtype == REP_ACK:
                break
            if rtype == REP_INFO and len(data) >= 2:
                (info,) = struct.unpack_from(">H", data)
                if info == INFO_EXPORT and len(data) >= 12:
                    size, flags = struct.unpack_from(">QH", data, 2)
                elif info == INFO_BLOCK_SIZE and len(data) >= 14:
                    sizes = struct.unpack_from(">III", data, 2)
                continue
            if rtype == REP_ERR_UNSUP:
                return _export_name(c, name, no_zeroes)
            if rtype & REP_ERR:
                why = _REP_ERRORS.get(rtype, f"error {rtype & ~REP_ERR}")
                detail = data.decode(errors="replace").strip()
                raise NbdConnectionError(f"export {export!r}: {why}" + (f" ({detail})" if detail else ""),
                                         operation="nbd", device=where)
            # Other reply types are informational: ignored, as the protocol allows.
        if size is None or flags is None:
            raise NbdConnectionError("the server sent no export information", operation="nbd", device=where)
        return ExportInfo(size, flags, *sizes)
    except OSError as err:
        raise NbdConnectionError(f"handshake failed: {err.strerror or err}", errno=err.errno, operation="nbd",
                                 device=where) from err


def _export_name(c: _Conn, name: bytes, no_zeroes: bool) -> ExportInfo:
    """The old ``NBD_OPT_EXPORT_NAME``: size and flags follow at once (a refusal is a hang-up)."""
    c.option(OPT_EXPORT_NAME, name)
    size, flags = struct.unpack(">QH", c.recv(10))
    if not no_zeroes:
        c.recv(124)
    return ExportInfo(size, flags)
