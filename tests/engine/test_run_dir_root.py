"""A safe run directory (issue 15 item 5), root tier.

Root's daemon and CLI, pointed (``DMTOOLS_RUN_DIR``) at a directory another user owns, with
symlinks planted there towards root's files (``daemon.pid``, ``daemon.log``, the socket, the
``fuse`` mount point, a ``mapper`` link), refuse it with a one-line error, and no file outside
(nor inside) changes: contents, modes and mtimes compared before and after. In a directory of its
own, root's daemon replaces planted links instead of following them, and its log is 0600.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmtools.cli import main as cli_main
from dmtools.engine import rundir
from dmtools.engine.client import UserspaceClient, open_userspace, start_daemon
from dmtools.engine.daemon import Daemon
from dmtools.errors import DaemonError, DMError
from dmtools.linux import process_gone
from dmtools.testing.daemon import stop_daemon

pytestmark = pytest.mark.root

NOBODY = 65534
PLANTED = ("daemon.pid", "daemon.log", "control.sock")


def _state(*roots: Path) -> dict[str, Any]:
    """Every entry under ``roots``: type, owner, mode, mtime, and content digest or link target."""
    out: dict[str, Any] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for name in [*dirnames, *filenames, ""]:
                path = os.path.join(dirpath, name) if name else dirpath
                st = os.lstat(path)
                what: Any = None
                if stat.S_ISLNK(st.st_mode):
                    what = os.readlink(path)
                elif stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as f:
                        what = hashlib.sha256(f.read()).hexdigest()
                out[path] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, what)
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Root-only files and a directory that planted links point at."""
    d = tmp_path / "outside"
    d.mkdir(mode=0o700)
    for name in PLANTED + ("link-target",):
        f = d / name
        f.write_bytes(f"root's {name}\n".encode())
        f.chmod(0o600)
    (d / "mountpoint").mkdir(mode=0o700)
    return d


def _plant(run: Path, outside: Path, owner: int) -> None:
    for name in PLANTED:
        (run / name).symlink_to(outside / name)
    (run / "fuse").symlink_to(outside / "mountpoint")
    (run / "mapper").mkdir()
    (run / "mapper" / "victim-dmtt").symlink_to(outside / "link-target")
    for path in [run, run / "mapper", *run.iterdir(), *(run / "mapper").iterdir()]:
        os.lchown(path, owner, owner)


@pytest.fixture
def foreign(tmp_path: Path, outside: Path) -> Path:
    """A run directory owned by nobody (mode 0755), with symlinks to root's files planted."""
    run = tmp_path / "foreign"
    run.mkdir(mode=0o755)
    _plant(run, outside, NOBODY)
    return run


