"""Daemons in tests: an in-process ``dmtools daemon`` started on a run directory and served on a
thread, and a daemon process stopped until it is gone."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

from dmtools.engine.daemon import SHUTDOWN_LIMIT, Daemon
from dmtools.testing.wait import pid_gone, wait_until

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.engine.client import UserspaceClient

__all__ = ["serving_daemon", "stop_daemon"]

#: seconds a daemon may take to stop
STOP_BOUND = 20.0
#: seconds a daemon process may take to exit once asked: its own bound on a shutdown, then exiting
EXIT_BOUND = SHUTDOWN_LIMIT + 10


@contextmanager
def serving_daemon(run_dir: str, *, expose: bool | None = False,
                   setup: Callable[[Daemon], None] | None = None) -> Iterator[Daemon]:
    """Start a daemon on ``run_dir`` (``expose=None``: FUSE/loop exposure where possible), call
    ``setup(daemon)`` (register test targets on ``daemon.engine``), serve it on a thread, and stop it
    at the end; raises ``AssertionError`` when it does not stop within ``STOP_BOUND`` seconds."""
    d = Daemon(run_dir, expose=expose)
    d.start()
    if setup is not None:
        setup(d)
    thread = threading.Thread(target=d.serve, daemon=True)
    thread.start()
    try:
        yield d
    finally:
        d.stop()
        thread.join(STOP_BOUND)
        assert not thread.is_alive(), "daemon did not stop"


def stop_daemon(client: UserspaceClient, *, force: bool = True) -> None:
    """Shut down the daemon process ``client`` talks to (``force``: its devices go even while
    open) and return once the process is gone; ``client`` is closed. The ``shutdown`` verb answers
    before the daemon has removed its devices and exposures and exited: a test that returned then
    would leave it winding down under the tests after it. ``AssertionError`` past ``EXIT_BOUND``
    seconds."""
    try:
        pid = client.ping()["pid"]
        client.shutdown(force=force)
    finally:
        client.close()
    wait_until(lambda: pid_gone(pid), f"the daemon of {client.run_dir} (pid {pid}) to exit", EXIT_BOUND)
