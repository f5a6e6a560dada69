"""``snapshot-origin <origin_dev>``: reads pass through, writes copy-on-write into every snapshot."""

from __future__ import annotations

from dmtools.engine.target_driver import TargetContext, TargetDriver
from dmtools.target_values import SnapshotOrigin

from snapshot.targets.core import SECTOR, _read_full, _write_full, do_origin, origins_of


class SnapshotOriginTarget(TargetDriver):
    """The origin device of a snapshotted volume (dm-snap.c ``origin_target``)."""

    name = "snapshot-origin"
    version = (1, 9, 0)
    value_type = SnapshotOrigin

    def __init__(self, ctx: TargetContext, start: int, length: int, value: SnapshotOrigin) -> None:
        super().__init__(ctx, start, length, value.args())
        try:
            self.dev = ctx.get_device(value.origin)
        except Exception as err:
            raise self.fail(f"Cannot get target device: {err}") from err
        self.devices.append(self.dev)
        self._base = start * SECTOR
        self.origins = origins_of(ctx)

    def read(self, buf: memoryview, offset: int) -> None:
        _read_full(self.dev, buf, self._base + offset)

    def write(self, buf: memoryview, offset: int) -> None:
        here = self._base + offset
        do_origin(self.origins, self.dev, here, len(buf), limit=True)
        _write_full(self.dev, buf, here)

    def zero(self, offset: int, length: int) -> None:
        here = self._base + offset
        do_origin(self.origins, self.dev, here, length, limit=True)
        self.dev.zero(here, length)

    def discard(self, offset: int, length: int) -> None:
        """A discard is a write for the snapshots: they keep their copy first (origin_map)."""
        here = self._base + offset
        do_origin(self.origins, self.dev, here, length, limit=True)
        self.dev.discard(here, length)

    def ima_status(self) -> str:
        """STATUSTYPE_IMA: dm-snap.c ``origin_status`` emits nothing."""
        return ""
