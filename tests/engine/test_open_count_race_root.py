"""Root tier: an exposed device's open count while other threads count it too.

The count once probed the loop device with an ``O_EXCL`` open, and two such probes at once saw
each other's claim; it now opens nothing (``dmtools.engine.openers``), and a count's own reads of
``/proc`` must not look like an opener either. The daemon's event watcher reads every device's
info twice a second while a command reads it too, so a device nobody opened must read as
unopened however many threads ask at once."""

from __future__ import annotations

import time

import pytest

from dmtools.engine import Engine
from dmtools.testing.threads import run_together

pytestmark = pytest.mark.root

THREADS = 4
SECONDS = 5.0


def test_concurrent_open_counts_of_an_unopened_device_are_zero(exposed_engine: Engine, dm_name: str) -> None:
    exposed_engine.create(dm_name, "0 2048 zero")
    seen: list[int] = []

    def count() -> None:
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            seen.append(exposed_engine.info(dm_name).open_count)

    run_together([count] * THREADS)
    assert len(seen) >= THREADS
    assert max(seen) == 0, f"{sum(1 for c in seen if c)} of {len(seen)} counts saw an opener"
    exposed_engine.remove(dm_name)  # no grace needed: nothing holds it
