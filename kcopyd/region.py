"""Regions (``dev, sector, count``) and the checks every job passes before any I/O.

A region is the kernel's ``struct dm_io_region`` (include/linux/dm-io.h): a device, a start sector
and a length in 512-byte sectors. ``dev`` is an open :class:`~dmtools.endpoint.Endpoint` (used as
is, never closed by kcopyd), a path to a regular file or block device, or an NBD URI
(``nbd://HOST/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``, ``nbds://``; opened for the job and
closed, a destination flushed, when it completes).
"""

from __future__ import annotations

import os
import stat

from dmtools.endpoint import Endpoint
from dmtools.errors import DMError, InvalidArgument
from dmtools.nbd.uri import is_nbd_uri
from dmtools.record import record
from dmtools.units import SECTOR

__all__ = ["MAX_REGIONS", "Region", "DevLike", "OpenRegion", "open_regions"]

#: At most this many destinations per job (DM_KCOPYD_MAX_REGIONS, include/linux/dm-kcopyd.h).
MAX_REGIONS = 8

DevLike = str | os.PathLike[str] | Endpoint  # no string: a ForwardRef compiles it (10M instructions)


@record(frozen=True)
class Region:
    """``count`` sectors of ``dev`` starting at ``sector``."""

    dev: DevLike
    sector: int
    count: int

    def __post_init__(self) -> None:
        sector, count = self.sector, self.count
        if type(sector) is int and type(count) is int and sector >= 0 and count >= 0 and isinstance(
                self.dev, (Endpoint, str)):
            return  # the common case, checked fast (a job's regions are made for every copy)
        for field, value in (("sector", self.sector), ("count", self.count)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgument(f"region {field} must be an integer, not {value!r}")
            if value < 0:
                raise InvalidArgument(f"region {field} cannot be negative: {value}")
        if not isinstance(self.dev, (str, os.PathLike, Endpoint)):
            raise InvalidArgument(f"region device must be a path or an Endpoint, not {self.dev!r}")

    @property
    def offset(self) -> int:
        """Start in bytes."""
        return self.sector * SECTOR

    @property
    def nbytes(self) -> int:
        """Length in bytes."""
        return self.count * SECTOR

    @property
    def dev_name(self) -> str:
        """The device's name for messages."""
        if isinstance(self.dev, Endpoint):
            return self.dev.name or type(self.dev).__name__
        return os.fspath(self.dev)


@record
class OpenRegion:
    """A region whose device is open: ``endpoint``, byte ``offset`` and ``owned`` (kcopyd closes it)."""

    region: Region
    endpoint: Endpoint
    offset: int
    owned: bool
    zoned: bool = False

    def close(self) -> None:
        """Close the endpoint if kcopyd opened it."""
        if self.owned:
            try:
                self.endpoint.close()
            finally:
                self.owned = False


def _open_path(path: str, *, writable: bool, offset: int, length: int) -> Endpoint:
    """Open a file or block device; block devices use O_DIRECT when the range is block aligned."""
    from dmtools.blockdev import BlockDevice, resolve_devno
    from dmtools.linux import parse_devno

    if not os.path.exists(path) and parse_devno(path) is not None:
        path = resolve_devno(path)  # "MAJOR:MINOR", as dmsetup tables name devices
    try:
        st = os.stat(path)
    except OSError as err:
        raise InvalidArgument(f"cannot open: {err.strerror}", errno=err.errno, operation="copy", device=path) from err
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise InvalidArgument("not a regular file or block device", operation="copy", device=path)
    if stat.S_ISBLK(st.st_mode):
        ep: Endpoint = BlockDevice(path, writable=writable, direct=True)
        lbs = ep.logical_block_size
        if offset % lbs == 0 and length % lbs == 0:
            return ep
        # O_DIRECT needs block-aligned offsets and lengths: fall back to the page cache.
        ep.close()
    return BlockDevice(path, writable=writable, direct=False)


def _open_one(region: Region, *, writable: bool) -> OpenRegion:
    if isinstance(region.dev, Endpoint):
        return OpenRegion(region, region.dev, region.offset, False, region.dev.zoned)  # by position: faster
    path = os.fspath(region.dev)
    if is_nbd_uri(path):
        from dmtools.nbd import NbdEndpoint, source_connections

        nbd_ep = NbdEndpoint(path, writable=writable) if writable else \
            NbdEndpoint(path, connections=source_connections())
        return OpenRegion(region, nbd_ep, region.offset, owned=True)
    try:
        ep = _open_path(path, writable=writable, offset=region.offset, length=region.nbytes)
    except DMError:
        raise
    except OSError as err:
        raise InvalidArgument(f"cannot open: {err.strerror}", errno=err.errno, operation="copy", device=path) from err
    return OpenRegion(region, ep, region.offset, True, ep.zoned)


def _check(opened: OpenRegion, role: str, *, writable: bool) -> None:
    region, ep = opened.region, opened.endpoint
    size = ep.size
    if region.offset + region.nbytes > size:
        raise InvalidArgument(
            f"{role} region {region.sector}+{region.count} sectors ends beyond the device "
            f"({size // SECTOR} sectors)",
            operation="copy",
            device=region.dev_name,
        )
    # a device kcopyd opened by its path: one set read-only is refused too (an endpoint the caller
    # opened is the caller's: its write errors are reported per destination, as the kernel's)
    if writable and (ep.read_only or (opened.owned and _set_read_only(ep))):
        raise InvalidArgument(f"{role} device is read-only", operation="copy", device=region.dev_name)


def _set_read_only(ep: Endpoint) -> bool:
    """True for a block device set read-only (``BLKROGET``: a loop device attached with ``-r``,
    ``blockdev --setro``): the kernel lets it be opened for writing and fails each write with
    EPERM, so a copy to it would write its other destinations and then fail."""
    fd = ep.fileno()
    if fd is None or ep.is_regular_file:
        return False
    import fcntl
    import struct

    from dmtools.linux import BLKROGET

    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, BLKROGET, buf, True)
    except OSError:
        return False  # not a block device after all: its writes tell
    return struct.unpack("=i", buf)[0] != 0


