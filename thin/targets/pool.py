"""``thin-pool <metadata dev> <data dev> <block size> <low water mark> [<#feat> <feat>...]``.

The table side of dm-thin.c's pool target (``pool_ctr``, ``pool_map``, ``pool_preresume``,
``pool_status``, ``pool_message``): it finds or creates the in-core pool
(:class:`~thin.targets.pool_core.Pool`) its devices name, passes I/O to the pool device straight
to the data device, and binds its features to the pool when it is resumed.
"""

from __future__ import annotations

from typing import Sequence

from dmtools.endpoint import read_full
from dmtools.engine.target_driver import TargetContext, TargetDriver
from dmtools.errors import DeviceBusy, DMError, InvalidTable
from dmtools.target_values import ThinPool

from thin.targets.pool_core import Features, Pool
from thin.targets.pool_table import pool_table

__all__ = ["ThinPoolTarget"]


class ThinPoolTarget(TargetDriver):
    """A thin pool's table; see the module docstring."""

    name = "thin-pool"
    version = (1, 24, 0)  # dm-thin.c
    value_type = ThinPool

    def __init__(self, ctx: TargetContext, start: int, length: int, value: ThinPool) -> None:
        super().__init__(ctx, start, length, value.args())
        self.value = value
        self.features = Features.of(value)
        writable = not value.read_only and not ctx.readonly
        try:
            self.metadata = ctx.get_device(value.metadata, writable=writable)
        except DMError as err:
            raise self.fail(f"Error opening metadata block device: {err.message}") from err
        self.devices.append(self.metadata)
        try:
            self.data = ctx.get_device(value.data, writable=not ctx.readonly)
        except DMError as err:
            raise self.fail(f"Error getting data device: {err.message}") from err
        self.devices.append(self.data)
        if self.metadata.name == self.data.name:
            raise self.fail("Error setting metadata or data device")
        self.check_area(self.data, 0, length)
        table = pool_table(ctx)
        try:
            self.pool = table.find_or_create(ctx.device, self.metadata, self.data,
                                             lambda: Pool(ctx.device, ctx.device_name, self.metadata, self.data, value))
        except (DeviceBusy, InvalidTable) as err:
            raise InvalidTable(f"{self.name}: {err.message}", errno=err.errno, operation="load",
                               device=ctx.device_name) from err
        if self.pool.block_size != value.block_size:
            table.put(self.pool)
            raise self.fail(f"changing the data block size (from {self.pool.block_size} to "
                            f"{value.block_size}) is not supported")
        if self.pool.pf.discard_enabled != self.features.discard_enabled and self.pool.refs > 1:
            table.put(self.pool)
            raise self.fail("Discard support cannot be disabled once enabled" if self.pool.pf.discard_enabled
                            else "Discard support cannot be enabled once disabled")
        self._released = False

    # -- I/O: the pool device maps straight onto the data device (pool_map) ----------------------
    def read(self, buf: memoryview, offset: int) -> None:
        read_full(self.data, buf, offset)

    def write(self, buf: memoryview, offset: int) -> None:
        self.data.write(buf, offset)

    def zero(self, offset: int, length: int) -> None:
        self.data.zero(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self.data.discard(offset, length)

    def flush(self) -> None:
        self.data.flush()

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        return self.data.data_extents(offset, length)

    # -- control -------------------------------------------------------------------------------
    def message(self, args: Sequence[str]) -> str | None:
        self.pool.message(args)
        return None

    def presuspend(self) -> None:
        self.pool.suspend()

    def presuspend_undo(self) -> None:
        self.pool.suspend_undo()

    def postsuspend(self) -> None:
        self.pool.suspend()

    def preresume(self) -> None:
        """``pool_preresume``: bind this table to the pool, grow the data and metadata space maps
        to the table length and the metadata device (a smaller table fails the resume)."""
        self.pool.bind(self.features, self.value.low_water_mark, self.ctx.event, self.metadata, self.data,
                       writable=not self.ctx.readonly)
        self.pool.resize(self.length)

    def resume(self) -> None:
        self.pool.resume()
        self.ctx.event()  # a resume always raises an event (thin-provisioning.rst)

    def destroy(self) -> None:
        if not self._released:
            self._released = True
            pool_table(self.ctx).put(self.pool)

    # -- text ----------------------------------------------------------------------------------
    def status(self) -> str:
        return self.pool.status()

    def table_params(self) -> str:
        """The kernel's table text: devices as ``major:minor``, the requested features, a
        trailing space (``pool_status`` STATUSTYPE_TABLE)."""
        return self.value.map_devices({self.value.metadata: self.metadata.name,
                                       self.value.data: self.data.name}.__getitem__).params
