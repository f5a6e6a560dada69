"""``ThinPoolManager``: thin pools and thin volumes in LVM's layout, on a ``DeviceMapper`` backend.

For pool ``NAME`` on a metadata device ``M`` and a data device ``D`` the devices are LVM's
(thin.md §10.1, lib/activate/dev_manager.c):

* ``NAME-tmeta``: ``linear M 512``, the kernel's metadata (after the pool record, see below);
* ``NAME-tdata``: ``linear D 0``, whole data blocks of ``D``;
* ``NAME-tpool``: ``thin-pool NAME-tmeta NAME-tdata <chunk> 0 <features>``;
* ``NAME``: ``linear NAME-tpool 0``, the pool as a user sees it (LVM's "used pool" layout);
* each thin volume ``V``: ``thin NAME-tpool <dev id>``, as large as it was created.

What the kernel does not keep (names, sizes, the expected transaction id, a change's messages)
lives in the pool record at the start of ``M`` (:mod:`thin.pool_record`), as LVM keeps it in the
VG metadata. Changes follow LVM's transaction discipline (thin.md §10.2): the record takes the next
transaction id and the change's messages first; then the messages go to the pool and
``set_transaction_id <old> <new>`` closes the change, checked against the pool's status. A pool
found one id behind its record gets the recorded messages again (``create_thin`` of an existing id
and ``delete`` of a missing one count as done), any other difference stops with LVM's error.
Device ids are LVM's: one above the highest in use. Every operation either completes or undoes
what it did (each docstring says so).

The manager runs on either backend: the kernel's ``thin-pool`` and ``thin`` targets, or the
userspace engine's (:mod:`thin.targets`); a backend without them gets
:class:`~dmtools.errors.TargetNotSupported` before anything is touched.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import math
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from dmtools.backend import DeviceMapper
from dmtools.blockdev import BlockDevice, resolve_devno
from dmtools.claims import claim_writes
from dmtools.errors import (CorruptMetadata, DeviceBusy, DeviceExists, DeviceNotFound, DMError, InvalidArgument,
                            PoolNotWritable, TargetNotSupported, quietly)
from dmtools.file_backing import grow_behind
from dmtools.linux import DEVNO
from dmtools.names import validate_name
from dmtools.reload import reload_stack
from dmtools.status import ThinPoolStatus, ThinStatus, parse_thin_pool_status, parse_thin_status
from dmtools.table import Table
from dmtools.target_values import MAX_THIN_DEV_ID, Linear, Thin, ThinPool
from dmtools.thin_messages import CreateSnap, CreateThin, Delete, PoolMessage, parse_pool_message, send
from dmtools.thin_messages import set_transaction_id as _set_transaction_id
from dmtools.units import SECTOR, int_in

from thin.pool_record import (RECORD_SECTORS, PoolRecord, ThinVolume, has_record, read_record, record_lock,
                              write_record)

__all__ = [
    "ThinPoolManager",
    "PoolInfo",
    "VolumeInfo",
    "DEFAULT_CHUNK_SECTORS",
    "MIN_METADATA_SECTORS",
    "MAX_METADATA_SECTORS",
]

#: LVM's default chunk, 64 KiB (thin.md §10.3, ``thin_pool_chunk_size_policy = generic``).
DEFAULT_CHUNK_SECTORS = 128
#: LVM's smallest pool metadata, 2 MiB (lib/config/defaults.h DEFAULT_THIN_POOL_MIN_METADATA_SIZE).
MIN_METADATA_SECTORS = 4096
#: The most metadata the kernel uses: 255 bitmaps x 16320 blocks x 8 sectors (thin.md §0).
MAX_METADATA_SECTORS = 33292800
#: LVM zeroes at least the start of a new metadata LV; the kernel formats it when its first 4 KiB
#: are zero (dm-thin-metadata.c ``__superblock_all_zeroes``). 1 MiB covers what a previous pool wrote
#: first (superblock, space-map roots, the first btree nodes).
_WIPE_BYTES = 1 << 20
# Aliases, because ``ThinPoolManager.list`` shadows the builtin inside the class.
Messages = list[PoolMessage]
Names = list[str]


@dataclass(frozen=True)
class PoolInfo:
    """A pool: its record and the kernel's status of ``NAME-tpool``."""

    name: str
    block_size: int
    features: tuple[str, ...]
    data_sectors: int
    metadata_sectors: int
    transaction_id: int
    volumes: int
    status: ThinPoolStatus

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        s = self.status
        return {
            "name": self.name,
            "chunk_sectors": self.block_size,
            "features": list(self.features),
            "data_sectors": self.data_sectors,
            "metadata_sectors": self.metadata_sectors,
            "transaction_id": self.transaction_id,
            "volumes": self.volumes,
            "status": s.format(),
            "mode": None if s.mode is None else s.mode.value,
            "fail": s.fail,
            "needs_check": s.needs_check,
            "out_of_data_space": s.out_of_data_space,
            "error_if_no_space": s.error_if_no_space,
            "used_data_blocks": s.used_data,
            "total_data_blocks": s.total_data,
            "used_metadata_blocks": s.used_metadata,
            "total_metadata_blocks": s.total_metadata,
            "data_percent": None if s.data_percent is None else round(s.data_percent, 2),
            "metadata_percent": None if s.metadata_percent is None else round(s.metadata_percent, 2),
            "held_metadata_root": s.held_root,
        }


