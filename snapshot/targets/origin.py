"""``snapshot-origin <origin_dev>``: reads pass through, writes copy-on-write into every snapshot."""

from __future__ import annotations

from dmtools.engine.passthrough import Passthrough, WriteThrough
from dmtools.engine.target_driver import TargetContext, TargetDriver
from dmtools.target_values import SnapshotOrigin

from snapshot.route import Route
from snapshot.targets.core import SECTOR, _read_full, do_origin, origins_of
from snapshot.targets.origins import device_key


class SnapshotOriginTarget(TargetDriver):
    """The origin device of a snapshotted volume (dm-snap.c ``origin_target``).

    Exposed, its reads and the writes that need no copy are moved by the C data path
    (:meth:`passthrough`): each Python write marks its range there once ``do_origin`` made every
    snapshot's copy durable.
    """

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
        self._key = device_key(self.dev)
        #: the origin device's small writes straight on its file where it allows it.
        self._io = Route(self.dev)
        #: the C data path's set of writes that need no copy, made when the exposure asks.
        self._writes: WriteThrough | None = None

    def read(self, buf: memoryview, offset: int) -> None:
        _read_full(self.dev, buf, self._base + offset)

    def write(self, buf: memoryview, offset: int) -> None:
        here = self._base + offset
        writes = self._writes
        ticket = None if writes is None else self.origins.ticket(self._key)
        # a first write of one chunk may be made by the copy's C call, after the copy's commit
        if not do_origin(self.origins, self.dev, here, len(buf), limit=True, key=self._key,
                         write=(self._io, buf, here)):
            self._io.write(buf, here)
        if writes is not None and ticket is not None:
            self.origins.mark(self._key, ticket, writes, here, len(buf))
            if not self.origins.first_current(self._key):  # (its snapshots changed since)
                self.origins.first_writes(self._key)

    def zero(self, offset: int, length: int) -> None:
        here = self._base + offset
        do_origin(self.origins, self.dev, here, length, limit=True, key=self._key)
        self.dev.zero(here, length)

    def discard(self, offset: int, length: int) -> None:
        """A discard is a write for the snapshots: they keep their copy first (origin_map)."""
        here = self._base + offset
        do_origin(self.origins, self.dev, here, length, limit=True, key=self._key)
        self.dev.discard(here, length)

    def passthrough(self) -> Passthrough | None:
        """The origin device, at the same offsets, with the writes that need no copy: none until
        this table's Python writes mark them. ``None`` for a subclass (it may move bytes
        otherwise) and where the C data path is unavailable."""
        if type(self) is not SnapshotOriginTarget or self._base:
            return None
        if self._writes is None:
            writes = WriteThrough.create(self.length * SECTOR)
            if writes is None:
                return None
            self.origins.attach_writes(self._key, writes)
            self._writes = writes
        return Passthrough(self.dev, self._writes)

    def destroy(self) -> None:
        writes, self._writes = self._writes, None
        if writes is not None:
            self.origins.detach_writes(self._key, writes)
            writes.close()

    def ima_status(self) -> str:
        """STATUSTYPE_IMA: dm-snap.c ``origin_status`` emits nothing."""
        return ""
