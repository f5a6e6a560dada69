"""The regular file behind a snapshot's COW, and growing it (what ``lvextend`` of a snapshot does to
its LV, for a COW kept in a file: directly, or through a loop device)."""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass

from dmtools import loop
from dmtools.errors import DMError, InvalidArgument
from dmtools.identity import devno_of

_LOOP = re.compile(r"^loop(\d+)$")


@dataclass(frozen=True)
class ExtendResult:
    """What :meth:`snapshot.SnapshotManager.extend` grew: the COW from ``old_bytes`` to ``new_bytes``."""

    snapshot: str
    file: str
    loop: str | None
    cow_device: str | None
    old_bytes: int
    new_bytes: int
    #: the snapshot table was reloaded through exception handover (always, for now).
    handover: bool = True


def backing_file(ref: str) -> tuple[str, str | None]:
    """``(file, loop device or None)`` behind a COW reference (a path or ``major:minor``).

    Raises ``InvalidArgument`` when it is neither a regular file nor a loop device over one without
    a size limit.
    """
    devno = devno_of(ref)
    if devno is None:
        try:
            st = os.stat(ref)
        except OSError as err:
            raise InvalidArgument(f"COW {ref}: {err.strerror}", errno=err.errno) from err
        if stat.S_ISREG(st.st_mode):
            return os.path.abspath(ref), None
    name = os.path.basename(os.path.realpath(f"/sys/dev/block/{devno[0]}:{devno[1]}")) if devno else ""
    if not _LOOP.match(name):
        raise InvalidArgument(f"COW {ref} is not a file or a loop-backed file; cannot extend it")
    loop_path = f"/dev/{name}"
    dev = loop.info(loop_path)
    if dev.sizelimit:
        raise InvalidArgument(f"{loop_path} has a size limit ({dev.sizelimit} bytes); cannot extend")
    if not dev.backing_file or not os.path.isfile(dev.backing_file):
        raise InvalidArgument(f"{loop_path} is not backed by a regular file ({dev.backing_file})")
    return dev.backing_file, loop_path


def grow_file(path: str, size: int) -> None:
    """Make ``path`` at least ``size`` bytes, allocated (``posix_fallocate``; sparse where unsupported)."""
    current = os.stat(path).st_size
    if current >= size:
        return
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            os.posix_fallocate(fd, current, size - current)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise DMError(f"cannot grow {path} to {size} bytes: {err.strerror}",
                              errno=err.errno, operation="extend") from err
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
