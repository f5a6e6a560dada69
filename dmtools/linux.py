"""Linux's numbers that several modules need, each defined once with the header it comes from.

ioctl requests (block devices, loop devices, device-mapper's poll), ``fallocate(2)`` modes, how a
device number is spelt in a table, sysfs's block device attributes, the mount table, whether udevd
runs or a process has exited, and the C library loaded once for the calls Python lacks.
"""

from __future__ import annotations

import functools
import os
import re

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)

if TYPE_CHECKING:  # pragma: no cover
    import ctypes

__all__ = [
    "BLKDISCARD",
    "BLKGETSIZE64",
    "BLKPBSZGET",
    "BLKROGET",
    "BLKROSET",
    "BLKSSZGET",
    "BLKZEROOUT",
    "DEVNO",
    "parse_devno",
    "DM_DEV_ARM_POLL",
    "DM_IOCTL_SIZE",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "LOOP_CLR_FD",
    "LOOP_CONFIGURE",
    "LOOP_CTL_GET_FREE",
    "LOOP_GET_STATUS64",
    "LOOP_SET_BLOCK_SIZE",
    "LOOP_SET_CAPACITY",
    "LOOP_SET_DIRECT_IO",
    "LOOP_SET_FD",
    "LOOP_SET_STATUS64",
    "mounts",
    "SYS_BLOCK",
    "SYS_DEV_BLOCK",
    "sysfs_attr",
    "block_attr",
    "loop_names",
    "UDEV_CONTROL",
    "udev_running",
    "process_gone",
    "libc",
]

# include/uapi/asm-generic/ioctl.h (x86, arm, riscv...): dir:2 | size:14 | type:8 | nr:8.
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


# include/uapi/linux/fs.h
BLKROSET = _ioc(_IOC_NONE, 0x12, 93, 0)
BLKROGET = _ioc(_IOC_NONE, 0x12, 94, 0)
BLKSSZGET = _ioc(_IOC_NONE, 0x12, 104, 0)
BLKGETSIZE64 = _ioc(_IOC_READ, 0x12, 114, 8)  # _IOR(0x12, 114, size_t)
BLKDISCARD = _ioc(_IOC_NONE, 0x12, 119, 0)
BLKPBSZGET = _ioc(_IOC_NONE, 0x12, 123, 0)
BLKZEROOUT = _ioc(_IOC_NONE, 0x12, 127, 0)

# include/uapi/linux/loop.h (plain numbers there, not _IO encoded)
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_SET_CAPACITY = 0x4C07
LOOP_SET_DIRECT_IO = 0x4C08
LOOP_SET_BLOCK_SIZE = 0x4C09
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

#: The device-mapper control node (include/uapi/linux/dm-ioctl.h ``DM_CONTROL_NODE``, under
#: ``DM_DIR``); here so that whether the kernel's device-mapper is there can be asked cheaply.
CONTROL_PATH = "/dev/mapper/control"

# include/uapi/linux/dm-ioctl.h: DM_DEV_ARM_POLL is _IOWR(0xfd, 16, struct dm_ioctl), dm-ioctl 4.37.
DM_IOCTL_SIZE = 312  # sizeof(struct dm_ioctl)
DM_DEV_ARM_POLL = _ioc(_IOC_READ | _IOC_WRITE, 0xFD, 16, DM_IOCTL_SIZE)

# include/uapi/linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: A device number as tables spell it, ``MAJOR:MINOR`` in ASCII digits (dm-table.c
#: ``dm_get_device`` reads it with ``sscanf("%u:%u%c")``); use with ``fullmatch``.
DEVNO = re.compile(r"([0-9]+):([0-9]+)")
#: A loop device's kernel name, ``loopN`` (drivers/block/loop.c ``loop_add``).
LOOP_NAME = re.compile(r"^loop([0-9]+)$")


