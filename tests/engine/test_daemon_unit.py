"""Unit tier: the daemon's control socket (no exposure) and the wire protocol."""

from __future__ import annotations

import os
import socket

import pytest

from dmtools.backend import DeviceInfo, StatusLine
from dmtools.engine import protocol
from dmtools.engine.client import UserspaceClient
from dmtools.engine.daemon import Daemon
from dmtools.errors import DaemonError, DeviceExists, DeviceNotFound, InvalidTable, NoSpace
from dmtools.testing.wait import wait_until


@pytest.fixture
def client(daemon):
    with UserspaceClient(daemon.run_dir) as c:
        yield c


def test_verbs_round_trip(client, make_image):
    img = make_image(1 << 20)
    info = client.create("a", f"0 2048 linear {img} 0", uuid="U1")
    assert isinstance(info, DeviceInfo) and info.live_table and info.uuid == "U1"
    assert str(client.table("a")) == f"0 2048 linear {img} 0"
    assert client.status("a") == [StatusLine(0, 2048, "linear", "")]
    client.load("a", "0 8 zero")
    assert client.info("a").inactive_table
    client.clear("a")
    client.suspend("a", noflush=True)
    assert client.info("a").suspended
    client.resume("a")
    client.rename("a", "b")
    assert [e.name for e in client.list()] == ["b"]
    assert client.wait_event("b", 0, timeout=5) == 1
    assert client.targets()["striped"][0] == 1
    assert client.version().backend == "userspace"
    assert client.deps("b") == []
    assert client.device_ref("b").startswith("0:")
    client.remove("b")
    assert client.list() == []


def test_errors_keep_their_class(client):
    with pytest.raises(DeviceNotFound) as exc:
        client.info("missing")
    assert exc.value.device == "missing" and exc.value.operation == "info"
    client.create("a", "0 8 zero")
    with pytest.raises(DeviceExists):
        client.create("a", "0 8 zero")
    with pytest.raises(InvalidTable):
        client.load("a", "0 8 zero x")
    assert not client.info("a").inactive_table


def test_bad_requests_answered_not_fatal(daemon):
    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.socket_path)
    f = s.makefile("rb")
    s.sendall(b'{"verb": "explode"}\n')
    reply = protocol.receive(f)
    assert reply["ok"] is False and "unknown verb" in reply["error"]["message"]
    s.sendall(b'{"verb": "info", "args": {"name": "x", "bogus": 1}}\n')
    assert "unknown arguments" in protocol.receive(f)["error"]["message"]
    s.sendall(b"not json\n")
    assert protocol.receive(f)["error"]["class"] == "DaemonError"
    s.close()
    with UserspaceClient(daemon.run_dir) as c:  # the daemon still serves
        assert c.list() == []


def test_client_vanishing_mid_call(daemon, client):
    client.create("a", "0 8 zero")
    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.socket_path)
    protocol.send(s, {"verb": "wait_event", "args": {"name": "a", "event_nr": 0, "timeout": 30}})
    s.close()  # gone before the reply
    client.rename("a", "b")  # wakes the waiter, whose reply then has nowhere to go
    assert client.info("b").event_nr == 1
    client.remove("b")


def test_second_daemon_refused(daemon):
    other = Daemon(daemon.run_dir, expose=False)
    with pytest.raises(DaemonError):
        other.start()


def test_shutdown_refused_while_open(daemon, client):
    from dmtools.errors import DeviceBusy

    client.create("a", "0 8 zero")
    ep = daemon.engine.open_endpoint("a")  # an opener inside the daemon's engine
    try:
        with pytest.raises(DeviceBusy):
            client.shutdown()
        assert client.list()[0].name == "a"
    finally:
        ep.close()
    client.shutdown()
    with pytest.raises(DaemonError):
        client.list()


def test_shutdown_returns_once_the_daemon_has_finished(daemon, client):
    """The verb answers before the daemon has removed its devices and released its pid lock: the
    call waits for that (here, a daemon on a thread of this process: until its pid file is gone)."""
    client.create("a", "0 8 zero")
    engine = daemon.engine
    assert client.shutdown() == os.getpid()
    assert not os.path.exists(daemon.pid_path)
    assert engine.list() == [] and daemon.engine is None
    after = Daemon(daemon.run_dir, expose=False)
    after.start()  # the run directory is free at once
    after.shutdown()


