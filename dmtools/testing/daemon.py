"""An in-process ``dmtools daemon`` for tests: started on a run directory, served on a thread."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from dmtools.engine.daemon import Daemon

__all__ = ["serving_daemon"]

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
