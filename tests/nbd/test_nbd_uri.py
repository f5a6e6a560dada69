"""NBD URIs: what is accepted, how it is read, one spelling per export, one-line refusals."""

from __future__ import annotations

import pytest

from dmtools.errors import InvalidArgument
from dmtools.nbd.uri import is_nbd_uri, parse_uri


@pytest.mark.parametrize(
    "text, transport, tls, host, port, export, socket",
    [
        ("nbd://example.com/disk", "tcp", False, "example.com", 10809, "disk", ""),
        ("nbd://10.0.0.2:10810/", "tcp", False, "10.0.0.2", 10810, "", ""),
        ("nbd://h//abs", "tcp", False, "h", 10809, "/abs", ""),
        ("nbd://h/a%20b", "tcp", False, "h", 10809, "a b", ""),
        ("nbds://[::1]:999/x", "tcp", True, "::1", 999, "x", ""),
        ("nbd+unix:///backup?socket=/run/nbd.sock", "unix", False, "", 0, "backup", "/run/nbd.sock"),
        ("nbds+unix://alice@/?socket=/s&tls-psk-file=/k", "unix", True, "", 0, "", "/s"),
    ],
)
def test_parse(text: str, transport: str, tls: bool, host: str, port: int, export: str, socket: str) -> None:
    u = parse_uri(text)
    assert (u.transport, u.tls, u.host, u.port, u.export, u.socket) == (transport, tls, host, port, export, socket)
    assert str(u) == text


def test_user_and_query_kept() -> None:
    u = parse_uri("nbds+unix://alice@/?socket=/s&tls-psk-file=/k")
    assert u.user == "alice"
    assert ("tls-psk-file", "/k") in u.query


@pytest.mark.parametrize(
    "text, why",
    [
        ("nbd+unix:///x", "needs ?socket=PATH"),
        ("nbd:///x", "needs a host"),
        ("nbd://h:notaport/x", "bad NBD URI"),
        ("nbd+unix://host/x?socket=/s", "has no host"),
        ("http://h/x", "not an NBD URI"),
    ],
)
def test_refused(text: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why.replace("?", r"\?")) as exc:
        parse_uri(text)
    assert "\n" not in str(exc.value)


def test_is_nbd_uri() -> None:
    assert is_nbd_uri("nbd+unix:///?socket=/s")
    assert is_nbd_uri("NBDS://h/")
    assert not is_nbd_uri("/dev/nbd0")
    assert not is_nbd_uri("nbd.img")
    assert not is_nbd_uri(None)