def open_regions(src: Region | None, dests: list[Region]) -> tuple[OpenRegion | None, list[OpenRegion]]:
    """Check ``src`` and ``dests`` and open their devices; raise ``InvalidArgument`` on the first bad one.

    All or nothing: on any error every endpoint opened here is closed again and no I/O was done.
    """
    if not isinstance(dests, (list, tuple)):
        raise InvalidArgument("destinations must be a list of Region", operation="copy")
    if not dests:
        raise InvalidArgument("a job needs at least one destination", operation="copy")
    if len(dests) > MAX_REGIONS:
        raise InvalidArgument(f"{len(dests)} destinations: at most {MAX_REGIONS} per job", operation="copy")
    for d in ([src] if src is not None else []) + list(dests):
        if not isinstance(d, Region):
            raise InvalidArgument(f"not a Region: {d!r}", operation="copy")
    count = src.count if src is not None else dests[0].count
    for i, d in enumerate(dests):
        if d.count != count:
            what = "the source's" if src is not None else "destination 0's"
            raise InvalidArgument(f"destination {i} has {d.count} sectors, {what} {count}", operation="copy",
                                  device=d.dev_name)
    opened: list[OpenRegion] = []
    try:
        osrc = None
        if src is not None:
            osrc = _open_one(src, writable=False)
            opened.append(osrc)
            _check(osrc, "source", writable=False)
        odests = []
        for i, d in enumerate(dests):
            od = _open_one(d, writable=True)
            opened.append(od)
            odests.append(od)
            _check(od, f"destination {i}", writable=True)
    except BaseException:
        for o in opened:
            o.close()
        raise
    return osrc, odests