def parse_devno(text: str) -> tuple[int, int] | None:
    """``(major, minor)`` when ``text`` is a device number as tables spell it (``MAJOR:MINOR``)
    that fits a ``dev_t`` (12 major and 20 minor bits: ``MINORBITS`` in include/linux/kdev_t.h;
    dm-table.c refuses a larger one with EOVERFLOW); ``None`` for anything else, such as a path."""
    match = DEVNO.fullmatch(text)
    if match is None:
        return None
    major, minor = int(match.group(1)), int(match.group(2))
    return (major, minor) if major < 1 << 12 and minor < 1 << 20 else None


#: sysfs's block devices by kernel name (``loop0``) and by device number (``7:0``).
SYS_BLOCK = "/sys/block"
SYS_DEV_BLOCK = "/sys/dev/block"


def sysfs_attr(path: str) -> str | None:
    """A sysfs attribute's text without its newline (bytes that are not UTF-8 kept as
    ``os.fsdecode`` keeps them), or ``None`` when it cannot be read. Raw calls: a scan reads
    one for every loop device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 1 << 16).decode("utf-8", "surrogateescape").rstrip("\n")
    except OSError:
        return None
    finally:
        os.close(fd)


def block_attr(devno: tuple[int, int], attr: str) -> str | None:
    """:func:`sysfs_attr` ``attr`` of block device ``devno`` (``/sys/dev/block/MAJOR:MINOR/attr``)."""
    return sysfs_attr(f"{SYS_DEV_BLOCK}/{devno[0]}:{devno[1]}/{attr}")


def loop_names() -> list[str]:
    """The loop devices there are, by kernel name (``loopN`` in ``/sys/block``) in order of N."""
    try:
        names = os.listdir(SYS_BLOCK)
    except OSError:
        return []
    return sorted((n for n in names if LOOP_NAME.match(n)), key=lambda n: int(n[4:]))


def mounts() -> list[tuple[str, str, str, str]]:
    """The mounts this process sees, from ``/proc/self/mountinfo`` (proc(5); none when it cannot be
    read): ``(device number, mount point, file system type, source)``, the point's ``\\040`` read
    back as a space. Nothing asks a file system, so a stuck FUSE server cannot hang the call."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) >= 5 and len(tail) >= 2:
                    out.append((fields[2], fields[4].replace("\\040", " "), tail[0], tail[1]))
    except OSError:
        pass
    return out


#: udevd's control socket (libudev's ``/run/udev/control``).
UDEV_CONTROL = "/run/udev/control"


def udev_running(path: str = UDEV_CONTROL) -> bool:
    """True when udevd answers on its control socket.

    libudev (and so libdm and a udev monitor) only checks that the socket exists; a udevd that
    exited (``udevadm control --exit``) leaves it behind, and every udev wait would then hang
    until its timeout, a udev monitor stay silent forever. Connecting tells the two apart
    (refused or gone: nobody listens). Other errors count as running, as libudev's check would.
    """
    import socket  # only here: the CLI's start-up imports this module

    if not os.path.exists(path):
        return False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(2.0)
        sock.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        sock.close()
    return True


def process_gone(pid: int) -> bool:
    """True once process ``pid`` has exited: it is gone, or a zombie (``/proc/PID/stat``'s state
    ``Z``: its parent, perhaps an init that reaps late, has not reaped it yet) whose threads have all
    exited. A thread group leader is a zombie as soon as it exits, while its other threads may
    still run (a SIGKILLed process whose threads are finishing I/O): they hold the process's files
    (its sockets, its locks) until the last one exits, and ``/proc/PID/task`` lists them till then."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        if stat.rpartition(b")")[2].split()[0] != b"Z":
            return False
        return os.listdir(f"/proc/{pid}/task") == [str(pid)]
    except (FileNotFoundError, ProcessLookupError):
        return True


@functools.cache
def libc() -> "ctypes.CDLL":
    """The C library (the process's own symbols), with ``errno`` kept for ``ctypes.get_errno``."""
    import ctypes  # only for the calls that need it: ctypes costs start-up

    return ctypes.CDLL(None, use_errno=True)
