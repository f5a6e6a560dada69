"""``SnapshotManager``: LVM's snapshot stack on any ``DeviceMapper`` backend.

For origin ``X`` (an existing device) and snapshot ``S`` the stack is LVM's
(lib/activate/dev_manager.c): ``X-real`` holds X's original table, ``S-cow`` maps the COW device,
``S`` is ``snapshot X-real S-cow P <chunk>`` and ``X`` is reloaded as ``snapshot-origin X-real``,
resumed after its snapshots. Merging is LVM's ``lvconvert --merge``: ``snapshot-merge X-real S-cow P
<chunk>`` is loaded on ``X`` while ``S`` still holds the snapshot, and resuming ``X`` hands the
exceptions over (kernel.md §2.9); the manager then polls the status until ``allocated ==
metadata``. ``refresh`` reloads a snapshot through the same handover (``lvchange --refresh``) and
``extend`` grows a file-backed COW before refreshing (``lvextend``; the monitor's auto-extend policy
``snapshot-extend``). Everything is found again from the tables, so
the manager keeps no state of its own: a new manager (or another process) sees the same snapshots.
A change holds its origin's lock (:meth:`SnapshotManager.origin_lock`), so two managers of one
origin take turns as LVM's commands do under the volume group's lock; ``list`` and ``status`` read
without it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dmtools.backend import DeviceMapper, wait_closed
from dmtools.errors import (DeviceBusy, DeviceExists, DeviceNotFound, DMError, InvalidArgument, InvalidName,
                            OperationCancelled, SnapshotInvalid, quietly)
from dmtools.file_backing import backing_file, grow_file
from dmtools.linux import block_attr, parse_devno
from dmtools.locks import lock_dir, named_lock
from dmtools.names import validate_name, validate_uuid
from dmtools.reload import reload_stack
from dmtools.status import SnapshotState, SnapshotStatus, parse_snapshot_status
from dmtools.table import Table
from dmtools.target_values import Error, Linear, Snapshot, SnapshotMerge, SnapshotOrigin, StoreMode
from dmtools.units import int_in

from snapshot.cow_file import ExtendResult
from snapshot.store.format import NUM_SNAPSHOT_HDR_CHUNKS, SECTOR, chunk_size_error

if TYPE_CHECKING:  # pragma: no cover
    from kcopyd.progress import ProgressFn

Names = list[str]

#: LVM zeroes this much of a new COW so the kernel sees magic 0 (lib/metadata/lv_manip.c).
COW_WIPE_BYTES = 4096
#: LVM's default snapshot chunk: 4 KiB (tools/lvcreate.c).
DEFAULT_CHUNK_SECTORS = 8


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot as the tables and status lines describe it."""

    name: str
    origin: str
    cow: str
    store: StoreMode
    chunk_size: int
    status: SnapshotStatus
    merging: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> str:
        """``active``, ``merging``, ``Invalid``, ``Overflow``, ``Merge failed``..."""
        if self.status.state is SnapshotState.ACTIVE:
            return "merging" if self.merging else "active"
        return self.status.state.value

    @property
    def used(self) -> int | None:
        """Allocated sectors."""
        return self.status.allocated

    @property
    def total(self) -> int | None:
        """COW size in sectors."""
        return self.status.total

    @property
    def percent(self) -> float | None:
        """Allocated share of the COW."""
        return self.status.percent

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "origin": self.origin,
            "cow": self.cow,
            "store": self.store.value,
            "chunk_size": self.chunk_size,
            "state": self.state,
            "status": self.status.format(),
            "used_sectors": self.used,
            "total_sectors": self.total,
            "metadata_sectors": self.status.metadata,
            "percent": None if self.percent is None else round(self.percent, 2),
            "merging": self.merging,
        }


