"""Which loop devices expose a file: an index by inode, kept until the kernel says a loop changed.

A loop device is the bytes of its backing *inode*, whatever path names it: a hard link or a bind
mount of the file is the same device. The kernel tells the inode through ``LOOP_GET_STATUS64``
(``lo_device``, ``lo_inode``: ``loop_get_status`` in ``drivers/block/loop.c`` fills them from
``vfs_getattr`` of the backing file), so the index is keyed by ``(st_dev, st_ino)``. Loop devices
over a file on a FUSE mount are indexed by path only: asking their inode would go to that FUSE
server, which may be stuck (a userspace engine's exposure; ``dmtools.claims``).

Reading every loop device's sysfs attributes costs about 10 µs each (on a machine with 92 of them,
1 ms per claim), so the index is built once and kept. It is dropped when the kernel announces a
change to a loop device: ``loop_configure``, ``__loop_clr_fd`` and ``loop_change_fd`` send a
``KOBJ_CHANGE`` uevent when they are done, a new device ``KOBJ_ADD`` (``drivers/block/loop.c``),
and a uevent is in a ``NETLINK_KOBJECT_UEVENT`` socket's queue before the ``ioctl`` that caused it
returns. The socket is bound before the scan that fills the index, so an attach that completes
after the scan is seen by the next lookup. Without such a socket (a network namespace that gets no
uevents, a process after ``fork``), or after the socket overflowed (``ENOBUFS``), every lookup
scans.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from dataclasses import dataclass

from dmtools.errors import DMError

__all__ = ["LoopRef", "LoopIndex", "loops_over_inode", "loops_over_path", "index"]

SYS_BLOCK = "/sys/block"
#: ``NETLINK_KOBJECT_UEVENT`` (include/uapi/linux/netlink.h) and its kernel multicast group.
NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1


@dataclass(frozen=True)
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
        self._sock: socket.socket | None = None
        self._by_inode: dict[tuple[int, int], list[LoopRef]] | None = None
        self._by_path: dict[str, list[LoopRef]] = {}
        #: how many times the index was (re)built: tests and benchmarks read it
        self.scans = 0

    # --- lookups ----------------------------------------------------------------------------
    def over_inode(self, st_dev: int, st_ino: int) -> list[LoopRef]:
        """The loop devices whose backing file is inode ``st_ino`` of file system ``st_dev``."""
        with self._lock:
            by_inode = self._current()
            return list(by_inode.get((st_dev, st_ino), ()))

    def over_path(self, real: str) -> list[LoopRef]:
        """The FUSE-backed loop devices whose backing file is the resolved path ``real``."""
        with self._lock:
            self._current()
            return list(self._by_path.get(real, ()))

    def invalidate(self) -> None:
        """Forget the index (the next lookup scans)."""
        with self._lock:
            self._by_inode = None

    # --- internals ----------------------------------------------------------------------------
    def _current(self) -> dict[tuple[int, int], list[LoopRef]]:
        if self._pid != os.getpid():  # a forked child shares the parent's socket queue: its own
            self._reopen()
        if self._sock is None or self._changed():
            self._by_inode = None
        if self._by_inode is None:
            self._by_inode, self._by_path = _scan()
            self.scans += 1
        return self._by_inode

    def _reopen(self) -> None:
        if self._sock is not None:
            self._sock.close()  # after a fork: this process's copy only
        self._sock = None
        self._by_inode = None
        self._pid = os.getpid()
        try:
            sock = socket.socket(socket.AF_NETLINK,
                                 socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                 NETLINK_KOBJECT_UEVENT)
        except OSError:
            return
        try:
            sock.bind((0, KERNEL_GROUP))
        except OSError:
            sock.close()
            return
        self._sock = sock

    def _changed(self) -> bool:
        """Drain the uevents queued since the last look; True when one concerns a loop device
        (or some were lost)."""
        assert self._sock is not None
        changed = False
        while True:
            try:
                msg = self._sock.recv(16384)
            except BlockingIOError:
                return changed
            except OSError as err:
                if err.errno == errno.ENOBUFS:  # overflowed: what was lost is unknown
                    changed = True
                    continue
                raise DMError(f"uevent socket: {err.strerror}", errno=err.errno,
                              operation="claim") from err
            head = msg.split(b"\0", 1)[0]
            if b"/block/loop" in head:
                changed = True


def _read(path: str) -> str | None:
    """A small sysfs attribute (raw calls: this runs for every loop device), or ``None``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode("utf-8", "surrogateescape").rstrip("\n")
    except OSError:
        return None
    finally:
        os.close(fd)


def _fuse_mounts() -> list[str]:
    """Mount points of FUSE file systems, from ``/proc/self/mountinfo``."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and right.startswith("fuse"):
                    out.append(fields[4].replace("\\040", " "))
    except OSError:
        pass
    return out


def _on(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def _scan() -> tuple[dict[tuple[int, int], list[LoopRef]], dict[str, list[LoopRef]]]:
    from dmtools import loop

    by_inode: dict[tuple[int, int], list[LoopRef]] = {}
    by_path: dict[str, list[LoopRef]] = {}
    try:
        names = sorted(n for n in os.listdir(SYS_BLOCK) if n.startswith("loop"))
    except OSError:
        return by_inode, by_path
    fuse: list[str] | None = None
    for name in names:
        backing = _read(f"{SYS_BLOCK}/{name}/loop/backing_file")
        dev = _read(f"{SYS_BLOCK}/{name}/dev")
        if backing is None or dev is None:
            continue  # not bound (or detached meanwhile)
        try:
            major, minor = (int(x) for x in dev.split(":"))
        except ValueError:
            continue
        ref = LoopRef(f"/dev/{name}", (major, minor), backing)
        if fuse is None:
            fuse = _fuse_mounts()
        if _on(backing, fuse):
            by_path.setdefault(backing, []).append(ref)
            continue
        try:
            st = loop.status(ref.path)
        except DMError:
            # No node in this /dev, or detached meanwhile: the path is all there is to go on.
            try:
                pst = os.stat(backing)
            except OSError:
                continue
            key = (pst.st_dev, pst.st_ino)
        else:
            key = (st.device, st.inode)
        by_inode.setdefault(key, []).append(ref)
    return by_inode, by_path


#: The process's index.
index = LoopIndex()


def loops_over_inode(st_dev: int, st_ino: int) -> list[LoopRef]:
    """The loop devices over inode ``(st_dev, st_ino)`` (``index.over_inode``)."""
    return index.over_inode(st_dev, st_ino)


def loops_over_path(real: str) -> list[LoopRef]:
    """The FUSE-backed loop devices over resolved path ``real`` (``index.over_path``)."""
    return index.over_path(real)
