"""The handshake for the kernel (no structured replies) against nbdkit and qemu-nbd; netlink encoding."""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path
from typing import Callable

import pytest

from dmtools.errors import InvalidArgument
from dmtools.nbd import NbdConnectionError, parse_uri
from dmtools.nbd import netlink as nl
from dmtools.nbd.handshake import FLAG_CAN_MULTI_CONN, FLAG_SEND_FLUSH, connect_socket, negotiate
from dmtools.nbd.kernel import device_index
from dmtools.testing.nbdserver import NbdServer

MiB = 1 << 20
READ_MAGIC = 0x25609513
SIMPLE_REPLY = 0x67446698


def _read_simple(sock: socket.socket, offset: int, length: int) -> bytes:
    """One NBD_CMD_READ with a simple reply, as the kernel sends it."""
    sock.sendall(struct.pack(">IHHQQI", READ_MAGIC, 0, 0, 7, offset, length))
    hdr = b""
    while len(hdr) < 16:
        hdr += sock.recv(16 - len(hdr))
    magic, err, cookie = struct.unpack(">IIQ", hdr)
    assert (magic, err, cookie) == (SIMPLE_REPLY, 0, 7)
    data = b""
    while len(data) < length:
        data += sock.recv(length - len(data))
    return data


def test_nbdkit_export(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    srv = start_nbdkit(["data", "data=1 2 3 4 @4096 0xff", "size=1M"])
    uri = parse_uri(srv.uri)
    with connect_socket(uri) as s:
        info = negotiate(s, uri.export, srv.uri)
        assert info.size == MiB
        assert info.flags & FLAG_SEND_FLUSH and info.multi_conn
        assert not info.read_only
        # Transmission with simple replies works on the negotiated socket.
        assert _read_simple(s, 0, 8) == bytes([1, 2, 3, 4, 0, 0, 0, 0])
        assert _read_simple(s, 4096, 1) == b"\xff"


def test_qemu_nbd_read_only(tmp_path: Path, start_qemu_nbd: Callable[..., NbdServer]) -> None:
    img = tmp_path / "q.img"
    img.write_bytes(os.urandom(2 * MiB))
    srv = start_qemu_nbd(img, options=["-r", "-x", "disk"])
    uri = parse_uri(f"nbd+unix:///disk?socket={srv.socket}")
    with connect_socket(uri) as s:
        info = negotiate(s, "disk", uri.text)
        assert info.size == 2 * MiB and info.read_only and not info.flags & FLAG_CAN_MULTI_CONN
        assert info.max_block == 32 * MiB  # qemu-nbd advertises its block sizes
        assert _read_simple(s, MiB, 4096) == img.read_bytes()[MiB : MiB + 4096]


def test_unknown_export_refused(tmp_path: Path, start_qemu_nbd: Callable[..., NbdServer]) -> None:
    img = tmp_path / "q.img"
    img.write_bytes(bytes(MiB))
    srv = start_qemu_nbd(img, options=["-x", "disk"])
    uri = parse_uri(f"nbd+unix:///other?socket={srv.socket}")
    with connect_socket(uri) as s, pytest.raises(NbdConnectionError, match="no such export|other"):
        negotiate(s, "other", uri.text)


def test_tls_refused_for_the_kernel() -> None:
    with pytest.raises(NbdConnectionError, match="TLS"):
        connect_socket(parse_uri("nbds://127.0.0.1/x"))


def test_not_an_nbd_server(tmp_path: Path) -> None:
    path = tmp_path / "fake.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        uri = parse_uri(f"nbd+unix:///?socket={path}")
        with connect_socket(uri) as s, pytest.raises(NbdConnectionError, match="not a newstyle NBD server"):
            negotiate(s, "", uri.text)
    finally:
        t.join()
        server.close()


def test_netlink_attrs_round_trip() -> None:
    attrs: list[nl.Attr] = [
        (nl.ATTR_SIZE_BYTES, nl.u64(1 << 30)),
        (nl.ATTR_SOCKETS, [(nl.SOCK_ITEM, [(nl.SOCK_FD, nl.u32(5))]), (nl.SOCK_ITEM, [(nl.SOCK_FD, nl.u32(6))])]),
        (nl.ATTR_BACKEND_IDENTIFIER, b"nbd://h:10809/x\0"),
    ]
    data = nl.encode_attrs(attrs)
    assert len(data) % 4 == 0
    parsed = list(nl.parse_attrs(data))
    assert [k for k, _ in parsed] == [nl.ATTR_SIZE_BYTES, nl.ATTR_SOCKETS, nl.ATTR_BACKEND_IDENTIFIER]
    assert struct.unpack("=Q", parsed[0][1])[0] == 1 << 30
    items = list(nl.parse_attrs(parsed[1][1]))
    fds = [struct.unpack("=I", dict(nl.parse_attrs(p))[nl.SOCK_FD])[0] for _, p in items]
    assert fds == [5, 6]
    assert parsed[2][1] == b"nbd://h:10809/x\0"
    # The nested flag is set on the wire (the kernel's strict parsing wants it) and masked when read.
    assert struct.unpack_from("=H", data, 12 + 2)[0] & nl.NLA_F_NESTED


@pytest.mark.parametrize("text, index", [("nbd3", 3), ("/nonexistent/nbd12", 12), (7, 7)])
def test_device_index(text: object, index: int) -> None:
    assert device_index(text) == index  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["/dev/null", "loop0", -1, True])
def test_device_index_refused(text: object) -> None:
    with pytest.raises(InvalidArgument):
        device_index(text)  # type: ignore[arg-type]
