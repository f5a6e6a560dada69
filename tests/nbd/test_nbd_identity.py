"""One export named two ways: a symlink or hard link to its socket, a relative socket path,
``./`` in it, a percent-encoded export name, ``nbds://``, TLS keys in the query, an address
spelled another way. Each names the same bytes, so kcopyd, mirror legs and a snapshot's COW refuse
what they refuse for one spelling; and a table's relative socket is the caller's, not the daemon's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kcopyd
from dmtools.errors import DeviceConflict, InvalidArgument
from dmtools.identity import identify, normalize_nbd_uri
from dmtools.nbd import NbdEndpoint
from dmtools.testing.nbdserver import NbdServer, serve_command

MiB = 1 << 20
S = 512


def _spellings(srv: NbdServer, tmp_path: Path) -> list[str]:
    """The export of ``srv`` (served as ``""``) named five more ways (each one connects)."""
    sock = Path(srv.socket)
    (tmp_path / "link.sock").symlink_to(sock.name)
    os.link(sock, tmp_path / "hard.sock")
    return [
        f"nbd+unix:///?socket={tmp_path}/link.sock",
        f"nbd+unix:///?socket={tmp_path}/hard.sock",
        f"nbd+unix:///?socket={tmp_path}/./{sock.name}",
        f"nbd+unix://?socket={sock}",  # no path: the default export too
        f"nbd+unix:///?socket={os.path.relpath(sock)}",
    ]


def test_spellings_of_one_export_are_one_identity(tmp_path: Path, start_nbdkit: Callable[..., NbdServer],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    srv = start_nbdkit(["memory", "1M"])
    monkeypatch.chdir(tmp_path)
    one = identify(srv.uri)
    sock = srv.socket
    tls_and_case = [f"nbds+unix:///?socket={sock}", f"nbd+unix:///?tls-psk-file=k&socket={sock}",
                    f"NBD+UNIX:///?socket={sock}"]
    for uri in _spellings(srv, tmp_path) + tls_and_case:
        assert identify(uri).overlaps(one), uri
    named = start_nbdkit(["memory", "1M"])
    assert identify(f"nbd+unix:///%78?socket={named.socket}").overlaps(identify(f"nbd+unix:///x?socket={named.socket}"))
    # another export name, or another server, is other bytes (which names a server serves is its own)
    assert not identify(f"nbd+unix:///y?socket={named.socket}").overlaps(identify(f"nbd+unix:///x?socket={named.socket}"))
    assert not identify(named.uri).overlaps(one)


def test_tcp_spellings() -> None:
    base = identify("nbd://127.0.0.1/e")
    for uri in ["nbds://127.0.0.1:10809/e", "nbd://[::ffff:127.0.0.1]/e", "nbd://user@127.0.0.1/e?tls-verify-peer=false"]:
        assert identify(uri).overlaps(base), uri
    assert identify("nbd://[0:0::1]:99/e").overlaps(identify("nbd://[::1]:99/e"))
    assert not identify("nbd://127.0.0.1:10810/e").overlaps(base)
    assert normalize_nbd_uri("nbds://User@[0::1]:99/a%2Fb?tls-psk-file=/k") == "nbd://[::1]:99/a/b"


def test_kcopyd_refuses_an_overlapping_copy_within_one_export_named_two_ways(
        tmp_path: Path, start_nbdkit: Callable[..., NbdServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """Regions named by URI and regions given as endpoints: the overlap is refused before any I/O
    (it was copied with pieces in flight at once, no memmove order: the export came out wrong)."""
    srv = start_nbdkit(["memory", "4M"])
    data = os.urandom(4 * MiB)
    with NbdEndpoint(srv.uri, writable=True) as ep:
        ep.write(data, 0)
    monkeypatch.chdir(tmp_path)
    with kcopyd.Client(num_pages=256) as kc:
        for other in _spellings(srv, tmp_path):
            with pytest.raises(InvalidArgument, match="one NBD export"):
                kc.copy(kcopyd.Region(srv.uri, 0, 2 * MiB // S), [kcopyd.Region(other, 8, 2 * MiB // S)])
        with NbdEndpoint(srv.uri) as src, NbdEndpoint(f"nbd+unix:///?socket={tmp_path}/link.sock",
                                                      writable=True) as dst:
            with pytest.raises(InvalidArgument, match="one NBD export"):
                kc.copy(kcopyd.Region(src, 0, 2 * MiB // S), [kcopyd.Region(dst, 8, 2 * MiB // S)])
            with pytest.raises(InvalidArgument, match="one NBD export"):  # a small job, run inline
                kc.run(kcopyd.Region(src, 0, 16), [kcopyd.Region(dst, 8, 16)])
            # disjoint ranges of one export are a legitimate copy
            job = kc.copy(kcopyd.Region(src, 0, 2 * MiB // S), [kcopyd.Region(dst, 2 * MiB // S, 2 * MiB // S)])
            assert job.wait(30) and job.ok
    got = bytearray(4 * MiB)
    with NbdEndpoint(srv.uri) as ep:
        ep.readinto(got, 0)
    assert bytes(got) == data[: 2 * MiB] * 2


def test_copy_command_refuses_one_export_named_two_ways(tmp_path: Path,
                                                        start_nbdkit: Callable[..., NbdServer]) -> None:
    """`dmtools copy` opens both as endpoints: refused in one line, exit 1."""
    srv = start_nbdkit(["memory", "1M"])
    (tmp_path / "link.sock").symlink_to(Path(srv.socket).name)
    res = subprocess.run([sys.executable, "-m", "dmtools.cli.main", "copy", srv.uri,
                          f"nbd+unix:///?socket={tmp_path}/link.sock"], capture_output=True, text=True)
    assert res.returncode == 1
    assert "one NBD export" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_mirror_legs_on_one_export_named_two_ways_refused(engine: Any, tmp_path: Path,
                                                          start_nbdkit: Callable[..., NbdServer]) -> None:
    from mirror import MirrorManager

    srv = start_nbdkit(["memory", "4M"])
    (tmp_path / "link.sock").symlink_to(Path(srv.socket).name)
    with pytest.raises(DeviceConflict, match="are the same bytes"):
        MirrorManager(engine).create("m-dmtt", [srv.uri, f"nbd+unix:///?socket={tmp_path}/link.sock"],
                                     region_size=128, nosync=True, monitor=False)
    assert list(engine.list()) == []


def test_snapshot_cow_on_the_origins_export_named_another_way_refused(
        engine: Any, tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    from snapshot import SnapshotManager

    srv = start_nbdkit(["memory", "8M"])
    (tmp_path / "link.sock").symlink_to(Path(srv.socket).name)
    engine.create("org-dmtt", f"0 {4 * MiB // S} linear {srv.uri} 0")
    with pytest.raises(DeviceConflict, match="share bytes"):
        SnapshotManager(engine).create("org-dmtt", f"nbd+unix:///?socket={tmp_path}/link.sock", "snap-dmtt",
                                       chunk_size=8)
    assert [e.name for e in engine.list()] == ["org-dmtt"]
    assert str(engine.table("org-dmtt")) == f"0 {4 * MiB // S} linear {srv.uri} 0"


def test_a_tables_relative_socket_is_the_callers(tmp_path: Path, start_nbdkit: Callable[..., NbdServer],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon has a working directory of its own: the client sends the socket's absolute path
    (the caller's server), and the daemon refuses a table that still holds a relative one."""
    from dmtools.engine.client import UserspaceClient
    from dmtools.testing.daemon import serving_daemon

    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir()
    other.mkdir()
    mine = start_nbdkit(["data", "data=0x43*4096"], name="work/s")
    theirs = start_nbdkit(["data", "data=0x44*4096"], name="other/s")
    assert (mine.socket, theirs.socket) == (work / "s.sock", other / "s.sock")
    with serving_daemon(str(tmp_path / "run")) as daemon, UserspaceClient(daemon.run_dir) as client:
        with pytest.raises(InvalidArgument, match="relative device path"):
            client.call("create", name="raw-dmtt", table="0 8 linear nbd+unix:///?socket=s.sock 0")
        monkeypatch.chdir(work)
        client.create("d-dmtt", "0 8 linear nbd+unix:///?socket=s.sock 0", readonly=True)
        monkeypatch.chdir(other)
        assert client.table("d-dmtt").devices() == (f"nbd+unix:///?socket={work}/s.sock",)
        buf = bytearray(4096)
        with client.open_endpoint("d-dmtt", writable=False) as ep:
            ep.readinto(buf, 0)
        assert bytes(buf) == b"C" * 4096
        assert [e.name for e in client.list()] == ["d-dmtt"]
        client.remove("d-dmtt")


