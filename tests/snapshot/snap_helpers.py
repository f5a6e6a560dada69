"""Helpers for the snapshot tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

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
