"""Removing what a test left behind: every device a predicate picks, devices stacked on others first.

Tests and the plugin's sweeps call :func:`remove_devices` at teardown. A device whose table uses
another picked device is removed before it (by ``deps``); what a backend cannot order (an engine
device stacked through an exposure reports the loop device, not the device under it) goes in a
later round, once the devices above it are gone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["remove_devices"]


def _tops_first(dm: Any, entries: list[Any]) -> list[str]:
    """Names of ``entries``, each before every picked device its table uses."""
    by_devno = {(e.major, e.minor): e.name for e in entries}
    below: dict[str, set[str]] = {}
    for e in entries:
        try:
            below[e.name] = {by_devno[d] for d in dm.deps(e.name) if d in by_devno}
        except Exception:  # noqa: BLE001 - gone or unreadable: no order known, a later round retries
            below[e.name] = set()
    used = set().union(*below.values())
    order = sorted(n for n in below if n not in used)
    seen = set(order)
    for name in order:  # breadth-first down the stacks; a device comes once all above it came
        for lower in sorted(below[name]):
            if lower not in seen and all(lower not in below[n] or n in seen for n in below):
                seen.add(lower)
                order.append(lower)
    return order + sorted(set(below) - seen)


def remove_devices(dm: Any, pick: Callable[[str], bool], *, rounds: int = 8, retry: bool = True) -> list[str]:
    """Remove every device of ``dm`` whose name ``pick`` accepts, resuming suspended ones first.

    A device that cannot go yet (held by another, busy) is retried in the next of ``rounds``
    rounds; the last round removes with ``retry`` (the backend's bounded wait for a brief opener
    such as udev). Errors are not raised, since teardown must go on. Returns the names still
    present after the last round (empty when everything went), so a test can assert it cleaned up.
    """
    for attempt in range(rounds):
        entries = [e for e in dm.list() if pick(e.name)]
        if not entries:
            return []
        for name in _tops_first(dm, entries):
            try:
                if dm.info(name).suspended:
                    dm.resume(name)
                dm.remove(name, retry=retry and attempt == rounds - 1)
            except Exception:  # noqa: BLE001 - held or busy: the next round retries it
                continue
    return sorted(e.name for e in dm.list() if pick(e.name))
