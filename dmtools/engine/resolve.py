"""Resolve table device references: paths or ``major:minor``, as dmsetup takes them.

A reference to one of the engine's own devices (its ``major:minor``, its exposed loop device, its
``mapper/NAME`` link or its FUSE file) resolves to the device itself, in-process: I/O never goes
through the engine's own FUSE/loop exposure, which would deadlock a suspended device against
itself. Anything else is claimed for the engine (``dmtools.claims``: ``O_EXCL`` on a block device,
a lock on a file; ``DeviceBusy`` when mounted or claimed elsewhere) and opened as a
``BackingDevice`` (a ``dmtools.blockdev.BlockDevice`` of a block device or regular file, with
``O_DIRECT`` for large writes), which releases the claim when the table closes it.

An NBD URI (``nbd://HOST/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``, ``nbds://`` …) opens the
export through libnbd (:class:`dmtools.nbd.NbdEndpoint`), so a linear segment, a mirror leg or a
snapshot's origin or COW may live on another host. It has no device number: tables show the URI.
Nothing can be claimed on a remote server; the identity checks still refuse one export named twice.
An export mapped writable must take FLUSH (``NBD_FLAG_SEND_FLUSH``): a table's durability points
are flushes.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from dmtools.blockdev import resolve_devno
from dmtools.engine.backing import BackingDevice
from dmtools.engine.target_driver import DeviceHandle
from dmtools.errors import DeviceBusy, DMError, InvalidTable
from dmtools.linux import DEVNO
from dmtools.nbd.uri import is_nbd_uri

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.engine.device import Device
    from dmtools.engine.engine import Engine


def _own(engine: "Engine", ref: str) -> "Device | None":
    """The engine device ``ref`` names, if it names one."""
    m = DEVNO.fullmatch(ref)
    if m:
        return engine.device_by_devno(int(m.group(1)), int(m.group(2)))
    exposure = engine.exposure
    if exposure is not None:
        dev = exposure.device_for_path(ref)
        if dev is not None:
            return dev
    try:
        st = os.stat(ref)
    except OSError:
        return None
    if stat.S_ISBLK(st.st_mode):
        return engine.device_by_devno(os.major(st.st_rdev), os.minor(st.st_rdev))
    return None


def resolve(engine: "Engine", ref: str, *, writable: bool) -> DeviceHandle:
    """Open ``ref`` for a table; raises ``InvalidTable`` when it names nothing usable."""
    from dmtools.engine.device_endpoint import DeviceEndpoint

    if is_nbd_uri(ref):
        return _remote(ref, writable=writable)
    own = _own(engine, ref)
    if own is not None:
        exposed = own.exposure
        claim = None
        if exposed is not None:
            # Its block device is claimed like any other: a mount of it fails, as in the kernel.
            # Claimed first: the device counts the table as an opener once its open succeeded,
            # as the kernel's count does (the open may wait: ``Holder._take``).
            try:
                claim = engine.claims.claim(exposed.loop.path)
            except DMError as err:
                cls = DeviceBusy if isinstance(err, DeviceBusy) else InvalidTable
                raise cls(f"{ref}: {err.message}", operation="load") from err
        try:
            endpoint = DeviceEndpoint(own, writable=writable)
        except DMError as err:
            if claim is not None:
                claim.release()
            raise InvalidTable(f"{ref}: {err.message}", operation="load") from err
        endpoint.claim = claim
        return DeviceHandle(endpoint, f"{own.major}:{own.minor}", own.major, own.minor, ref)
    m = DEVNO.fullmatch(ref)
    try:
        path = resolve_devno((int(m.group(1)), int(m.group(2)))) if m else ref
        # dm_get_device claims the device for every table (one holder: dm-table.c
        # _dm_claim_ptr); a device mounted or claimed elsewhere is EBUSY.
        claim = engine.claims.claim(path)
    except DMError as err:
        cls = DeviceBusy if isinstance(err, DeviceBusy) else InvalidTable
        raise cls(f"{ref}: {err.message}", operation="load") from err
    try:
        bdev = BackingDevice(path, writable=writable)
    except DMError as err:
        claim.release()
        raise InvalidTable(f"{ref}: {err.message}", operation="load") from err
    bdev.claim = claim
    devno = bdev.devno
    if devno is None:
        name = os.path.abspath(ref)
        return DeviceHandle(bdev, name, -1, -1, name)
    return DeviceHandle(bdev, f"{devno[0]}:{devno[1]}", devno[0], devno[1], path)


def _remote(ref: str, *, writable: bool) -> DeviceHandle:
    """An NBD export for a table; ``InvalidTable`` when it cannot be reached or is read-only."""
    from dmtools.nbd import NbdEndpoint

    try:
        endpoint = NbdEndpoint(ref, writable=writable)
    except DMError as err:
        raise InvalidTable(f"{ref}: {err.message}", operation="load") from err
    if writable and endpoint.read_only:
        endpoint.close()
        raise InvalidTable(f"{ref}: the export is read-only", operation="load")
    if writable and not endpoint.can_flush:
        # A table's durability points (a COW's chunk and exception before the origin write, a
        # mirror's dirty mark before its data, a file system's commits) are flushes; a server
        # that takes none (nbd-server without 'flush = true' writes through its page cache)
        # would acknowledge them with nothing on stable storage.
        endpoint.close()
        raise InvalidTable(f"{ref}: the server takes no FLUSH (NBD_FLAG_SEND_FLUSH), so writes to the export "
                           "cannot be made durable; serve it with flush support, or map it read-only",
                           operation="load")
    return DeviceHandle(endpoint, ref, -1, -1, ref)
