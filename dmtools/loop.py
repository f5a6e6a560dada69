"""Loop devices through the kernel's ioctls (no ``losetup``).

Attaching asks ``/dev/loop-control`` for a free device (``LOOP_CTL_GET_FREE``) and configures it in
one step with ``LOOP_CONFIGURE``; kernels older than 5.8 get ``LOOP_SET_FD`` + ``LOOP_SET_STATUS64``.
Another process may grab the same free device between the two calls: the kernel then answers EBUSY
and we ask for another one (a bounded number of times). State is read back from sysfs
(``/sys/block/loopN/loop/*``), which needs no open of the device.

Structure layouts, flags and ioctl numbers: include/uapi/linux/loop.h; sysfs attributes:
drivers/block/loop.c (``loop_attr_*``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import stat
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

from dmtools.blockdev import device_number
from dmtools.errors import DeviceBusy, DeviceNotFound, DMError, InvalidArgument, LoopError
from dmtools.linux import (BLKGETSIZE64, BLKROSET, LOOP_CLR_FD, LOOP_CONFIGURE, LOOP_CTL_GET_FREE, LOOP_GET_STATUS64,
                           LOOP_NAME, LOOP_SET_BLOCK_SIZE, LOOP_SET_CAPACITY, LOOP_SET_DIRECT_IO, LOOP_SET_FD,
                           LOOP_SET_STATUS64, SYS_BLOCK, SYS_DEV_BLOCK, loop_names)
from dmtools.record import record
from dmtools.units import int_in

__all__ = [
    "LoopDevice",
    "attach",
    "attached",
    "detach",
    "info",
    "status",
    "list_loops",
    "find_by_backing_file",
    "set_capacity",
    "set_direct_io",
    "pack_info64",
    "unpack_info64",
    "pack_config",
    "LoopStatus",
]

LOOP_CONTROL = "/dev/loop-control"

# include/uapi/linux/loop.h
LO_NAME_SIZE = 64
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LO_FLAGS_DIRECT_IO = 16

#: struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit (__u64);
#: lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (__u32); lo_file_name[64],
#: lo_crypt_name[64], lo_encrypt_key[32] (__u8); lo_init[2] (__u64). 232 bytes, no padding.
INFO64 = struct.Struct("=5Q4I64s64s32s2Q")

#: How many free devices an attach tries before giving up when others keep taking them.
ATTACH_ATTEMPTS = 64



# --------------------------------------------------------------------------------------------
# Structures


@record(frozen=True)
class LoopStatus:
    """Decoded ``struct loop_info64`` (what ``LOOP_GET_STATUS64`` returns)."""

    device: int
    inode: int
    rdevice: int
    offset: int
    sizelimit: int
    number: int
    flags: int
    file_name: str


def pack_info64(*, offset: int = 0, sizelimit: int = 0, flags: int = 0, file_name: str | bytes = b"") -> bytes:
    """Pack a ``struct loop_info64`` for ``LOOP_SET_STATUS64``/``LOOP_CONFIGURE``.

    ``file_name`` is informational (``lo_file_name``); it is cut to 63 bytes plus the NUL.
    """
    name = os.fsencode(file_name)[: LO_NAME_SIZE - 1]
    return INFO64.pack(0, 0, 0, offset, sizelimit, 0, 0, 0, flags, name, b"", b"", 0, 0)


def unpack_info64(data: bytes | bytearray) -> LoopStatus:
    """Decode a ``struct loop_info64``; raises :class:`InvalidArgument` on a wrong length."""
    if len(data) != INFO64.size:
        raise InvalidArgument(f"loop_info64 is {INFO64.size} bytes, got {len(data)}")
    f = INFO64.unpack(data)
    return LoopStatus(device=f[0], inode=f[1], rdevice=f[2], offset=f[3], sizelimit=f[4], number=f[5], flags=f[8],
                      file_name=os.fsdecode(f[9].split(b"\0", 1)[0]))


def pack_config(fd: int, info64: bytes, *, block_size: int = 0) -> bytes:
    """Pack a ``struct loop_config`` around a packed ``loop_info64`` (``block_size`` 0 = default):
    fd, block_size (__u32); struct loop_info64 info; __reserved[8] (__u64)."""
    if len(info64) != INFO64.size:
        raise InvalidArgument(f"loop_info64 is {INFO64.size} bytes, got {len(info64)}")
    return struct.pack("=2I", fd, block_size) + info64 + bytes(8 * 8)


# --------------------------------------------------------------------------------------------
# The device


class _Holder:
    """An open descriptor of a loop device, closed on :meth:`close` or when garbage collected.

    An autoclear loop device detaches itself when its last opener closes, so :func:`attach` keeps
    one open for the caller.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