@dataclass(frozen=True)
class VolumeInfo:
    """A thin volume: its record entry and, when active, the kernel's status."""

    name: str
    pool: str
    dev_id: int
    size: int
    origin: str | None
    active: bool
    status: ThinStatus | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "pool": self.pool,
            "dev_id": self.dev_id,
            "size_sectors": self.size,
            "origin": self.origin,
            "active": self.active,
            "status": None if self.status is None else self.status.format(),
            "mapped_sectors": None if self.status is None else self.status.mapped_sectors,
        }


@dataclass
class _Pool:
    """One active pool as the manager works on it."""

    name: str
    record_dev: str
    record: PoolRecord

    @property
    def tmeta(self) -> str:
        return f"{self.name}-tmeta"

    @property
    def tdata(self) -> str:
        return f"{self.name}-tdata"

    @property
    def tpool(self) -> str:
        return f"{self.name}-tpool"


def _layer_names(name: str) -> tuple[str, str, str]:
    return f"{name}-tmeta", f"{name}-tdata", f"{name}-tpool"


def _ref_path(ref: str) -> str:
    """A path to open for a table's device reference (``major:minor`` is looked up in /sys)."""
    return resolve_devno(ref) if DEVNO.fullmatch(ref) else ref


def _device_sectors(path: str) -> int:
    with BlockDevice(path) as dev:
        return dev.size // SECTOR


