"""Daemons in tests: an in-process ``dmtools daemon`` started on a run directory and served on a
thread, and a daemon process stopped until it is gone."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

from dmtools.engine.daemon import Daemon

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.engine.client import UserspaceClient

__all__ = ["serving_daemon", "stop_daemon"]

#: seconds a daemon may take to stop
STOP_BOUND = 20.0


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
    open) and return once the process is gone (``UserspaceClient.shutdown``): a test that returned
    earlier would leave it winding down under the tests after it; ``client`` is closed."""
    try:
        client.shutdown(force=force)
    finally:
        client.close()