@record
class LoopDevice:
    """A bound loop device as the kernel reports it (sysfs).

    ``backing_file`` is the kernel's path of the file (it ends in `` (deleted)`` once the file is
    unlinked). For an ``autoclear`` device returned by :func:`attach`, this object holds the device
    open: the kernel detaches it when :meth:`close` is called (or the object is collected, or the
    process exits) and nothing else has it open.
    """

    path: str
    number: int
    backing_file: str | None
    offset: int = 0
    sizelimit: int = 0
    read_only: bool = False
    autoclear: bool = False
    direct_io: bool = False
    major: int = 7
    minor: int = 0
    partscan: bool = False

    def __post_init__(self) -> None:
        # the descriptor attach() keeps open: not a field (no part of equality, repr or to_dict)
        self._holder: _Holder | None = None

    def __fspath__(self) -> str:
        return self.path

    @property
    def devno(self) -> str:
        """``"MAJOR:MINOR"``, as a device-mapper table names it."""
        return f"{self.major}:{self.minor}"

    @property
    def held_open(self) -> bool:
        """True while this object keeps the device open (autoclear devices from :func:`attach`)."""
        return self._holder is not None and self._holder.fd >= 0

    def close(self) -> None:
        """Drop the descriptor this object holds (an autoclear device then detaches itself)."""
        if self._holder is not None:
            self._holder.close()

    def to_dict(self) -> dict[str, Any]:
        """The public fields as a plain dict (for JSON output)."""
        return {name: getattr(self, name) for name in self.__match_args__}


