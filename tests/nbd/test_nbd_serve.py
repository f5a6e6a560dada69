"""``dmtools serve``: a device exported over NBD by nbdkit, read back through libnbd.

The server tests serve a regular file (what nbdkit's ``file`` plugin does with a device is the same
calls); the root-tier tests serve a userspace-engine device through the command itself.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmtools.errors import DeviceIOError, InvalidArgument
from dmtools.nbd import NbdConnectionError, NbdEndpoint
from dmtools.nbd.serve import ServeOptions, Server, parse_listen
from dmtools.testing.daemon import stop_daemon
from dmtools.testing.nbdserver import missing_tools, serve_command

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _need_nbdkit() -> None:
    reason = missing_tools("nbdkit")
    if reason:
        pytest.skip(reason)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(4 * MiB))
    return path


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    servers: list[Server] = []

    def start(device: Path, **kw: object) -> Server:
        kw.setdefault("socket", str(tmp_path / f"s{len(servers)}.sock"))
        srv = Server(ServeOptions(device=str(device), **kw))  # type: ignore[arg-type]
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def _read(uri: str, size: int) -> bytes:
    buf = bytearray(size)
    with NbdEndpoint(uri) as ep:
        assert ep.readinto(buf, 0) == size
    return bytes(buf)


def test_serves_the_bytes_read_only(image: Path, serve: object) -> None:
    srv = serve(image)  # type: ignore[operator]
    assert srv.uri.startswith("nbd+unix:///?socket=")
    assert oct(os.stat(srv.address).st_mode & 0o777) == oct(0o600)
    assert _read(srv.uri, 4 * MiB) == image.read_bytes()
    before = image.read_bytes()
    with NbdEndpoint(srv.uri, writable=True) as ep:
        assert ep.read_only  # the server says so
        with pytest.raises(DeviceIOError):
            ep.write(b"x" * 4096, 0)
    assert image.read_bytes() == before


def test_writable_two_clients_and_flush(image: Path, serve: object) -> None:
    """Writes from two connections, each flushed, are in the file; multi-conn is offered."""
    srv = serve(image, writable=True, export_name="vol")  # type: ignore[operator]
    assert "/vol?" in srv.uri
    a, b = os.urandom(MiB), os.urandom(MiB)
    with NbdEndpoint(srv.uri, writable=True) as one, NbdEndpoint(srv.uri, writable=True) as two:
        assert not one.read_only and one.can_flush
        one.write(a, 0)
        two.write(b, 2 * MiB)
        one.flush()
        two.flush()
    data = image.read_bytes()
    assert data[:MiB] == a and data[2 * MiB:3 * MiB] == b


def test_tcp_needs_tls_unless_insecure(image: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="requires TLS"):
        Server(ServeOptions(device=str(image), listen=("127.0.0.1", 0)))
    srv = Server(ServeOptions(device=str(image), listen=("127.0.0.1", 0), insecure=True))
    try:
        host, port = srv.address  # type: ignore[misc]
        assert host == "127.0.0.1" and port > 0
        assert srv.uri == f"nbd://127.0.0.1:{port}/"
        assert _read(srv.uri, 4 * MiB) == image.read_bytes()
    finally:
        srv.stop()


def test_tcp_with_psk(image: Path, tmp_path: Path) -> None:
    """TLS with a pre-shared key: a client with the key reads; one without TLS is refused."""
    psk = tmp_path / "keys.psk"
    psk.write_text(f"alice:{secrets.token_hex(32)}\n")
    psk.chmod(0o600)
    srv = Server(ServeOptions(device=str(image), listen=("127.0.0.1", 0), tls_psk=str(psk)))
    try:
        _, port = srv.address  # type: ignore[misc]
        assert srv.uri.startswith("nbds://")
        uri = f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={psk}"
        assert _read(uri, 4 * MiB) == image.read_bytes()
        with pytest.raises(NbdConnectionError, match="requires TLS"):
            NbdEndpoint(f"nbd://127.0.0.1:{port}/")
    finally:
        srv.stop()


def test_socket_is_never_replaced(image: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("mine")
    with pytest.raises(InvalidArgument, match="already exists"):
        Server(ServeOptions(device=str(image), socket=str(taken)))
    assert taken.read_text() == "mine"


def test_stop_removes_only_our_socket(image: Path, tmp_path: Path) -> None:
    srv = Server(ServeOptions(device=str(image), socket=str(tmp_path / "s.sock")))
    srv.stop()
    assert not (tmp_path / "s.sock").exists()
    assert srv.process.returncode is not None


def test_server_gone_fails_the_client(image: Path, serve: object) -> None:
    """nbdkit killed: a connected client gets an error, not a hang."""
    srv = serve(image)  # type: ignore[operator]
    with NbdEndpoint(srv.uri, timeout=10) as ep:
        srv.process.kill()
        srv.process.wait()
        with pytest.raises(DeviceIOError):
            ep.readinto(bytearray(MiB), 0)


@pytest.mark.parametrize("text, want", [("127.0.0.1:10809", ("127.0.0.1", 10809)),
                                        (":0", ("", 0)), ("[::1]:99", ("::1", 99))])
def test_parse_listen(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["host", "host:port", "h:70000", ""])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_listen(text)


def _dmtools(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmtools.cli.main", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, why",
    [
        (("serve", "x", "--listen", "127.0.0.1:0"), "requires TLS"),
        (("serve", "x", "--listen", "nowhere"), "ADDR:PORT"),
        (("serve", "x", "--socket", "/", "--insecure"), "already exists"),
        (("serve", "x", "--listen", "127.0.0.1:0", "--tls-psk", "/nonexistent/k"), "does not exist"),
    ],
)
def test_cli_refusals_one_line(args: tuple[str, ...], why: str) -> None:
    """Refused before any backend is opened or anything is bound: exit 1, one line."""
    res = _dmtools(*args)
    assert res.returncode == 1
    assert why in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.root
def test_cli_serves_an_engine_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dmtools serve` of a userspace-engine device: the URI reads the device's bytes, the device
    cannot be removed while served, and SIGTERM stops cleanly (socket gone, exit 0)."""
    from dmtools.engine.client import open_userspace
    from dmtools.errors import DeviceBusy

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    monkeypatch.setenv("DMTOOLS_RUN_DIR", str(run_dir))
    backing = tmp_path / "backing.img"
    backing.write_bytes(os.urandom(4 * MiB))
    dm = open_userspace(str(run_dir))
    try:
        dm.create("srv-dmtt", f"0 {4 * MiB // 512} linear {backing} 0")
        sock = tmp_path / "srv.sock"
        with serve_command("srv-dmtt", "--socket", str(sock)) as (proc, info):
            assert info["writable"] is False and info["uri"] == f"nbd+unix:///srv-dmtt?socket={sock}"
            assert _read(info["uri"], 4 * MiB) == backing.read_bytes()
            with pytest.raises(DeviceBusy):
                dm.remove("srv-dmtt")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        assert not sock.exists()
        dm.remove("srv-dmtt")
    finally:
        stop_daemon(dm)


