"""Which loop devices expose a file: an index by inode, kept until the kernel says a loop changed.

A loop device is the bytes of its backing *inode*, whatever path names it: a hard link or a bind
mount of the file is the same device. The kernel tells the inode through ``LOOP_GET_STATUS64``
(``lo_device``, ``lo_inode``: ``loop_get_status`` in ``drivers/block/loop.c`` fills them from
``vfs_getattr`` of the backing file), so the index is keyed by ``(st_dev, st_ino)``. Loop devices
over a file on a FUSE mount are indexed by path only: asking their inode would go to that FUSE
server, which may be stuck (a userspace engine's exposure; ``dmtools.claims``).

Reading every loop device's sysfs attributes costs about 10 µs each (on a machine with 92 of them,
1 ms per claim), so the index is built once and kept, and a loop device is read again only when the
kernel announces a change to it: ``loop_configure``, ``__loop_clr_fd`` and ``loop_change_fd`` send
a ``KOBJ_CHANGE`` uevent when they are done, a new device ``KOBJ_ADD`` (``drivers/block/loop.c``),
and a uevent is in a ``NETLINK_KOBJECT_UEVENT`` socket's queue before the ``ioctl`` that caused it
returns. The socket is bound before the scan that fills the index, so an attach that completes
after the scan is seen by the next lookup. Without such a socket (a network namespace that gets no
uevents), or after the socket overflowed (``ENOBUFS``), every loop device is read again; a process
after ``fork`` opens its own socket and starts over.
"""

from __future__ import annotations

import errno
import os
import re
import threading

from _socket import AF_NETLINK, SOCK_CLOEXEC, SOCK_NONBLOCK, SOCK_RAW
from _socket import socket as _raw_socket  # socket's C type: the socket module costs 5 ms at start-up

from dmtools.errors import DMError
from dmtools.linux import SYS_BLOCK, loop_names, mounts, sysfs_attr
from dmtools.record import record

__all__ = ["LoopRef", "LoopIndex", "loops_over_inode", "loops_over_path", "index"]

#: ``NETLINK_KOBJECT_UEVENT`` (include/uapi/linux/netlink.h) and its kernel multicast group.
NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1
#: the loop device a uevent is about: ``change@/devices/virtual/block/loop9`` (or ``/loop9/loop9p1``)
_LOOP_EVENT = re.compile(rb"/block/(loop\d+)(?:/|$)")


@record(frozen=True)
class LoopRef:
    """One bound loop device: its node, ``(major, minor)`` and backing file as sysfs names it."""

    path: str
    devno: tuple[int, int]
    backing: str