def _read_attr(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:  # a file name is bytes
        return f.read().rstrip("\n")


def _number_of(dev: LoopDevice | str | os.PathLike[str] | int) -> int:
    """The loop number for a ``LoopDevice``, ``/dev/loopN`` path, ``loopN`` name or an int."""
    if isinstance(dev, LoopDevice):
        return dev.number
    if isinstance(dev, bool):
        raise InvalidArgument(f"not a loop device: {dev!r}")
    if isinstance(dev, int):
        if dev < 0:
            raise InvalidArgument(f"not a loop device number: {dev}")
        return dev
    text = os.fspath(dev)
    m = LOOP_NAME.match(os.path.basename(text))
    if m and (os.sep not in text or not os.path.exists(text)):
        return int(m.group(1))
    major, minor = device_number(text)
    try:
        name = os.path.basename(os.path.realpath(f"{SYS_DEV_BLOCK}/{major}:{minor}"))
    except OSError:
        name = ""
    m = LOOP_NAME.match(name)
    if not m:
        raise InvalidArgument("not a loop device", errno=errno.ENOTTY, device=text)
    return int(m.group(1))


def info(dev: LoopDevice | str | os.PathLike[str] | int) -> LoopDevice:
    """Current state of one loop device, read from sysfs.

    Raises :class:`DeviceNotFound` when it does not exist or has no backing file bound, and
    :class:`InvalidArgument` when ``dev`` is not a loop device.
    """
    number = _number_of(dev)
    base = f"{SYS_BLOCK}/loop{number}"
    path = f"/dev/loop{number}"
    try:
        backing = _read_attr(f"{base}/loop/backing_file")
        offset = int(_read_attr(f"{base}/loop/offset"))
        sizelimit = int(_read_attr(f"{base}/loop/sizelimit"))
        autoclear = _read_attr(f"{base}/loop/autoclear") == "1"
        partscan = _read_attr(f"{base}/loop/partscan") == "1"
        dio = _read_attr(f"{base}/loop/dio") == "1"
        ro = _read_attr(f"{base}/ro") == "1"
        major, minor = (int(x) for x in _read_attr(f"{base}/dev").split(":"))
    except OSError as err:
        # A device detached while we read it: its attributes go (ENOENT) or fail (ENODEV).
        if err.errno not in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            raise
        raise DeviceNotFound("loop device is not attached", errno=errno.ENXIO, device=path) from err
    return LoopDevice(path=path, number=number, backing_file=backing, offset=offset, sizelimit=sizelimit, read_only=ro,
                      autoclear=autoclear, direct_io=dio, major=major, minor=minor, partscan=partscan)


def list_loops() -> list[LoopDevice]:
    """Every bound loop device, by number (devices detached while listing are left out)."""
    found = []
    for name in loop_names():
        try:
            found.append(info(name))
        except DeviceNotFound:
            continue
    return found


def find_by_backing_file(path: str | os.PathLike[str]) -> list[LoopDevice]:
    """Loop devices bound to the file at ``path`` (compared by resolved path)."""
    real = os.path.realpath(os.fspath(path))
    return [
        d
        for d in list_loops()
        if d.backing_file is not None and (d.backing_file == real or d.backing_file == real + " (deleted)")
    ]


# --------------------------------------------------------------------------------------------
# Attach


def _loop_error(err: OSError, what: str, device: str | None, operation: str) -> DMError:
    code = err.errno or errno.EIO
    msg = f"{what}: {os.strerror(code)}"
    if code in (errno.EACCES, errno.EPERM):
        msg += " (loop devices need root)"
    if code == errno.EBUSY:
        return DeviceBusy(msg, errno=code, operation=operation, device=device)
    return LoopError(msg, errno=code, operation=operation, device=device)


def _check_attach_args(path: str, offset: int, sizelimit: int, block_size: int) -> os.stat_result:
    for what, value in (("offset", offset), ("sizelimit", sizelimit), ("block_size", block_size)):
        if not int_in(value):
            raise InvalidArgument(f"{what} must be a non-negative integer, not {value!r}", device=path)
        if value >= 1 << 63:
            raise InvalidArgument(f"{what} too large: {value}", errno=errno.EOVERFLOW, device=path)
    if offset % 512 or sizelimit % 512:
        raise InvalidArgument("offset and sizelimit must be multiples of 512 bytes", device=path)
    if block_size and (block_size < 512 or block_size > 65536 or block_size & (block_size - 1)):
        raise InvalidArgument(f"block size must be a power of two from 512: {block_size}", device=path)
    try:
        st = os.stat(path)
    except FileNotFoundError as err:
        raise DeviceNotFound("no such file", errno=errno.ENOENT, operation="attach", device=path) from err
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgument("is a directory", errno=errno.EISDIR, operation="attach", device=path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise InvalidArgument("not a regular file or block device", operation="attach", device=path)
    # An empty file is a valid (zero-sized) loop device, as with losetup; an offset must fall inside.
    if stat.S_ISREG(st.st_mode) and offset and offset >= st.st_size:
        raise InvalidArgument(
            f"offset {offset} is not inside the file ({st.st_size} bytes)", operation="attach", device=path
        )
    return st


def _configure(loop_fd: int, backing_fd: int, info64: bytes, block_size: int) -> None:
    """``LOOP_CONFIGURE`` (Linux 5.8+)."""
    fcntl.ioctl(loop_fd, LOOP_CONFIGURE, pack_config(backing_fd, info64, block_size=block_size))


def _legacy_configure(loop_fd: int, backing_fd: int, offset: int, sizelimit: int, flags: int, name: str,
                      block_size: int) -> None:
    """``LOOP_SET_FD`` + ``LOOP_SET_STATUS64`` (+ block size, direct I/O) for kernels before 5.8.

    Read-only comes from the backing descriptor's mode. All or nothing: a failure after
    ``LOOP_SET_FD`` clears the device again.
    """
    fcntl.ioctl(loop_fd, LOOP_SET_FD, backing_fd)
    try:
        settable = flags & (LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN)
        info64 = pack_info64(offset=offset, sizelimit=sizelimit, flags=settable, file_name=name)
        fcntl.ioctl(loop_fd, LOOP_SET_STATUS64, info64)
        if block_size:
            fcntl.ioctl(loop_fd, LOOP_SET_BLOCK_SIZE, block_size)
        if flags & LO_FLAGS_DIRECT_IO:
            fcntl.ioctl(loop_fd, LOOP_SET_DIRECT_IO, 1)
    except BaseException:
        with contextlib.suppress(OSError):
            fcntl.ioctl(loop_fd, LOOP_CLR_FD, 0)
        raise


#: False once the kernel answered LOOP_CONFIGURE with ENOTTY (tests set it to use the old path).
_use_configure = True


def attach(path: str | os.PathLike[str], *, read_only: bool = False, autoclear: bool = False, direct_io: bool = False,
           offset: int = 0, sizelimit: int = 0, partscan: bool = False, block_size: int = 0) -> LoopDevice:
    """Bind a free loop device to the file (or block device) at ``path``.

    ``offset``/``sizelimit`` in bytes (multiples of 512; 0 = to the end); ``block_size`` sets the
    loop device's logical block size (0 = 512); ``direct_io`` makes the loop driver bypass the page
    cache (refused if the kernel cannot do it for this file). An ``autoclear`` device is held open by
    the returned object and detaches itself when that is closed (see :class:`LoopDevice`).

    All or nothing: on error no device stays bound. Raises :class:`DeviceNotFound` (no such file),
    :class:`InvalidArgument` (a directory, bad offsets, direct I/O impossible), :class:`LoopError`
    (no loop support, permission, the file not writable without ``read_only``, free devices kept
    being taken by others).
    """
    p = os.fspath(path)
    _check_attach_args(p, offset, sizelimit, block_size)
    flags = (
        (LO_FLAGS_READ_ONLY if read_only else 0)
        | (LO_FLAGS_AUTOCLEAR if autoclear else 0)
        | (LO_FLAGS_PARTSCAN if partscan else 0)
        | (LO_FLAGS_DIRECT_IO if direct_io else 0)
    )
    mode = os.O_RDONLY if read_only else os.O_RDWR
    request = _BindRequest(p, offset, sizelimit, flags, block_size)
    with _open_backing(p, mode) as backing_fd, _open_control(p) as ctl:
        for attempt in range(ATTACH_ATTEMPTS):
            try:
                number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            except OSError as err:
                raise _loop_error(err, "no free loop device", p, "attach") from err
            try:
                loop_fd = os.open(f"/dev/loop{number}", mode | os.O_CLOEXEC)
            except OSError as err:
                if err.errno == errno.ENOENT and os.path.exists(f"{SYS_BLOCK}/loop{number}"):
                    raise LoopError(f"/dev/loop{number} has no device node (is devtmpfs mounted on /dev?)",
                                    errno=err.errno, operation="attach", device=p) from err
                if err.errno in (errno.ENOENT, errno.ENXIO):
                    continue  # removed by someone between GET_FREE and open
                raise _loop_error(err, "cannot open loop device", f"/dev/loop{number}", "attach") from err
            try:
                if _bind(loop_fd, f"/dev/loop{number}", backing_fd, request):
                    return _finish_attach(loop_fd, number, p, direct_io, autoclear)
            finally:
                os.close(loop_fd)
            # Someone else bound it first; back off a little as contention grows.
            if attempt >= 4:
                time.sleep(random.uniform(0, 0.001 * attempt))
    raise LoopError(f"free loop devices kept being taken by others ({ATTACH_ATTEMPTS} attempts)", errno=errno.EBUSY,
                    operation="attach", device=p)


@record(frozen=True)
class _BindRequest:
    path: str
    offset: int
    sizelimit: int
    flags: int
    block_size: int


@contextlib.contextmanager
def _open_backing(path: str, mode: int) -> Iterator[int]:
    try:
        fd = os.open(path, mode | os.O_CLOEXEC)
    except OSError as err:
        hint = "; attach it read-only" if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM) else ""
        raise LoopError(f"cannot open backing file: {os.strerror(err.errno or errno.EIO)}{hint}", errno=err.errno,
                        operation="attach", device=path) from err
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _open_control(path: str) -> Iterator[int]:
    try:
        fd = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise LoopError(f"{LOOP_CONTROL} is missing (load the loop module)", errno=err.errno, operation="attach",
                        device=path) from err
    except OSError as err:
        raise _loop_error(err, f"cannot open {LOOP_CONTROL}", path, "attach") from err
    try:
        yield fd
    finally:
        os.close(fd)


def _bind(loop_fd: int, dev_path: str, backing_fd: int, req: _BindRequest) -> bool:
    """Bind the backing file to an opened loop device; False when someone else bound it first."""
    global _use_configure
    # A read-only policy set earlier with BLKROSET outlives a detach (include/uapi/linux/fs.h;
    # block/ioctl.c keeps bd_read_only): clear it, read-only binds use LO_FLAGS_READ_ONLY instead.
    with contextlib.suppress(OSError):  # not permitted or not supported: the bind below reports any real problem
        fcntl.ioctl(loop_fd, BLKROSET, struct.pack("i", 0))
    try:
        if _use_configure:
            info64 = pack_info64(offset=req.offset, sizelimit=req.sizelimit, flags=req.flags, file_name=req.path)
            try:
                _configure(loop_fd, backing_fd, info64, req.block_size)
                return True
            except OSError as err:
                # Before Linux 5.8 the ioctl is unknown (EINVAL or ENOTTY): use the old pair.
                if err.errno not in (errno.EINVAL, errno.ENOTTY):
                    raise
                if err.errno == errno.ENOTTY:
                    _use_configure = False
        _legacy_configure(loop_fd, backing_fd, req.offset, req.sizelimit, req.flags, req.path, req.block_size)
        return True
    except OSError as err:
        if err.errno == errno.EBUSY:
            return False
        raise _loop_error(err, "cannot bind loop device", dev_path, "attach") from err


def _finish_attach(loop_fd: int, number: int, path: str, direct_io: bool, autoclear: bool) -> LoopDevice:
    """Read the new device back; undo the bind if direct I/O was asked for and not granted."""
    try:
        dev = info(number)
        if direct_io and not dev.direct_io:
            raise InvalidArgument(
                "the kernel cannot do direct I/O on this file (alignment of the file system, "
                "offset or block size)",
                operation="attach",
                device=path,
            )
    except BaseException:
        with contextlib.suppress(OSError):
            fcntl.ioctl(loop_fd, LOOP_CLR_FD, 0)
        raise
    if autoclear:
        dev._holder = _Holder(os.dup(loop_fd))
    return dev


@contextlib.contextmanager
def attached(path: str | os.PathLike[str], **options: Any) -> Iterator[LoopDevice]:
    """``with attached(path, **attach_options) as dev:`` — detached when the block exits."""
    dev = attach(path, **options)
    try:
        yield dev
    finally:
        detach(dev)


# --------------------------------------------------------------------------------------------
# Detach and changes


@contextlib.contextmanager
def _opened(number: int, operation: str) -> Iterator[int]:
    """An open descriptor of ``/dev/loopN`` for ioctls, closed on exit."""
    path = f"/dev/loop{number}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise DeviceNotFound("no such loop device", errno=errno.ENOENT, operation=operation, device=path) from err
    except OSError as err:
        raise _loop_error(err, "cannot open", path, operation) from err
    try:
        yield fd
    finally:
        os.close(fd)


def _device_ioctl(fd: int, number: int, operation: str, request: int, arg: int | bytes, *,
                  einval: str | None = None) -> None:
    """Run one ioctl on a bound loop device, turning its errno into our errors.

    ENXIO (nothing bound) is :class:`DeviceNotFound`, EBUSY :class:`DeviceBusy`, EINVAL
    :class:`InvalidArgument` when ``einval`` gives the meaning, anything else :class:`LoopError`.
    """
    path = f"/dev/loop{number}"
    try:
        fcntl.ioctl(fd, request, arg)
    except OSError as err:
        if err.errno == errno.ENXIO:
            raise DeviceNotFound("loop device is not attached", errno=err.errno, operation=operation,
                                 device=path) from err
        if einval is not None and err.errno == errno.EINVAL:
            raise InvalidArgument(einval, errno=err.errno, operation=operation, device=path) from err
        raise _loop_error(err, f"{operation} failed", path, operation) from err


def _bound(number: int) -> bool:
    return os.path.exists(f"{SYS_BLOCK}/loop{number}/loop")


def detach(dev: LoopDevice | str | os.PathLike[str] | int, *, timeout: float = 5.0) -> bool:
    """Unbind a loop device (``LOOP_CLR_FD``).

    The kernel finishes the detach when the last opener closes the device; this waits up to
    ``timeout`` seconds for that and returns True once the device is free, False if someone still
    holds it open (it is then marked autoclear and goes when they close it). Kernels that answer
    EBUSY instead get the autoclear flag set. Raises :class:`DeviceNotFound` when the device does
    not exist or is not attached, :class:`InvalidArgument` when ``dev`` is not a loop device.
    """
    number = _number_of(dev)
    try:
        with _opened(number, "detach") as fd:
            try:
                _device_ioctl(fd, number, "detach", LOOP_CLR_FD, 0)
            except DeviceBusy:
                _set_autoclear(fd, number)
    finally:
        if isinstance(dev, LoopDevice):
            dev.close()
    deadline = time.monotonic() + timeout
    delay = 0.001
    while _bound(number):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def status(dev: LoopDevice | str | os.PathLike[str] | int) -> LoopStatus:
    """``LOOP_GET_STATUS64``: the backing file's ``st_dev``/``st_ino`` even after it was unlinked.

    Raises :class:`DeviceNotFound` (missing or unbound device) or :class:`LoopError`.
    """
    number = _number_of(dev)
    buf = bytearray(INFO64.size)
    with _opened(number, "status") as fd:
        try:
            fcntl.ioctl(fd, LOOP_GET_STATUS64, buf, True)
        except OSError as err:
            if err.errno == errno.ENXIO:
                raise DeviceNotFound("loop device is not attached", errno=err.errno,
                                     operation="status", device=f"/dev/loop{number}") from err
            raise _loop_error(err, "status failed", f"/dev/loop{number}", "status") from err
    return unpack_info64(buf)


def _set_autoclear(fd: int, number: int) -> None:
    """Old kernels refuse ``LOOP_CLR_FD`` on an open device: let the last close detach it."""
    buf = bytearray(INFO64.size)
    try:
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf, True)
    except OSError as err:
        raise _loop_error(err, "device busy, status unreadable", f"/dev/loop{number}", "detach") from err
    fields = list(INFO64.unpack(buf))
    fields[8] |= LO_FLAGS_AUTOCLEAR
    _device_ioctl(fd, number, "detach", LOOP_SET_STATUS64, INFO64.pack(*fields))