def test_shutdown_that_does_not_finish_is_an_error(daemon, client):
    import errno
    import threading

    gate = threading.Event()
    close = daemon.engine.close
    daemon.engine.close = lambda: (gate.wait(30), close())
    try:
        with pytest.raises(DaemonError, match=r"did not exit within 0.2 s") as info:
            client.shutdown(timeout=0.2)
        assert info.value.errno == errno.ETIMEDOUT
        assert os.path.exists(daemon.pid_path)  # still held: the daemon is stuck in its shutdown
    finally:
        gate.set()
    wait_until(lambda: not os.path.exists(daemon.pid_path), "the daemon to finish")


def test_socket_is_private(daemon):
    mode = os.stat(daemon.socket_path).st_mode & 0o777
    assert mode == 0o600


def test_protocol_error_decoding_only_builds_dmtools_errors():
    err = protocol.decode_error({"class": "NoSpace", "message": "full", "errno": 28})
    assert isinstance(err, NoSpace) and err.errno == 28
    assert type(protocol.decode_error({"class": "SystemExit", "message": "x"})).__name__ == "DMError"
    assert protocol.encode_error(OSError(5, "EIO"))["errno"] == 5


def test_io_over_the_socket_without_exposure(client, make_image):
    img = make_image(8 << 20)
    client.create("io", f"0 {8 << 11} linear {img} 0")
    ep = client.open_endpoint("io")
    try:
        assert type(ep).__name__ == "SocketEndpoint"
        assert ep.size == 8 << 20
        assert client.info("io").open_count == 1
        data = os.urandom(6 << 20)  # bigger than one request: split by the client
        assert ep.write(data, 4096) == len(data)
        ep.flush()
        back = bytearray(len(data))
        assert ep.readinto(back, 4096) == len(data)
        assert bytes(back) == data
        assert ep.readinto(bytearray(8192), (8 << 20) - 4096) == 4096  # short at the end
        ep.zero(4096, 4096)
        one = bytearray(4096)
        ep.readinto(one, 4096)
        assert bytes(one) == bytes(4096)
        with pytest.raises(NoSpace):
            ep.write(b"x" * 512, 8 << 20)
    finally:
        ep.close()
    assert client.info("io").open_count == 0
    with open(img, "rb") as f:
        f.seek(8192)
        assert f.read(4096) == data[4096:8192]


def test_dropped_connection_releases_its_handles(daemon, client):
    client.create("h", "0 8 zero")
    s = socket.socket(socket.AF_UNIX)
    s.connect(daemon.socket_path)
    f = s.makefile("rb")
    protocol.send(s, {"verb": "open", "args": {"name": "h", "writable": True}})
    assert protocol.receive(f)["ok"]
    assert client.info("h").open_count == 1
    f.close()
    s.close()  # a client that dies with the device open
    wait_until(lambda: client.info("h").open_count == 0, "the dead client's open to be dropped", 5)
    client.remove("h")


def test_info_without_open_count_never_counts(daemon, client, monkeypatch):
    """``info(open_count=False)`` (what the event watcher asks twice a second) skips the engine's
    opener count, which probes an exposed device with an ``O_EXCL`` open: over the daemon's
    protocol and in ``events.state.capture``; a plain ``info`` still counts."""
    from dmtools.engine.engine import Engine
    from dmtools.events.state import capture

    counted: list[str] = []
    real = Engine._open_count

    def spy(self, dev):
        counted.append(dev.name)
        return real(self, dev)

    monkeypatch.setattr(Engine, "_open_count", spy)
    client.create("a", "0 8 zero")
    counted.clear()
    assert client.info("a", open_count=False).open_count == -1
    state = capture(client, "a")
    assert state is not None and state.name == "a" and not state.suspended
    assert counted == []
    assert client.info("a").open_count == 0
    assert counted == ["a"]
