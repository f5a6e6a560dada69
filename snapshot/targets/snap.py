"""``snapshot <origin> <cow> <P|PO|N> <chunk_sectors> [<#feat> <feat>...]`` (dm-snap.c ``snapshot_ctr``),
built from its table value (:class:`dmtools.target_values.Snapshot`, which holds the argument checks)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from dmtools.engine.target_driver import DeviceHandle, TargetDriver, TargetContext
from dmtools.errors import CorruptMetadata, DMError, InvalidTable
from dmtools.target_values import Snapshot, Target

from snapshot.store import make_store
from snapshot.store.base import ExceptionStore
from snapshot.targets import handover
from snapshot.targets.core import SECTOR, CopyOnWrite, origins_of


class SnapshotTarget(TargetDriver):
    """A point-in-time view of an origin, its changes kept in a COW device."""

    name = "snapshot"
    version = (1, 16, 0)
    #: the table value this target is built from.
    value_type: ClassVar[type[Snapshot]] = Snapshot
    #: snapshot-merge opens the origin read-write; snapshot opens it read-only.
    origin_writable = False
    merge = False

    def __init__(self, ctx: TargetContext, start: int, length: int, value: Snapshot) -> None:
        super().__init__(ctx, start, length, value.args())
        self.value = value
        self.discard_zeroes_cow = "discard_zeroes_cow" in value.features
        self.discard_passdown_origin = "discard_passdown_origin" in value.features
        try:
            self.origin: DeviceHandle = ctx.get_device(value.origin, writable=self.origin_writable)
        except DMError as err:
            raise self.fail(f"Cannot get origin device: {err.message}") from err
        self.devices.append(self.origin)
        try:
            self.cow: DeviceHandle = ctx.get_device(value.cow, writable=True)
        except DMError as err:
            raise self.fail(f"Cannot get COW device: {err.message}") from err
        self.devices.append(self.cow)
        if self.cow.name == self.origin.name:
            raise self.fail("COW device cannot be the same as origin device")
        store = make_store(self.cow, value.store, value.chunk_size)
        if store.chunk_size:
            self._check_chunk(store.chunk_size, "Couldn't create exception store")
        self.snap = CopyOnWrite(self.origin, self.cow, store, (start + length) * SECTOR, name=ctx.device_name,
                                event=ctx.event, overflow_allowed=value.overflow, merge_target=self.merge, owner=self,
                                origins=origins_of(ctx))
        self._base = start * SECTOR
        try:
            #: a handover destination reads no metadata: its store comes from the source at resume
            self.handover_dest = self.snap.register()
        except InvalidTable as err:
            self.snap.kc.destroy()
            raise self.fail(err.message) from err
        if self.handover_dest:
            store.chunk_size = 0
            return
        try:
            self._read_metadata(store)
        except BaseException:
            self.snap.destroy()
            raise

    def _read_metadata(self, store: ExceptionStore) -> None:
        try:
            store.read_metadata()
        except CorruptMetadata as err:
            raise self.fail(f"Failed to read snapshot metadata: {err.message}") from err
        if not store.chunk_size:
            raise self.fail("Chunk size not set")
        self._check_chunk(store.chunk_size, "Failed to read snapshot metadata")
        self.snap.valid = store.valid

    def _check_chunk(self, chunk: int, failure: str) -> None:
        """dm-exception-store.c's block size check; ``failure`` is the ``ti->error`` dm-snap.c puts
        first (from the table: the store; from the COW header: the metadata)."""
        cb = chunk * SECTOR
        if cb % self.cow.logical_block_size or cb % self.origin.logical_block_size:
            raise self.fail(f"{failure}: Chunk size is not a multiple of device blocksize")

    # -- I/O ------------------------------------------------------------------------------------
    def read(self, buf: memoryview, offset: int) -> None:
        self.snap.read(buf, self._base + offset)

    def write(self, buf: memoryview, offset: int) -> None:
        self.snap.write(buf, self._base + offset)

    def flush(self) -> None:
        """PREFLUSH to a snapshot goes to the COW."""
        self.cow.flush()

    def discard(self, offset: int, length: int) -> None:
        if self.discard_zeroes_cow:
            self.snap.discard(self._base + offset, length)
            if self.discard_passdown_origin and self.snap.valid:
                self.origin.discard(self._base + offset, length)

    # -- text and lifetime ----------------------------------------------------------------------
    def status(self) -> str:
        return self.snap.status()

    def table_value(self, value: Target) -> Target:
        """The value with the store mode and chunk size the store has now (a handover destination
        shows chunk size 0 until its resume, as dm-snap.c); the engine shows its devices as
        ``major:minor`` and escapes what needs it when printing."""
        store = self.snap.store
        return dataclasses.replace(self.value, store=store.mode, chunk_size=store.chunk_size)

    def ima_status(self) -> str:
        """STATUSTYPE_IMA text of dm-snap.c ``snapshot_status`` (``dmsetup measure``)."""
        snap = self.snap
        major, minor, patch = self.version
        yn = {True: "y", False: "n"}
        with snap.cond:
            flags = (snap.valid, snap.merge_failed, snap.overflowed)
        return (
            f"target_name={self.name},target_version={major}.{minor}.{patch}"
            f",snap_origin_name={self.origin.name},snap_cow_name={self.cow.name}"
            f",snap_valid={yn[flags[0]]},snap_merge_failed={yn[flags[1]]}"
            f",snapshot_overflowed={yn[flags[2]]};"
        )

    def preresume(self) -> None:
        """Refuse to resume a handover source, or a destination whose source is still live."""
        handover.preresume(self.snap)

    def resume(self) -> None:
        """Complete a pending exception handover into this table, then activate it."""
        handover.resume(self.snap)

    def postsuspend(self) -> None:
        """Copies in flight finish before the device counts as suspended."""

    def destroy(self) -> None:
        handover.before_destroy(self.snap)
        self.snap.destroy()