# --- an export and the file or device its local server serves --------------------------------------
@pytest.mark.parametrize("argv, path", [
    (["-U", "/s", "-P", "/p", "file", "/srv/a.img"], "/srv/a.img"),
    (["--exit-with-parent", "--threads", "16", "--readonly", "--tls=off", "file", "file=/proc/7/fd/3"],
     "/proc/7/fd/3"),
    (["-Ufoo", "--filter=log", "--filter", "delay", "file", "logfile=/l", "file=/a", "rdelay=1"], "/a"),
    (["/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-file-plugin.so", "/a"], "/a"),
    (["--filter=offset", "file", "/a", "offset=4096"], None),  # bytes moved
    (["--filter", "cow", "file", "/a"], None),  # writes diverted
    (["file", "dir=/srv"], None),
    (["file", "a.img"], None),  # relative to a directory nbdkit may have left
    (["memory", "1G"], None),
    (["-e", "file", "memory", "1G"], None),  # "file" is the export name here
])
def test_parse_nbdkit_argv(argv: list[str], path: str | None) -> None:
    from dmtools.nbd.peer import parse_nbdkit_argv

    assert parse_nbdkit_argv(argv) == path


def test_copy_between_a_file_and_its_export_is_refused(tmp_path: Path, start_nbdkit: Callable[..., NbdServer]) -> None:
    """An export served from a file here (``dmtools serve``'s nbdkit, or one started with the
    ``file`` plugin behind the ``log`` filter) shares that file's bytes, offset for offset: a copy
    between them that overlaps is refused, by the API and by `dmtools copy`; one between disjoint
    ranges, or from an export of another file, still runs. Before, the API copy ran and left the
    file wrong."""
    from dmtools.nbd.serve import ServeOptions, Server

    image = tmp_path / "a.img"
    data = os.urandom(4 * MiB)
    image.write_bytes(data)
    other = tmp_path / "b.img"
    other.write_bytes(data)
    (tmp_path / "c.img").write_bytes(bytes(MiB))
    logged = start_nbdkit(["file", str(image), f"logfile={tmp_path}/log"], filters=["log"])
    with Server(ServeOptions(device=str(image), socket=str(tmp_path / "s.sock"), writable=True)) as srv:
        for uri in (srv.uri, logged.uri):
            with kcopyd.Client(num_pages=256) as kc:
                with pytest.raises(InvalidArgument, match=f"is served from {image}"):
                    kc.copy(kcopyd.Region(str(image), 0, MiB // S), [kcopyd.Region(uri, 8, MiB // S)])
                with pytest.raises(InvalidArgument, match=f"is served from {image}"):
                    kc.copy(kcopyd.Region(uri, 8, MiB // S), [kcopyd.Region(str(tmp_path / "c.img"), 0, MiB // S),
                                                              kcopyd.Region(str(image), 0, MiB // S)])
            res = subprocess.run([sys.executable, "-m", "dmtools.cli.main", "copy", str(image), uri],
                                 capture_output=True, text=True)
            assert res.returncode == 1 and "is served from" in res.stderr, res.stderr
            assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert image.read_bytes() == data
        with kcopyd.Client(num_pages=256) as kc:
            job = kc.copy(kcopyd.Region(str(image), 0, MiB // S), [kcopyd.Region(srv.uri, 2 * MiB // S, MiB // S)])
            assert job.wait(30) and job.ok
            job = kc.copy(kcopyd.Region(str(other), 0, MiB // S), [kcopyd.Region(srv.uri, 0, MiB // S)])
            assert job.wait(30) and job.ok
    assert image.read_bytes() == data[: 2 * MiB] + data[:MiB] + data[3 * MiB:]


def test_mirror_leg_on_the_export_of_the_other_leg_refused(engine: Any, tmp_path: Path,
                                                           start_nbdkit: Callable[..., NbdServer]) -> None:
    """A table names exports without connecting first: the server of a Unix socket is found by
    the socket file (its listening socket and the nbdkit holding it), so a mirror whose second
    leg is the export of its first leg's file is refused (its legs would be one copy of the data)."""
    from mirror import MirrorManager

    image = tmp_path / "leg0.img"
    image.write_bytes(bytes(4 * MiB))
    srv = start_nbdkit(["file", str(image)])
    assert identify(srv.uri).overlaps(identify(str(image)))
    with pytest.raises(DeviceConflict, match=f"backed by {image}"):
        MirrorManager(engine).create("m-dmtt", [str(image), srv.uri], region_size=128, nosync=True, monitor=False)
    assert list(engine.list()) == []
    other = tmp_path / "leg1.img"
    other.write_bytes(bytes(4 * MiB))
    assert not identify(start_nbdkit(["file", str(other)]).uri).overlaps(identify(str(image)))


@pytest.mark.root
def test_copy_between_a_backing_file_and_the_served_device_is_refused(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`dmtools serve` of a userspace-engine device mapped over a file at an offset: the export is
    those bytes of the file, through the engine's table, so a copy from the file onto an
    overlapping range of the export is refused and a disjoint one runs."""
    import signal

    from dmtools.engine.client import open_userspace
    from dmtools.testing.daemon import stop_daemon

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    monkeypatch.setenv("DMTOOLS_RUN_DIR", str(run_dir))
    backing = tmp_path / "backing.img"
    data = os.urandom(8 * MiB)
    backing.write_bytes(data)
    dm = open_userspace(str(run_dir))
    try:
        dm.create("srv-dmtt", f"0 {4 * MiB // S} linear {backing} {2 * MiB // S}")  # bytes 2-6 MiB
        with serve_command("srv-dmtt", "--socket", str(tmp_path / "srv.sock"), "--writable") as (proc, info):
            uri = info["uri"]
            with kcopyd.Client(num_pages=256) as kc:
                with pytest.raises(InvalidArgument, match="is served from"):
                    # file bytes 0-3 MiB onto export bytes 0-3 MiB, which are file bytes 2-5 MiB
                    kc.copy(kcopyd.Region(str(backing), 0, 3 * MiB // S), [kcopyd.Region(uri, 0, 3 * MiB // S)])
                job = kc.copy(kcopyd.Region(str(backing), 0, MiB // S), [kcopyd.Region(uri, MiB // S, MiB // S)])
                assert job.wait(30) and job.ok  # file 0-1 MiB onto file 3-4 MiB: disjoint
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        assert backing.read_bytes() == data[: 3 * MiB] + data[:MiB] + data[4 * MiB:]
        dm.remove("srv-dmtt")
    finally:
        stop_daemon(dm)


def test_tcp_export_of_a_file_here_and_its_host_spelled_two_ways(tmp_path: Path) -> None:
    """Over TCP (`serve --listen 127.0.0.1:0 --insecure`): ``localhost`` and ``127.0.0.1`` reach one
    server, and its export is the file it serves; overlapping copies are refused both ways."""
    from dmtools.nbd.serve import ServeOptions, Server

    image = tmp_path / "a.img"
    data = os.urandom(4 * MiB)
    image.write_bytes(data)
    with Server(ServeOptions(device=str(image), listen=("127.0.0.1", 0), insecure=True, writable=True)) as srv:
        port = srv.address[1]
        by_name, by_address = f"nbd://localhost:{port}/", f"nbd://127.0.0.1:{port}/"
        with kcopyd.Client(num_pages=256) as kc:
            with pytest.raises(InvalidArgument, match="one NBD export"):
                kc.copy(kcopyd.Region(by_name, 0, MiB // S), [kcopyd.Region(by_address, 8, MiB // S)])
            with pytest.raises(InvalidArgument, match=f"is served from {image}"):
                kc.copy(kcopyd.Region(str(image), 0, MiB // S), [kcopyd.Region(by_name, 8, MiB // S)])
            job = kc.copy(kcopyd.Region(by_name, 0, MiB // S), [kcopyd.Region(by_address, 2 * MiB // S, MiB // S)])
            assert job.wait(30) and job.ok
    assert image.read_bytes() == data[: 2 * MiB] + data[:MiB] + data[3 * MiB:]
