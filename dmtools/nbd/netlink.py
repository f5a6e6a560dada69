"""The kernel's nbd.ko through its generic netlink family "nbd", with the standard library only.

Numbers come from include/uapi/linux/nbd-netlink.h (family "nbd", version 1; commands and
attributes), include/uapi/linux/genetlink.h (the controller) and include/uapi/linux/netlink.h.
:class:`NbdNetlink` sends one request at a time and waits for its acknowledgement; an error
acknowledgement becomes ``OSError`` with the kernel's errno, turned into named errors by
:mod:`dmtools.nbd.kernel`.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any, Iterator

__all__ = ["NbdNetlink", "Attr", "encode_attrs", "parse_attrs", "FamilyMissing"]

NETLINK_GENERIC = 16
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLA_F_NESTED = 1 << 15
NLA_TYPE_MASK = ~((1 << 15) | (1 << 14)) & 0xFFFF
# The generic netlink controller (genetlink.h).
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2

# nbd-netlink.h
FAMILY = "nbd"
VERSION = 1
CMD_CONNECT = 1
CMD_DISCONNECT = 2
CMD_RECONFIGURE = 3
CMD_LINK_DEAD = 4
CMD_STATUS = 5
ATTR_INDEX = 1
ATTR_SIZE_BYTES = 2
ATTR_BLOCK_SIZE_BYTES = 3
ATTR_TIMEOUT = 4
ATTR_SERVER_FLAGS = 5
ATTR_CLIENT_FLAGS = 6
ATTR_SOCKETS = 7
ATTR_DEAD_CONN_TIMEOUT = 8
ATTR_DEVICE_LIST = 9
ATTR_BACKEND_IDENTIFIER = 10
SOCK_ITEM = 1
SOCK_FD = 1
DEVICE_ITEM = 1
DEVICE_INDEX = 1
DEVICE_CONNECTED = 2

#: An attribute to encode: ``(type, value)`` where value is bytes, or a list of attributes (nested).
Attr = tuple[int, Any]


class FamilyMissing(OSError):
    """The generic netlink family "nbd" is not registered (nbd.ko is not loaded)."""


def u32(v: int) -> bytes:
    return struct.pack("=I", v)


def u64(v: int) -> bytes:
    return struct.pack("=Q", v)


def encode_attrs(attrs: list[Attr]) -> bytes:
    """Netlink attributes (``struct nlattr`` + payload, each padded to 4 bytes); lists nest."""
    out = bytearray()
    for kind, value in attrs:
        if isinstance(value, list):
            payload = encode_attrs(value)
            kind |= NLA_F_NESTED
        else:
            payload = bytes(value)
        out += struct.pack("=HH", 4 + len(payload), kind) + payload
        out += bytes(-len(out) % 4)
    return bytes(out)


def parse_attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """``(type, payload)`` for each attribute in ``data`` (the nested flag masked off)."""
    pos = 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4:
            break
        yield kind & NLA_TYPE_MASK, data[pos + 4 : pos + length]
        pos += (length + 3) & ~3


class NbdNetlink:
    """A generic netlink socket talking to the "nbd" family; ``close()`` (or ``with``) releases it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.sock.bind((0, 0))
        self._seq = 0
        try:
            self.family = self._family_id(FAMILY)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "NbdNetlink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _family_id(self, name: str) -> int:
        try:
            replies = self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, [(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0")],
                                   version=1)
        except OSError as err:
            if err.errno == errno.ENOENT:
                raise FamilyMissing(errno.ENOENT, f"generic netlink family {name!r} not registered") from err
            raise
        for attrs in replies:
            for kind, payload in attrs:
                if kind == CTRL_ATTR_FAMILY_ID:
                    return int(struct.unpack_from("=H", payload)[0])
        raise FamilyMissing(errno.ENOENT, f"generic netlink family {name!r} not registered")

    def request(self, family: int, cmd: int, attrs: list[Attr], *, version: int = VERSION
                ) -> list[list[tuple[int, bytes]]]:
        """Send one request; return the attributes of each reply message; raise ``OSError`` on a NACK."""
        self._seq += 1
        seq = self._seq
        body = struct.pack("=BBH", cmd, version, 0) + encode_attrs(attrs)
        msg = struct.pack("=IHHII", 16 + len(body), family, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body
        self.sock.sendall(msg)
        replies: list[list[tuple[int, bytes]]] = []
        while True:
            data = self.sock.recv(1 << 16)
            pos = 0
            while pos + 16 <= len(data):
                length, mtype, _flags, mseq, _pid = struct.unpack_from("=IHHII", data, pos)
                if length < 16:
                    raise OSError(errno.EPROTO, "malformed netlink message")
                payload = data[pos + 16 : pos + length]
                pos += (length + 3) & ~3
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code:
                        raise OSError(-code, os.strerror(-code))
                    return replies
                if mtype == NLMSG_DONE:
                    return replies
                replies.append(list(parse_attrs(payload[4:])))

    def nbd(self, cmd: int, attrs: list[Attr]) -> list[list[tuple[int, bytes]]]:
        """A request to the "nbd" family."""
        return self.request(self.family, cmd, attrs)
