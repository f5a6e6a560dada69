"""The pools of one engine (dm-thin.c ``dm_thin_pool_table``), by pool device and metadata device.

One in-core :class:`~thin.targets.pool_core.Pool` exists per pool mapped device: every table
loaded on that device (a reload that grows the pool, say) shares it, and ``thin`` targets find it
through the pool device they name. A metadata device already serving another pool device is
refused, as in ``__pool_find``. The table lives in the engine (``TargetContext.target_state``),
not in a module global: two engines in one process keep separate pools.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

from dmtools.errors import DeviceBusy, InvalidTable

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.engine.target_driver import DeviceHandle, TargetContext

    from thin.targets.pool_core import Pool

__all__ = ["PoolTable", "pool_table"]

#: ``TargetContext.target_state`` key of the table.
STATE_KEY = "thin-pool"


class PoolTable:
    """Pools by pool device (an engine device object) and by metadata device name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._pools: list["Pool"] = []

    def by_pool_device(self, pool_md: Any) -> "Pool | None":
        """The pool of a pool mapped device (``__pool_table_lookup``)."""
        with self.lock:
            return next((p for p in self._pools if p.pool_md is pool_md), None)

    def find_or_create(self, pool_md: Any, metadata: "DeviceHandle", data: "DeviceHandle",
                       create: Callable[[], "Pool"]) -> "Pool":
        """The pool these devices name, with one more reference (dm-thin.c ``__pool_find``).

        Raises ``DeviceBusy`` when the metadata device serves another pool device or the same one
        with another data device, ``InvalidTable`` when a reload names other devices than the
        pool it replaces; ``create()`` builds a new pool otherwise.
        """
        with self.lock:
            pool = next((p for p in self._pools if p.metadata_name == metadata.name), None)
            if pool is not None:
                if pool.pool_md is not pool_md:
                    raise DeviceBusy("metadata device already in use by a pool", operation="load")
                if pool.data_name != data.name:
                    raise DeviceBusy("data device already in use by a pool", operation="load")
                pool.refs += 1
                return pool
            pool = next((p for p in self._pools if p.pool_md is pool_md), None)
            if pool is not None:
                raise InvalidTable("different pool cannot replace a pool", operation="load")
            pool = create()
            pool.refs = 1
            self._pools.append(pool)
            return pool

    def acquire(self, pool: "Pool") -> None:
        """One more reference (a thin device on the pool: ``__pool_inc``)."""
        with self.lock:
            pool.refs += 1

    def put(self, pool: "Pool") -> None:
        """Drop one reference; the last one destroys the pool (``__pool_dec``)."""
        with self.lock:
            pool.refs -= 1
            if pool.refs > 0:
                return
            self._pools = [p for p in self._pools if p is not pool]
        pool.destroy()


def pool_table(ctx: "TargetContext") -> PoolTable:
    """The pool table of the engine ``ctx`` belongs to."""
    return ctx.target_state(STATE_KEY, PoolTable)
