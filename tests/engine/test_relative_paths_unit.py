"""Relative device paths mean the caller's file (issue 15 item 4), unit tier.

The client makes every relative path of a table absolute in the caller's working directory; the
daemon, whose working directory is its own, refuses a table that still holds one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dmtools.engine import protocol
from dmtools.engine.client import UserspaceClient
from dmtools.engine.daemon import Daemon
from dmtools.errors import InvalidArgument
from dmtools.table import Table


@pytest.mark.parametrize(
    ("ref", "cwd", "expected"),
    [
        ("dev/loop14", "/home/u", "/home/u/dev/loop14"),
        ("./img", "/w", "/w/img"),
        ("a//b/./c", "/w", "/w/a/b/c"),
        ("../img", "/w/x", "/w/x/../img"),  # ".." kept: /w/x may be a symlink
        ("/dev/loop0", "/w", "/dev/loop0"),
        ("7:0", "/w", "7:0"),
        ("253:12", "/w", "253:12"),
        ("nbd://host/export", "/w", "nbd://host/export"),
        ("nbd+unix:///e?socket=/s", "/w", "nbd+unix:///e?socket=/s"),
        ("nbd+unix:///e?socket=s&tls-psk-file=./k", "/w", "nbd+unix:///e?socket=/w/s&tls-psk-file=/w/k"),
        ("nbds+unix://?socket=a%20b", "/w", "nbds+unix://?socket=/w/a%20b"),
        ("7:0x", "/w", "/w/7:0x"),  # not a device number: a file name
    ],
)
def test_absolute_reference(ref: str, cwd: str, expected: str) -> None:
    assert protocol.absolute_reference(ref, cwd) == expected


def test_absolute_table_rewrites_every_relative_reference(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    text = "0 8 linear dev/a 0\n8 16 striped 2 8 b 0 /dev/loop1 0\n24 8 linear 7:3 8"
    table = protocol.absolute_table(text)
    assert table.devices() == (f"{tmp_path}/dev/a", f"{tmp_path}/b", "/dev/loop1", "7:3")
    assert protocol.absolute_table(Table.parse(text)) == table


@pytest.mark.parametrize("verb", ["create", "load"])
def test_daemon_refuses_a_relative_path(daemon: Daemon, tmp_path: Path, verb: str) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"\0" * 8192)
    client = UserspaceClient(daemon.run_dir)
    try:
        if verb == "load":
            client.create("d", None)
        with pytest.raises(InvalidArgument, match="relative device path 'img'.*absolute path"):
            # sent as it is, past the client's own rewriting
            client.call(verb, name="d", table=f"0 8 zero\n8 8 linear {image} 0\n16 8 linear img 0")
        names = [e.name for e in client.list()]
        assert names == (["d"] if verb == "load" else [])
        if verb == "load":
            assert not client.info("d").inactive_table
    finally:
        client.close()


def test_client_sends_the_callers_file(daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon runs in another directory: the client's rewriting makes ``img`` the caller's."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "img").write_bytes(b"C" * 4096)
    other = tmp_path / "other"
    other.mkdir()
    (other / "img").write_bytes(b"D" * 4096)
    monkeypatch.chdir(work)
    client = UserspaceClient(daemon.run_dir)
    try:
        client.create("d", "0 8 linear img 0")
        monkeypatch.chdir(other)  # later calls from elsewhere see the same table
        assert client.table("d").devices() == (str(work / "img"),)
        with client.open_endpoint("d", writable=False) as ep:
            buf = bytearray(4096)
            assert ep.readinto(buf, 0) == 4096
        assert bytes(buf) == b"C" * 4096
        client.load("d", "0 8 linear img 0")
        assert client.table("d", inactive=True).devices() == (str(other / "img"),)
    finally:
        client.close()
