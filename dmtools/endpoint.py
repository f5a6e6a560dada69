"""Endpoints: the one I/O interface that kcopyd, the userspace engine and the managers use.

Offsets and lengths are in bytes. Buffers are caller-owned (``memoryview``/``bytearray``/mmap); an
endpoint reads into them and writes from them without extra copies where the platform allows.
Concrete endpoints: ``dmtools.blockdev.BlockDevice`` (regular files and block devices), the
userspace engine's device endpoints, ``NullEndpoint`` and, for tests, ``dmtools.testing.faults``.
"""

from __future__ import annotations

import abc
import errno
import os

from dmtools.closing import Closing
from dmtools.errors import DeviceIOError
from dmtools.linux import block_attr

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Any, Sequence


class Endpoint(Closing, abc.ABC):
    """A byte-addressed device: file, block device, engine device, null or a test wrapper."""

    #: human-readable name (a path or a device name), used in error messages.
    name: str = ""
    #: the userspace engine's device this endpoint opens in-process (``DeviceEndpoint``), else None.
    device: object | None = None

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Size in bytes."""

    @property
    def logical_block_size(self) -> int:
        """Smallest addressable unit in bytes (512 unless the device says otherwise)."""
        return 512

    @property
    def read_only(self) -> bool:
        """True when writes are refused."""
        return False

    @property
    def direct(self) -> bool:
        """True when I/O bypasses the page cache (``O_DIRECT``): requests must then be aligned."""
        return False

    @property
    def devno(self) -> tuple[int, int] | None:
        """``(major, minor)`` of the block device behind the endpoint, ``None`` for anything else."""
        return None

    @property
    def zoned(self) -> bool:
        """True for a zoned block device (sysfs ``queue/zoned`` is not ``none``): writes go in order.

        Read once per endpoint (a device's zoned model does not change while it is open): every
        kcopyd job asks it of its destinations, and a device without a sysfs entry (the userspace
        engine's) cost a failed ``open`` each time.
        """
        known: bool | None = self.__dict__.get("_zoned")
        if known is None:
            known = self.__dict__["_zoned"] = _sysfs_zoned(self.devno)
        return known

    @abc.abstractmethod
    def readinto(self, buf: Any, offset: int) -> int:
        """Fill ``buf`` from ``offset``; return the bytes read (short only at end of device)."""

    @abc.abstractmethod
    def write(self, buf: Any, offset: int) -> int:
        """Write all of ``buf`` at ``offset``; return the bytes written."""

    def writev(self, views: Sequence[Any], offset: int) -> None:
        """Write ``views`` back to back from ``offset``, each one whole (a short write is continued).

        One ``write`` per view here; an endpoint that can do it in one call (a buffered file's
        ``pwritev``) overrides it.
        """
        for v in views:
            done = 0
            while done < len(v):
                n = self.write(v[done:] if done else v, offset + done)
                if n <= 0:
                    raise DeviceIOError("write made no progress", operation="write", device=self.name)
                done += n
            offset += done

    def splice_to(self, pipe: int, offset: int, length: int) -> None:
        """Put the ``length`` bytes at ``offset`` into the pipe ``pipe`` (which has room for them).

        An endpoint with a file descriptor lets the kernel move them (``splice(2)``); the default
        reads them with :meth:`readinto` and writes them to the pipe. A short read (past the end)
        raises ``DeviceIOError``.
        """
        buf = bytearray(length)
        if self.readinto(buf, offset) != length:
            raise DeviceIOError(f"short read at byte {offset}", operation="read", device=self.name)
        write_pipe(pipe, memoryview(buf))

    def flush(self) -> None:
        """Make completed writes durable."""

    def write_durable(self, buf: Any, offset: int) -> int:
        """Write all of ``buf`` at ``offset``, durable when this returns (the kernel's ``REQ_FUA``).

        Here ``write`` then ``flush``; an endpoint whose device takes FUA writes (an NBD export
        with ``SEND_FUA``) makes this write durable in one command. Wrappers keep this default,
        so their own ``write`` and ``flush`` are the ones used.
        """
        n = self.write(buf, offset)
        self.flush()
        return n

    def zero(self, offset: int, length: int) -> None:
        """Write ``length`` zero bytes at ``offset`` (efficiently where the device allows)."""
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self.write(memoryview(chunk)[:n], offset)
            offset += n

    def discard(self, offset: int, length: int) -> None:
        """Discard a range; the default writes zeros."""
        self.zero(offset, length)

    def fileno(self) -> int | None:
        """The OS file descriptor for fast paths (``copy_file_range``, ``preadv``), or ``None``."""
        return None

    def plain_fd(self, length: int, write: bool) -> int:
        """The descriptor on which this endpoint's I/O of ``length`` bytes is nothing but a
        ``pread``/``pwrite`` at the same byte offset, else -1.

        "Nothing but": no suspend gate, no wrapper's work, no other check than the end of the file
        or device (which the caller then checks itself, on the descriptor). ``write`` asks for
        writing, and -1 then also means writes are refused (``read_only``) or go another way (a
        zoned device's order, ``O_DIRECT``); a descriptor given for writing reads plainly too.
        Asked per job: it is valid only while the endpoint is open. kcopyd's lean path
        (:mod:`kcopyd.inline`) copies between such descriptors in C. Here -1: an endpoint says
        otherwise only for what it knows to be plain.
        """
        return -1

    def direct_fileno(self) -> tuple[int, int] | None:
        """An ``O_DIRECT`` descriptor of the same file or device and its alignment (the logical
        block size), on which an aligned ``pread``/``pwrite`` of whole blocks is this endpoint's
        I/O without the page cache (the kernel writes back and invalidates cached pages of the
        range first, so it agrees with the buffered I/O), else ``None``. Valid while the
        endpoint is open, as :meth:`plain_fd`. Here ``None``: an endpoint says otherwise only
        for what it knows to be plain."""
        return None

    @property
    def is_regular_file(self) -> bool:
        """True for regular files (``copy_file_range`` and hole detection apply)."""
        return False

    @property
    def writes_by_kernel(self) -> bool:
        """True when ``write``/``writev`` hand the caller's buffer to a system call and nothing in
        this process reads it: the kernel alone copies it, and a page of it that cannot be
        faulted in fails the call (EFAULT) instead of raising SIGBUS. A buffer that maps a file
        (kcopyd's mapped sources, :mod:`kcopyd.mapped`) may then be written from. False unless
        an endpoint declares it (wrappers, engine devices and TLS connections read buffers)."""
        return False

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """Allocated ``(offset, length)`` ranges inside ``[offset, offset+length)``, or ``None`` if unknown."""
        return None

    def fadvise(self, offset: int, length: int, advice: int) -> None:
        """``posix_fadvise`` on the range (``os.POSIX_FADV_*``: read ahead, drop clean pages);
        only advice, ignored where there is no page cache."""

    def close(self) -> None:
        """Release the endpoint."""


def _sysfs_zoned(devno: tuple[int, int] | None) -> bool:
    """True when sysfs says block device ``devno`` is zoned (False for no device, or no entry)."""
    if not devno:
        return False
    return block_attr(devno, "queue/zoned") not in (None, "", "none")


def read_full(ep: Endpoint, buf: Any, offset: int) -> None:
    """Fill ``buf`` from ``offset`` of ``ep``, reading again after a short read; a read that
    returns nothing (past the end) raises ``DeviceIOError`` (EIO)."""
    got = ep.readinto(buf, offset)
    while got < len(buf):
        n = ep.readinto(buf[got:], offset + got)
        if n <= 0:
            raise DeviceIOError(f"short read at byte {offset + got}", errno=errno.EIO, operation="read",
                                device=ep.name)
        got += n


def write_pipe(pipe: int, buf: memoryview) -> None:
    """Write all of ``buf`` into the pipe ``pipe`` (which has room for it)."""
    done = 0
    while done < len(buf):
        done += os.write(pipe, buf[done:])


class ForwardingEndpoint(Endpoint):
    """Forwards every operation to ``inner``: the base of wrappers that change only some of them."""

    def __init__(self, inner: Endpoint, name: str = "") -> None:
        self.inner = inner
        self.name = name or inner.name

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def logical_block_size(self) -> int:
        return self.inner.logical_block_size

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    @property
    def direct(self) -> bool:
        return self.inner.direct

    def readinto(self, buf: Any, offset: int) -> int:
        return self.inner.readinto(buf, offset)

    def write(self, buf: Any, offset: int) -> int:
        return self.inner.write(buf, offset)

    def flush(self) -> None:
        self.inner.flush()

    def zero(self, offset: int, length: int) -> None:
        self.inner.zero(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self.inner.discard(offset, length)

    def fileno(self) -> int | None:
        return self.inner.fileno()

    def plain_fd(self, length: int, write: bool) -> int:
        """``inner``'s, unless this endpoint's ``readinto``/``write``/``zero`` is its own: a
        subclass that defines one of them is not plain (:meth:`__init_subclass__`), nor an
        endpoint whose method was replaced on the instance (a test's probe)."""
        own = self.__dict__
        if "write" in own or "readinto" in own:
            return -1
        return self.inner.plain_fd(length, write)

    def direct_fileno(self) -> tuple[int, int] | None:
        """``inner``'s, on :meth:`plain_fd`'s conditions."""
        own = self.__dict__
        if "write" in own or "readinto" in own:
            return None
        return self.inner.direct_fileno()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A wrapper changing the I/O would be bypassed by a copy on the inner descriptor.
        if any(m in cls.__dict__ for m in ("readinto", "write", "zero")):
            if "plain_fd" not in cls.__dict__:
                cls.plain_fd = Endpoint.plain_fd  # type: ignore[method-assign]
            if "direct_fileno" not in cls.__dict__:
                cls.direct_fileno = Endpoint.direct_fileno  # type: ignore[method-assign]

    @property
    def is_regular_file(self) -> bool:
        return self.inner.is_regular_file

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        return self.inner.data_extents(offset, length)

    def fadvise(self, offset: int, length: int, advice: int) -> None:
        self.inner.fadvise(offset, length, advice)

    def close(self) -> None:
        self.inner.close()


class NullEndpoint(Endpoint):
    """Reads zeros, discards writes: a sink and source for tests and benchmarks."""

    def __init__(self, size: int, name: str = "null") -> None:
        self._size = size
        self.name = name

    @property
    def size(self) -> int:
        return self._size

    def readinto(self, buf: Any, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), self._size - offset))
        mv[:n] = bytes(n)
        return n

    def write(self, buf: Any, offset: int) -> int:
        return memoryview(buf).nbytes

    @property
    def writes_by_kernel(self) -> bool:
        return True  # the bytes are never read

    def zero(self, offset: int, length: int) -> None:
        return None
