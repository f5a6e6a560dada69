"""Tunables of the userspace thin targets: the module parameters of ``dm_thin_pool``.

``no_space_timeout`` (dm-thin.c ``no_space_timeout_secs``, default 60 s, 0 = never): how long a
pool that ran out of data space queues the writes that need a new block before it switches to
erroring them (``error_if_no_space``). Like the kernel's 0644 module parameter it can be changed
at any time; it applies from the next time a pool runs out of space.

* in-process: ``thin.targets.params.set_no_space_timeout(seconds)``;
* for the engine daemon (another process): ``DMTOOLS_THIN_NO_SPACE_TIMEOUT`` read when this module
  is imported, e.g. ``DMTOOLS_THIN_NO_SPACE_TIMEOUT=5 dmtools daemon start``.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("thin")

#: dm-thin.c ``DEFAULT_NO_SPACE_TIMEOUT_SECS``.
DEFAULT_NO_SPACE_TIMEOUT = 60.0
#: environment variable read at import (daemon start).
ENV_NO_SPACE_TIMEOUT = "DMTOOLS_THIN_NO_SPACE_TIMEOUT"
#: dm-thin.c ``COMMIT_PERIOD`` (HZ): a pool with changes commits at least once a second.
COMMIT_PERIOD = 1.0
#: pages (4 KiB) of each pool's kcopyd client.
KCOPYD_PAGES = 256


def _from_env() -> float:
    text = os.environ.get(ENV_NO_SPACE_TIMEOUT, "").strip()
    if not text:
        return DEFAULT_NO_SPACE_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        log.warning("%s=%r is not a number of seconds; using %g", ENV_NO_SPACE_TIMEOUT, text, DEFAULT_NO_SPACE_TIMEOUT)
        return DEFAULT_NO_SPACE_TIMEOUT
    return value


_no_space_timeout = _from_env()


def get_no_space_timeout() -> float:
    """The current ``no_space_timeout`` in seconds (0: queue for ever)."""
    return _no_space_timeout


def set_no_space_timeout(seconds: float) -> float:
    """Set ``no_space_timeout`` (seconds, >= 0); returns the previous value."""
    global _no_space_timeout
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
        raise ValueError(f"no_space_timeout must be a non-negative number of seconds, not {seconds!r}")
    old, _no_space_timeout = _no_space_timeout, float(seconds)
    return old
