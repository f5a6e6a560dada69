"""Device identity: what bytes a reference names, whatever its spelling.

The kernel knows a device by its ``dev_t`` and a table's devices by what they map; our tools take
names, and two names can mean the same bytes. :func:`identify` resolves a reference (a path,
``major:minor``, a symlink, a relative path, a loop device, a partition, a dm device of either
engine, a regular file, an NBD URI) down to :class:`Extent` values: byte ranges of the *bottom*
objects its data lives on:

* a block device that maps nothing further: ``("blk", major, minor)``;
* a regular file: ``("file", st_dev, st_ino)`` (a file is never followed further: its file
  system's device is not "its" bytes);
* an NBD export: ``("nbd", server, export name)``, the server its Unix socket's inode (or path
  when there is none), or its transport, canonical host and port (:func:`normalize_nbd_uri`).

An nbd device attached by ``dmtools nbd attach`` is the export its sysfs ``backend`` names. On the
way down a loop device contributes its backing file and byte range (sysfs
``loop/backing_file``, ``offset``, ``sizelimit``; ``drivers/block/loop.c``), a partition its
parent disk from sysfs ``start`` (``block/partitions/core.c``), a dm device the devices its table
maps: exactly through ``linear`` and ``striped`` (``drivers/md/dm-linear.c``, ``dm-stripe.c``),
conservatively (the whole of every device) through any other target. With a ``DeviceMapper``
given, its devices (both engines; the userspace engine's exposure loops and ``0:N`` devices
included) are looked up through it. A userspace engine's exposed device met otherwise (no
backend given, or another one) is looked up through that engine: one of this process, or the
daemon of its run directory (``DaemonError`` when it does not answer: its bytes are unknown).
A kernel dm device or an md array seen without its backend falls back to sysfs ``slaves``
(conservative).

Two references :meth:`Identity.overlaps` when any of their extents share a byte;
:func:`ensure_disjoint` refuses a set of roles that alias with :class:`DeviceConflict`, and
:func:`users` names the live devices whose tables map given bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from dmtools.claims import mount_of, os_errors, whole_disk
from dmtools.errors import DaemonError, DeviceConflict, DeviceNotFound, DMError, InvalidArgument
from dmtools.linux import DEVNO, SYS_DEV_BLOCK, block_attr, parse_devno, sysfs_attr
from dmtools.units import SECTOR

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.backend import DeviceMapper
    from dmtools.nbd.uri import NbdUri

__all__ = ["Extent", "Identity", "identify", "devno_of", "ensure_disjoint", "served_as", "users", "DeviceConflict"]

_DEV_BLOCK = re.compile("/dev/block/" + DEVNO.pattern)
_NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock")
#: nbd.ko's block major (include/uapi/linux/major.h); ``dmtools nbd attach`` records the export's
#: URI as the device's backend identifier (sysfs ``backend``, drivers/block/nbd.c).
_NBD_MAJOR = 43


@dataclass(frozen=True)
class Extent:
    """A byte range ``[start, end)`` of one bottom object (``end=None``: to its end)."""

    base: tuple  # type: ignore[type-arg]
    start: int
    end: int | None

    def overlaps(self, other: "Extent") -> bool:
        """True when both ranges are on one base and share at least one byte."""
        return (self.base == other.base and (self.end is None or other.start < self.end)
                and (other.end is None or self.start < other.end))


# --- the mapping from a device's bytes to its extents ---------------------------------------------
@dataclass(frozen=True)
class _Leaf:
    """The device is ``base`` itself, byte for byte."""

    base: tuple  # type: ignore[type-arg]


@dataclass(frozen=True)
class _Window:
    """Bytes ``[0, end - start)`` are bytes ``[start, end)`` of ``node`` (a loop range, a partition)."""

    node: "_Node"
    start: int
    end: int | None


@dataclass(frozen=True)
class _Striped:
    """``striped``: chunk ``c`` of the segment is chunk ``c // n`` of leg ``c % n`` (dm-stripe.c)."""

    chunk: int
    legs: tuple[tuple["_Node", int], ...]  # (node, byte offset)


