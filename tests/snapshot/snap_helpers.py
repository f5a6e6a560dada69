"""Helpers for the snapshot tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: dms.c's first write failed at each step (a test seam): the step, short or failed, the C
#: call's system calls, and whether the snapshot stays valid (the
#: Python path copied again, or wrote the area again) or is invalid (a flush failed: the
#: commit fails, and the record is never written after it).
FAULTS = {
    "origin-read": (0, False, "r", True),
    "origin-read-short": (0, True, "r", True),
    "cow-write": (1, False, "rw", True),
    "cow-write-short": (1, True, "rw", True),
    "preflush": (2, False, "rwf", False),
    "area-write": (3, False, "rwfw", True),
    "area-write-short": (3, True, "rwfw", True),
    "fua": (4, False, "rwfwf", False),
    "origin-write": (5, False, "rwfwfw", True),
    "origin-write-short": (5, True, "rwfwfw", True),
}

#: seconds: bound for every wait on an observable state, on a loaded 2-CPU machine.
WAIT = 30.0


def until(cond: Callable[[], bool], what: str) -> None:
    """Wait (bounded by ``WAIT``) for an observable state."""
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def only_snapshot(engine: Any) -> Any:
    """The one snapshot (``CopyOnWrite``) of ``engine``."""
    from snapshot.targets.core import origins_of

    (snap,) = origins_of(engine).all_snapshots()
    return snap


def c_ops() -> str:
    """The system calls of this thread's last dms.c call: r(ead), w(rite), f(lush)."""
    from snapshot.route import c_library

    found = c_library()
    assert found is not None
    ffi, lib = found
    out = bytearray(8)
    n = lib.dms_last_ops(ffi.from_buffer(out), len(out))
    return out[:n].decode()