class ThinPoolManager:
    """Create, extend, activate and deactivate thin pools; create, snapshot and remove thin volumes."""

    def __init__(self, dm: DeviceMapper) -> None:
        self.dm = dm

    # -- support and discovery -------------------------------------------------------------------
    def _require_targets(self, operation: str, device: str | None = None) -> None:
        """Refuse early on a backend without ``thin-pool``/``thin`` (the kernel loads its module on
        demand, so only other backends are asked)."""
        if self.dm.backend == "kernel":
            return
        have = self.dm.targets()
        if "thin-pool" not in have or "thin" not in have:
            raise TargetNotSupported(
                f"the {self.dm.backend or 'selected'} backend has no thin-pool/thin target; "
                "thin pools need a backend that has both (dmtools targets lists them)",
                operation=operation, device=device,
            )

    def _single(self, name: str) -> Any:
        table = self.dm.table(name)
        return table.lines[0].target if len(table.lines) == 1 else None

    def _pool(self, name: str, operation: str) -> _Pool:
        """The active pool ``name``: its record, read through ``NAME-tmeta``'s device."""
        self._require_targets(operation, name)
        tmeta, _, tpool = _layer_names(name)
        try:
            target = self._single(tpool)
            meta = self._single(tmeta)
        except DeviceNotFound:
            raise DeviceNotFound("no such active thin pool (see 'dmtools thin activate')",
                                 operation=operation, device=name) from None
        if not isinstance(target, ThinPool) or not isinstance(meta, Linear) or meta.offset != RECORD_SECTORS:
            raise DeviceNotFound("not a thin pool made by dmtools", operation=operation, device=name)
        record_dev = _ref_path(meta.device)
        record = read_record(record_dev)
        if record.name != name:
            raise CorruptMetadata(f"the pool record names pool {record.name!r}", operation=operation, device=name)
        return _Pool(name, record_dev, record)

    @contextlib.contextmanager
    def _locked(self, name: str, operation: str) -> Iterator[_Pool]:
        """Active pool ``name``, read again under its record lock (:func:`~thin.pool_record.record_lock`),
        which is held until the change is done: a second manager of the pool waits, then sees it."""
        with record_lock(self._pool(name, operation).record_dev):
            yield self._pool(name, operation)

    def _pool_status(self, pool: _Pool) -> ThinPoolStatus:
        lines = self.dm.status(pool.tpool)
        return parse_thin_pool_status(lines[0].params)

    def pools(self) -> Names:
        """Names of the active pools made by this manager (``NAME-tpool`` with a record)."""
        out = []
        names = {e.name for e in self.dm.list()}
        for n in sorted(names):
            if n.endswith("-tpool") and n[: -len("-tpool")] in names:
                try:
                    self._pool(n[: -len("-tpool")], "list")
                except DMError:
                    continue
                out.append(n[: -len("-tpool")])
        return out

    def pool_status(self, name: str) -> PoolInfo:
        """Pool ``name``'s record and status; raises ``DeviceNotFound``."""
        pool = self._pool(name, "status")
        r = pool.record
        return PoolInfo(name, r.block_size, r.features, r.data_sectors, r.metadata_sectors,
                        r.transaction_id, len(r.volumes), self._pool_status(pool))

    def list(self, pool: str | None = None) -> builtins.list[VolumeInfo]:
        """Thin volumes of ``pool`` (or of every active pool), active or not, by name."""
        out: builtins.list[VolumeInfo] = []
        for name in [pool] if pool is not None else self.pools():
            p = self._pool(name, "list")
            for vname, vol in sorted(p.record.volumes.items()):
                out.append(self._volume_info(p, vname, vol))
        return out

    def status(self, pool: str, name: str) -> VolumeInfo:
        """One thin volume; raises ``DeviceNotFound``."""
        p = self._pool(pool, "status")
        return self._volume_info(p, name, self._volume(p, name, "status"))

    def _volume(self, pool: _Pool, name: str, operation: str) -> ThinVolume:
        """The recorded volume ``name`` of ``pool``; raises ``DeviceNotFound``."""
        vol = pool.record.volumes.get(name)
        if vol is None:
            raise DeviceNotFound(f"pool {pool.name} has no thin volume of this name", operation=operation, device=name)
        return vol

    def _volume_info(self, pool: _Pool, name: str, vol: ThinVolume) -> VolumeInfo:
        status = None
        active = self._is_volume(pool, name, vol)
        if active:
            status = parse_thin_status(self.dm.status(name)[0].params)
        return VolumeInfo(name, pool.name, vol.dev_id, vol.size, vol.origin, active, status)

    def _is_volume(self, pool: _Pool, name: str, vol: ThinVolume) -> bool:
        """True when device ``name`` is this pool's thin device ``vol.dev_id``."""
        try:
            target = self._single(name)
        except DeviceNotFound:
            return False
        return (isinstance(target, Thin) and target.dev_id == vol.dev_id
                and target.pool == self.dm.device_ref(pool.tpool))

    # -- the transaction discipline ----------------------------------------------------------------
    def _writable_status(self, pool: _Pool, operation: str) -> ThinPoolStatus:
        status = self._pool_status(pool)
        if status.fail or status.error or status.read_only or status.needs_check:
            # libdm refuses messages to a pool in these states (thin.md §10.2)
            raise PoolNotWritable(
                f"the pool reports {status.format().strip()!r}: it takes no changes "
                "(read-only, failed or in need of a check)", operation=operation, device=pool.name)
        return status

    def _sync(self, pool: _Pool, operation: str) -> None:
        """Bring the kernel's transaction id to the record's, replaying the recorded messages
        when the kernel is exactly one behind (libdm ``_thin_pool_node_send_messages``)."""
        status = self._writable_status(pool, operation)
        kernel, expected = status.transaction_id, pool.record.transaction_id
        assert kernel is not None
        if kernel == expected:
            return
        if kernel + 1 != expected:
            raise CorruptMetadata(f"Thin pool {pool.name} transaction_id is {kernel}, while expected {expected}",
                                  operation=operation, device=pool.name)
        for text in pool.record.pending:
            msg = parse_pool_message(text)
            try:
                send(self.dm, pool.tpool, msg)
            except (DeviceExists, DeviceNotFound) as err:
                # a create that was applied, a delete that was applied (libdm expected errnos)
                if not ((isinstance(msg, (CreateThin, CreateSnap)) and isinstance(err, DeviceExists))
                        or (isinstance(msg, Delete) and err.errno == errno.ENODATA)):
                    raise
        self._close_transaction(pool, kernel, expected, operation)

    def _close_transaction(self, pool: _Pool, old: int, new: int, operation: str) -> None:
        _set_transaction_id(self.dm, pool.tpool, old, new)
        now = self._pool_status(pool).transaction_id
        if now != new:
            raise CorruptMetadata(f"Thin pool {pool.name} reports transaction_id {now} after "
                                  f"set_transaction_id {old} {new}", operation=operation, device=pool.name)

    def _change(self, pool: _Pool, messages: Messages, volumes: dict[str, ThinVolume], operation: str, *,
                around: Iterable[str] = ()) -> None:
        """One LVM transaction: record (next id, messages, new volumes), messages, set_transaction_id.

        Devices in ``around`` are suspended while the messages are sent (an origin during
        ``create_snap``). All-or-nothing: on failure created ids are deleted again and the record
        goes back to the previous transaction (without volumes whose ``delete`` went through).
        """
        self._sync(pool, operation)
        old = pool.record
        new = write_record(pool.record_dev, old.with_changes(
            transaction_id=old.transaction_id + 1, pending=tuple(str(m) for m in messages), volumes=volumes))
        pool.record = new
        applied: Messages = []
        suspended: Names = []
        try:
            try:
                for dev in around:
                    self.dm.suspend(dev)
                    suspended.append(dev)
                for msg in messages:
                    send(self.dm, pool.tpool, msg)
                    applied.append(msg)
            finally:
                for dev in reversed(suspended):
                    self.dm.resume(dev)
            self._close_transaction(pool, old.transaction_id, new.transaction_id, operation)
        except BaseException:
            self._undo_change(pool, old, new, applied)
            raise

    def _undo_change(self, pool: _Pool, old: PoolRecord, new: PoolRecord, applied: Messages) -> None:
        back = dict(old.volumes)
        for msg in reversed(applied):
            if isinstance(msg, (CreateThin, CreateSnap)):
                quietly(lambda m=msg: send(self.dm, pool.tpool, Delete(m.dev_id)))  # type: ignore[misc]
            elif isinstance(msg, Delete):  # irreversible: the volume is gone
                back = {n: v for n, v in back.items() if v.dev_id != msg.dev_id}
        try:
            kernel = self._pool_status(pool).transaction_id
        except DMError:
            kernel = None
        tid = old.transaction_id if kernel in (None, old.transaction_id) else new.transaction_id
        with contextlib.suppress(DMError, OSError):
            pool.record = write_record(pool.record_dev, new.with_changes(
                transaction_id=tid, pending=(), volumes=back if tid == old.transaction_id else new.volumes))

    # -- pools ---------------------------------------------------------------------------------------
    def create_pool(self, name: str, metadata: str, data: str, *, chunk_size: int = DEFAULT_CHUNK_SECTORS,
                    zero: bool = True, error_if_no_space: bool = False) -> PoolInfo:
        """Make pool ``name`` on a metadata and a data device (``lvcreate --type thin-pool``).

        The metadata device's first 256 KiB take the pool record and the start of the rest is
        zeroed, so the kernel formats it; ``chunk_size`` is in sectors (128..2097152, a multiple
        of 128); ``zero=False`` adds ``skip_block_zeroing``. All-or-nothing: on failure every
        device made is removed and the record wiped. Raises ``InvalidArgument`` (sizes),
        ``InvalidTable`` (chunk size), ``DeviceExists``, ``DeviceConflict`` (the two devices share
        bytes, under any spelling: ``dmtools.inputs``), ``DeviceBusy`` (a device a live table maps,
        or already holding a pool) and ``TargetNotSupported``.
        """
        self._require_targets("create", name)
        names = [validate_name(n) for n in (name, *_layer_names(name))]
        for n in names:
            if self.dm.exists(n):
                raise DeviceExists("device already exists", operation="create", device=n)
        features = tuple(f for f, on in (("skip_block_zeroing", not zero),
                                         ("error_if_no_space", error_if_no_space)) if on)
        ThinPool("metadata", "data", chunk_size, 0, features)  # the kernel's argument checks, early
        self._check_devices(metadata, data, "create")
        with record_lock(metadata):  # one pool made on a device at a time: the second finds the first's record
            return self._create_pool(name, metadata, data, chunk_size, features)

    def _create_pool(self, name: str, metadata: str, data: str, chunk_size: int,
                     features: tuple[str, ...]) -> PoolInfo:
        if has_record(metadata):
            raise DeviceBusy("the metadata device already holds a dmtools thin pool; use 'dmtools thin "
                             "activate' (or wipe its first 256 KiB to start over)", operation="create",
                             device=metadata)
        meta_sectors = min(_device_sectors(metadata) - RECORD_SECTORS, MAX_METADATA_SECTORS)
        if meta_sectors < MIN_METADATA_SECTORS:
            raise InvalidArgument(
                f"the metadata device needs at least {(MIN_METADATA_SECTORS + RECORD_SECTORS) * SECTOR} "
                f"bytes (2 MiB of pool metadata after the 256 KiB pool record)", operation="create",
                device=metadata)
        data_sectors = _device_sectors(data) // chunk_size * chunk_size
        if not data_sectors:
            raise InvalidArgument(f"the data device is smaller than one chunk ({chunk_size * SECTOR} bytes)",
                                  operation="create", device=data)
        record = PoolRecord(name, chunk_size, features, 0, data_sectors, meta_sectors)
        # a device mounted, held or claimed elsewhere is refused before this write, not by the table after it
        with claim_writes(metadata, holder="dmtools thin pool create"), \
                BlockDevice(metadata, writable=True) as meta_dev:
            meta_dev.write(bytes(RECORD_SECTORS * SECTOR + min(_WIPE_BYTES, meta_sectors * SECTOR)), 0)
            meta_dev.flush()
        try:
            write_record(metadata, record)
            self._activate_layers(record, metadata, data)
        except BaseException:
            self._wipe_record(metadata)
            raise
        return self.pool_status(name)

    def _wipe_record(self, metadata: str) -> None:
        with contextlib.suppress(DMError, OSError), BlockDevice(metadata, writable=True) as dev:
            dev.write(bytes(RECORD_SECTORS * SECTOR), 0)
            dev.flush()

    def _check_devices(self, metadata: str, data: str, operation: str) -> None:
        """The check every multi-device command runs (``dmtools.inputs``): the two devices must not
        share bytes under any spelling (``DeviceConflict``) nor be mapped by a live table
        (``DeviceBusy``)."""
        from dmtools.inputs import check_devices

        check_devices({"--metadata": metadata, "--data": data}, backends=[self.dm], operation=operation, in_use=("*",))

    def _activate_layers(self, record: PoolRecord, metadata: str, data: str) -> None:
        """Create ``-tmeta``, ``-tdata``, ``-tpool`` and ``NAME``; all or none."""
        dm = self.dm
        name = record.name
        tmeta, tdata, tpool = _layer_names(name)
        created: Names = []
        try:
            dm.create(tmeta, Table.single(record.metadata_sectors, Linear(metadata, RECORD_SECTORS)))
            created.append(tmeta)
            self._check_metadata(tmeta)
            dm.create(tdata, Table.single(record.data_sectors, Linear(data, 0)))
            created.append(tdata)
            pool_target = ThinPool(dm.device_ref(tmeta), dm.device_ref(tdata), record.block_size,
                                   record.low_water_mark, record.features)
            dm.create(tpool, Table.single(record.data_sectors, pool_target))
            created.append(tpool)
            dm.create(name, Table.single(record.data_sectors, Linear(dm.device_ref(tpool), 0)))
            created.append(name)
        except BaseException:
            quietly(*[(lambda n=n: dm.remove(n, retry=True)) for n in reversed(created)])
            raise

    def _check_metadata(self, tmeta: str) -> None:
        """LVM runs ``thin_check`` on the metadata before it activates a pool, unless the metadata
        is new (its first 64 bytes zero) (thin.md §10.1); a failed check stops the activation.

        A backend whose devices have no block device (the userspace engine without exposure)
        gets our own check (:func:`thin.metadata.check`) through an endpoint instead."""
        try:
            path = self.dm.device_path(tmeta)
        except DMError:
            self._check_metadata_endpoint(tmeta)
            return
        with BlockDevice(path) as dev:
            head = bytearray(64)
            dev.readinto(head, 0)
        tool = shutil.which("thin_check")
        if not any(head) or tool is None:
            return
        done = subprocess.run([tool, "-q", "--clear-needs-check-flag", path], capture_output=True, text=True)
        if done.returncode:
            raise CorruptMetadata(f"thin_check failed on the pool metadata: {done.stderr.strip()[:200]}",
                                  operation="activate", device=tmeta)

    def _check_metadata_endpoint(self, tmeta: str) -> None:
        """``_check_metadata`` through ``open_endpoint``: check, then clear needs_check as
        ``thin_check --clear-needs-check-flag`` does."""
        from thin.metadata import ThinMetadata, check
        from thin.metadata.transaction import EndpointMetadataDevice

        with self.dm.open_endpoint(tmeta) as ep:
            head = bytearray(64)
            ep.readinto(head, 0)
            if not any(head):
                return
            report = check(EndpointMetadataDevice(ep))
            if report.errors:
                raise CorruptMetadata(f"the pool metadata fails its check: {report.errors[0][:200]}",
                                      operation="activate", device=tmeta)
            if report.needs_check:
                with ThinMetadata.open(EndpointMetadataDevice(ep, writable=True), writable=True) as md:
                    md.clear_needs_check()
                    md.commit()

    def activate(self, metadata: str, data: str, *, volumes: bool = True) -> PoolInfo:
        """Activate the pool on ``metadata``/``data`` again (after a restart), and its volumes.

        The pool's name, sizes and volumes come from the pool record; a change interrupted
        before its ``set_transaction_id`` is completed. All-or-nothing. Raises
        ``CorruptMetadata`` (no record, a failed ``thin_check``, a transaction id that does not
        match), ``InvalidArgument`` (a device smaller than recorded), ``DeviceExists``,
        ``DeviceConflict`` and ``DeviceBusy`` (as :meth:`create_pool`).
        """
        self._require_targets("activate", metadata)
        with record_lock(metadata):
            return self._activate(metadata, data, volumes)

    def _activate(self, metadata: str, data: str, volumes: bool) -> PoolInfo:
        record = read_record(metadata)
        name = record.name
        names = [name, *_layer_names(name)] + (sorted(record.volumes) if volumes else [])
        for n in names:
            if self.dm.exists(n):
                raise DeviceExists("device already exists", operation="activate", device=n)
        self._check_devices(metadata, data, "activate")
        if _device_sectors(metadata) - RECORD_SECTORS < record.metadata_sectors:
            raise InvalidArgument("the metadata device is smaller than the pool's metadata",
                                  operation="activate", device=metadata)
        if _device_sectors(data) < record.data_sectors:
            raise InvalidArgument(f"the data device is smaller than the pool ({record.data_sectors} sectors); "
                                  "is it the pool's data device?", operation="activate", device=data)
        self._activate_layers(record, metadata, data)
        made: Names = []
        try:
            pool = self._pool(name, "activate")
            self._sync(pool, "activate")
            if volumes:
                for vname, vol in sorted(pool.record.volumes.items()):
                    self._activate_volume(pool, vname, vol)
                    made.append(vname)
        except BaseException:
            quietly(*[(lambda n=n: self.dm.remove(n, retry=True))
                       for n in [*reversed(made), name, *reversed(_layer_names(name))]])
            raise
        return self.pool_status(name)

    def deactivate(self, name: str) -> None:
        """Remove pool ``name``'s devices and its active volumes; the data stays on the devices.

        Raises ``DeviceBusy`` (nothing removed) while a volume or the pool device is open.
        """
        with self._locked(name, "deactivate") as pool:
            self._deactivate(pool)

    def _deactivate(self, pool: _Pool) -> None:
        name = pool.name
        active = [v for v, vol in sorted(pool.record.volumes.items()) if self._is_volume(pool, v, vol)]
        for dev in [*active, name]:
            if self.dm.info(dev).open_count:
                raise DeviceBusy("device is open", operation="deactivate", device=dev)
        for dev in [*active, name, pool.tpool, pool.tdata, pool.tmeta]:
            self.dm.remove(dev, retry=True)

    def extend(self, name: str) -> PoolInfo:
        """Take up grown metadata and data devices (``lvextend`` of the pool's sub-LVs).

        Grow the devices first (a larger file and ``losetup -c``, ``lvextend`` ...). The layers
        are reloaded with the larger tables and resumed bottom-up, and the kernel grows its space
        maps at the pool's resume. All-or-nothing. Raises ``InvalidArgument`` when neither device
        grew.
        """
        with self._locked(name, "extend") as pool:
            return self._extend(pool)

    def _extend(self, pool: _Pool) -> PoolInfo:
        dm, name = self.dm, pool.name
        rec = pool.record
        meta_target = self._single(pool.tmeta)
        data_target = self._single(pool.tdata)
        pool_target = self._single(pool.tpool)
        meta_sectors = min(_device_sectors(_ref_path(meta_target.device)) - RECORD_SECTORS, MAX_METADATA_SECTORS)
        data_sectors = _device_sectors(_ref_path(data_target.device)) // rec.block_size * rec.block_size
        grow_meta = meta_sectors > rec.metadata_sectors
        grow_data = data_sectors > rec.data_sectors
        if not grow_meta and not grow_data:
            raise InvalidArgument("neither the metadata nor the data device has grown; grow them first",
                                  operation="extend", device=name)
        loads: builtins.list[tuple[str, Table]] = []
        if grow_meta:
            loads.append((pool.tmeta, Table.single(meta_sectors, meta_target)))
        if grow_data:
            loads += [(pool.tdata, Table.single(data_sectors, data_target)),
                      (pool.tpool, Table.single(data_sectors, pool_target)),
                      (name, Table.single(data_sectors, self._single(name)))]
        new = rec.with_changes(metadata_sectors=max(meta_sectors, rec.metadata_sectors),
                               data_sectors=max(data_sectors, rec.data_sectors))
        order = [name, pool.tpool, pool.tdata, pool.tmeta]  # top-down for suspend
        try:
            pool.record = write_record(pool.record_dev, new)
            reload_stack(dm, loads, order)
        except BaseException:
            quietly(lambda: write_record(pool.record_dev, pool.record.with_changes(
                metadata_sectors=rec.metadata_sectors, data_sectors=rec.data_sectors)))
            raise
        return self.pool_status(name)

    def autoextend(self, name: str, percent: int, *, data: bool = True, metadata: bool = False) -> PoolInfo:
        """Grow the pool's data and/or metadata device by ``percent`` % and take them up, as dmeventd's
        thin plugin does with ``lvextend --use-policies`` (``thin_pool_autoextend_percent``).

        Each device must be a file or a loop device over one (the file grows, allocated, and the loop
        takes the new capacity); data grows by whole pool blocks, at least one, metadata up to the
        kernel's limit. Then :meth:`extend` reloads the layers. Raises ``InvalidArgument`` (bad
        percent, nothing to grow, not file-backed) and ``DMError`` from a failed step.
        """
        if not int_in(percent, 1):
            raise InvalidArgument(f"extension percent must be a positive integer, not {percent!r}",
                                  operation="extend", device=name)
        with self._locked(name, "extend") as pool:
            rec = pool.record
            if data:
                target = self._single(pool.tdata)
                step = max(1, math.ceil(rec.data_sectors * percent / 100 / rec.block_size)) * rec.block_size
                grow_behind(target.device, (target.offset + rec.data_sectors + step) * SECTOR)
            if metadata and rec.metadata_sectors < MAX_METADATA_SECTORS:
                target = self._single(pool.tmeta)
                new = min(rec.metadata_sectors + max(8, math.ceil(rec.metadata_sectors * percent / 100)),
                          MAX_METADATA_SECTORS)
                grow_behind(target.device, (target.offset + new) * SECTOR)
            return self._extend(pool)

    # -- volumes ---------------------------------------------------------------------------------------
    def _new_volume_checks(self, pool: _Pool, name: str, operation: str) -> int:
        validate_name(name)
        if name in pool.record.volumes:
            raise DeviceExists(f"pool {pool.name} already has a thin volume of this name",
                               operation=operation, device=name)
        if self.dm.exists(name):
            raise DeviceExists("device already exists", operation=operation, device=name)
        dev_id = pool.record.next_dev_id()
        if dev_id > MAX_THIN_DEV_ID:
            raise InvalidArgument("Cannot find free device_id.", operation=operation, device=pool.name)
        return dev_id

    def _activate_volume(self, pool: _Pool, name: str, vol: ThinVolume) -> None:
        self.dm.create(name, Table.single(vol.size, Thin(self.dm.device_ref(pool.tpool), vol.dev_id)))

    def create(self, pool: str, name: str, size: int) -> VolumeInfo:
        """Make thin volume ``name`` of ``size`` sectors in ``pool`` and activate it
        (``lvcreate -V``). All-or-nothing. Raises ``DeviceExists``, ``InvalidArgument`` and
        ``PoolNotWritable``."""
        if not int_in(size, 1):
            raise InvalidArgument(f"a thin volume's size is a positive number of sectors, not {size!r}",
                                  operation="create", device=name)
        with self._locked(pool, "create") as p:
            dev_id = self._new_volume_checks(p, name, "create")
            vol = ThinVolume(dev_id, size)
            self._change(p, [CreateThin(dev_id)], {**p.record.volumes, name: vol}, "create")
            self._activate_or_undo(p, name, vol, "create")
        return self.status(pool, name)

    def _activate_or_undo(self, pool: _Pool, name: str, vol: ThinVolume, operation: str) -> None:
        try:
            self._activate_volume(pool, name, vol)
        except BaseException:
            volumes = {n: v for n, v in pool.record.volumes.items() if n != name}
            quietly(lambda: self._change(pool, [Delete(vol.dev_id)], volumes, operation))
            raise

    def snapshot(self, pool: str, origin: str, name: str) -> VolumeInfo:
        """Snapshot thin volume ``origin`` as ``name`` (``lvcreate -s``), and activate it.

        An active origin is suspended while ``create_snap`` is sent, as LVM does. The snapshot
        has the origin's size. All-or-nothing. Raises ``DeviceNotFound`` (no such origin),
        ``DeviceExists`` and ``PoolNotWritable``.
        """
        with self._locked(pool, "snapshot") as p:
            src = self._volume(p, origin, "snapshot")
            dev_id = self._new_volume_checks(p, name, "snapshot")
            vol = ThinVolume(dev_id, src.size, origin)
            around = [origin] if self._is_volume(p, origin, src) else []
            self._change(p, [CreateSnap(dev_id, src.dev_id)], {**p.record.volumes, name: vol}, "snapshot",
                         around=around)
            self._activate_or_undo(p, name, vol, "snapshot")
        return self.status(pool, name)

    def remove(self, pool: str, name: str) -> None:
        """Deactivate thin volume ``name`` and delete it from the pool (``lvremove``; the data is
        gone). Raises ``DeviceNotFound`` and ``DeviceBusy`` (open: nothing changed)."""
        with self._locked(pool, "remove") as p:
            self._remove(p, name)

    def _remove(self, p: _Pool, name: str) -> None:
        vol = self._volume(p, name, "remove")
        active = self._is_volume(p, name, vol)
        if active and self.dm.info(name).open_count:
            raise DeviceBusy("thin volume is open", operation="remove", device=name)
        self._sync(p, "remove")
        if active:
            self.dm.remove(name, retry=True)
        try:
            self._change(p, [Delete(vol.dev_id)], {n: v for n, v in p.record.volumes.items() if n != name}, "remove")
        except BaseException:
            if active and name in p.record.volumes:
                quietly(lambda: self._activate_volume(p, name, vol))
            raise
