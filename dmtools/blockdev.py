"""Block-device endpoints: regular files and block devices behind one :class:`~dmtools.endpoint.Endpoint`.

:class:`BlockDevice` reads into and writes from caller buffers with ``os.preadv``/``os.pwritev`` (no
intermediate copies), loops on short transfers, and optionally opens with ``O_DIRECT``, in which case
offsets, lengths and buffer addresses must be aligned to the logical block size (use
:func:`aligned_buffer`); misaligned requests raise :class:`~dmtools.errors.InvalidArgument` before
the kernel sees them. Zeroing and discard use ``fallocate(2)`` on files and the ``BLKZEROOUT`` /
``BLKDISCARD`` ioctls on block devices, falling back to writing zeros.

The ioctl numbers and fallocate modes are in :mod:`dmtools.linux`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct

from dmtools.endpoint import Endpoint
from dmtools.errors import DeviceBusy, DeviceIOError, DeviceNotFound, DMError, InvalidArgument, NoSpace
from dmtools.nbd.uri import is_nbd_uri
from dmtools.linux import (BLKDISCARD, BLKGETSIZE64, BLKPBSZGET, BLKSSZGET, BLKZEROOUT, FALLOC_FL_KEEP_SIZE,
                           FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, block_attr, libc, parse_devno)
from dmtools.units import int_in

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Any, Sequence

__all__ = ["BlockDevice", "aligned_buffer", "buffer_address", "open_endpoint", "device_number", "resolve_devno"]


#: Largest zero-filled buffer used when zeroing has to fall back to writes.
_ZERO_CHUNK = 1 << 20

#: errnos meaning "this file system / device cannot do that operation".
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS)


# --------------------------------------------------------------------------------------------
# Small system-call helpers


_fallocate_fn: Any = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call ``fallocate(2)`` with ``mode`` (Python's ``os.posix_fallocate`` cannot pass a mode)."""
    global _fallocate_fn
    if _fallocate_fn is None:
        lib = libc()
        fn = getattr(lib, "fallocate64", None) or lib.fallocate
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        fn.restype = ctypes.c_int
        _fallocate_fn = fn
    if _fallocate_fn(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _PyBuffer(ctypes.Structure):
    """``Py_buffer`` from CPython's Include/pybuffer.h, to find a read-only buffer's address."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer: Any = None
_release_buffer: Any = None


def buffer_address(mv: memoryview) -> int:
    """Memory address of the first byte of a non-empty, C-contiguous byte view."""
    global _get_buffer, _release_buffer
    if not mv.readonly:
        return ctypes.addressof(ctypes.c_char.from_buffer(mv))
    if _get_buffer is None:
        get = ctypes.pythonapi.PyObject_GetBuffer
        get.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
        get.restype = ctypes.c_int
        release = ctypes.pythonapi.PyBuffer_Release
        release.argtypes = [ctypes.POINTER(_PyBuffer)]
        release.restype = None
        _get_buffer, _release_buffer = get, release
    view = _PyBuffer()
    if _get_buffer(mv, ctypes.byref(view), 0) != 0:  # PyBUF_SIMPLE
        raise InvalidArgument("buffer does not expose its memory")
    try:
        return int(view.buf or 0)
    finally:
        _release_buffer(ctypes.byref(view))


def _byte_view(buf: Any, *, writable: bool) -> memoryview:
    """A 1-D unsigned-byte view of ``buf`` without copying."""
    try:
        mv = memoryview(buf)
    except TypeError as err:
        raise InvalidArgument(f"not a buffer: {type(buf).__name__}") from err
    if writable and mv.readonly:
        raise InvalidArgument("cannot read into a read-only buffer")
    if mv.format != "B" or mv.ndim != 1:
        if not mv.c_contiguous:
            raise InvalidArgument("buffer must be contiguous")
        mv = mv.cast("B")
    elif not mv.c_contiguous:
        raise InvalidArgument("buffer must be contiguous")
    return mv


#: A transparent huge page (x86-64, arm64 with 4 KiB pages: PMD_SIZE).
HUGE_PAGE = 2 << 20


def aligned_buffer(nbytes: int, *, huge: bool = False) -> mmap.mmap:
    """A zero-filled, page-aligned anonymous buffer of ``nbytes`` bytes, usable with ``O_DIRECT``.

    ``huge`` asks for transparent huge pages (``MADV_HUGEPAGE``; the size is rounded up to whole
    ones, which Linux 6.7+ also aligns): an ``O_DIRECT`` request from such a buffer pins one
    folio and becomes a few large segments instead of one per 4 KiB page (measured: half the
    CPU of a 512 KiB direct write). Only advice: without THP it is an ordinary buffer.

    Raises :class:`InvalidArgument` when ``nbytes`` is not a positive integer.
    """
    if not int_in(nbytes, 1):
        raise InvalidArgument(f"buffer size must be a positive integer, not {nbytes!r}")
    if not huge:
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = mmap.mmap(-1, -(-nbytes // HUGE_PAGE) * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):
        buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def _ioctl_uint(fd: int, request: int, fmt: str) -> int:
    """Run an ioctl that writes one integer of struct format ``fmt`` and return it."""
    buf = bytearray(struct.calcsize(fmt))
    fcntl.ioctl(fd, request, buf, True)
    return int(struct.unpack(fmt, buf)[0])


def _sysfs_dio_alignment(st_dev: int) -> int:
    """Logical block size of the block device holding a file (its ``O_DIRECT`` alignment)."""
    for attr in ("queue/logical_block_size", "../queue/logical_block_size"):
        text = block_attr((os.major(st_dev), os.minor(st_dev)), attr)
        if text is not None and text.isdigit():
            return max(512, int(text))
    return 512


# --------------------------------------------------------------------------------------------
# Device numbers


def device_number(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(major, minor)`` of the block device at ``path``.

    Raises :class:`DeviceNotFound` if ``path`` does not exist and :class:`InvalidArgument` if it is
    not a block device.
    """
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError as err:
        raise DeviceNotFound("no such device", errno=errno.ENOENT, device=p) from err
    if not stat.S_ISBLK(st.st_mode):
        raise InvalidArgument("not a block device", errno=errno.ENOTBLK, device=p)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def resolve_devno(devno: str | tuple[int, int]) -> str:
    """The ``/dev`` path of block device ``"MAJOR:MINOR"`` (or a ``(major, minor)`` pair).

    Looks the device up in ``/sys/dev/block`` and checks that the node in ``/dev`` has that number.
    Raises :class:`InvalidArgument` on bad syntax and :class:`DeviceNotFound` when no such block
    device (or no node for it) exists.
    """
    parsed = parse_devno(devno) if isinstance(devno, str) else devno
    if parsed is None:
        raise InvalidArgument(f"not a device number (MAJOR:MINOR, at most 4095:1048575): {devno!r}")
    major, minor = parsed
    text = f"{major}:{minor}"
    uevent = block_attr(parsed, "uevent")
    if uevent is None:
        raise DeviceNotFound("no such block device", errno=errno.ENXIO, device=text)
    name = dict(line.split("=", 1) for line in uevent.splitlines() if "=" in line).get("DEVNAME")
    if not name:
        raise DeviceNotFound("block device has no name", errno=errno.ENXIO, device=text)
    path = f"/dev/{name}"
    try:
        st = os.stat(path)
    except FileNotFoundError as err:
        raise DeviceNotFound(f"no device node {path}", errno=errno.ENOENT, device=text) from err
    if not stat.S_ISBLK(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (major, minor):
        raise DeviceNotFound(f"{path} is not block device {text}", errno=errno.ENXIO, device=text)
    return path


# --------------------------------------------------------------------------------------------
# The endpoint


class BlockDevice(Endpoint):
    """A regular file or block device opened for positional I/O.

    ``writable`` opens read-write; ``direct`` adds ``O_DIRECT`` (requests must then be aligned to
    :attr:`logical_block_size`, buffers too: see :func:`aligned_buffer`); ``exclusive`` opens a
    block device with ``O_EXCL`` (refused with :class:`DeviceBusy` while it is mounted or held by
    another exclusive opener) and takes a non-blocking ``flock`` on a regular file; ``create``
    creates a missing regular file (needs ``writable``).

    Raises :class:`DeviceNotFound` (missing path), :class:`InvalidArgument` (a directory, another
    kind of file, ``O_DIRECT`` unsupported, bad option combination), :class:`DeviceBusy` (exclusive
    open refused) or :class:`DMError` carrying the errno (permissions and the like).
    """

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = False, direct: bool = False,
                 exclusive: bool = False, create: bool = False) -> None:
        self.path = os.fspath(path)
        self.name = self.path
        self._fd = -1
        self._writable = writable
        self._direct = direct
        if create and not writable:
            raise InvalidArgument("create=True needs writable=True", device=self.path)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        if "\0" in self.path:  # no file can be named so (the OS would refuse it with ValueError)
            raise DeviceNotFound("no such file or device (the name contains a NUL byte)", errno=errno.ENOENT,
                                 operation="open", device=repr(self.path))
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if not create:
                raise DeviceNotFound("no such file or device", errno=errno.ENOENT, operation="open",
                                     device=self.path) from None
            flags |= os.O_CREAT
            st = None
        except OSError as err:
            raise self._open_error(err) from err
        if st is not None:
            self._check_kind(st.st_mode)
            if exclusive and stat.S_ISBLK(st.st_mode):
                flags |= os.O_EXCL
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as err:
            raise self._open_error(err) from err
        try:
            st = os.fstat(fd)
            self._check_kind(st.st_mode)  # the path may have changed between stat and open
            if exclusive and stat.S_ISREG(st.st_mode):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as err:
                    raise DeviceBusy("file is locked by another exclusive user", errno=errno.EBUSY, operation="open",
                                     device=self.path) from err
            self._is_block = stat.S_ISBLK(st.st_mode)
            self._rdev = st.st_rdev
            if self._is_block:
                self._lbs = _ioctl_uint(fd, BLKSSZGET, "=i")
                self._pbs = _ioctl_uint(fd, BLKPBSZGET, "=I")
            else:
                self._lbs = _sysfs_dio_alignment(st.st_dev) if direct else 512
                self._pbs = max(self._lbs, st.st_blksize or 512)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._known_size = 0

    # -- opening helpers

    def _check_kind(self, mode: int) -> None:
        if stat.S_ISDIR(mode):
            raise InvalidArgument("is a directory", errno=errno.EISDIR, operation="open", device=self.path)
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise InvalidArgument("not a regular file or block device", errno=errno.EINVAL, operation="open",
                                  device=self.path)

    def _open_error(self, err: OSError) -> DMError:
        code = err.errno or errno.EIO
        if code == errno.ENOENT:
            return DeviceNotFound("no such file or device", errno=code, operation="open", device=self.path)
        if code == errno.EBUSY:
            return DeviceBusy("in use (mounted or opened exclusively)", errno=code, operation="open", device=self.path)
        if code == errno.EINVAL and self._direct:
            return InvalidArgument("O_DIRECT is not supported here", errno=code, operation="open", device=self.path)
        if code == errno.EISDIR:
            return InvalidArgument("is a directory", errno=code, operation="open", device=self.path)
        return DMError(os.strerror(code), errno=code, operation="open", device=self.path)

    # -- properties

    def _require_open(self) -> int:
        if self._fd < 0:
            raise InvalidArgument("endpoint is closed", errno=errno.EBADF, device=self.path)
        return self._fd

    @property
    def size(self) -> int:
        """Size in bytes (``BLKGETSIZE64`` for block devices, ``st_size`` for files; read each time)."""
        fd = self._require_open()
        try:
            if self._is_block:
                return _ioctl_uint(fd, BLKGETSIZE64, "=Q")
            return os.fstat(fd).st_size
        except OSError as err:
            raise self._io_error(err, "size") from err

    @property
    def logical_block_size(self) -> int:
        """``BLKSSZGET`` for block devices; for files 512, or the file system's device block size
        when opened with ``direct``."""
        return self._lbs

    @property
    def physical_block_size(self) -> int:
        """``BLKPBSZGET`` for block devices; the file system's preferred I/O size for files."""
        return self._pbs

    @property
    def read_only(self) -> bool:
        return not self._writable

    @property
    def direct(self) -> bool:
        """True when opened with ``O_DIRECT``."""
        return self._direct

    @property
    def is_regular_file(self) -> bool:
        return not self._is_block

    @property
    def writes_by_kernel(self) -> bool:
        """True: writes are ``pwritev`` (or ``O_DIRECT``) from the caller's buffer."""
        return True

    @property
    def is_block_device(self) -> bool:
        """True for a block device."""
        return self._is_block

    @property
    def devno(self) -> tuple[int, int] | None:
        """``(major, minor)`` of a block device, ``None`` for a regular file."""
        if not self._is_block:
            return None
        return os.major(self._rdev), os.minor(self._rdev)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._fd < 0

    def fileno(self) -> int:
        return self._require_open()

    def plain_fd(self, length: int, write: bool) -> int:
        """The descriptor, unless opened ``O_DIRECT`` (alignment), or ``write`` on a read-only
        endpoint or a zoned device; -1 once closed. :meth:`write`'s own checks beyond a plain
        ``pwrite`` are the range and the end of a block device, which the caller makes."""
        if self._direct or (write and (not self._writable or (self._is_block and self.zoned))):
            return -1
        return self._fd

    # -- checks and error mapping

    def _io_error(self, err: OSError, operation: str, offset: int | None = None, length: int | None = None) -> DMError:
        code = err.errno or errno.EIO
        where = f" at offset {offset}" if offset is not None else ""
        if length is not None:
            where += f" length {length}"
        msg = f"{os.strerror(code)}{where}"
        if code == errno.ENOSPC:
            return NoSpace(msg, errno=code, operation=operation, device=self.path)
        if code == errno.EBUSY:
            return DeviceBusy(msg, errno=code, operation=operation, device=self.path)
        if code == errno.EINVAL:
            return InvalidArgument(msg, errno=code, operation=operation, device=self.path)
        return DeviceIOError(msg, errno=code, operation=operation, device=self.path)

    def _check_range(self, offset: int, length: int, operation: str) -> None:
        for what, value in (("offset", offset), ("length", length)):
            if not int_in(value):
                raise InvalidArgument(f"{what} must be a non-negative integer, not {value!r}", operation=operation,
                                      device=self.path)

    def _check_inside(self, offset: int, length: int, operation: str) -> None:
        """Refuse a block-device request that ends past the device (before any byte is written).

        The size is cached and re-read only when a request seems to pass the end (devices grow).
        """
        end = offset + length
        if end <= self._known_size:
            return
        self._known_size = self.size
        if end > self._known_size:
            raise NoSpace(f"range {offset}+{length} ends past the device's {self._known_size} bytes",
                          errno=errno.ENOSPC, operation=operation, device=self.path)

    def _check_writable(self, operation: str) -> None:
        if not self._writable:
            raise DeviceIOError("opened read-only", errno=errno.EBADF, operation=operation, device=self.path)

    def _check_direct(self, mv: memoryview | None, offset: int, length: int, operation: str) -> None:
        """With ``O_DIRECT``, refuse requests the kernel would fail with EINVAL."""
        if not self._direct:
            return
        align = self._lbs
        bad = []
        if offset % align:
            bad.append(f"offset {offset}")
        if length % align:
            bad.append(f"length {length}")
        if mv is not None and len(mv) and buffer_address(mv) % align:
            bad.append("buffer address")
        if bad:
            raise InvalidArgument(
                f"O_DIRECT needs {align}-byte alignment: {', '.join(bad)} misaligned "
                "(use dmtools.blockdev.aligned_buffer)",
                errno=errno.EINVAL,
                operation=operation,
                device=self.path,
            )

    # -- I/O

    def readinto(self, buf: Any, offset: int) -> int:
        """Fill ``buf`` from ``offset``; returns the byte count, short only at end of file/device.

        Raises :class:`InvalidArgument` (bad offset, misaligned ``O_DIRECT`` request) or
        :class:`DeviceIOError` carrying the errno.
        """
        fd = self._require_open()
        with _byte_view(buf, writable=True) as mv:
            return self._readinto(fd, mv, offset)

    def _readinto(self, fd: int, mv: memoryview, offset: int) -> int:
        self._check_range(offset, len(mv), "read")
        self._check_direct(mv, offset, len(mv), "read")
        total = 0
        want = len(mv)
        while total < want:
            try:
                n = os.preadv(fd, [mv[total:]], offset + total)
            except OSError as err:
                raise self._io_error(err, "read", offset + total, want - total) from err
            if n == 0:
                break
            total += n
            if self._direct and n % self._lbs:
                break  # a partial block under O_DIRECT only happens at end of file
        return total

    def write(self, buf: Any, offset: int) -> int:
        """Write all of ``buf`` at ``offset`` and return its length.

        Regular files grow; a block device raises :class:`NoSpace` past its end. Raises
        :class:`InvalidArgument` for misaligned ``O_DIRECT`` requests and :class:`DeviceIOError`
        for read-only endpoints and I/O errors.
        """
        fd = self._require_open()
        with _byte_view(buf, writable=False) as mv:
            return self._write(fd, mv, offset)

    def _write(self, fd: int, mv: memoryview, offset: int) -> int:
        self._check_range(offset, len(mv), "write")
        self._check_writable("write")
        self._check_direct(mv, offset, len(mv), "write")
        if self._is_block:
            self._check_inside(offset, len(mv), "write")
        total = 0
        want = len(mv)
        while total < want:
            try:
                n = os.pwritev(fd, [mv[total:]], offset + total)
            except OSError as err:
                raise self._io_error(err, "write", offset + total, want - total) from err
            if n == 0:
                raise NoSpace(f"device accepted no data at offset {offset + total}", errno=errno.ENOSPC,
                              operation="write", device=self.path)
            total += n
        return total

    def writev(self, views: Sequence[Any], offset: int) -> None:
        """Write ``views`` back to back: one ``pwritev`` on a buffered regular file, else one
        checked ``write`` per view (O_DIRECT alignment, block devices)."""
        if self._direct or not self._writable or self._is_block:
            super().writev(views, offset)
            return
        fd = self._require_open()
        pending = [v for v in views if len(v)]
        while pending:
            n = os.pwritev(fd, pending, offset)
            if n <= 0:
                raise DeviceIOError("write made no progress", operation="write", device=self.name)
            offset += n
            while pending and n >= len(pending[0]):
                n -= len(pending.pop(0))
            if n:
                pending[0] = pending[0][n:]

    def splice_to(self, pipe: int, offset: int, length: int) -> None:
        """Put the ``length`` bytes at ``offset`` into the pipe ``pipe`` (``splice(2)``: page-cache
        pages are referenced, not copied). A pipe without room raises :class:`DeviceIOError`
        with errno ``EAGAIN`` (nothing waits); the end of the file or device before ``length``
        bytes raises it with ``EIO``."""
        fd = self._require_open()
        self._check_range(offset, length, "read")
        self._check_direct(None, offset, length, "read")
        done = 0
        while done < length:
            try:
                n = os.splice(fd, pipe, length - done, offset_src=offset + done, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError as err:
                raise DeviceIOError(f"the pipe is full after {done} of {length} bytes",
                                    errno=errno.EAGAIN, operation="read", device=self.path) from err
            except OSError as err:
                raise self._io_error(err, "read", offset + done, length - done) from err
            if n <= 0:
                raise DeviceIOError(f"short read at byte {offset + done}", errno=errno.EIO,
                                    operation="read", device=self.path)
            done += n

    def fadvise(self, offset: int, length: int, advice: int) -> None:
        """``posix_fadvise`` on the range (only advice: a file system may refuse it)."""
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._require_open(), offset, length, advice)

    def flush(self) -> None:
        """Make completed writes durable (``fdatasync`` for files, ``fsync`` for block devices)."""
        fd = self._require_open()
        try:
            if self._is_block:
                os.fsync(fd)
            else:
                os.fdatasync(fd)
        except OSError as err:
            raise self._io_error(err, "flush") from err

    def zero(self, offset: int, length: int, *, unmap: bool = True) -> None:
        """Make ``[offset, offset+length)`` read as zeros.

        Files: with ``unmap`` punch a hole (keeping the file sparse), else ``FALLOC_FL_ZERO_RANGE``
        (keeping blocks allocated); either one falls back to the other and then to writing zeros.
        A range past the end of a file extends it. Block devices: ``BLKZEROOUT`` for the part aligned
        to the logical block size, zero writes for unaligned edges and where the ioctl is missing; a
        range past the end raises :class:`NoSpace`.
        """
        fd = self._require_open()
        self._check_range(offset, length, "zero")
        self._check_writable("zero")
        self._check_direct(None, offset, length, "zero")
        if length == 0:
            return
        if self._is_block:
            self._zero_block(fd, offset, length)
        else:
            self._zero_file(fd, offset, length, unmap)

    def _zero_file(self, fd: int, offset: int, length: int, unmap: bool) -> None:
        end = offset + length
        size = os.fstat(fd).st_size
        punch = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, min(end, size))
        zero_range = (FALLOC_FL_ZERO_RANGE, end)
        for mode, limit in (punch, zero_range) if unmap else (zero_range, punch):
            try:
                if offset < limit:
                    _fallocate(fd, mode, offset, limit - offset)
                if limit < end:  # punching stops at EOF: extending the file reads as zeros
                    os.ftruncate(fd, end)
                return
            except OSError as err:
                if err.errno in _UNSUPPORTED or err.errno == errno.EINVAL:
                    continue
                raise self._io_error(err, "zero", offset, length) from err
        self._write_zeros(offset, length)

    def _zero_block(self, fd: int, offset: int, length: int) -> None:
        end = offset + length
        self._check_inside(offset, length, "zero")
        lbs = self._lbs
        a_start = -(-offset // lbs) * lbs
        a_end = end // lbs * lbs
        if a_start >= a_end:
            self._write_zeros(offset, length)
            return
        try:
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", a_start, a_end - a_start))
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise self._io_error(err, "zero", a_start, a_end - a_start) from err
            self._write_zeros(a_start, a_end - a_start)
        if offset < a_start:
            self._write_zeros(offset, a_start - offset)
        if a_end < end:
            self._write_zeros(a_end, end - a_end)

    def _write_zeros(self, offset: int, length: int) -> None:
        chunk = aligned_buffer(min(length, _ZERO_CHUNK))
        try:
            with memoryview(chunk) as mv:
                end = offset + length
                while offset < end:
                    n = min(len(mv), end - offset)
                    with mv[:n] as part:
                        self.write(part, offset)
                    offset += n
        finally:
            chunk.close()

    def discard(self, offset: int, length: int) -> None:
        """Tell the storage a range is unused (a hint: contents afterwards are unspecified).

        Files: punch a hole (the range then reads as zeros); the part past end of file is ignored.
        Block devices: ``BLKDISCARD`` on the part aligned to the logical block size. Where neither is
        supported nothing happens.
        """
        fd = self._require_open()
        self._check_range(offset, length, "discard")
        self._check_writable("discard")
        if length == 0:
            return
        try:
            if self._is_block:
                lbs = self._lbs
                a_start = -(-offset // lbs) * lbs
                a_end = min(offset + length, self.size) // lbs * lbs
                if a_start < a_end:
                    fcntl.ioctl(fd, BLKDISCARD, struct.pack("=QQ", a_start, a_end - a_start))
            else:
                end = min(offset + length, os.fstat(fd).st_size)
                if offset < end:
                    _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, end - offset)
        except OSError as err:
            if err.errno in _UNSUPPORTED:
                return
            raise self._io_error(err, "discard", offset, length) from err

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """Allocated ``(offset, length)`` ranges in ``[offset, offset+length)`` of a regular file.

        Uses ``SEEK_DATA``/``SEEK_HOLE``; ``None`` for block devices and file systems that cannot
        tell (they then count as fully allocated).
        """
        fd = self._require_open()
        self._check_range(offset, length, "data_extents")
        if self._is_block:
            return None
        end = offset + length
        extents: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # no data at or after pos
                    break
                if err.errno in _UNSUPPORTED or err.errno == errno.EINVAL:
                    return None
                raise self._io_error(err, "data_extents", pos) from err
            if data >= end:
                break
            try:
                hole = os.lseek(fd, data, os.SEEK_HOLE)
            except OSError as err:
                raise self._io_error(err, "data_extents", data) from err
            stop = min(hole, end)
            extents.append((data, stop - data))
            pos = hole
        return extents

    def close(self) -> None:
        """Close the descriptor (idempotent); releases an exclusive claim or lock."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        # Like io.FileIO: a forgotten endpoint gives its descriptor (and exclusive claim) back.
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        mode = "rw" if self._writable else "ro"
        extra = ",direct" if self._direct else ""
        state = "closed" if self._fd < 0 else mode + extra
        return f"BlockDevice({self.path!r}, {state})"


def open_endpoint(target: Endpoint | str | os.PathLike[str], *, writable: bool = False,
                  direct: bool = False) -> Endpoint:
    """An endpoint for ``target``: an :class:`Endpoint` is returned as it is, a path (or a
    ``"MAJOR:MINOR"`` block device number that names no file) is opened as a :class:`BlockDevice`,
    an NBD URI as a :class:`dmtools.nbd.NbdEndpoint`.

    Raises :class:`InvalidArgument` when a read-only endpoint is given and ``writable`` is asked for,
    and whatever :class:`BlockDevice` raises.
    """
    if isinstance(target, Endpoint):
        if writable and target.read_only:
            raise InvalidArgument("endpoint is read-only", errno=errno.EROFS, device=target.name)
        return target
    path = os.fspath(target)
    if is_nbd_uri(path):
        from dmtools.nbd import NbdEndpoint

        return NbdEndpoint(path, writable=writable)
    if parse_devno(path) is not None and not os.path.exists(path):
        path = resolve_devno(path)
    return BlockDevice(path, writable=writable, direct=direct)
