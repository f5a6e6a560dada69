"""The regular file behind a device, and growing it: what ``lvextend`` does to an LV, for a device
kept in a file (the file itself, or a loop device over it). Used to extend a snapshot's COW and a
thin pool's data or metadata device."""

from __future__ import annotations

import errno
import os
import stat

from dmtools import loop
from dmtools.errors import DMError, InvalidArgument
from dmtools.identity import devno_of
from dmtools.linux import SYS_DEV_BLOCK

__all__ = ["backing_file", "grow_file", "grow_behind"]


def backing_file(ref: str) -> tuple[str, str | None]:
    """``(file, loop device or None)`` behind a device reference (a path or ``major:minor``).

    Raises ``InvalidArgument`` when it is neither a regular file nor a loop device over one without
    a size limit.
    """
    devno = devno_of(ref)
    if devno is None:
        try:
            st = os.stat(ref)
        except OSError as err:
            raise InvalidArgument(f"{ref}: {err.strerror}", errno=err.errno) from err
        if stat.S_ISREG(st.st_mode):
            return os.path.abspath(ref), None
    name = os.path.basename(os.path.realpath(f"{SYS_DEV_BLOCK}/{devno[0]}:{devno[1]}")) if devno else ""
    if not loop.LOOP_NAME.match(name):
        raise InvalidArgument(f"{ref} is not a file or a loop-backed file; cannot extend it")
    loop_path = f"/dev/{name}"
    dev = loop.info(loop_path)
    if dev.sizelimit:
        raise InvalidArgument(f"{loop_path} has a size limit ({dev.sizelimit} bytes); cannot extend")
    if not dev.backing_file or not os.path.isfile(dev.backing_file):
        raise InvalidArgument(f"{loop_path} is not backed by a regular file ({dev.backing_file})")
    return dev.backing_file, loop_path


def grow_file(path: str, size: int, loop_path: str | None = None) -> None:
    """Make ``loop_path``, a loop device over ``path`` (:func:`backing_file`), or else ``path``
    itself, at least ``size`` bytes: the file grows, allocated (``posix_fallocate``; sparse where
    unsupported), to the loop device's offset plus ``size``, and the loop device takes the new
    capacity (``LOOP_SET_CAPACITY``). Raises ``DMError`` when the file or the loop device could
    not grow."""
    end = size + (loop.info(loop_path).offset if loop_path is not None else 0)
    current = os.stat(path).st_size
    if current < end:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            try:
                os.posix_fallocate(fd, current, end - current)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise DMError(f"cannot grow {path} to {end} bytes: {err.strerror}",
                                  errno=err.errno, operation="extend") from err
                os.ftruncate(fd, end)
            os.fsync(fd)
        finally:
            os.close(fd)
    if loop_path is not None and loop.set_capacity(loop_path) < size:
        raise DMError(f"{loop_path} is smaller than {size} bytes after LOOP_SET_CAPACITY", operation="extend")


def grow_behind(ref: str, size: int) -> tuple[str, str | None]:
    """:func:`grow_file` on the file behind ``ref`` (:func:`backing_file`) and the loop device over
    it, if any. Returns ``(file, loop or None)``; raises ``InvalidArgument`` (not file-backed) or
    ``DMError``."""
    path, loop_path = backing_file(ref)
    grow_file(path, size, loop_path)
    return path, loop_path