@dataclass(frozen=True)
class _Opaque:
    """A target mapped conservatively: any byte may live anywhere on these extents."""

    extents: frozenset[Extent]


@dataclass(frozen=True)
class _Table:
    """A dm table: ``(start, end, node or None, byte offset)`` segments (``None``: zero/error)."""

    segments: tuple[tuple[int, int, "_Node | None", int], ...]


@dataclass(frozen=True)
class _Alias:
    """Every node holds the same bytes at the same offsets (an export and the file it serves)."""

    nodes: tuple["_Node", ...]


_Node = Union[_Leaf, _Window, _Striped, _Opaque, _Table, _Alias]


def _min_end(a: int | None, b: int | None) -> int | None:
    """The nearer of two ends (``None``: no end)."""
    return b if a is None else a if b is None else min(a, b)


def _extents(node: _Node, start: int, end: int | None) -> set[Extent]:
    """The extents holding bytes ``[start, end)`` of ``node``."""
    if end is not None and end <= start:
        return set()
    if isinstance(node, _Leaf):
        return {Extent(node.base, start, end)}
    if isinstance(node, _Window):
        s = node.start + start
        e = node.end if end is None else _min_end(node.start + end, node.end)
        return _extents(node.node, s, e)
    if isinstance(node, _Opaque):
        return set(node.extents)
    if isinstance(node, _Striped):
        return _striped_extents(node, start, end)
    out: set[Extent] = set()
    if isinstance(node, _Alias):
        for alias in node.nodes:
            out |= _extents(alias, start, end)
        return out
    for s, e, child, offset in node.segments:
        lo, hi = max(start, s), e if end is None else min(end, e)
        if lo < hi and child is not None:
            out |= _extents(child, offset + lo - s, offset + hi - s)
    return out