def set_capacity(dev: LoopDevice | str | os.PathLike[str] | int) -> int:
    """Re-read the backing file's size (``LOOP_SET_CAPACITY``); returns the new size in bytes.

    Raises :class:`DeviceNotFound` when the device is not attached.
    """
    number = _number_of(dev)
    with _opened(number, "set_capacity") as fd:
        _device_ioctl(fd, number, "set_capacity", LOOP_SET_CAPACITY, 0)
        buf = bytearray(8)
        fcntl.ioctl(fd, BLKGETSIZE64, buf, True)
        return int(struct.unpack("=Q", buf)[0])


def set_direct_io(dev: LoopDevice | str | os.PathLike[str] | int, enabled: bool = True) -> bool:
    """Switch direct I/O on or off (``LOOP_SET_DIRECT_IO``); returns whether it is now on.

    Raises :class:`InvalidArgument` when enabling is refused (the backing file's alignment does not
    allow it) and :class:`DeviceNotFound` when the device is not attached.
    """
    number = _number_of(dev)
    refused = "direct I/O refused for this backing file"
    with _opened(number, "set_direct_io") as fd:
        _device_ioctl(fd, number, "set_direct_io", LOOP_SET_DIRECT_IO, int(enabled), einval=refused)
    now = info(number).direct_io
    if enabled and not now:
        raise InvalidArgument(refused, errno=errno.EINVAL, operation="set_direct_io", device=f"/dev/loop{number}")
    return now
