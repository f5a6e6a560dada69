"""``dmtools.engine.rundir``: what a run directory must be, and files made there without following links."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from dmtools.engine import rundir
from dmtools.errors import DaemonError


@pytest.fixture
def private(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file outside the run directory that planted links point at."""
    f = tmp_path / "precious"
    f.write_bytes(b"precious\n")
    f.chmod(0o640)
    return f


def test_a_private_directory_passes(private: Path) -> None:
    assert rundir.check(str(private)) == str(private)


@pytest.mark.parametrize(("mode", "why"), [(0o777, "writable by others"), (0o770, "writable by its group"),
                                           (0o1777, "writable by others"), (0o722, "writable by others")])
def test_a_directory_others_can_write_is_refused(private: Path, mode: int, why: str) -> None:
    private.chmod(mode)
    with pytest.raises(DaemonError, match=why) as exc:
        rundir.check(str(private))
    assert exc.value.errno == errno.EPERM


def test_a_symlink_is_refused(private: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(private)
    with pytest.raises(DaemonError, match="symlink"):
        rundir.check(str(tmp_path / "link"))
    with pytest.raises(DaemonError, match="symlink"):
        rundir.ensure(str(tmp_path / "link"))


def test_an_ancestor_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # not sticky: anyone may rename our directory away and put theirs
    (shared / "run").mkdir(mode=0o700)
    with pytest.raises(DaemonError, match=f"{shared}: writable by others"):
        rundir.check(str(shared / "run"))
    shared.chmod(0o1777)  # root's and sticky, as /tmp: allowed when root runs the test
    if os.geteuid() == 0:
        assert rundir.check(str(shared / "run"))


def test_missing_is_enoent_and_ensure_creates_it_0700(tmp_path: Path) -> None:
    with pytest.raises(DaemonError) as exc:
        rundir.check(str(tmp_path / "a" / "run"))
    assert exc.value.errno == errno.ENOENT
    made = rundir.ensure(str(tmp_path / "a" / "run"))
    assert stat.S_IMODE(os.lstat(made).st_mode) == 0o700


def _snapshot(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, stat.S_IMODE(st.st_mode)


@pytest.mark.parametrize("flags", [os.O_RDWR, os.O_WRONLY | os.O_APPEND])
def test_open_file_replaces_a_symlink_and_never_writes_through_it(private: Path, outside: Path, flags: int) -> None:
    before = _snapshot(outside)
    (private / "daemon.log").symlink_to(outside)
    fd = rundir.open_file(str(private / "daemon.log"), flags, 0o600)
    try:
        os.write(fd, b"ours\n")
    finally:
        os.close(fd)
    st = os.lstat(private / "daemon.log")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert (private / "daemon.log").read_bytes() == b"ours\n"
    assert _snapshot(outside) == before
    assert sorted(os.listdir(private)) == ["daemon.log"]  # no temporary name left


def test_open_file_replaces_a_hard_link(private: Path, outside: Path) -> None:
    os.link(outside, private / "daemon.pid")
    fd = rundir.open_file(str(private / "daemon.pid"), os.O_RDWR, 0o644)
    os.write(fd, b"123\n")
    os.close(fd)
    assert outside.read_bytes() == b"precious\n" and outside.stat().st_nlink == 1
    assert (private / "daemon.pid").read_bytes() == b"123\n"


def test_open_file_keeps_a_good_file_and_makes_a_log_private(private: Path) -> None:
    log = private / "daemon.log"
    log.write_bytes(b"old line\n")
    log.chmod(0o644)
    fd = rundir.open_file(str(log), os.O_WRONLY | os.O_APPEND, 0o600)
    os.write(fd, b"new line\n")
    os.close(fd)
    assert log.read_bytes() == b"old line\nnew line\n"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_open_file_refuses_a_directory(private: Path) -> None:
    (private / "daemon.pid").mkdir()
    with pytest.raises(DaemonError, match="directory"):
        rundir.open_file(str(private / "daemon.pid"), os.O_RDWR)


def test_bind_socket_replaces_a_planted_link(private: Path, outside: Path) -> None:
    before = _snapshot(outside)
    path = private / "control.sock"
    path.symlink_to(outside)
    server = rundir.bind_socket(str(path))
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        rundir.check_socket(str(path))
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))
    finally:
        server.close()
    assert _snapshot(outside) == before
    assert sorted(os.listdir(private)) == ["control.sock"]


def test_check_socket_refuses_a_link_or_a_file(private: Path, outside: Path) -> None:
    (private / "control.sock").symlink_to(outside)
    with pytest.raises(DaemonError, match="control.sock: it is a symlink"):
        rundir.check_socket(str(private / "control.sock"))
    os.unlink(private / "control.sock")
    (private / "control.sock").write_bytes(b"")
    with pytest.raises(DaemonError, match="control.sock: it is not a socket"):
        rundir.check_socket(str(private / "control.sock"))
    os.unlink(private / "control.sock")
    with pytest.raises(FileNotFoundError):
        rundir.check_socket(str(private / "control.sock"))


