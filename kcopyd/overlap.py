"""Regions of one job that share bytes, checked once per job before any I/O.

The kernel's kcopyd trusts its callers (dm-snapshot, dm-raid1 never hand it overlapping regions);
this one is also reached from the command line, so it decides:

- two destinations that share bytes are refused (``InvalidArgument``): the result would depend
  on which write lands last;
- a source that shares bytes with a destination *on the same file or block device* is copied as
  ``memmove(3)`` copies: the job runs one sub-job at a time, front to back when the destination
  starts before the source and back to front when it starts after it, so every byte is read
  before it is overwritten. ``copy_file_range`` is not used for such a job (the kernel refuses
  overlapping ranges within one file);
- a source that shares bytes with a destination reached through *another* device (a loop device
  over the file, a dm device over it, a second loop device) is refused: those paths have their
  own caches, so no copy order can promise memmove's result;
- a source overlapping destinations on both sides, or a back-to-front copy with ``WRITE_SEQ``
  (which writes in offset order), is refused.

Where two regions name different devices, whether they share bytes is decided by
:mod:`dmtools.identity` (a loop device is its backing file and range, a dm device the devices it
maps). Endpoints without a file descriptor are compared by object.
"""

from __future__ import annotations

import os
import stat

from dmtools.endpoint import Endpoint
from dmtools.errors import InvalidArgument
from dmtools.nbd.uri import is_nbd_uri
from dmtools.record import record

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Hashable, Sequence
    from dmtools.backend import DeviceMapper
    from dmtools.identity import Identity

__all__ = ["Span", "device_key", "span_of", "path_key", "path_span", "plan_overlap", "region_identities",
           "endpoint_identities", "knows_identity", "check_dests_not_in_use"]


@record(frozen=True)
class Span:
    """Bytes ``[start, end)`` of the device ``key`` (what the I/O is addressed through)."""

    key: Hashable
    start: int
    end: int

    def overlaps(self, other: "Span") -> bool:
        """True when both address the same device and their byte ranges intersect."""
        return self.key == other.key and self.start < other.end and other.start < self.end


def device_key(ep: Any) -> Hashable:
    """What an endpoint is open on: ``("blk", rdev)`` for a block device, ``("file", dev, ino)`` for
    a file, else the object (equal keys: the same device or file, whatever the spelling)."""
    try:
        fd = ep.fileno()
    except Exception:  # noqa: BLE001 - an endpoint without a descriptor
        fd = None
    if fd is None:
        return ("obj", id(ep))
    return _stat_key(os.fstat(fd))


def _stat_key(st: os.stat_result) -> Hashable:
    return ("blk", st.st_rdev) if stat.S_ISBLK(st.st_mode) else ("file", st.st_dev, st.st_ino)


def path_key(path: str | os.PathLike[str]) -> Hashable:
    """:func:`device_key` of an existing path, before it is opened."""
    return _stat_key(os.stat(path))


def span_of(opened: Any) -> Span:
    """The :class:`Span` of an open region (``kcopyd.region.OpenRegion``)."""
    return Span(device_key(opened.endpoint), opened.offset, opened.offset + opened.region.nbytes)


def path_span(path: str, offset: int, nbytes: int) -> Span:
    """The :class:`Span` of a region given by path, before it is opened (a missing file is keyed
    by its real path, dangling symlinks followed, so two spellings of one new file still match)."""
    try:
        key = path_key(path)
    except FileNotFoundError:
        key = ("new", os.path.realpath(path))
    return Span(key, offset, offset + nbytes)


