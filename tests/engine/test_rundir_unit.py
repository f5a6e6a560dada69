"""``dmtools.engine.rundir``: what a run directory must be, and files made there without following links."""

from __future__ import annotations

import errno
import os
import socket
import stat
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