class SnapshotManager:
    """Create, list, merge and remove snapshots through a ``DeviceMapper`` backend."""

    def __init__(self, dm: DeviceMapper, *, poll_interval: float = 0.05) -> None:
        self.dm = dm
        self.poll_interval = poll_interval

    # -- discovery --------------------------------------------------------------------------------
    def _devices(self) -> dict[str, Table]:
        out: dict[str, Table] = {}
        for entry in self.dm.list():
            try:
                out[entry.name] = self.dm.table(entry.name)
            except DMError:
                continue
        return out

    def _ref_names(self) -> dict[str, str]:
        """Device reference (``major:minor``) -> device name, for this backend's devices."""
        return {f"{e.major}:{e.minor}": e.name for e in self.dm.list()}

    @staticmethod
    def _single(table: Table) -> Any:
        return table.lines[0].target if len(table.lines) == 1 else None

    def _origin_of_real(self, tables: dict[str, Table], real_ref: str) -> str | None:
        for name, table in tables.items():
            t = self._single(table)
            if isinstance(t, (SnapshotOrigin, SnapshotMerge)) and t.origin == real_ref:
                return name
        return None

    def _snapshots_of_real(self, tables: dict[str, Table], real_ref: str) -> Names:
        return [
            n
            for n, tb in tables.items()
            if type(self._single(tb)) is Snapshot and self._single(tb).origin == real_ref
        ]

    def _info(self, name: str, target: Snapshot, refs: dict[str, str], tables: dict[str, Table], merging: bool) -> SnapshotInfo:
        status_line = self.dm.status(name if not merging else self._origin_of_real(tables, target.origin) or name)
        status = parse_snapshot_status(status_line[0].params if status_line else "Unknown")
        real = refs.get(target.origin, target.origin)
        origin = self._origin_of_real(tables, target.origin) or real
        return SnapshotInfo(name=name, origin=origin if not merging else origin, cow=refs.get(target.cow, target.cow),
                            store=target.store, chunk_size=target.chunk_size, status=status, merging=merging,
                            extra={"real": real})

    def list(self) -> list[SnapshotInfo]:
        """Every snapshot (and every merge in progress, named after its ``NAME-cow`` device)."""
        tables = self._devices()
        refs = self._ref_names()
        out: list[SnapshotInfo] = []
        for name, table in sorted(tables.items()):
            t = self._single(table)
            if type(t) is Snapshot:
                out.append(self._info(name, t, refs, tables, False))
            elif isinstance(t, SnapshotMerge):
                cow_name = refs.get(t.cow, t.cow)
                snap_name = cow_name[:-4] if cow_name.endswith("-cow") else cow_name
                out.append(self._info(snap_name, t, refs, tables, True))
        return out

    def status(self, name: str) -> SnapshotInfo:
        """One snapshot's info; raises ``DeviceNotFound``."""
        for info in self.list():
            if info.name == name:
                return info
        raise DeviceNotFound("no such snapshot", operation="status", device=name)

    # -- locking ----------------------------------------------------------------------------------
    def lock_directory(self) -> str:
        """Where the origins' locks live: ``locks`` in the backend's run directory (a userspace
        client's, else ``dmtools.engine.rundir.run_dir()``, which is the daemon's too), as LVM keeps
        a file per volume group in its locking dir. Raises ``DaemonError`` for an unsafe one."""
        from dmtools.engine import rundir

        return lock_dir(getattr(self.dm, "run_dir", None) or rundir.run_dir())

    @contextlib.contextmanager
    def origin_lock(self, origin: str) -> Iterator[None]:
        """Hold origin ``origin``'s lock (:func:`dmtools.locks.named_lock`, the file
        ``snapshot-origin.ORIGIN``) while the block runs; waits for another manager's change of
        it. Every change of a snapshot stack runs under its origin's lock, reading the tables
        again once it has it."""
        with named_lock(self.lock_directory(), f"snapshot-origin.{origin}"):
            yield

    def _origin_for(self, name: str) -> str:
        """The origin of snapshot ``name`` (or of its merge); ``name`` itself when it has none, so
        that a change of a missing snapshot still takes a lock of its own."""
        tables = self._devices()
        t = self._single(tables[name]) if name in tables else None
        if type(t) is Snapshot:
            return self._origin_of_real(tables, t.origin) or name
        return self._merging_origin(name, tables, self._ref_names()) or name

    @contextlib.contextmanager
    def _snapshot_lock(self, name: str) -> Iterator[None]:
        """Hold the lock of snapshot ``name``'s origin; taken again when the snapshot moved to
        another origin (or went) while this waited."""
        for _ in range(8):
            origin = self._origin_for(name)
            with self.origin_lock(origin):
                if self._origin_for(name) == origin:
                    yield
                    return
        raise DeviceBusy("the snapshot's origin keeps changing", operation="lock", device=name)

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _cow_size(cow: str) -> int:
        from dmtools.blockdev import open_endpoint

        with open_endpoint(cow) as dev:
            return dev.size

    @staticmethod
    def _wipe_header(cow: str) -> None:
        """Zero the COW's header; a COW mounted, held or claimed elsewhere is refused first."""
        from dmtools.blockdev import open_endpoint
        from dmtools.claims import claim_writes

        with claim_writes(cow, holder="dmtools snapshot create"), open_endpoint(cow, writable=True) as dev:
            dev.write(bytes(min(COW_WIPE_BYTES, dev.size)), 0)
            dev.flush()

    def _check_cow(self, origin: str | None, cow: str, operation: str) -> str:
        """Refuse a COW that shares bytes with the origin, or that a live table already maps (a
        snapshot's COW, origin or ``-real``, a mirror leg...) whatever its spelling: a symlink,
        ``/dev/block/M:m``, the file behind a loop device (``dmtools.inputs``). Raises
        ``DeviceConflict`` or ``DeviceBusy``; returns the reference to put in the ``-cow`` table
        (a relative path made absolute here, where the caller meant it)."""
        import dataclasses

        from dmtools.identity import identify
        from dmtools.inputs import check_devices

        roles: dict[str, Any] = {"--cow": cow}
        if origin is not None and self.dm.exists(origin):
            ident = identify(self.dm.device_ref(origin), dm=self.dm)
            roles["the origin"] = dataclasses.replace(ident, ref=origin)
        check_devices(roles, backends=[self.dm], operation=operation, in_use=("--cow",))
        from dmtools.engine.protocol import absolute_reference

        return absolute_reference(cow)

    def _check_chunk(self, chunk_size: int) -> None:
        err = chunk_size_error(chunk_size)
        if err:
            raise InvalidArgument(f"{err} ({chunk_size} sectors)", operation="create")

    # -- create / activate ------------------------------------------------------------------------
    def create(self, origin: str, cow: str, name: str, *, chunk_size: int = DEFAULT_CHUNK_SECTORS,
               store: StoreMode = StoreMode.PERSISTENT) -> SnapshotInfo:
        """Snapshot device ``origin`` into ``cow`` (a path or block device) as ``name``.

        The COW's first 4 KiB are zeroed (the kernel then writes a new header). All-or-nothing:
        on failure every device created is removed and the origin's table restored. Raises
        ``InvalidArgument`` (chunk size, COW smaller than three chunks), ``DeviceExists``,
        ``DeviceNotFound``, ``DeviceBusy`` (COW already in use, origin merging), ``DeviceConflict``
        (the COW shares bytes with the origin).
        """
        self._check_chunk(chunk_size)
        with self.origin_lock(origin):
            return self._activate(origin, cow, name, chunk_size, store, wipe=True)

    def activate(self, origin: str, cow: str, name: str) -> SnapshotInfo:
        """Re-activate an existing persistent COW (after a reboot or a daemon restart).

        The chunk size comes from the COW header. Raises ``CorruptMetadata`` for a bad header,
        ``SnapshotInvalid`` when the COW was invalidated and ``InvalidArgument`` for a COW that
        holds no snapshot yet.
        """
        from snapshot.offline import inspect

        with self.origin_lock(origin):
            self._check_cow(origin, cow, "activate")
            info = inspect(cow)
            if not info.initialised:
                raise InvalidArgument("COW holds no snapshot (header magic is 0); use create", device=cow)
            if not info.valid:
                raise SnapshotInvalid("the COW's snapshot was invalidated; it cannot be activated", device=cow)
            return self._activate(origin, cow, name, info.chunk_size, StoreMode.PERSISTENT, wipe=False)

    def _activate(self, origin: str, cow: str, name: str, chunk: int, store: StoreMode, *, wipe: bool) -> SnapshotInfo:
        dm = self.dm
        validate_name(name)
        cow_name = f"{name}-cow"
        validate_name(cow_name)
        tables = self._devices()
        for n in (name, cow_name):
            if n in tables or dm.exists(n):
                raise DeviceExists("device already exists", operation="create", device=n)
        if origin not in tables:
            raise DeviceNotFound("origin is not an active device of this backend", operation="create", device=origin)
        otarget = self._single(tables[origin])
        if isinstance(otarget, SnapshotMerge):
            raise DeviceBusy("origin is merging a snapshot", operation="create", device=origin)
        cow = self._check_cow(origin, cow, "create")
        size = self._cow_size(cow)
        minimum = (NUM_SNAPSHOT_HDR_CHUNKS + 2) if store.persistent else 1
        if size < minimum * chunk * SECTOR:
            raise InvalidArgument(
                f"COW device holds {size} bytes; at least {minimum} chunks of {chunk * SECTOR} bytes are needed",
                operation="create",
                device=cow,
            )
        origin_table = tables[origin]
        origin_sectors = origin_table.size
        real_name = f"{origin}-real"
        created: Names = []
        had_real = isinstance(otarget, SnapshotOrigin)
        suspended = False
        reloaded = False
        # the -real device's name and the layers' uuids are checked before the COW is written
        real_uuid, cow_uuid = self._layer_uuids(origin, name, had_real)
        if not had_real and dm.exists(validate_name(real_name)):
            raise DeviceExists("device already exists", operation="create", device=real_name)
        if wipe:
            self._wipe_header(cow)
        try:
            if had_real:
                real_ref = otarget.origin
            else:
                dm.create(real_name, origin_table, uuid=real_uuid)
                created.append(real_name)
                real_ref = dm.device_ref(real_name)
            dm.create(cow_name, Table.single(size // SECTOR, Linear(cow, 0)), uuid=cow_uuid)
            created.append(cow_name)
            dm.suspend(origin)
            suspended = True
            snap = Snapshot(real_ref, dm.device_ref(cow_name), store, chunk)
            dm.create(name, Table.single(origin_sectors, snap))
            created.append(name)
            if not had_real:
                dm.load(origin, Table.single(origin_sectors, SnapshotOrigin(real_ref)))
                reloaded = True
            dm.resume(origin)
            suspended = False
        except BaseException:
            self._rollback(origin, origin_table if reloaded else None, created, suspended)
            raise
        return self.status(name)

    def _layer_uuids(self, origin: str, name: str, had_real: bool) -> tuple[str, str]:
        """The uuids of ``ORIGIN-real`` (``""`` when it exists already) and ``NAME-cow``: the
        origin's uuid with a layer suffix (``-real``, ``-NAME-cow``), as LVM suffixes its layers'
        uuids; none for an origin without a uuid. Refused, before anything is written, when the
        kernel would refuse it (over 128 bytes: ``InvalidName``) or a live device has it already
        (``DeviceExists``: origin ``U``'s snapshot ``a-b`` and origin ``U-a``'s snapshot ``b`` both
        make ``U-a-b-cow``). A uuid is never cut to fit: two long names sharing a prefix would
        then clash, and a uuid that still reads as origin and snapshot is worth a shorter name."""
        uuid = self.dm.info(origin).uuid
        if not uuid:
            return "", ""
        wanted = {f"{name}-cow": f"{uuid}-{name}-cow"}
        if not had_real:
            wanted[f"{origin}-real"] = f"{uuid}-real"
        in_use = {e.uuid: e.name for e in self.dm.list() if e.uuid}
        for device, layer_uuid in wanted.items():
            try:
                validate_uuid(layer_uuid)
            except InvalidName as err:
                raise InvalidName(f"{device} would get uuid {layer_uuid!r} (the origin's uuid and a suffix), "
                                  f"but {err.message}: use a shorter snapshot name", operation="create",
                                  device=device) from err
            if layer_uuid in in_use:
                raise DeviceExists(f"uuid {layer_uuid!r}, which {device} would get, belongs to {in_use[layer_uuid]}",
                                   operation="create", device=device)
        return wanted.get(f"{origin}-real", ""), wanted[f"{name}-cow"]

    def _rollback(self, origin: str, origin_table: Table | None, created: Names, suspended: bool) -> None:
        dm = self.dm
        with contextlib.suppress(DMError):
            if origin_table is not None or suspended:
                if not suspended:
                    dm.suspend(origin)
                if origin_table is not None:
                    dm.load(origin, origin_table)
                dm.resume(origin)
        quietly(*[(lambda n=n: dm.remove(n, retry=True)) for n in reversed(created)])

    # -- remove -----------------------------------------------------------------------------------
    def _snapshot(self, name: str, operation: str) -> tuple[Snapshot, dict[str, Table]]:
        tables = self._devices()
        t = self._single(tables[name]) if name in tables else None
        if type(t) is not Snapshot:
            raise DeviceNotFound("no such snapshot", operation=operation, device=name)
        return t, tables

    def remove(self, name: str) -> None:
        """Drop snapshot ``name`` and its ``-cow`` device; with the last one the plain origin returns.

        A passing opener (udev probing the device after a write, a scanner) is waited for, up to
        ``dmtools.backend.REMOVE_WAIT`` seconds as ``dmsetup remove --retry``; raises
        ``DeviceBusy``, having changed nothing, while the snapshot is still open then.
        """
        with self._snapshot_lock(name):
            self._remove(name)

    def _remove(self, name: str) -> None:
        dm = self.dm
        target, tables = self._snapshot(name, "remove")
        openers = wait_closed(dm, name)
        if openers:
            raise DeviceBusy(f"snapshot is open ({openers} openers)", operation="remove", device=name)
        origin = self._origin_of_real(tables, target.origin)
        others = [n for n in self._snapshots_of_real(tables, target.origin) if n != name]
        refs = self._ref_names()
        if origin is not None:
            dm.suspend(origin)
        try:
            dm.remove(name, retry=True)
        finally:
            if origin is not None:
                self._restore_origin(origin, target.origin, others, refs)
        self._remove_cow(target.cow, refs)

    def _restore_origin(self, origin: str, real_ref: str, others: Names, refs: dict[str, str]) -> None:
        """Resume ``origin``; without snapshots left it gets the plain table back and -real goes."""
        dm = self.dm
        real = refs.get(real_ref)
        if others or real is None:
            dm.resume(origin)
            return
        dm.load(origin, dm.table(real))
        dm.resume(origin)
        dm.remove(real, retry=True)

    def _remove_cow(self, cow_ref: str, refs: dict[str, str]) -> None:
        cow_name = refs.get(cow_ref)
        if cow_name is not None and cow_name.endswith("-cow"):
            self.dm.remove(cow_name, retry=True)

    # -- merge ------------------------------------------------------------------------------------
    def merge(self, name: str, *, wait: bool = True, progress: ProgressFn | None = None,
              timeout: float | None = None) -> SnapshotInfo | None:
        """Roll the origin back to snapshot ``name``.

        As ``lvconvert --merge``: the origin is reloaded as ``snapshot-merge`` on the snapshot's
        COW, takes over its exceptions by handover (no metadata re-read), and the snapshot device
        (``error`` after the handover) goes away. With
        ``wait`` this polls the status (``progress(done, total)`` in sectors) until the merge
        finishes, then restores ``snapshot-origin`` (other snapshots left) or the plain origin.
        Calling ``merge`` again for a merge started with ``wait=False`` resumes waiting, and
        after ``Merge failed`` retries it (the table is reloaded; the merge goes on). Raises
        ``SnapshotInvalid``, ``DeviceBusy`` (snapshot open, another merge running) and
        ``DMError`` for ``Merge failed``.
        """
        with self._snapshot_lock(name):
            merging = self._merge_start(name)
        if not wait:
            return None
        self._wait_merge(merging, name, progress, timeout)
        with self.origin_lock(merging):
            self._finish_merge(merging)
        return None

    def _merge_start(self, name: str) -> str:
        """Start (or retry) the merge of ``name``; returns the merging origin."""
        dm = self.dm
        tables = self._devices()
        refs = self._ref_names()
        merging = self._merging_origin(name, tables, refs)
        if merging is None:
            target, tables = self._snapshot(name, "merge")
            if not target.persistent:
                raise InvalidArgument("a transient snapshot cannot be merged", operation="merge", device=name)
            status = parse_snapshot_status(dm.status(name)[0].params)
            if not status.valid:
                raise SnapshotInvalid("Unable to merge invalid snapshot", operation="merge", device=name)
            if dm.info(name).open_count:
                raise DeviceBusy("snapshot is open", operation="merge", device=name)
            origin = self._origin_of_real(tables, target.origin)
            if origin is None:
                raise DeviceNotFound("the snapshot's origin device is missing", operation="merge", device=name)
            if isinstance(self._single(tables[origin]), SnapshotMerge):
                raise DeviceBusy("origin is already merging a snapshot", operation="merge", device=origin)
            merge_t = SnapshotMerge(target.origin, target.cow, StoreMode.PERSISTENT, target.chunk_size)
            self._start_merge(origin, name, Table.single(tables[origin].size, merge_t), tables)
            merging = origin
        else:
            self._retry_failed_merge(merging)
        return merging

    def _retry_failed_merge(self, origin: str) -> None:
        """After ``Merge failed`` reactivate the origin, as LVM's deactivate + activate does: the
        kernel keeps ``merge_failed`` for the table's life and refuses a second ``snapshot-merge``
        of the origin (dm-snap.c), so a new table reads the exceptions left on the COW and merges
        them. The origin must not be open."""
        status = parse_snapshot_status(self.dm.status(origin)[0].params, "snapshot-merge")
        if status.state is not SnapshotState.MERGE_FAILED:
            return
        dm = self.dm
        if dm.info(origin).open_count:
            raise DeviceBusy("Merge failed and the origin is open: close it to retry the merge",
                             operation="merge", device=origin)
        table = self._devices()[origin]
        info = dm.info(origin)
        dm.remove(origin, retry=True)
        try:
            dm.create(origin, table, uuid=info.uuid, readonly=info.read_only)
        except DMError as err:
            # Only this table reads the origin right (merged chunks from -real, the rest from the
            # COW), so nothing else may stand in for it: say exactly how to bring it back.
            raise DMError(f"retrying the merge removed {origin} and could not create it again "
                          f"({err.message}); no data is lost (it is on the -real device and the "
                          f"COW): create it again with the table '{table}'",
                          errno=err.errno, operation="merge", device=origin) from err

    def _start_merge(self, origin: str, name: str, merge_table: Table, tables: dict[str, Table]) -> None:
        """LVM's sequence: the origin gets ``snapshot-merge`` (a handover destination) and the
        snapshot device ``error``; suspend both, resume the origin (exceptions handed over, merge
        running), resume and remove the snapshot device. A failure before the origin's resume
        leaves everything as it was."""
        dm = self.dm
        dm.load(origin, merge_table)  # refusals (another merge, COW pairing) raise here
        try:
            dm.load(name, Table.single(tables[name].size, Error()))
            dm.suspend(origin)
        except BaseException:
            quietly(lambda: dm.clear(name), lambda: dm.clear(origin), lambda: dm.resume(origin))
            raise
        try:
            dm.suspend(name)
            dm.resume(origin)  # handover: the snapshot device's table is invalid from here on
        except BaseException:
            # the merge table may be live (suspended); put snapshot-origin back, then the snapshot
            quietly(lambda: dm.clear(name), lambda: dm.load(origin, tables[origin]), lambda: dm.resume(origin),
                    lambda: dm.resume(name))
            raise
        dm.resume(name)  # error target live; the handed-over snapshot table is destroyed
        dm.remove(name, retry=True)

    # -- refresh ----------------------------------------------------------------------------------
    def refresh(self, name: str) -> SnapshotInfo:
        """Reload snapshot ``name`` through the kernel's exception handover (``lvchange --refresh``).

        When ``NAME-cow`` (a single linear mapping) maps less than its underlying device now holds,
        the COW was grown: ``NAME-cow`` is reloaded to cover the whole device, so the snapshot sees
        the new space. Sequence (kernel.md §2.9, §2.11): load the same ``snapshot`` table into
        ``name`` (a handover destination) and the longer linear into ``NAME-cow``; suspend the
        origin, ``name`` and ``NAME-cow``; resume ``NAME-cow``, ``name`` (the exceptions move to the
        new table) and the origin. On failure the inactive tables loaded here are cleared and
        every device suspended here is resumed. Raises ``DeviceNotFound`` (no such snapshot) and
        ``DMError`` from the backend.
        """
        with self._snapshot_lock(name):
            return self._refresh(name)

    def _refresh(self, name: str) -> SnapshotInfo:
        dm = self.dm
        target, tables = self._snapshot(name, "refresh")
        refs = self._ref_names()
        origin = self._origin_of_real(tables, target.origin)
        cow_name = refs.get(target.cow)
        cow_table = self._grown_cow_table(cow_name, tables, refs) if cow_name else None
        cow = [(cow_name, cow_table)] if cow_table is not None and cow_name is not None else []
        # resumed bottom-up: NAME-cow, the snapshot, the origin
        reload_stack(dm, [(name, tables[name]), *cow], [*([origin] if origin else []), name, *(n for n, _ in cow)])
        return self.status(name)

    def extend(self, name: str, percent: int) -> ExtendResult:
        """Grow the COW of snapshot ``name`` by ``percent`` % of its size (whole chunks, at least
        one), as ``lvextend`` of a snapshot: the file behind it grows (allocated), a loop device
        over it takes the new capacity (``LOOP_SET_CAPACITY``) and :meth:`refresh` reloads
        ``NAME-cow`` and the snapshot through exception handover (dm-snap.c ``snapshot_resume``).

        The COW is a file or a loop device over one, directly or under the manager's linear
        ``NAME-cow``. The grown file is not shrunk when a later step fails (the space stays
        unused); :meth:`refresh` undoes its own steps. Raises ``InvalidArgument`` (not a one-line
        snapshot, COW not file-backed, percent below 1) and ``DMError`` from a failed step.
        """
        if not int_in(percent, 1):
            raise InvalidArgument(f"extension percent must be a positive integer, not {percent!r}",
                                  operation="extend", device=name)
        with self._snapshot_lock(name):
            return self._extend(name, percent)

    def _extend(self, name: str, percent: int) -> ExtendResult:
        target, tables = self._snapshot(name, "extend")
        cow_name = self._ref_names().get(target.cow)
        linear = self._single(tables[cow_name]) if cow_name in tables else None
        if cow_name is not None and not isinstance(linear, Linear):
            raise InvalidArgument(f"COW device {cow_name} is not a single linear mapping; cannot extend",
                                  operation="extend", device=name)
        under, offset = (linear.device, linear.offset) if linear else (target.cow, 0)
        path, loop_path = backing_file(under)
        cow_bytes = tables[cow_name].size * SECTOR if cow_name else os.stat(path).st_size
        chunk = target.chunk_size * SECTOR
        new_bytes = cow_bytes + max(1, math.ceil(cow_bytes * percent / 100 / chunk)) * chunk
        end = offset * SECTOR + new_bytes
        grow_file(path, end, loop_path)
        self._refresh(name)
        if cow_name is not None and self.dm.table(cow_name).size * SECTOR < new_bytes:
            raise DMError(f"{cow_name} maps less than {new_bytes} bytes after the refresh",
                          operation="extend", device=name)
        return ExtendResult(name, path, loop_path, cow_name, cow_bytes, new_bytes)

    def _grown_cow_table(self, cow_name: str, tables: dict[str, Table], refs: dict[str, str]) -> Table | None:
        """A longer table for ``NAME-cow`` when its device grew, else ``None``."""
        table = tables.get(cow_name)
        t = self._single(table) if table is not None else None
        if table is None or not isinstance(t, Linear):
            return None
        under = self._device_sectors(t.device, refs)
        if under is None:
            return None
        sectors = under - int(t.offset)
        if sectors <= table.size:
            return None
        return Table.single(sectors, Linear(t.device, t.offset))

    def _device_sectors(self, ref: str, refs: dict[str, str]) -> int | None:
        """Size in sectors of a table's device reference (this backend's device, block device or
        file); ``None`` when it cannot be found."""
        if ref in refs:
            return self.dm.table(refs[ref]).size
        if ":" in ref and not ref.startswith("/"):
            devno = parse_devno(ref)
            size = block_attr(devno, "size") if devno is not None else None
            return int(size) if size is not None and size.isdigit() else None
        try:
            return self._cow_size(ref) // SECTOR
        except (DMError, OSError):
            return None

    def _merging_origin(self, name: str, tables: dict[str, Table], refs: dict[str, str]) -> str | None:
        for oname, table in tables.items():
            t = self._single(table)
            if isinstance(t, SnapshotMerge) and refs.get(t.cow) == f"{name}-cow":
                return oname
        return None

    def _wait_merge(self, origin: str, name: str, progress: ProgressFn | None, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        start_left: int | None = None
        while True:
            status = parse_snapshot_status(self.dm.status(origin)[0].params, "snapshot-merge")
            if status.state is SnapshotState.INVALID:
                raise SnapshotInvalid("Merging snapshot invalidated", operation="merge", device=name)
            if status.state is SnapshotState.MERGE_FAILED:
                raise DMError("Merge failed. Retry merge or inspect manually.", operation="merge", device=name)
            assert status.allocated is not None and status.metadata is not None
            left = status.allocated - status.metadata
            if start_left is None:
                start_left = max(left, 0)
            if progress is not None:
                progress(max(0, start_left - left), start_left)
            if status.merge_done:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise OperationCancelled("merge still running at the timeout", operation="merge", device=name)
            time.sleep(self.poll_interval)

    def _finish_merge(self, origin: str) -> None:
        """Replace ``snapshot-merge`` by ``snapshot-origin`` (or the plain table) and drop the COW."""
        dm = self.dm
        tables = self._devices()
        refs = self._ref_names()
        t = self._single(tables[origin])
        if not isinstance(t, SnapshotMerge):
            return
        others = self._snapshots_of_real(tables, t.origin)
        dm.suspend(origin)
        try:
            if others:
                dm.load(origin, Table.single(tables[origin].size, SnapshotOrigin(t.origin)))
        except BaseException:
            dm.resume(origin)
            raise
        if others:
            dm.resume(origin)
        else:
            self._restore_origin(origin, t.origin, [], refs)
        self._remove_cow(t.cow, refs)