def plan_overlap(src: tuple[Span, str] | None, dests: Sequence[tuple[Span, str]], *, write_seq: bool,
                 identities: Sequence[Any | None] = ()) -> bool | None:
    """Check a job's regions, each a ``(span, name for messages)``; return ``None`` (no
    overlap), ``False`` (one sub-job at a time, front to back) or ``True`` (one at a time, back to
    front).

    ``identities`` (optional, ``dmtools.identity.Identity`` or ``None`` per region: the source
    first, then each destination) find regions that share bytes through different devices.
    Raises ``InvalidArgument`` for the refused cases listed in the module docstring.
    """
    ids = list(identities) + [None] * (1 + len(dests) - len(identities))
    for i, (a, aname) in enumerate(dests):
        for j in range(i + 1, len(dests)):
            b, bname = dests[j]
            if a.overlaps(b) or _share(ids[1 + i], ids[1 + j]):
                raise InvalidArgument(
                    f"destinations {i} ({aname}) and {j} ({bname}) share bytes; "
                    "the result would depend on which write lands last",
                    operation="copy",
                )
    if src is None:
        return None
    s, sname = src
    before = after = same = False
    for i, (d, dname) in enumerate(dests):
        if s.overlaps(d):
            if d.start < s.start:
                before = True
            elif d.start > s.start:
                after = True
            else:
                same = True
        elif _share(ids[0], ids[1 + i]):
            nbd = _nbd_how(ids[0], ids[1 + i])
            raise InvalidArgument(
                f"the source ({sname}) and destination {i} ({dname}) share bytes ({nbd}); a copy through "
                "an NBD export onto its own bytes is refused (its connections give no memmove order)"
                if nbd else
                f"the source ({sname}) and destination {i} ({dname}) share bytes through different "
                "devices; name one device for both to copy within it as memmove",
                operation="copy",
            )
    if before and after:
        raise InvalidArgument("the source overlaps destinations on both sides; no copy order keeps it intact",
                              operation="copy")
    if after and write_seq:
        raise InvalidArgument(
            "a destination overlapping the source's end must be written back to front, "
            "which WRITE_SEQ (offset order) forbids",
            operation="copy",
        )
    if not (before or after or same):
        return None
    return after


def _share(a: Any | None, b: Any | None) -> bool:
    return a is not None and b is not None and bool(a.overlaps(b))


def _nbd_how(a: Any, b: Any) -> str:
    """How two identities that share bytes do so through an NBD export (``""`` when neither is
    one): one export named two ways, or an export and the file or device it is served from."""
    shared = {x.base for x in a.extents} & {x.base for x in b.extents}
    if any(base[0] == "nbd" for base in shared):
        return f"one NBD export, {a.path}"
    for x in (a, b):
        if is_nbd_uri(x.path) and len(x.via) > 1:
            return f"the NBD export {x.ref} is served from {', '.join(x.via[1:])}"
    return ""


def knows_identity(dev: Any) -> bool:
    """True for an endpoint that knows its identity (an NBD export's: a class attribute, so
    nothing is computed here)."""
    return isinstance(dev, Endpoint) and getattr(type(dev), "identity", None) is not None


def endpoint_identities(regions: Sequence[Any | None]) -> list["Identity | None"]:
    """For a job whose regions are all endpoints: the identities of those that know theirs,
    ``None`` for the others, or ``[]`` unless two know theirs (one export named twice)."""
    known = [r is not None and knows_identity(r.dev) for r in regions]
    if sum(known) < 2:
        return []
    return [r.dev.identity.slice(r.offset, r.nbytes) if k else None for r, k in zip(regions, known)]  # type: ignore[union-attr]


def region_identities(regions: Sequence[Any | None], backends: Sequence["DeviceMapper"] = (),
                      opened: Sequence[Any | None] = ()) -> list["Identity | None"]:
    """The bytes each region given by path covers (``None`` for endpoints and ``None``).

    Resolved through the userspace backend among ``backends`` when one is there, so that its
    exposed devices are seen through. Endpoints handed in by callers (the userspace targets'
    own copies) are not resolved: that would cost a resolution per chunk copied; an endpoint
    that knows its identity (an NBD export's, resolved once per endpoint) gives it. ``opened``
    (the regions opened, in the same order) lends an NBD URI its endpoint's identity, which
    knows what a local server serves.
    """
    from dmtools.identity import identify

    dm = next((b for b in backends if b.backend == "userspace"), None)
    out: list[Identity | None] = []
    for i, r in enumerate(regions):
        o = opened[i] if i < len(opened) else None
        ep: Any = o.endpoint if o is not None else None
        if r is None:
            out.append(None)
        elif knows_identity(r.dev) or (is_nbd_uri(r.dev) and knows_identity(ep)):
            dev: Any = r.dev if isinstance(r.dev, Endpoint) else ep
            out.append(dev.identity.slice(r.offset, r.nbytes))
        elif isinstance(r.dev, Endpoint):
            out.append(None)
        else:
            out.append(identify(os.fspath(r.dev), dm=dm).slice(r.offset, r.nbytes))
    return out


def check_dests_not_in_use(dests: Sequence[Any], identities: Sequence["Identity | None"],
                           backends: Sequence["DeviceMapper"]) -> None:
    """Raise ``DeviceBusy`` when a live table of ``backends`` maps bytes of a destination given by
    path (``dmtools.inputs.check_not_in_use``); writing under a live table corrupts it."""
    if not backends:
        return  # no live table
    from dmtools.inputs import check_not_in_use

    idents = {f"destination {i}": ident for i, ident in enumerate(identities) if ident is not None}
    check_not_in_use(idents, backends, operation="copy")
