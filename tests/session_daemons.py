"""The test session's own daemon run directory, and no daemon of the session left running after it.

Tests reach the userspace engine's daemon as users do: ``dmtools.open("userspace")`` and
``dmtools --backend userspace`` start it on demand in ``DMTOOLS_RUN_DIR`` (else ``/run/dmtools``).
A session run in the caller's run directory would use a daemon someone else runs there, and
leave one running when none was there. So ``tests/conftest.py`` gives each session a fresh run
directory (``dmtt-run-*`` in ``$TMPDIR``, mode 0700) before anything is collected (modules read
``run_dir()`` at import), and at the session's end stops every daemon the session started: those
of that directory and of the session's temporary directories (``tmp_path/run``), found by the pid
file they hold open. Each is shut down with ``force`` (its devices go) and waited for; one that
does not answer gets ``SIGTERM`` and its own shutdown bound. A daemon that still runs then, one a
test left running in its ``tmp_path`` (its fixture's teardown stops it), a device a test left in
one, or a mount left under the run directory fails the session, and is reported at the end of
its summary. The caller's ``DMTOOLS_RUN_DIR`` is restored afterwards and the run directory
removed (kept, and named in the summary, when the session failed and its daemon logged
something). ``tests/test_session_daemons.py`` runs sessions and checks this.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field

import pytest

from dmtools.engine.client import EXIT_TIMEOUT
from dmtools.testing.daemon import stop_daemon
from dmtools.linux import process_gone
from dmtools.testing.wait import wait_until

#: the session's run directory's name starts with this (in ``$TMPDIR``)
PREFIX = "dmtt-run-"
#: the pid file a daemon holds open while it runs (``dmtools.engine.daemon``)
PID_FILE = "daemon.pid"


@dataclass
class SessionRunDir:
    """What the session changed, and what its end found."""

    path: str
    saved: str | None
    problems: list[str] = field(default_factory=list)
    stopped: dict[int, str] = field(default_factory=dict)
    #: why the run directory stays after the session (``None``: it is removed)
    kept: str | None = None


KEY = pytest.StashKey[SessionRunDir]()


def daemons_under(roots: list[str]) -> dict[int, str]:
    """``{pid: run directory}`` of every other process holding a daemon pid file under ``roots``
    open (a running daemon keeps it open and locked), read from ``/proc/PID/fd``."""
    prefixes = tuple(os.path.join(os.path.realpath(r), "") for r in roots)
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if os.path.basename(target) == PID_FILE and target.startswith(prefixes):
                found[int(entry)] = os.path.dirname(target)
                break
    return found


def stop(pid: int, run_dir: str) -> list[str]:
    """Stop daemon ``pid`` of ``run_dir``: the ``shutdown`` verb with ``force``, or ``SIGTERM``
    when it does not answer; wait until it is gone (``AssertionError`` past ``EXIT_TIMEOUT``).
    Returns the devices it still had."""
    from dmtools.engine.client import UserspaceClient
    from dmtools.errors import DMError

    left: list[str] = []
    try:
        client = UserspaceClient(run_dir)
    except DMError:  # not answering (or already on its way out): its SIGTERM handler shuts it down
        terminate(pid)
    else:
        try:
            left = sorted(e.name for e in client.list())
            stop_daemon(client)
            return left
        except DMError:
            terminate(pid)
    wait_until(lambda: process_gone(pid), f"the daemon of {run_dir} (pid {pid}) to stop", EXIT_TIMEOUT)
    return left


def terminate(pid: int) -> None:
    """``SIGTERM`` to ``pid``, unless it is gone already."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def _mounts_under(path: str) -> list[str]:
    prefix = os.path.join(os.path.realpath(path), "")
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p.startswith(prefix)]


def configure(config: pytest.Config) -> None:
    """Make the session's run directory and point ``DMTOOLS_RUN_DIR`` at it."""
    path = tempfile.mkdtemp(prefix=PREFIX)
    config.stash[KEY] = SessionRunDir(path, os.environ.get("DMTOOLS_RUN_DIR"))
    os.environ["DMTOOLS_RUN_DIR"] = path


def finish(session: pytest.Session) -> None:
    """Stop the daemons the session started (after every fixture's teardown). A daemon that
    would not stop, one a test left in its ``tmp_path``, a device left in one, or a mount left
    under the run directory fails the session."""
    state = session.config.stash.get(KEY, None)
    if state is None:
        return
    roots = [state.path]
    factory = getattr(session.config, "_tmp_path_factory", None)  # pytest's tmp_path_factory
    basetemp = getattr(factory, "_basetemp", None)  # None when no test asked for a tmp_path
    if basetemp is not None:
        roots.append(str(basetemp))
    for pid, run_dir in sorted(daemons_under(roots).items()):
        try:
            left = stop(pid, run_dir)
        except Exception as err:  # noqa: BLE001 - reported; the other daemons are still stopped
            state.problems.append(f"the daemon of {run_dir} (pid {pid}) could not be stopped: {err}")
            continue
        state.stopped[pid] = run_dir
        if os.path.realpath(run_dir) != os.path.realpath(state.path):  # a test's own: its teardown stops it
            state.problems.append(f"a test left its daemon running: pid {pid}, run directory {run_dir}")
        if left:
            state.problems.append(f"the daemon of {run_dir} still had devices the tests left: {', '.join(left)}")
    still = daemons_under(roots)
    state.problems += [f"a daemon still runs: pid {pid}, run directory {d}" for pid, d in sorted(still.items())]
    state.problems += [f"still mounted under the session's run directory: {m}" for m in _mounts_under(state.path)]
    if state.problems and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    log = os.path.join(state.path, "daemon.log")
    if _mounts_under(state.path):
        state.kept = "something is still mounted under it"
    elif session.exitstatus != pytest.ExitCode.OK and os.path.exists(log) and os.path.getsize(log):
        state.kept = f"the session failed: see {log}"


def summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Report what the end of the session found (the daemons stopped, with ``-v``)."""
    state = config.stash.get(KEY, None)
    if state is None or not (state.problems or state.kept or (state.stopped and config.option.verbose > 0)):
        return
    terminalreporter.section("daemons of the session", red=bool(state.problems))
    for pid, run_dir in sorted(state.stopped.items()):
        terminalreporter.line(f"stopped the daemon of {run_dir} (pid {pid})")
    for problem in state.problems:
        terminalreporter.line(problem)
    if state.kept:
        terminalreporter.line(f"kept the run directory {state.path}: {state.kept}")


def unconfigure(config: pytest.Config) -> None:
    """Restore ``DMTOOLS_RUN_DIR`` and remove the run directory, unless something is still mounted
    under it, or the session failed and its daemon logged something."""
    state = config.stash.get(KEY, None)
    if state is None:
        return
    if state.saved is None:
        os.environ.pop("DMTOOLS_RUN_DIR", None)
    else:
        os.environ["DMTOOLS_RUN_DIR"] = state.saved
    if state.kept is None and not _mounts_under(state.path):
        shutil.rmtree(state.path, ignore_errors=True)
