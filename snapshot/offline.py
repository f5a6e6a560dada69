"""Offline tools: read a COW without device-mapper (``inspect``) and rebuild a snapshot's view
from its origin and COW (``export``), e.g. to recover data from an LVM snapshot on another machine.

Both open the origin and COW read-only and check everything before writing a byte.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from dmtools.blockdev import open_endpoint
from dmtools.claims import Holder
from dmtools.endpoint import Endpoint
from dmtools.errors import CorruptMetadata, InvalidArgument, SnapshotInvalid
from dmtools.linux import DEVNO
from dmtools.output import discard_output, open_output
from kcopyd.overlap import device_key, path_key
from kcopyd.progress import CopyTally, ProgressFn

from snapshot.store.format import SECTOR, SNAP_MAGIC

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.backend import DeviceMapper
from snapshot.store.base import Usage
from snapshot.store.persistent import PersistentStore


@dataclass(frozen=True)
class CowInfo(Usage):
    """What ``inspect`` reports about a persistent COW device; its usage in sectors is a
    :class:`Usage` (``percent``: the allocated share, as LVM's ``Data%``)."""

    path: str
    size: int
    magic: int
    initialised: bool
    valid: bool
    version: int
    chunk_size: int
    exceptions: int
    current_area: int
    next_free: int

    @property
    def status(self) -> str:
        """The kernel's INFO text a snapshot on this COW would report right after activation."""
        return self.status_text() if self.valid else "Invalid"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (adds ``status`` and ``percent``)."""
        d = asdict(self)
        d["status"] = self.status
        d["percent"] = round(self.percent, 2)
        return d

    def format(self) -> str:
        """Human-readable lines."""
        if not self.initialised:
            state = "new (no header yet; the kernel initialises it on first activation)"
        else:
            state = "valid" if self.valid else "INVALID"
        lines = [
            f"COW:            {self.path} ({self.size} bytes, {self.total_sectors} sectors)",
            f"magic:          0x{self.magic:08x}" + ("" if self.initialised else " (zero)"),
            f"state:          {state}",
            f"version:        {self.version}",
            f"chunk size:     {self.chunk_size} sectors ({self.chunk_size * SECTOR // 1024} KiB)",
            f"exceptions:     {self.exceptions}",
            f"usage:          {self.sectors_allocated}/{self.total_sectors} sectors "
            f"({self.percent:.2f}%), metadata {self.metadata_sectors} sectors",
            f"status:         {self.status}",
        ]
        return "\n".join(lines)


def _open(dev: "str | os.PathLike[str] | Endpoint") -> tuple[Endpoint, bool]:
    """An endpoint for ``dev`` and whether we opened it (and so must close it)."""
    if isinstance(dev, Endpoint):
        return dev, False
    return open_endpoint(dev), True


def load_store(cow: Endpoint) -> PersistentStore:
    """Load a persistent store read-only; raises ``CorruptMetadata`` for a bad header or metadata."""
    store = PersistentStore(cow, readonly=True)
    store.read_metadata()
    return store


def inspect(cow_path: "str | os.PathLike[str] | Endpoint") -> CowInfo:
    """Read a COW's header and metadata without writing; raises ``CorruptMetadata``."""
    cow, owned = _open(cow_path)
    try:
        store = load_store(cow)
        return CowInfo(path=cow.name, size=cow.size, magic=0 if store.new_store else SNAP_MAGIC,
                       initialised=not store.new_store, valid=store.valid, version=store.version,
                       chunk_size=store.chunk_size, exceptions=store.records if store.valid else 0,
                       current_area=store.current_area, next_free=store.next_free, **asdict(store.usage()))
    finally:
        if owned:
            cow.close()


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` did."""

    bytes: int
    exceptions: int
    runs: int
    #: what was done to the output ("created with N bytes", "truncated from A to B bytes"...)
    output: str = ""


def _check_paths(origin: "str | os.PathLike[str] | Endpoint", cow: "str | os.PathLike[str] | Endpoint",
                 out: "str | os.PathLike[str] | Endpoint", backends: "Sequence[DeviceMapper]") -> None:
    """Refuse, before anything is opened, an output sharing bytes with the origin or the COW
    under any spelling (``dmtools.identity``: the file behind a loop device, a second loop over
    it, a dm device over it, a symlink, a relative path), origin and COW that alias, and an output
    that a live table of ``backends`` maps. Endpoints given as objects are compared when open."""
    from dmtools.inputs import check_devices

    roles: dict[str, Any] = {}
    for role, ref in (("--origin", origin), ("--cow", cow), ("the output", out)):
        if isinstance(ref, Endpoint) or (role == "the output" and not os.path.exists(ref)):
            continue
        roles[role] = ref
    check_devices(roles, backends=backends, operation="export", in_use=("the output",))


def _open_output(out: "str | os.PathLike[str] | Endpoint", size: int, inputs: tuple[Endpoint, ...],
                 force: bool, holder: Holder) -> tuple[Endpoint, bool, str]:
    """Open (or create) the output (``dmtools.output``); returns ``(endpoint, owned, what was done
    to it)``."""
    if isinstance(out, Endpoint):
        if device_key(out) in {device_key(ep) for ep in inputs}:
            raise InvalidArgument("output must differ from the origin and the COW", operation="export")
        if out.read_only:
            raise InvalidArgument("output is read-only", device=out.name, operation="export")
        if out.size < size:
            raise InvalidArgument(f"output holds {out.size} bytes, the snapshot needs {size}", device=out.name,
                                  operation="export")
        return out, False, f"first {size} bytes of {out.name} written"
    path = Path(out)
    if path.exists() and path_key(path) in {device_key(ep) for ep in inputs}:
        raise InvalidArgument("output must differ from the origin and the COW", device=str(path), operation="export")
    dev, _size, _is_blk, action = open_output(path, size, size, force=force, holder=holder)
    return dev, True, action


def chunk_runs(items: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
    """Coalesce sorted ``(old, new)`` pairs into ``(old, new, count)`` runs of consecutive chunks."""
    run_old = run_new = -2
    count = 0
    for old, new in items:
        if old == run_old + count and new == run_new + count:
            count += 1
            continue
        if count:
            yield run_old, run_new, count
        run_old, run_new, count = old, new, 1
    if count:
        yield run_old, run_new, count


def export(origin: "str | os.PathLike[str] | Endpoint", cow: "str | os.PathLike[str] | Endpoint",
           out: "str | os.PathLike[str] | Endpoint", *, progress: ProgressFn | None = None, force: bool = False,
           backends: "Sequence[DeviceMapper]" = ()) -> ExportResult:
    """Write the snapshot's view (origin with the COW's exceptions applied) to ``out``.

    ``out`` may be a new or empty regular file (sized to the origin). An existing non-empty file
    or a block device is refused unless ``force``: then a file starts over at the origin's size
    and a block device (at least as large) has its first bytes written (``dmtools.output``);
    ``ExportResult.output`` says which. Before anything is opened, an output that shares bytes
    with the origin or the COW under any spelling raises ``DeviceConflict``, and one that a live
    table of ``backends`` maps ``DeviceBusy`` (``dmtools.inputs``). The COW is checked next: a
    corrupt header or metadata raises ``CorruptMetadata``, an invalidated snapshot
    ``SnapshotInvalid``, and nothing is written. Bulk data moves with kcopyd
    (``copy_file_range`` between regular files).
    """
    import kcopyd

    if isinstance(out, str) and DEVNO.fullmatch(out) and not os.path.exists(out):
        from dmtools.blockdev import resolve_devno

        out = resolve_devno(out)  # "MAJOR:MINOR" names a device, as for the inputs: never a new file
    _check_paths(origin, cow, out, backends)
    holder = Holder("dmtools snapshot export")
    org, own_org = _open(origin)
    cw, own_cow = _open(cow)
    dst: Endpoint | None = None
    own_dst = False
    try:
        if device_key(org) == device_key(cw):
            raise InvalidArgument("origin and COW are the same device", operation="export")
        store = load_store(cw)
        if not store.valid:
            raise SnapshotInvalid("the snapshot is invalid (COW header valid=0); its data is lost", device=cw.name)
        cb = store.chunk_bytes
        if cb % org.logical_block_size:
            raise CorruptMetadata(
                f"chunk size {store.chunk_size} is not a multiple of the origin's block size", device=cw.name
            )
        size = org.size
        origin_chunks = (size + cb - 1) // cb
        last = store.table.last()
        if last is not None and last[0] >= origin_chunks:
            raise CorruptMetadata(
                f"COW maps origin chunk {last[0]} but the origin has only {origin_chunks} chunks "
                f"of {cb} bytes (wrong origin?)",
                device=cw.name,
            )
        dst, own_dst, action = _open_output(out, size, (org, cw), force, holder)
        tally = CopyTally(size + len(store.table) * cb, progress)
        sectors = size // SECTOR
        runs = 0
        with kcopyd.Client() as kc:
            kc.copy(kcopyd.Region(org, 0, sectors), [kcopyd.Region(dst, 0, sectors)], 0, tally,
                    ("copying the origin", size))
            kc.destroy()  # all origin data first: exception chunks overwrite it
        if size % SECTOR:
            tail = bytearray(size % SECTOR)
            org.readinto(tail, sectors * SECTOR)
            dst.write(tail, sectors * SECTOR)
        tally.check(dst.name, "export")
        with kcopyd.Client() as kc:
            cs = store.chunk_size
            for old, new, count in chunk_runs(store.table.items()):
                start = old * cs
                length = min(count * cs, sectors - start)
                if length <= 0:
                    continue
                kc.copy(kcopyd.Region(cw, new * cs, length), [kcopyd.Region(dst, start, length)], 0, tally,
                        (f"copying exception chunks {old}..{old + count - 1}", count * cb))
                runs += 1
        tally.check(dst.name, "export")
        dst.flush()
        return ExportResult(size, len(store.table), runs, action)
    except BaseException:
        if own_dst and dst is not None:
            assert not isinstance(out, Endpoint)
            discard_output(dst, out, action)
            dst = None
        raise
    finally:
        if own_dst and dst is not None:
            dst.close()
        holder.close()
        if own_cow:
            cw.close()
        if own_org:
            org.close()