def test_replace_symlink_replaces_the_entry_not_its_target(private: Path, outside: Path) -> None:
    before = _snapshot(outside)
    link = private / "NAME"
    link.symlink_to(outside)
    rundir.replace_symlink("/dev/loop7", str(link))
    assert os.readlink(link) == "/dev/loop7"
    assert _snapshot(outside) == before


def test_subdir_refuses_a_link_to_elsewhere(private: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (private / "fuse").symlink_to(elsewhere)
    with pytest.raises(DaemonError, match="symlink"):
        rundir.subdir(str(private / "fuse"), 0o700)
    assert rundir.subdir(str(private / "mapper"), 0o755) == str(private / "mapper")


@pytest.fixture
def long_run(tmp_path: Path) -> Path:
    """A private run directory whose socket path is longer than ``sun_path`` (108 bytes)."""
    d = tmp_path / ("x" * 110) / "run"
    d.mkdir(mode=0o700, parents=True)
    assert len(os.fsencode(rundir.socket_path(str(d)))) > 108  # sun_path
    return d


def test_a_socket_path_longer_than_sun_path_binds_and_connects(long_run: Path, outside: Path) -> None:
    """Bound and reached by ``/proc/self/fd/N/control.sock``: the socket is in the run directory,
    0600, and a link planted there is replaced, not followed."""
    before, fds = _snapshot(outside), len(os.listdir("/proc/self/fd"))
    path = long_run / "control.sock"
    path.symlink_to(outside)
    server = rundir.bind_socket(str(path))
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        rundir.check_socket(str(path))
        with socket.socket(socket.AF_UNIX) as c:
            rundir.connect(c, str(path))
            conn, _ = server.accept()
            with conn:
                c.sendall(b"ping")
                assert conn.recv(4) == b"ping"
    finally:
        server.close()
    assert _snapshot(outside) == before
    assert sorted(os.listdir(long_run)) == ["control.sock"]
    assert len(os.listdir("/proc/self/fd")) == fds  # the directory's O_PATH descriptors are closed


def test_a_long_socket_path_without_proc_is_refused_in_one_line(long_run: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``/proc`` to name the directory by: a clear error naming the limit, nothing made."""
    from dmtools.engine.client import UserspaceClient

    monkeypatch.setattr(rundir, "PROC_FD", str(tmp_path / "no-proc"))
    path = str(long_run / "control.sock")
    why = f"run directory {long_run} is too long for a Unix socket \\(.* at most 107 bytes: sun_path\\)"
    with pytest.raises(DaemonError, match=why) as err:
        rundir.bind_socket(path)
    assert err.value.errno == errno.ENAMETOOLONG and "\n" not in str(err.value)
    assert os.listdir(long_run) == []
    with pytest.raises(DaemonError, match=why) as err:
        UserspaceClient(str(long_run))
    assert err.value.errno == errno.ENAMETOOLONG and "None" not in str(err.value)


def test_a_long_socket_path_through_a_symlinked_directory_is_refused(long_run: Path, tmp_path: Path) -> None:
    link = tmp_path / ("y" * 110)
    link.symlink_to(long_run)
    with pytest.raises(DaemonError, match="it is a symlink") as err:
        with socket.socket(socket.AF_UNIX) as c:
            rundir.connect(c, str(link / "control.sock"))
    assert err.value.errno == errno.EPERM


def test_a_daemon_in_a_long_run_directory_serves_every_connection(long_run: Path, tmp_path: Path) -> None:
    """The control connection, a device's I/O connection and the event stream all reach a
    daemon whose socket path is longer than ``sun_path``."""
    from dmtools.engine.client import UserspaceClient
    from dmtools.testing.daemon import serving_daemon
    from dmtools.testing.wait import wait_until

    img = tmp_path / "a.img"
    img.write_bytes(b"\0" * 65536)
    heard: list[object] = []
    with serving_daemon(str(long_run)) as daemon:
        client = UserspaceClient(str(long_run))
        reader = threading.Thread(target=lambda: heard.extend(client.events(timeout=10)), daemon=True)
        reader.start()
        wait_until(lambda: daemon.hub is not None and bool(daemon.hub.subscribers), "the subscription", 10)
        client.create("long-dmtt", f"0 128 linear {img} 0")
        assert [e.name for e in client.list()] == ["long-dmtt"]
        ep = client.open_endpoint("long-dmtt")
        try:
            assert ep.write(b"d" * 512, 512) == 512
            ep.flush()
        finally:
            ep.close()
        assert img.read_bytes()[512:1024] == b"d" * 512
        client.remove("long-dmtt")
        assert client.list() == []
        wait_until(lambda: any(getattr(e, "device", None) == "long-dmtt" for e in heard), "the events", 10)
        client.close()
    reader.join(10)
    assert not reader.is_alive()
