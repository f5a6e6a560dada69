"""Exclusive claims on devices and image files, as the kernel's ``bd_claim`` gives them.

The kernel claims every block device a dm table uses, with one holder shared by all dm tables
(``_dm_claim_ptr`` in ``drivers/md/dm-table.c``): two tables may use one device (many LVs on one
PV, a snapshot stack's ``-real`` and ``-cow``), but a mounted device, or one another program holds
open with ``O_EXCL``, is refused with ``EBUSY``, and while a table holds a device, mounting it
or opening it ``O_EXCL`` fails in turn (``bd_may_claim`` in ``block/bdev.c``).

A :class:`Holder` is one such holder (an engine; a tool). ``holder.claim(path)`` takes:

* a **block device**: an ``O_EXCL`` descriptor, held until the claim is released. This is what
  makes a mount, ``mkfs``, another engine or the kernel's own dm fail against us, as against
  the kernel. A loop device also claims its backing file (below), unless that file lives on a
  FUSE file system (another engine's exposure: its loop device is claim enough).
* a **regular file** (the userspace engine takes files; the kernel does not): a ``flock``
  exclusive lock on a descriptor of it (the lock that ``BlockDevice(exclusive=True)`` takes, so
  our offline tools and engines honour each other), and a check that no loop device over the
  file is claimed by someone else (mounted, or held ``O_EXCL``).

Claims are refcounted per device within a holder, so a holder's tables nest freely. Both kinds
of lock belong to the open file: they go when the holder closes them or its process dies (a
``SIGKILL``\\ ed daemon leaves nothing stale).

Offline tools claim what they write for the length of the operation::

    with claims.claim(path):     # raises DeviceBusy when an engine, a mount or a tool holds it
        ...write...
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress

from dmtools.errors import DeviceBusy, DeviceNotFound, DMError
from dmtools.linux import SYS_DEV_BLOCK, block_attr, mounts, parse_devno, sysfs_attr

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Hashable

__all__ = ["Claim", "Holder", "claim", "claim_writes", "busy_reason", "loops_over", "mount_of", "os_errors", "whole_disk"]

class Claim:
    """One device claimed by a :class:`Holder`; :meth:`release` gives it back (once)."""

    def __init__(self, holder: "Holder", keys: tuple[Hashable, ...], path: str) -> None:
        self.holder = holder
        self.keys = keys
        self.path = path
        self._released = False

    def release(self) -> None:
        """Drop this claim (the device stays claimed while other claims of the holder use it)."""
        if not self._released:
            self._released = True
            self.holder._drop(self.keys)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Claim({self.path!r}, holder={self.holder.name!r})"


class Holder:
    """A claim holder: every claim it takes on one device shares one descriptor (refcounted)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        #: block devices being opened (without the lock) and the signal that one was
        self._opening: set[Hashable] = set()
        self._opened = threading.Condition(self._lock)
        self._held: dict[Hashable, list[int]] = {}  # key -> [fd, count]
        self._paths: dict[Hashable, str] = {}  # block device key -> the path it was claimed by

    def claim(self, path: str, *, device: str | None = None, created: bool = False) -> Claim:
        """Claim the block device or regular file at ``path``; all-or-nothing.

        ``device`` names the requester in errors. ``created``: ``path`` is a regular file that the
        caller has just made (``O_CREAT | O_EXCL``), so no loop device can be over it unless one
        was set up in between, which a search could miss as well (a loop set up just after it):
        the loop devices are not searched (a search reads every loop device the first time).
        Raises ``DeviceBusy`` (mounted, held ``O_EXCL``
        or locked by another holder, or a loop device over the file is), ``DeviceNotFound``,
        or ``DMError`` (permissions and the like).
        """
        with os_errors(path, "claim", device):
            st = os.stat(path)
        taken: list[Hashable] = []
        try:
            if stat.S_ISBLK(st.st_mode):
                devno = (os.major(st.st_rdev), os.minor(st.st_rdev))
                self._take(("blk", devno), path, device, taken)
                backing = _loop_backing(devno)
                if backing is not None and not _on_fuse(backing):
                    with suppress(DeviceNotFound):  # unlinked: nobody else can name it any more
                        self._take_file(backing, device, taken)
            elif stat.S_ISREG(st.st_mode):
                self._take_file(path, device, taken, loops=not created)
            else:
                raise DeviceNotFound("not a block device or regular file", errno=errno.ENOTBLK,
                                     operation="claim", device=path)
        except BaseException:
            self._drop(tuple(taken))
            raise
        return Claim(self, tuple(taken), path)

    def holds(self, key: Hashable) -> bool:
        """True while this holder has a claim on ``key`` (``("blk", (major, minor))`` or
        ``("file", st_dev, st_ino)``)."""
        with self._lock:
            return key in self._held

    # --- internals --------------------------------------------------------------------------
    def _take(self, key: Hashable, path: str, device: str | None, taken: list[Hashable]) -> None:
        with self._lock:
            while key in self._opening:  # another thread of this holder is opening it: nest in that
                self._opened.wait()
            held = self._held.get(key)
            if held is not None:
                held[1] += 1
                taken.append(key)
                return
            self._opening.add(key)
        # Opened without the lock: an open waits for the disk's open_mutex, which sync(2) holds
        # while it waits for the writes of a device that may be suspended (an engine's own
        # exposed device under a table being loaded); other claims and ``holds`` (an open count)
        # must not wait for that device's resume.
        fd = -1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as err:
            with self._lock:
                kin = self._kin(key[1]) if err.errno == errno.EBUSY else None  # type: ignore[index]
            if kin is not None:
                raise DeviceBusy(f"{path} and {kin} are a disk and its partition: one holder may "
                                 "not claim both (the kernel's bd_may_claim refuses it)",
                                 errno=errno.EBUSY, operation="claim", device=device) from err
            with os_errors(path, "claim", device):
                raise
        finally:
            with self._lock:
                self._opening.discard(key)
                if fd >= 0:
                    self._held[key] = [fd, 1]
                    self._paths[key] = path
                    taken.append(key)
                self._opened.notify_all()

    def _kin(self, devno: tuple[int, int]) -> str | None:
        """A device this holder claims that is the disk of partition ``devno`` or a partition of
        disk ``devno`` (caller holds the lock). ``block/bdev.c`` ``bd_may_claim``: claiming a
        partition marks its whole disk claimed for partitioning, so the disk cannot be claimed,
        even by the same holder, and a partition of a claimed disk cannot be either."""
        whole = whole_disk(devno)
        for key, path in self._paths.items():
            other = key[1]  # type: ignore[index]
            if other == whole or whole_disk(other) == devno:
                return path
        return None

    def _take_file(self, path: str, device: str | None, taken: list[Hashable], loops: bool = True) -> None:
        with os_errors(path, "claim", device):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        key = ("file", st.st_dev, st.st_ino)
        with self._lock:
            while key in self._opening:  # another thread of this holder is checking it: nest in that
                self._opened.wait()
            held = self._held.get(key)
            if held is not None:
                os.close(fd)
                held[1] += 1
                taken.append(key)
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                os.close(fd)
                raise DeviceBusy(f"{path} is claimed by another engine or tool", errno=errno.EBUSY,
                                 operation="claim", device=device) from err
            if not loops:
                self._held[key] = [fd, 1]
                taken.append(key)
                return
            self._opening.add(key)
        # The loop devices are probed without the lock, as ``_take`` opens: one may be an engine's
        # exposed device, suspended, whose open waits while a sync(2) waits for its writes.
        ok = False
        try:
            self._check_loops(path, device, st)
            ok = True
        finally:
            with self._lock:
                self._opening.discard(key)
                if ok:
                    self._held[key] = [fd, 1]
                    taken.append(key)
                self._opened.notify_all()
            if not ok:
                os.close(fd)

    def _ours(self, devno: tuple[int, int]) -> bool:
        """True when this holder claims loop device ``devno`` or a partition of it."""
        with self._lock:
            return ("blk", devno) in self._held or any(whole_disk(k[1]) == devno for k in self._paths)  # type: ignore[index]

    def _check_loops(self, path: str, device: str | None, st: os.stat_result) -> None:
        """Refuse a file that a loop device exposes to someone else (called without the lock: the
        probing open of a loop device may wait)."""
        for loop_path, devno in loops_over(path, st):
            if self._ours(devno):
                continue  # our own claim on that loop device or a partition of it: one holder nests
            try:
                fd = os.open(loop_path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
            except OSError as err:
                if err.errno == errno.EBUSY:
                    raise DeviceBusy(f"{path} is in use through {loop_path}, which is "
                                     f"{busy_reason(loop_path)}", errno=errno.EBUSY,
                                     operation="claim", device=device) from err
                continue  # detached meanwhile
            os.close(fd)

    def _drop(self, keys: tuple[Hashable, ...]) -> None:
        with self._lock:
            for key in keys:
                held = self._held.get(key)
                if held is None:
                    continue
                held[1] -= 1
                if held[1] == 0:
                    del self._held[key]
                    self._paths.pop(key, None)
                    os.close(held[0])

    def close(self) -> None:
        """Release every claim (a holder that goes away, as its process exiting would)."""
        with self._lock:
            fds = [held[0] for held in self._held.values()]
            self._held.clear()
            self._paths.clear()
        for fd in fds:
            os.close(fd)

    def __repr__(self) -> str:
        return f"Holder({self.name!r}, claims={len(self._held)})"


@contextmanager
def claim(path: "str | os.PathLike[str]", *, holder: str | None = None) -> Iterator[Claim]:
    """Claim ``path`` for one operation of an offline tool (a holder of its own); released on exit.

    Raises ``DeviceBusy`` when an engine's table, a mount, an ``O_EXCL`` opener or another tool
    holds it (see :meth:`Holder.claim`).
    """
    owner = Holder(holder or f"dmtools pid {os.getpid()}")
    try:
        yield owner.claim(os.fspath(path))
    finally:
        owner.close()


def claim_writes(target: "str | os.PathLike[str]", *, holder: str | None = None) -> "AbstractContextManager[Claim | None]":
    """:func:`claim` of what ``open_endpoint(target, writable=True)`` writes directly (a path, or a
    ``MAJOR:MINOR`` that names no file), for a tool that writes a device before a table claims
    it; an NBD URI has nothing to claim here (its server holds the bytes): ``None``."""
    from dmtools.nbd.uri import is_nbd_uri

    ref = os.fspath(target)
    if is_nbd_uri(ref):
        return nullcontext()
    if parse_devno(ref) is not None and not os.path.exists(ref):
        from dmtools.blockdev import resolve_devno

        ref = resolve_devno(ref)
    return claim(ref, holder=holder)


@contextmanager
def os_errors(path: str, operation: str, device: str | None = None) -> Iterator[None]:
    """Turn an ``OSError`` about ``path`` into ours: ENOENT ``DeviceNotFound``, EBUSY
    ``DeviceBusy`` (saying who holds it), anything else ``DMError`` with the errno."""
    try:
        yield
    except FileNotFoundError as err:
        raise DeviceNotFound("no such file or device", errno=errno.ENOENT, operation=operation, device=path) from err
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise DeviceBusy(f"{path} is {busy_reason(path)}", errno=errno.EBUSY,
                             operation=operation, device=device) from err
        raise DMError(f"{path}: {err.strerror}", errno=err.errno, operation=operation, device=device) from err


def busy_reason(path: str) -> str:
    """Why an ``O_EXCL`` open of block device ``path`` fails: mounted, a holder, or an opener."""
    try:
        rdev = os.stat(path).st_rdev
    except OSError:
        return "in use"
    devno = f"{os.major(rdev)}:{os.minor(rdev)}"
    for mounted, point, _, _ in mounts():
        if mounted == devno:
            return f"mounted on {point}"
    try:
        holders = sorted(os.listdir(f"{SYS_DEV_BLOCK}/{devno}/holders"))
    except OSError:
        holders = []
    if holders:
        return f"held by {', '.join(holders)}"
    major, minor = os.major(rdev), os.minor(rdev)
    whole = whole_disk((major, minor))
    if whole is not None:  # bd_may_claim: a partition of a claimed disk is busy too
        return (f"held open exclusively (O_EXCL) by another program or engine, or its disk "
                f"{whole[0]}:{whole[1]} is")
    parts = _partitions(f"{SYS_DEV_BLOCK}/{devno}")
    if parts:  # a disk with a claimed partition is busy (block/bdev.c bd_may_claim)
        return (f"held open exclusively (O_EXCL) by another program or engine, or one of its "
                f"partitions ({', '.join(parts)}) is mounted or claimed")
    return "held open exclusively (O_EXCL) by another program or engine"


def _partitions(sysdir: str) -> list[str]:
    """Names of the partitions of the disk at ``sysdir`` (``/sys/dev/block/M:m``)."""
    try:
        names = sorted(os.listdir(sysdir))
    except OSError:
        return []
    return [n for n in names if os.path.exists(f"{sysdir}/{n}/partition")]


def loops_over(path: str, st: os.stat_result | None = None) -> list[tuple[str, tuple[int, int]]]:
    """``(path, devno)`` of the loop devices whose backing file is ``path``: the same inode by
    any name (a hard link, a bind mount: ``LOOP_GET_STATUS64``), or, for loops over a FUSE file,
    the same resolved path (see :mod:`dmtools.loop_index`). ``st`` is ``path``'s ``stat`` when
    the caller has it."""
    from dmtools.loop_index import loops_over_inode, loops_over_path

    if st is None:
        try:
            st = os.stat(path)
        except OSError:
            st = None
    refs = loops_over_inode(st.st_dev, st.st_ino) if st is not None else []
    refs += [r for r in loops_over_path(os.path.realpath(path)) if r not in refs]
    return [(r.path, r.devno) for r in refs]


def _loop_backing(devno: tuple[int, int]) -> str | None:
    backing = block_attr(devno, "loop/backing_file")
    return None if backing is None or backing.endswith(" (deleted)") else backing


def whole_disk(devno: tuple[int, int]) -> tuple[int, int] | None:
    """The disk of partition ``devno`` (sysfs: a partition's directory sits in its disk's), or
    ``None`` when ``devno`` is not a partition."""
    base = f"{SYS_DEV_BLOCK}/{devno[0]}:{devno[1]}"
    if not os.path.exists(f"{base}/partition"):
        return None
    return parse_devno(sysfs_attr(os.path.join(os.path.realpath(base), "..", "dev")) or "")


def mount_of(path: str) -> tuple[str, str, str]:
    """``(mount point, file system type, source)`` of the mount holding ``path``, from
    ``/proc/self/mountinfo`` (``path`` is never stat()ed: a FUSE server may be stuck)."""
    real = path if os.path.isabs(path) else os.path.abspath(path)
    best = ("", "", "")
    for _, mnt, fstype, source in mounts():
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
            best = (mnt, fstype, source)
    return best


def _on_fuse(path: str) -> bool:
    """True when ``path`` lies on a FUSE mount."""
    return mount_of(path)[1].startswith("fuse")