class LoopIndex:
    """Bound loop devices by backing inode and (FUSE-backed ones) by backing path; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._sock: _raw_socket | None = None
        #: loop device name -> (index key, LoopRef): an inode ``(st_dev, st_ino)`` or a path
        self._entries: dict[str, tuple[tuple[int, int] | str, LoopRef]] | None = None
        self._by_inode: dict[tuple[int, int], list[LoopRef]] = {}
        self._by_path: dict[str, list[LoopRef]] = {}
        #: how many times every loop device was read (``scans``) or one was read again after its
        #: uevent (``updates``): tests and benchmarks read them
        self.scans = 0
        self.updates = 0

    # --- lookups ----------------------------------------------------------------------------
    def over_inode(self, st_dev: int, st_ino: int) -> list[LoopRef]:
        """The loop devices whose backing file is inode ``st_ino`` of file system ``st_dev``."""
        with self._lock:
            self._current()
            return list(self._by_inode.get((st_dev, st_ino), ()))

    def over_path(self, real: str) -> list[LoopRef]:
        """The FUSE-backed loop devices whose backing file is the resolved path ``real``."""
        with self._lock:
            self._current()
            return list(self._by_path.get(real, ()))

    # --- internals ----------------------------------------------------------------------------
    def _current(self) -> None:
        if self._pid != os.getpid():  # a forked child shares the parent's socket queue: its own
            self._reopen()
        changed = self._changed() if self._sock is not None else None
        if changed is None or self._entries is None:
            self._entries = {}
            fuse = _fuse_mounts()
            for name in loop_names():
                self._read_one(name, fuse)
            self.scans += 1
        elif changed:
            fuse = _fuse_mounts()
            for name in changed:
                self._entries.pop(name, None)
                self._read_one(name, fuse)
            self.updates += 1
        else:
            return
        self._by_inode, self._by_path = {}, {}
        for key, ref in self._entries.values():
            index = self._by_path if isinstance(key, str) else self._by_inode
            index.setdefault(key, []).append(ref)  # type: ignore[arg-type]

    def _read_one(self, name: str, fuse: list[str]) -> None:
        assert self._entries is not None
        entry = _entry(name, fuse)
        if entry is not None:
            self._entries[name] = entry

    def _reopen(self) -> None:
        if self._sock is not None:
            self._sock.close()  # after a fork: this process's copy only
        self._sock = None
        self._entries = None
        self._pid = os.getpid()
        try:
            sock = _raw_socket(AF_NETLINK, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT)
        except OSError:
            return
        try:
            sock.bind((0, KERNEL_GROUP))
        except OSError:
            sock.close()
            return
        self._sock = sock

    def _changed(self) -> set[str] | None:
        """Drain the uevents queued since the last look: the loop devices they name (a
        partition's event names its disk), or ``None`` when some were lost (``ENOBUFS``)."""
        assert self._sock is not None
        names: set[str] | None = set()
        while True:
            try:
                msg = self._sock.recv(16384)
            except BlockingIOError:
                return names
            except OSError as err:
                if err.errno == errno.ENOBUFS:  # overflowed: what was lost is unknown
                    names = None
                    continue
                raise DMError(f"uevent socket: {err.strerror}", errno=err.errno, operation="claim") from err
            m = _LOOP_EVENT.search(msg.split(b"\0", 1)[0])
            if m is not None and names is not None:
                names.add(m.group(1).decode())


def _fuse_mounts() -> list[str]:
    """Mount points of FUSE file systems, from ``/proc/self/mountinfo``."""
    return [point for _, point, fstype, _ in mounts() if fstype.startswith("fuse")]


def _on(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def _entry(name: str, fuse: list[str]) -> tuple[tuple[int, int] | str, LoopRef] | None:
    """``(key, ref)`` of loop device ``name`` when bound: its backing inode as the kernel gives
    it, or its backing path when that is on a FUSE mount (``fuse``: their mount points)."""
    backing = sysfs_attr(f"{SYS_BLOCK}/{name}/loop/backing_file")
    dev = sysfs_attr(f"{SYS_BLOCK}/{name}/dev")
    if backing is None or dev is None:
        return None  # not bound (or detached meanwhile)
    try:
        major, minor = (int(x) for x in dev.split(":"))
    except ValueError:
        return None
    ref = LoopRef(f"/dev/{name}", (major, minor), backing)
    if _on(backing, fuse):
        return backing, ref
    from dmtools import loop  # only for a bound loop device: most are unbound

    try:
        st = loop.status(ref.path)
    except DMError:
        # No node in this /dev, or detached meanwhile: the path is all there is to go on.
        try:
            pst = os.stat(backing)
        except OSError:
            return None
        return (pst.st_dev, pst.st_ino), ref
    return (st.device, st.inode), ref


#: The process's index.
index = LoopIndex()


def loops_over_inode(st_dev: int, st_ino: int) -> list[LoopRef]:
    """The loop devices over inode ``(st_dev, st_ino)`` (``index.over_inode``)."""
    return index.over_inode(st_dev, st_ino)


def loops_over_path(real: str) -> list[LoopRef]:
    """The FUSE-backed loop devices over resolved path ``real`` (``index.over_path``)."""
    return index.over_path(real)