def test_root_refuses_another_users_run_directory(foreign: Path, outside: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str], dm_name: str) -> None:
    before = _state(outside, foreign)
    monkeypatch.setenv("DMTOOLS_RUN_DIR", str(foreign))
    why = f"unsafe run directory {foreign}: owned by uid {NOBODY}, not by uid 0"

    with pytest.raises(DaemonError, match=why):
        Daemon(str(foreign)).start()
    with pytest.raises(DaemonError, match=why):
        start_daemon(str(foreign))
    with pytest.raises(DaemonError, match=why):
        open_userspace()
    from dmtools.engine import Engine

    eng = Engine(expose=True, run_dir=str(foreign))
    try:
        with pytest.raises(DMError, match=why):
            eng.create(dm_name, "0 8 zero")
        assert eng.list() == []
    finally:
        eng.close()

    for argv in (["--backend", "userspace", "dm", "ls"], ["daemon", "run", "--foreground"], ["daemon", "status"],
                 ["daemon", "stop"], ["--backend", "userspace", "dm", "create", dm_name, "--table", "0 8 zero"]):
        capsys.readouterr()
        rc = cli_main.main(argv, propagate=False)
        err = capsys.readouterr().err
        assert rc == 1, argv
        assert err.count("\n") == 1 and why in err and "Traceback" not in err, argv
    assert _state(outside, foreign) == before


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o1777])
def test_root_refuses_a_run_directory_others_can_write(tmp_path: Path, outside: Path, mode: int,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "shared"
    run.mkdir()
    run.chmod(mode)
    _plant(run, outside, 0)
    before = _state(outside, run)
    with pytest.raises(DaemonError, match="unsafe run directory .*: writable by"):
        Daemon(str(run)).start()
    monkeypatch.setenv("DMTOOLS_RUN_DIR", str(run))
    assert cli_main.main(["--backend", "userspace", "dm", "ls"]) == 1
    assert "writable by" in capsys.readouterr().err
    assert _state(outside, run) == before


def test_a_run_directory_below_another_users_directory_is_refused(tmp_path: Path, outside: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    run = theirs / "run"
    run.mkdir(mode=0o700)  # ours, but they may rename it away and put their own in its place
    before = _state(outside, theirs)
    with pytest.raises(DaemonError, match=f"{theirs}: owned by uid {NOBODY}"):
        Daemon(str(run)).start()
    assert _state(outside, theirs) == before


def _stop_daemon(run: Path) -> None:
    """Stop the daemon serving ``run``, if one does."""
    try:
        client = UserspaceClient(str(run))
    except DMError:
        return
    stop_daemon(client)


@pytest.fixture
def own_run(tmp_path: Path, outside: Path) -> Iterator[Path]:
    """Root's own run directory (0700) with links planted by an earlier mishap; the daemon is
    stopped at teardown."""
    run = tmp_path / "own"
    run.mkdir(mode=0o700)
    for name in ("daemon.pid", "control.sock"):
        (run / name).symlink_to(outside / name)
    (run / "daemon.log").write_bytes(b"an old world-readable log\n")
    (run / "daemon.log").chmod(0o644)
    (run / "mapper").mkdir(mode=0o755)
    try:
        yield run
    finally:
        _stop_daemon(run)


def test_own_run_directory_links_are_replaced_not_followed(own_run: Path, outside: Path, dm_name: str) -> None:
    before = _state(outside)
    (own_run / "mapper" / dm_name).symlink_to(outside / "link-target")
    client = open_userspace(str(own_run))  # starts the daemon (FUSE + loop exposure)
    try:
        client.create(dm_name, "0 8 zero")
        link = own_run / "mapper" / dm_name
        assert os.readlink(link).startswith("/dev/loop")
        assert stat.S_ISBLK(os.stat(link).st_mode)
        client.remove(dm_name)
        pid = client.ping()["pid"]
    finally:
        client.close()
    assert (own_run / "daemon.pid").read_text().strip() == str(pid)
    for name, kind in (("daemon.pid", stat.S_ISREG), ("control.sock", stat.S_ISSOCK), ("daemon.log", stat.S_ISREG)):
        assert kind(os.lstat(own_run / name).st_mode), name
    log = own_run / "daemon.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert log.read_bytes().startswith(b"an old world-readable log\n")
    assert not [n for n in os.listdir(own_run) if n.endswith(".tmp")]
    assert _state(outside) == before


def test_default_run_directory_is_made_0700(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root's default (``/run/dmtools``, here under tmp_path) is created 0700, owned by root."""
    from dmtools.engine import expose

    default = tmp_path / "run" / "dmtools"
    monkeypatch.setattr(rundir, "ROOT_RUN_DIR", str(default))
    monkeypatch.setattr(expose, "DEFAULT_RUN_DIR", str(default))
    monkeypatch.delenv("DMTOOLS_RUN_DIR", raising=False)
    assert rundir.run_dir() == str(default)
    daemon = Daemon(expose=False)
    daemon.start()
    try:
        st = os.lstat(default)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, 0)
    finally:
        daemon.shutdown()
    os.rmdir(default)
    from dmtools.engine import Engine

    eng = Engine(expose=True)  # an in-process engine: <default>/engine-PID
    try:
        eng.create("t-dmtt", "0 8 zero")
        st = os.lstat(default)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, 0)
        assert os.path.isdir(default / f"engine-{os.getpid()}" / "fuse")
        eng.remove("t-dmtt")
    finally:
        eng.close()


@pytest.fixture
def long_run(tmp_path: Path) -> Iterator[Path]:
    """A run directory whose socket path is longer than ``sun_path`` (108 bytes); its daemon is
    stopped at teardown."""
    run = tmp_path / ("x" * 110) / "run"
    run.parent.mkdir(mode=0o700)
    assert len(os.fsencode(run / "control.sock")) > 108
    try:
        yield run
    finally:
        _stop_daemon(run)


def test_a_run_directory_longer_than_sun_path_works_end_to_end(long_run: Path, tmp_path: Path, dm_name: str,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI starts the daemon on demand there and creates, exposes, lists and removes a device;
    the socket is bound and reached through ``/proc/self/fd/N`` (it was "cannot reach the dmtools
    daemon …: None")."""
    img = tmp_path / "a.img"
    img.write_bytes(b"\0" * (1 << 20))
    monkeypatch.setenv("DMTOOLS_RUN_DIR", str(long_run))

    def cli(*argv: str) -> str:
        capsys.readouterr()
        rc = cli_main.main(["--backend", "userspace", *argv], propagate=False)
        out, err = capsys.readouterr()
        assert (rc, err) == (0, ""), argv
        return out

    cli("dm", "create", dm_name, "--table", f"0 2048 linear {img} 0")
    assert stat.S_ISSOCK(os.lstat(long_run / "control.sock").st_mode)
    assert dm_name in cli("dm", "ls")
    link = long_run / "mapper" / dm_name
    assert os.readlink(link).startswith("/dev/loop")
    fd = os.open(link, os.O_WRONLY)
    try:
        os.pwrite(fd, b"L" * 4096, 8192)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(img, "rb") as f:
        assert f.read()[8192:12288] == b"L" * 4096
    cli("dm", "remove", dm_name)
    assert dm_name not in cli("dm", "ls")
    assert not os.path.lexists(link)
    status = json.loads(cli("--json", "daemon", "status"))
    assert (status["run_dir"], status["devices"], status["exposed"]) == (str(long_run), 0, True)
    assert cli("daemon", "stop") == f"stopped (pid {status['pid']})\n"
    assert process_gone(status["pid"])  # stop returns once the daemon has exited
    assert not os.path.lexists(long_run / "control.sock")
    assert not [n for n in os.listdir(long_run) if n.endswith(".tmp")]
