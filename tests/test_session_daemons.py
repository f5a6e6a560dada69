"""A test session starts the userspace daemon in a run directory of its own and stops it at its
end (``tests/session_daemons.py``); a daemon someone else runs in ``DMTOOLS_RUN_DIR`` is left alone.

Each test runs ``tests/session_daemon_user.py`` (a root test that creates and removes a device on
``dmtools.open("userspace")``) in a pytest session of its own, with ``DMTOOLS_RUN_DIR`` naming
another directory and ``TMPDIR`` under ``tmp_path``, and looks for daemon processes afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmtools.linux import process_gone
from dmtools.testing.daemon import stop_daemon
from session_daemons import PREFIX, daemons_under, stop

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[1]
INNER = ROOT / "tests" / "session_daemon_user.py"


def daemon_processes(under: Path) -> dict[int, str]:
    """``{pid: run directory}`` of every ``dmtools.engine.daemon`` process whose ``--run-dir`` is
    under ``under``, read from ``/proc/PID/cmdline`` (the way ``start_daemon`` starts them)."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "dmtools.engine.daemon" in argv and "--run-dir" in argv:
            run_dir = argv[argv.index("--run-dir") + 1]
            if run_dir.startswith(f"{under}/"):
                found[int(entry)] = run_dir
    return found


@pytest.fixture
def theirs(tmp_path: Path) -> Iterator[Path]:
    """A run directory named by ``DMTOOLS_RUN_DIR`` when a session starts; any daemon left under
    ``tmp_path`` is stopped at teardown (the old conftest left the sessions' daemons there)."""
    path = tmp_path / "theirs"
    path.mkdir(mode=0o700)
    yield path
    for pid, run_dir in daemons_under([str(tmp_path)]).items():
        stop(pid, run_dir)


def session(tmp_path: Path, theirs: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run the inner test in a pytest session of its own; its output and its report."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    report = tmp_path / "report.json"
    environ = dict(os.environ, DMTOOLS_RUN_DIR=str(theirs), TMPDIR=str(tmp), DMTT_INNER_REPORT=str(report), **env)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", str(INNER)], cwd=ROOT,
                          env=environ, capture_output=True, text=True, timeout=300, check=False)
    return proc, json.loads(report.read_text())


def test_a_session_stops_the_daemon_it_started(tmp_path: Path, theirs: Path) -> None:
    proc, seen = session(tmp_path, theirs)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert Path(seen["run_dir"]).parent == tmp_path / "tmp" and Path(seen["run_dir"]).name.startswith(PREFIX)
    assert f"stopped the daemon of {seen['run_dir']} (pid {seen['pid']})" in proc.stdout
    assert daemon_processes(tmp_path) == {}
    assert os.listdir(theirs) == []  # DMTOOLS_RUN_DIR of the caller: not used
    assert not any(p.name.startswith(PREFIX) for p in (tmp_path / "tmp").iterdir())  # removed


def test_a_daemon_someone_runs_is_left_alone(tmp_path: Path, theirs: Path, dm_name: str) -> None:
    from dmtools.engine.client import open_userspace

    dm = open_userspace(str(theirs))
    try:
        dm.create(dm_name, "0 8 zero")
        before = dm.ping()
        proc, seen = session(tmp_path, theirs)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert seen["run_dir"] != str(theirs) and seen["pid"] != before["pid"]
        assert dm.ping() == before  # same pid, still one device
        assert str(dm.table(dm_name)) == "0 8 zero"
        assert daemon_processes(tmp_path) == {before["pid"]: str(theirs)}
    finally:
        stop_daemon(dm)


def test_a_device_left_in_the_daemon_fails_the_session(tmp_path: Path, theirs: Path) -> None:
    proc, seen = session(tmp_path, theirs, DMTT_INNER_LEAVE="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
    assert f"the daemon of {seen['run_dir']} still had devices the tests left: {seen['device']}" in proc.stdout
    assert daemon_processes(tmp_path) == {}


def test_a_failed_session_keeps_the_run_directory_when_its_daemon_logged(tmp_path: Path, theirs: Path) -> None:
    proc, seen = session(tmp_path, theirs, DMTT_INNER_FAIL="1")
    assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout + proc.stderr
    log = Path(seen["run_dir"]) / "daemon.log"
    assert f"kept the run directory {seen['run_dir']}: the session failed: see {log}" in proc.stdout
    assert log.read_text() == "dmtools daemon: what the test's failure left in the log\n"
    assert daemon_processes(tmp_path) == {}


@pytest.fixture
def after_private_daemon() -> Iterator[dict[str, int]]:
    """Set up before ``private_daemon`` and torn down after it: its daemon is gone by then."""
    seen: dict[str, int] = {}
    yield seen
    assert process_gone(seen["pid"]), f"the private daemon (pid {seen['pid']}) still runs after its teardown"


def test_the_private_daemon_is_gone_when_its_teardown_returns(after_private_daemon: dict[str, int],
                                                              private_daemon: Any) -> None:
    after_private_daemon["pid"] = private_daemon.ping()["pid"]
    assert not process_gone(after_private_daemon["pid"])
