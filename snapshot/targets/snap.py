"""``snapshot <origin> <cow> <P|PO|N> <chunk_sectors> [<#feat> <feat>...]`` (dm-snap.c ``snapshot_ctr``)."""

from __future__ import annotations

from typing import Sequence

from dmtools.engine.target_driver import DeviceHandle, TargetDriver, TargetContext, parse_uint
from dmtools.errors import CorruptMetadata, DMError, InvalidTable

from snapshot.store import make_store
from snapshot.store.base import ExceptionStore
from snapshot.store.persistent import PersistentStore
from snapshot.targets import handover
from snapshot.targets.core import SECTOR, Snapshot

FEATURES = ("discard_zeroes_cow", "discard_passdown_origin")


class SnapshotTarget(TargetDriver):
    """A point-in-time view of an origin, its changes kept in a COW device."""

    name = "snapshot"
    version = (1, 16, 0)
    #: snapshot-merge opens the origin read-write; snapshot opens it read-only.
    origin_writable = False
    merge = False

    def __init__(self, ctx: TargetContext, start: int, length: int, args: Sequence[str]) -> None:
        super().__init__(ctx, start, length, args)
        if len(args) < 4:
            raise self.fail("requires 4 or more arguments")
        self.discard_zeroes_cow = False
        self.discard_passdown_origin = False
        self._parse_features(args[4:])
        store_arg = args[2]
        try:
            chunk = parse_uint(args[3])
        except ValueError:
            raise self.fail("Invalid chunk size") from None
        try:
            self.origin: DeviceHandle = ctx.get_device(args[0], writable=self.origin_writable)
        except DMError as err:
            raise self.fail(f"Cannot get origin device: {err.message}") from err
        self.devices.append(self.origin)
        try:
            self.cow: DeviceHandle = ctx.get_device(args[1], writable=True)
        except DMError as err:
            raise self.fail(f"Cannot get COW device: {err.message}") from err
        self.devices.append(self.cow)
        if self.cow.name == self.origin.name:
            raise self.fail("COW device cannot be the same as origin device")
        try:
            store = make_store(self.cow, store_arg, chunk)
        except InvalidTable as err:
            raise self.fail(err.message) from err
        if self.merge and not isinstance(store, PersistentStore):
            raise self.fail("Snapshot merge requires a persistent exception store")
        if store.chunk_size:
            self._check_chunk(store.chunk_size)
        self.snap = Snapshot(
            self.origin,
            self.cow,
            store,
            (start + length) * SECTOR,
            name=ctx.device_name,
            event=ctx.event,
            overflow_allowed=bool(getattr(store, "overflow", False)),
            merge_target=self.merge,
            owner=self,
        )
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
        self._check_chunk(store.chunk_size)
        self.snap.valid = store.valid

    def _parse_features(self, rest: Sequence[str]) -> None:
        if not rest:
            return
        try:
            n = parse_uint(rest[0])
        except ValueError:
            raise self.fail("Invalid number of feature arguments") from None
        if n > 2 or len(rest) - 1 != n:
            raise self.fail("Invalid number of feature arguments")
        for feat in rest[1:]:
            f = feat.lower()
            if f == "discard_zeroes_cow":
                self.discard_zeroes_cow = True
            elif f == "discard_passdown_origin":
                self.discard_passdown_origin = True
            else:
                raise self.fail("Unrecognised feature requested")
        if self.discard_passdown_origin and not self.discard_zeroes_cow:
            raise self.fail("discard_passdown_origin feature depends on discard_zeroes_cow")

    def _check_chunk(self, chunk: int) -> None:
        cb = chunk * SECTOR
        if cb % self.cow.logical_block_size or cb % self.origin.logical_block_size:
            raise self.fail("Chunk size is not a multiple of device blocksize")

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

    def table_params(self) -> str:
        text = f"{self.origin.name} {self.cow.name} {self.snap.store.status_table()}"
        feats = [f for f, on in zip(FEATURES, (self.discard_zeroes_cow, self.discard_passdown_origin)) if on]
        if feats:
            text += f" {len(feats)} " + " ".join(feats)
        return text

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