#: `dmtools serve` of a file, run as a command: the backend's lookup of NAME is the seam replaced
#: (NAME is the image); with argv[1] "emit" the process sends itself SIGTERM as the URI is printed.
_SERVE_FILE = """
import os, signal, sys
from dmtools.cli import common, main

class _Backend:
    def device_path(self, name):
        return name

common.open_backend = lambda args: _Backend()
if sys.argv[1] == "emit":
    printed = common.emit
    def emit(*args, **kw):
        printed(*args, **kw)
        os.kill(os.getpid(), signal.SIGTERM)
    common.emit = emit
sys.exit(main.main(["serve", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("when, signum", [("wait", signal.SIGHUP), ("wait", signal.SIGTERM),
                                          ("emit", signal.SIGTERM)])
def test_stop_signals_remove_the_socket(image: Path, tmp_path: Path, when: str, signum: int) -> None:
    """SIGHUP (a closed terminal) stops serving cleanly as SIGTERM does, and so does a signal
    that comes before the server waits (while its URI is printed): exit 0, socket gone, nbdkit
    gone. Before, both left the socket behind (SIGHUP: exit 129), and the next serve refused it."""
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([sys.executable, "-c", _SERVE_FILE, when, str(image), "--socket", str(sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving "), proc.stderr.read() if proc.stderr else ""
        if when == "wait":
            assert _read(f"nbd+unix:///{image}?socket={sock}", 4 * MiB) == image.read_bytes()  # serving
            proc.send_signal(signum)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not sock.exists()
