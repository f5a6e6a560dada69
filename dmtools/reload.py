"""Swap new tables into a stack of live devices the way LVM does: load, suspend top-down, resume
bottom-up."""

from __future__ import annotations

from collections.abc import Sequence

from dmtools.backend import DeviceMapper
from dmtools.errors import quietly
from dmtools.table import Table

__all__ = ["reload_stack"]


def reload_stack(dm: DeviceMapper, loads: Sequence[tuple[str, Table]], suspend: Sequence[str], *,
                 noflush: bool = False) -> None:
    """Load each ``(name, table)`` of ``loads`` into its inactive slot, suspend the devices of
    ``suspend`` in that order (top of the stack first), then resume them in the reverse order, so
    each takes its new table once everything it stacks on has.

    All-or-nothing: on a failure the tables loaded here and not yet live are cleared, every device
    suspended here is resumed (on its old table) and the error is raised.
    """
    loaded: list[str] = []
    suspended: list[str] = []
    try:
        for name, table in loads:
            dm.load(name, table)
            loaded.append(name)
        for name in suspend:
            dm.suspend(name, noflush=noflush)
            suspended.append(name)
        for name in reversed(suspend):
            dm.resume(name)
            suspended.remove(name)
            if name in loaded:
                loaded.remove(name)
    except BaseException:
        quietly(*[(lambda d=d: dm.clear(d)) for d in loaded])
        quietly(*[(lambda d=d: dm.resume(d)) for d in reversed(suspended)])
        raise
