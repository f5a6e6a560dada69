"""Tunables of the userspace snapshot targets: the module parameters of ``dm_snapshot``.

``snapshot_cow_threshold`` (dm-snap.c ``cow_threshold``, ``DEFAULT_COW_THRESHOLD`` = 2048) caps the
chunks being copied on write per snapshot: an origin write (and a snapshot write) waits while more
than this many copies are in flight, and goes on once completions bring the count back to it.

Like the kernel's 0644 module parameter it can be changed at any time and applies at once:

* in-process: ``snapshot.targets.params.set_cow_threshold(n)`` (``get_cow_threshold()`` reads it);
* for the engine daemon (another process): the environment variable
  ``DMTOOLS_SNAPSHOT_COW_THRESHOLD`` read when this module is imported, e.g.
  ``DMTOOLS_SNAPSHOT_COW_THRESHOLD=512 dmtools daemon start``.

The current kernel compares an unsigned count with the int parameter: 0 lets one copy run at a
time per snapshot, and a negative value never throttles.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("snapshot")

#: dm-snap.c ``DEFAULT_COW_THRESHOLD``.
DEFAULT_COW_THRESHOLD = 2048
#: environment variable read at import (daemon start).
ENV_COW_THRESHOLD = "DMTOOLS_SNAPSHOT_COW_THRESHOLD"


def _from_env() -> int:
    text = os.environ.get(ENV_COW_THRESHOLD, "").strip()
    if not text:
        return DEFAULT_COW_THRESHOLD
    try:
        return int(text)
    except ValueError:
        log.warning("%s=%r is not an integer; using %d", ENV_COW_THRESHOLD, text, DEFAULT_COW_THRESHOLD)
        return DEFAULT_COW_THRESHOLD


_cow_threshold = _from_env()


def get_cow_threshold() -> int:
    """The current ``snapshot_cow_threshold``."""
    return _cow_threshold


def set_cow_threshold(value: int) -> int:
    """Set ``snapshot_cow_threshold`` (any int, as the kernel's); returns the previous value.

    Writers waiting at the old threshold re-check the new one at once.
    """
    global _cow_threshold
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"snapshot_cow_threshold must be an int, not {type(value).__name__}")
    old, _cow_threshold = _cow_threshold, value
    from snapshot.targets import registry

    for snap in registry.all_snapshots():
        snap.wake_throttled()
    return old


def over_threshold(in_progress: int) -> bool:
    """True when ``in_progress`` copies exceed the threshold (the unsigned comparison of dm-snap.c)."""
    limit = _cow_threshold
    return limit >= 0 and in_progress > limit