def _striped_extents(node: _Striped, start: int, end: int | None) -> set[Extent]:
    n, chunk = len(node.legs), node.chunk
    if end is None:  # segments are always bounded; kept total for safety
        return {x for leg, off in node.legs for x in _extents(leg, off, None)}
    first, last = start // chunk, (end - 1) // chunk
    out: set[Extent] = set()
    for i, (leg, off) in enumerate(node.legs):
        k0 = first + (i - first) % n  # first chunk of the range on leg i
        if k0 > last:
            continue
        k1 = last - (last - i) % n  # last chunk of the range on leg i
        lo = (k0 // n) * chunk + (start % chunk if k0 == first else 0)
        hi = (k1 // n) * chunk + ((end - 1) % chunk + 1 if k1 == last else chunk)
        out |= _extents(leg, off + lo, off + hi)
    return out


@dataclass(frozen=True)
class Identity:
    """What a reference is: the extents its bytes live on, and how it got there.

    ``ref`` is the reference as given, ``path`` what it resolved to (an absolute path, a URI, or
    ``major:minor`` for a device without a node), ``via`` the chain of layers for messages, e.g.
    ``("/dev/loop3", "/srv/c.img")``.
    """

    ref: str
    path: str
    extents: frozenset[Extent]
    via: tuple[str, ...]
    _node: "_Node | None" = field(repr=False, compare=False, hash=False, default=None)
    _start: int = field(repr=False, compare=False, hash=False, default=0)
    _end: int | None = field(repr=False, compare=False, hash=False, default=None)

    def overlaps(self, other: "Identity") -> bool:
        """True when the two share at least one byte."""
        return any(a.overlaps(b) for a in self.extents for b in other.extents)

    def slice(self, start: int, length: int) -> "Identity":
        """Bytes ``[start, start + length)`` of this device, as an ``Identity``.

        Exact through loop offsets and size limits, partitions, ``linear`` and ``striped``
        tables; the whole underlying set through any other target.
        """
        if start < 0 or length < 0:
            raise InvalidArgument(f"bad byte range {start}+{length}", device=self.ref)
        node = self._node if self._node is not None else _Opaque(self.extents)
        s = self._start + start
        e = _min_end(s + length, self._end)
        return Identity(self.ref, self.path, frozenset(_extents(node, s, e)), self.via, node, s, e)

    def describe(self) -> str:
        """``"/dev/loop3 (backed by /srv/c.img)"``: the path and what it maps."""
        if len(self.via) > 1:
            return f"{self.via[0]} (backed by {', '.join(self.via[1:])})"
        return self.path


# --- resolution -------------------------------------------------------------------------------------
class _Resolver:
    """One resolution pass: caches what it reads (sysfs, the backend's device list and tables)."""

    def __init__(self, dm: "DeviceMapper | None") -> None:
        self.dm = dm
        self._dm_devices: dict[tuple[int, int], str] | None = None
        self._nodes: dict[tuple[int, int], tuple[_Node, tuple[str, ...]]] = {}
        self._busy: set[tuple[int, int]] = set()
        #: resolvers of other userspace engines met on the way, by their FUSE mount point
        self._engines: dict[str, _Resolver] = {}
        self._clients: list["DeviceMapper"] = []

    def close(self) -> None:
        """Close the daemon connections this pass opened."""
        for client in self._clients:
            client.close()
        for sub in self._engines.values():
            sub.close()

    def engine_of(self, fuse_file: str) -> "_Resolver | None":
        """A resolver for the userspace engine whose FUSE file ``fuse_file`` is: an engine of
        this process, or the daemon of the run directory above the mount. ``None`` when the file
        is not on a dmtools FUSE mount; ``DaemonError`` when its engine cannot be asked."""
        mnt, fstype, _ = mount_of(fuse_file)
        if fstype != "fuse.dmtools":
            return None
        sub = self._engines.get(mnt)
        if sub is not None:
            return sub
        from dmtools.engine.expose import engine_serving

        eng: DeviceMapper | None = engine_serving(mnt)
        if eng is None:
            from dmtools.engine.client import UserspaceClient

            run_dir = os.path.dirname(mnt)
            try:
                eng = UserspaceClient(run_dir)
            except DMError as err:
                raise DaemonError(f"{fuse_file} belongs to the userspace engine of {run_dir}, "
                                  f"which does not answer: what its device maps is unknown",
                                  errno=err.errno, operation="identify") from err
            self._clients.append(eng)
        sub = self._engines[mnt] = _Resolver(eng)
        return sub

    # the backend's devices
    def dm_devices(self) -> dict[tuple[int, int], str]:
        if self._dm_devices is None:
            self._dm_devices = {}
            if self.dm is not None:
                for entry in self.dm.list():
                    self._dm_devices[(entry.major, entry.minor)] = entry.name
        return self._dm_devices

    # references
    def reference(self, ref: str, cwd: str | None) -> tuple[str, _Node, tuple[str, ...]]:
        """``(path, node, via)`` for a reference as a caller or a table spells it."""
        scheme = ref.split(":", 1)[0].lower() if "://" in ref else ""
        if scheme in _NBD_SCHEMES:
            uri, base = _nbd_base(ref, cwd)
            return (uri, *self.served(uri, _Leaf(base)))
        m = DEVNO.fullmatch(ref) or _DEV_BLOCK.fullmatch(ref)
        if m and (not ref.startswith("/") or not os.path.lexists(ref)):
            # /dev/block/M:m is udev's spelling; where udev made no such link it means the same
            devno = (int(m.group(1)), int(m.group(2)))
            node, via = self.block(devno)
            return via[0], node, via
        path = ref if os.path.isabs(ref) else os.path.join(cwd or os.getcwd(), ref)
        with os_errors(ref, "identify"):
            st = os.stat(path)
        real = os.path.realpath(path)
        if stat.S_ISBLK(st.st_mode):
            devno = (os.major(st.st_rdev), os.minor(st.st_rdev))
            node, via = self.block(devno)
            return real, node, (real,) + via[1:]
        if stat.S_ISREG(st.st_mode):
            own = self.exposed_file(real, st)
            if own is not None:
                node, via = own[0].block(own[1])
                return real, node, (real,) + via[1:]
            return real, _Leaf(("file", st.st_dev, st.st_ino)), (real,)
        raise InvalidArgument("not a block device or regular file", errno=errno.ENOTBLK,
                              operation="identify", device=ref)

    def served(self, uri: str, node: _Node) -> tuple[_Node, tuple[str, ...]]:
        """An export's node and chain: over a Unix socket of this host whose nbdkit serves a file
        or device (``dmtools serve``), also that file's or device's bytes, offset for offset."""
        from dmtools.nbd.peer import socket_served_file
        from dmtools.nbd.uri import parse_uri

        parsed = parse_uri(uri)
        path = socket_served_file(parsed.socket) if parsed.transport == "unix" else None
        if path is None:
            return node, (uri,)
        try:
            _, served, via = self.reference(path, "/")
        except (DMError, OSError):  # gone meanwhile, or not ours to read: the export alone
            return node, (uri,)
        return _Alias((node, served)), (uri, *via)

    def exposed_file(self, real: str, st: os.stat_result) -> "tuple[_Resolver, tuple[int, int]] | None":
        """The engine device whose exposure (the FUSE file behind its loop device) ``real`` is."""
        if os.major(st.st_dev) != 0:  # FUSE files live on anonymous devices
            return None
        for resolver in (self, self.engine_of(real)):
            if resolver is None or resolver.dm is None:
                continue
            for devno in resolver.dm_devices():
                if block_attr(devno, "loop/backing_file") == real:
                    return resolver, devno
        return None

    # block devices
    def block(self, devno: tuple[int, int]) -> tuple[_Node, tuple[str, ...]]:
        """``(node, via)`` for block device ``devno`` (memoised; cycles are refused)."""
        known = self._nodes.get(devno)
        if known is not None:
            return known
        if devno in self._busy:
            raise InvalidArgument(f"{devno[0]}:{devno[1]} maps itself", operation="identify")
        self._busy.add(devno)
        try:
            result = self._block(devno)
        finally:
            self._busy.discard(devno)
        self._nodes[devno] = result
        return result

    def _block(self, devno: tuple[int, int]) -> tuple[_Node, tuple[str, ...]]:
        text = f"{devno[0]}:{devno[1]}"
        name = self.dm_devices().get(devno)
        if name is not None:
            return self.dm_table(name, devno)
        sysdir = f"{SYS_DEV_BLOCK}/{text}"
        if not os.path.isdir(sysdir):
            raise DeviceNotFound("no such block device", errno=errno.ENXIO, operation="identify", device=text)
        path = _dev_path(devno)
        if devno[0] == _NBD_MAJOR:  # nbd.ko: the export its backend identifier names
            backend = block_attr(devno, "backend") or ""
            if backend.split(":", 1)[0].lower() in _NBD_SCHEMES and "://" in backend:
                with contextlib.suppress(InvalidArgument):
                    return _Leaf(_nbd_base(backend, "/")[1]), (path, backend)
        backing = block_attr(devno, "loop/backing_file")
        if backing is not None:
            engine = self.engine_of(backing)  # another userspace engine's exposed device
            if engine is not None and devno in engine.dm_devices():
                return engine.block(devno)
            return self.loop(devno, path, backing)
        parent = whole_disk(devno)
        if parent is not None:
            size = int(block_attr(devno, "size") or 0) * SECTOR
            node, via = self.block(parent)
            offset = int(block_attr(devno, "start") or 0) * SECTOR
            return _Window(node, offset, offset + size), (path,) + via
        slaves = _slaves(devno)
        if slaves:  # a kernel dm device or md array seen without its backend: conservative
            out: set[Extent] = set()
            chain: list[str] = [path]
            for slave in slaves:
                node, via = self.block(slave)
                out |= _extents(node, 0, None)
                chain.extend(v for v in via if v not in chain)
            return _Opaque(frozenset(out)), tuple(chain)
        return _Leaf(("blk", devno[0], devno[1])), (path,)

    def loop(self, devno: tuple[int, int], path: str, backing: str) -> tuple[_Node, tuple[str, ...]]:
        """A loop device: a window on its backing inode as ``LOOP_GET_STATUS64`` gives it
        (``lo_device``, ``lo_inode``: a hard link, a bind mount or an unlinked file is the same
        inode), or on the block device or FUSE file it is bound to, resolved as a reference."""
        offset = int(block_attr(devno, "loop/offset") or 0)
        limit = int(block_attr(devno, "loop/sizelimit") or 0)
        end = offset + limit if limit else None
        name = backing[:-len(" (deleted)")] if backing.endswith(" (deleted)") else backing
        node: _Node | None = None
        via: tuple[str, ...] = ()
        if not mount_of(name)[1].startswith("fuse"):  # never ask a FUSE server (it may be stuck)
            from dmtools import loop as _loop

            try:
                status = _loop.status(path)
            except DMError:
                status = None
            # loop_get_status (drivers/block/loop.c): lo_rdevice is the backing block device's
            # rdev; for a regular file 0 (older kernels: the file's own st_dev).
            if status is not None and status.rdevice in (0, status.device):
                node, via = _Leaf(("file", status.device, status.inode)), (name,)
        if node is None:
            _, node, via = self.reference(backing, None)
        return _Window(node, offset, end), (path,) + via

    def dm_table(self, name: str, devno: tuple[int, int]) -> tuple[_Node, tuple[str, ...]]:
        """The node of a backend device from its live table."""
        from dmtools.table import Linear, Striped, Zero, Error

        assert self.dm is not None
        try:
            table = self.dm.table(name)
        except DeviceNotFound:
            table = None
        try:
            path = self.dm.device_path(name)
        except DMError:  # an engine device that is not exposed
            path = f"{devno[0]}:{devno[1]}"
        chain: list[str] = [path]
        segments: list[tuple[int, int, _Node | None, int]] = []

        def child(ref: str) -> _Node:
            _, node, via = self.reference(ref, "/")
            chain.extend(v for v in via if v not in chain)
            return node

        for line in (table.lines if table is not None else ()):
            start, end = line.start * SECTOR, (line.start + line.length) * SECTOR
            tgt = line.target
            node: _Node | None
            if isinstance(tgt, Linear):
                node, offset = child(tgt.device), tgt.offset * SECTOR
            elif isinstance(tgt, Striped):
                legs = tuple((child(leg.device), leg.offset * SECTOR) for leg in tgt.stripes)
                node, offset = _Striped(tgt.chunk_size * SECTOR, legs), 0
            elif isinstance(tgt, (Zero, Error)) and not tgt.devices:
                node, offset = None, 0
            else:
                refs = list(tgt.devices) or self._deps(name, tgt.args())
                whole = set()
                for ref in refs:
                    whole |= _extents(child(ref), 0, None)
                node, offset = _Opaque(frozenset(whole)), 0
            segments.append((start, end, node, offset))
        return _Table(tuple(segments)), tuple(chain)

    def _deps(self, name: str, args: list[str]) -> list[str]:
        """Devices of a target this library does not model: its ``deps`` (block devices) and
        every argument that is ``major:minor`` or an absolute path of a file or block device
        (a userspace table names regular files by path; ``deps`` cannot list them)."""
        assert self.dm is not None
        refs = [f"{a}:{b}" for a, b in self.dm.deps(name)]
        for arg in args:
            if arg in refs:
                continue
            if DEVNO.fullmatch(arg) or (arg.startswith("/") and _is_device_or_file(arg)):
                refs.append(arg)
        return refs


def _is_device_or_file(path: str) -> bool:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISBLK(mode) or stat.S_ISREG(mode)


def _slaves(devno: tuple[int, int]) -> list[tuple[int, int]]:
    base = f"{SYS_DEV_BLOCK}/{devno[0]}:{devno[1]}/slaves"
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    devnos = (parse_devno(sysfs_attr(f"{base}/{name}/dev") or "") for name in names)
    return [d for d in devnos if d is not None]


def _dev_path(devno: tuple[int, int]) -> str:
    """``/dev/NAME`` of a block device (``/dev/block/M:m`` when sysfs has no name)."""
    uevent = block_attr(devno, "uevent") or ""
    for line in uevent.splitlines():
        if line.startswith("DEVNAME="):
            return "/dev/" + line[len("DEVNAME="):]
    return f"/dev/block/{devno[0]}:{devno[1]}"


def normalize_nbd_uri(uri: str, cwd: str | None = None) -> str:
    """One spelling per NBD export: ``nbd://HOST:PORT/EXPORT`` (the host lower-case, an address in
    its canonical form, the default port explicit), ``nbd+unix:///EXPORT?socket=PATH`` (the
    socket's path made absolute in ``cwd``, default the caller's working directory, its symlinks
    resolved) or ``nbd+vsock://CID:PORT/EXPORT``, the export name quoted one way. TLS (``nbds``),
    a user name and the query's other keys choose how the export is reached, not which bytes it
    is: they are left out. Raises ``InvalidArgument`` for a bad URI."""
    from dmtools.nbd.uri import parse_uri

    parsed = parse_uri(uri)
    export = urllib.parse.quote(parsed.export, safe="/")
    if parsed.transport == "unix":
        return f"nbd+unix:///{export}?socket={urllib.parse.quote(_socket_path(parsed, cwd), safe='/')}"
    host = _canonical_host(parsed.host)
    host = f"[{host}]" if ":" in host else host
    scheme = "nbd" if parsed.transport == "tcp" else "nbd+vsock"
    return f"{scheme}://{host}:{parsed.port}/{export}"


def _socket_path(parsed: "NbdUri", cwd: str | None) -> str:
    """The real path of a Unix-socket URI's socket (relative to ``cwd``, symlinks resolved)."""
    raw = dict(parsed.query)["socket"]
    return os.path.realpath(os.path.join(cwd if cwd is not None else os.getcwd(), raw))


def _canonical_host(host: str) -> str:
    """A host name lower-case; an address in its one canonical form (``::ffff:127.0.0.1`` is
    ``127.0.0.1``, ``0:0::1`` is ``::1``)."""
    import ipaddress

    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host.lower()
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.compressed


def _nbd_base(uri: str, cwd: str | None) -> tuple[str, tuple]:  # type: ignore[type-arg]
    """``(normalized URI, the base of the export's extents)``: the base names the
    server and the export; a Unix socket that exists is its inode (a hard link or a bind mount
    of it is the same server)."""
    from dmtools.nbd.uri import parse_uri

    norm = normalize_nbd_uri(uri, cwd)
    parsed = parse_uri(norm)
    server: tuple  # type: ignore[type-arg]
    if parsed.transport == "unix":
        try:
            st = os.stat(parsed.socket)
        except OSError:
            st = None
        server = ("unix", st.st_dev, st.st_ino) if st is not None and stat.S_ISSOCK(st.st_mode) \
            else ("unix", parsed.socket)
    else:
        server = (parsed.transport, parsed.host.lower(), parsed.port)
    return norm, ("nbd", server, parsed.export)


# --- the public API ---------------------------------------------------------------------------------
def devno_of(ref: str) -> tuple[int, int] | None:
    """The device number ``ref`` names: ``major:minor`` as a table spells it, or a block device's
    node (symlinks followed); ``None`` for anything else (a regular file, a missing path)."""
    devno = parse_devno(ref)
    if devno is not None:
        return devno
    try:
        st = os.stat(ref)
    except (OSError, ValueError):
        return None
    return (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISBLK(st.st_mode) else None


def identify(ref: "str | os.PathLike[str]", *, dm: "DeviceMapper | None" = None, cwd: str | None = None) -> Identity:
    """Resolve ``ref`` to the bytes it names.

    ``ref`` is a path (absolute, or relative to ``cwd``, default the caller's working directory;
    symlinks followed), ``major:minor`` or an NBD URI. ``dm`` is the backend whose devices (and
    engine-internal devices) are looked through; without it a dm device is resolved from sysfs.
    Raises ``DeviceNotFound`` (nothing there), ``InvalidArgument`` (not a block device, file or
    URI; a table that maps itself) or ``DMError`` (the backend failed).
    """
    text = os.fspath(ref)
    if not isinstance(text, str) or not text:
        raise InvalidArgument(f"not a device reference: {ref!r}", operation="identify")
    resolver = _Resolver(dm)
    try:
        path, node, via = resolver.reference(text, cwd)
    finally:
        resolver.close()
    return Identity(text, path, frozenset(_extents(node, 0, None)), via, node)


def served_as(export: Identity, served: Identity) -> Identity:
    """``export`` (an NBD export's identity) whose bytes are also ``served``'s, offset for offset:
    the file or device its server serves (``dmtools.nbd.peer``)."""
    node = _Alias(tuple(x._node if x._node is not None else _Opaque(x.extents) for x in (export, served)))
    return Identity(export.ref, export.path, frozenset(_extents(node, 0, None)), export.via + served.via, node)


def ensure_disjoint(refs: Mapping[str, "str | os.PathLike[str] | Identity"], *,
                    dm: "DeviceMapper | None" = None) -> dict[str, Identity]:
    """Identify every role's reference; raise ``DeviceConflict`` when two share bytes.

    ``refs`` maps a role as the user knows it (``"--cow"``, ``"the origin"``) to a reference or an
    ``Identity``. The error names both roles and how they alias, e.g. ``--cow /srv/c.img and the
    origin /dev/loop3 are the same bytes (/dev/loop3 is backed by /srv/c.img)``.
    """
    idents: dict[str, Identity] = {}
    for role, ref in refs.items():
        idents[role] = ref if isinstance(ref, Identity) else identify(ref, dm=dm)
    roles = list(idents)
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            ia, ib = idents[a], idents[b]
            if ia.overlaps(ib):
                raise DeviceConflict(conflict_message(a, ia, b, ib))
    return idents


def conflict_message(role_a: str, a: Identity, role_b: str, b: Identity) -> str:
    """``"<role a> <ref a> and <role b> <ref b> are the same bytes (<how>)"``."""
    what = "are the same bytes" if a.extents == b.extents else "share bytes"
    how = [f"{x.ref} is {x.path}" for x in (a, b) if x.ref != x.path and len(x.via) == 1]
    how += [f"{x.via[0]} is backed by {', '.join(x.via[1:])}" for x in (a, b) if len(x.via) > 1]
    if not how and a.ref != b.ref:
        how = [f"both are {a.path}"]
    suffix = f" ({'; '.join(how)})" if how else ""
    return f"{role_a} {a.ref} and {role_b} {b.ref} {what}{suffix}"


def users(ident: Identity, dm: "DeviceMapper") -> list[str]:
    """Names of ``dm``'s live devices whose tables map any byte of ``ident``, sorted."""
    resolver = _Resolver(dm)
    out = []
    try:
        for devno, name in sorted(resolver.dm_devices().items(), key=lambda kv: kv[1]):
            try:
                node, _ = resolver.block(devno)
            except (DeviceNotFound, InvalidArgument):
                continue  # removed meanwhile, or a reference that no longer resolves
            if any(x.overlaps(y) for x in _extents(node, 0, None) for y in ident.extents):
                out.append(name)
    finally:
        resolver.close()
    return out
