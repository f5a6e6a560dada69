"""How many times a block device is open, found without opening it: the kernel's dm open count.

The kernel's dm counts every open of a dm device (``dm_blk_open``, called once per ``bdev_open``
of the whole disk, ``dm_blk_close`` once per release). An exposed engine device is a loop device,
whose own count the kernel does not publish, so :func:`count` rebuilds it from what the openers
leave visible. It never opens the device: an open takes the disk's ``open_mutex``, which
``sync(2)`` (``sync_bdevs``) and a last close hold while they wait for the device's dirty pages,
and a suspended engine device does not write them until it is resumed. A count that opened it
(as an ``O_EXCL`` probe did) waited for the resume, so suspend, info, resume deadlocked.

The rule: each of these is one open, as it is in the kernel's count.

* An open file of the device in any process (``/proc/PID/fd``). Descriptors that share one open
  file, ``dup`` or inherited across ``fork`` or passed over a socket, are one (kcmp KCMP_FILE).
  An ``O_EXCL`` opener (``mkfs``, another engine's claim) is such a file: one open, not two.
* A holder disk (``/sys/dev/block/M:m/holders``): a kernel dm table's device, an md member,
  a bcache backing device (``bd_link_disk_holder``); one open per holder disk.
* A mounted file system: one open per super block, however many mounts, bind mounts and mount
  namespaces show it (``/proc/PID/mountinfo`` of one process per mount namespace).
* A btrfs file system with the device as a member (``/sys/fs/btrfs/UUID/devices``; its mounts
  show an anonymous device number, not the member's).
* Active swap on it (``/proc/swaps``): one open since Linux 6.10, two before (``swapon`` opened
  the device, then ``claim_swapfile`` opened it again to hold it exclusively; 6.10 opens it once,
  ``O_EXCL``: mm/swapfile.c, "swapon(2): open swap with O_EXCL").
* A loop device backed by it (the loop driver keeps the file it was given; no holder link).

Not seen, so not counted: opens only the kernel holds otherwise (an ext4 external journal), a
mapping of the device whose descriptor was closed, io_uring fixed files, descriptors in flight in
a unix socket, a super block still alive after its last mount was lazily unmounted, and openers
in PID or mount namespaces whose processes this one cannot see. Transient openers (udev, blkid)
are counted while they hold it, as the kernel counts them.
"""

from __future__ import annotations

import os
import platform
import re
import stat

from dmtools.linux import SYS_BLOCK, SYS_DEV_BLOCK, libc, loop_names, sysfs_attr

__all__ = ["count"]

#: kcmp(2) syscall numbers (include/uapi/linux/kcmp.h: KCMP_FILE = 0), by machine.
_KCMP_SYSCALL = {"x86_64": 312, "aarch64": 272, "riscv64": 272, "ppc64le": 354, "s390x": 343}
_KCMP_FILE = 0
BTRFS_SYSFS = "/sys/fs/btrfs"


def count(path: str, major: int, minor: int) -> int:
    """Opens of block device ``major:minor`` (node ``path``) by the rule above; never opens it."""
    devno, rdev = f"{major}:{minor}", os.makedev(major, minor)
    fds, mounted = _scan_processes(rdev, devno)
    return fds + mounted + _holders(devno) + _btrfs_members(devno) + _swaps(path, rdev) + _loops_over(path, rdev)


def _same_open_file(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """True when descriptors ``(pid, fd)`` ``a`` and ``b`` share one open file (kcmp KCMP_FILE).

    The kernel counts opens of a block device, not descriptors: a descriptor inherited by a child or
    duplicated with dup() is the same open. Without kcmp the two are taken as distinct.
    """
    nr = _KCMP_SYSCALL.get(platform.machine())
    if nr is None:
        return False
    return libc().syscall(nr, a[0], b[0], _KCMP_FILE, a[1], b[1]) == 0


def _scan_processes(rdev: int, devno: str) -> tuple[int, int]:
    """``(open files of the device, 1 if a mount namespace shows it mounted else 0)``, from one
    pass over ``/proc``."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0, 0
    found: list[tuple[int, int]] = []
    namespaces: set[str] = set()
    mounted = 0
    for pid in pids:
        found += _device_fds(pid, rdev)
        if mounted:
            continue
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            continue
        if ns not in namespaces:
            namespaces.add(ns)
            mounted = int(_mounted_in(pid, devno))
    opens: list[tuple[int, int]] = []
    for desc in found:
        if not any(_same_open_file(desc, other) for other in opens):
            opens.append(desc)
    return len(opens), mounted


def _device_fds(pid: str, rdev: int) -> list[tuple[int, int]]:
    """``(pid, fd)`` of process ``pid``'s descriptors of block device ``rdev``.

    Only descriptors naming something under ``/dev/`` are stat()ed, through the ``/proc`` link (the
    open file itself, in whatever mount namespace it was opened): a file on a stuck FUSE mount would
    make its server answer, a device node's inode answers by itself.
    """
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return []
    out = []
    for fd in fds:
        link = f"{fd_dir}/{fd}"
        try:
            if not os.readlink(link).startswith("/dev/"):
                continue
            st = os.stat(link)
        except OSError:
            continue
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
            out.append((int(pid), int(fd)))
    return out


def _mounted_in(pid: str, devno: str) -> bool:
    """True when the mount namespace of process ``pid`` has a mount of device ``devno``."""
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return any(line.split(" ", 3)[2] == devno for line in f)
    except (OSError, IndexError):
        return False


def _holders(devno: str) -> int:
    try:
        return len(os.listdir(f"{SYS_DEV_BLOCK}/{devno}/holders"))
    except OSError:
        return 0


def _btrfs_members(devno: str) -> int:
    """Mounted btrfs file systems with ``devno`` as a member device."""
    try:
        fsids = os.listdir(BTRFS_SYSFS)
    except OSError:
        return 0
    n = 0
    for fsid in fsids:
        devices = f"{BTRFS_SYSFS}/{fsid}/devices"
        try:
            members = os.listdir(devices)
        except OSError:
            continue
        n += any(sysfs_attr(f"{devices}/{m}/dev") == devno for m in members)
    return n


def _names_device(name: str, path: str, rdev: int) -> bool:
    """True when ``name`` (a path the kernel printed) is ``path`` or a device node of ``rdev``."""
    if name == path:
        return True
    if not name.startswith("/dev/"):
        return False  # never stat()ed: it may be a file on a stuck FUSE mount
    try:
        st = os.stat(name)
    except OSError:
        return False
    return stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev


def _swap_opens(release: str) -> int:
    """Opens that one active swap area on a block device holds on kernel ``release``."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return 2 if m is not None and (int(m.group(1)), int(m.group(2))) < (6, 10) else 1


def _swaps(path: str, rdev: int) -> int:
    try:
        with open("/proc/swaps") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return 0
    names = [line.rsplit(None, 4)[0].replace("\\040", " ") for line in lines if line.strip()]
    return _swap_opens(platform.release()) * sum(_names_device(name, path, rdev) for name in names)


def _loops_over(path: str, rdev: int) -> int:
    """Loop devices whose backing file is the device (``/sys/block/loopN/loop/backing_file``)."""
    n = 0
    for name in loop_names():
        backing = sysfs_attr(f"{SYS_BLOCK}/{name}/loop/backing_file")
        n += backing is not None and _names_device(backing, path, rdev)
    return n
