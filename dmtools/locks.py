"""Locks that make two managers of one object take turns, as LVM's commands take a volume group's.

Both kinds are open file description locks (``F_OFD_SETLKW``, a write lock that waits): the lock
goes with the descriptor, so a killed manager leaves none behind; it conflicts between any two
descriptors, two threads of one process included; and it is apart from the ``flock`` and
``O_EXCL`` claims an engine holds on the same device (``dmtools.claims``).

* :func:`range_lock` locks bytes of a device or file (the thin pool's record area).
* :func:`named_lock` locks a file named after the object in a lock directory, LVM's file per
  volume group in its locking dir (lib/locking/file_locking.c): the file is removed at release
  and a waiter that finds the name gone or replaced after it got its lock tries again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import struct

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Iterator

__all__ = ["range_lock", "named_lock", "lock_dir"]

#: ``struct flock`` of 64-bit Linux (asm-generic/fcntl.h): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhqqi4x")
#: Tries of :func:`named_lock` when the file keeps being removed under it (each try means another
#: manager held the lock and finished meanwhile, so this only runs out under endless contention).
_NAMED_TRIES = 1000


def _wait_lock(fd: int, start: int, length: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0))


@contextlib.contextmanager
def range_lock(path: str, start: int, length: int, *, operation: str = "lock") -> Iterator[None]:
    """Hold bytes ``start .. start + length`` of device or file ``path`` (opened read-write) while
    the block runs; waits for the holder. Raises ``DeviceNotFound`` and ``DMError`` from the open."""
    from dmtools.claims import os_errors

    with os_errors(path, operation):
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        with os_errors(path, operation):
            _wait_lock(fd, start, length)
        yield
    finally:
        os.close(fd)


def lock_dir(run_directory: str) -> str:
    """``RUN_DIRECTORY/locks`` (made 0700 if missing), after the run directory's safety checks
    (``dmtools.engine.rundir.check``: ours, written by nobody else). Raises ``DaemonError``."""
    from dmtools.engine import rundir

    return rundir.subdir(os.path.join(rundir.ensure(run_directory), "locks"), 0o700)


@contextlib.contextmanager
def named_lock(directory: str, name: str) -> Iterator[None]:
    """Hold the lock named ``name`` (a file of that name in ``directory``, a checked
    :func:`lock_dir`) while the block runs; waits for the holder.

    The file is opened without following a symlink and must be a regular file of ours with one
    link (nobody else writes in a checked directory; this refuses what slipped in anyway, as
    ``DMError`` EPERM). At release it is removed while still locked.
    """
    import errno

    from dmtools.errors import DMError

    path = os.path.join(directory, name)
    for _ in range(_NAMED_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink > 1:
                raise DMError(f"lock file {path} is not a file of ours", errno=errno.EPERM, operation="lock")
            _wait_lock(fd, 0, 0)
            try:
                now = os.lstat(path)
            except FileNotFoundError:
                continue  # the holder removed it at its release: lock the next one
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                continue
            try:
                yield
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            return
        finally:
            os.close(fd)
    raise DMError(f"lock file {path} kept being replaced", errno=errno.EAGAIN, operation="lock")
