"""``snapshot-origin <origin_dev>``: reads pass through, writes copy-on-write into every snapshot."""

from __future__ import annotations

from typing import Sequence

from dmtools.engine.target_driver import DeviceHandle, TargetDriver, TargetContext

from snapshot.targets import registry
from snapshot.targets.core import SECTOR, PendingException, Snapshot, _read_full, _write_full


def do_origin(
    origin: DeviceHandle, offset: int, length: int, *, skip: Snapshot | None = None, limit: bool = False
) -> None:
    """Make every active, valid, non-merging snapshot of ``origin`` hold its own copy of
    ``[offset, offset+length)`` before the caller overwrites it (dm-snap.c ``do_origin``).

    With ``limit`` (origin writes; not the merge's) it first waits while any of the snapshots has
    more than ``snapshot_cow_threshold`` copies in flight. Returns once every needed exception is
    copied **and** committed (or its snapshot is invalid). Runs inside the origin's gate, which a
    handover freezes.
    """
    key = registry.device_key(origin)
    with registry.gate(key).enter():
        snaps = registry.snapshots_of_key(key)
        if limit:
            for snap in snaps:
                snap.wait_for_in_progress()
        waits: list[tuple[Snapshot, list[PendingException]]] = []
        for snap in snaps:
            if snap is skip:
                continue
            pes = snap.origin_write_prepare(offset, length)
            if pes:
                waits.append((snap, pes))
        # One pass is enough: every chunk of the range had an exception already or has one of the
        # pending exceptions waited for here, which either commits or invalidates its snapshot.
        for snap, pes in waits:
            snap.wait_all(pes)


class SnapshotOriginTarget(TargetDriver):
    """The origin device of a snapshotted volume (dm-snap.c ``origin_target``)."""

    name = "snapshot-origin"
    version = (1, 9, 0)

    def __init__(self, ctx: TargetContext, start: int, length: int, args: Sequence[str]) -> None:
        super().__init__(ctx, start, length, args)
        if len(args) != 1:
            raise self.fail("origin: incorrect number of arguments")
        try:
            self.dev = ctx.get_device(args[0])
        except Exception as err:
            raise self.fail(f"Cannot get target device: {err}") from err
        self.devices.append(self.dev)
        self._base = start * SECTOR

    def read(self, buf: memoryview, offset: int) -> None:
        _read_full(self.dev, buf, self._base + offset)

    def write(self, buf: memoryview, offset: int) -> None:
        here = self._base + offset
        do_origin(self.dev, here, len(buf), limit=True)
        _write_full(self.dev, buf, here)

    def zero(self, offset: int, length: int) -> None:
        here = self._base + offset
        do_origin(self.dev, here, length, limit=True)
        self.dev.zero(here, length)

    def discard(self, offset: int, length: int) -> None:
        """A discard is a write for the snapshots: they keep their copy first (origin_map)."""
        here = self._base + offset
        do_origin(self.dev, here, length, limit=True)
        self.dev.discard(here, length)

    def table_params(self) -> str:
        return self.dev.name

    def ima_status(self) -> str:
        """STATUSTYPE_IMA: dm-snap.c ``origin_status`` emits nothing."""
        return ""
