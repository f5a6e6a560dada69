"""Errors named for the condition they report.

Every error carries the ``errno`` (when one applies), the ``operation`` that failed (a dmsetup verb
such as ``"create"`` or an I/O operation such as ``"read"``) and the ``device`` it concerned.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable


class DMError(Exception):
    """Base class of every error raised by dmtools."""

    default_errno: int | None = None

    def __init_subclass__(cls, errno: int | None = None, **kwargs: object) -> None:
        """``class X(DMError, errno=E)`` gives ``X`` the errno it carries when none is passed."""
        super().__init_subclass__(**kwargs)
        if errno is not None:
            cls.default_errno = errno

    def __init__(self, message: str, *, errno: int | None = None, operation: str | None = None,
                 device: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno if errno is not None else self.default_errno
        self.operation = operation
        self.device = device

    def __str__(self) -> str:
        prefix = " ".join(p for p in (self.operation, self.device) if p)
        return f"{prefix}: {self.message}" if prefix else self.message


class KernelUnavailable(DMError, errno=_errno.ENODEV):
    """Kernel device-mapper (``/dev/mapper/control``) or libdevmapper cannot be used."""


class DeviceNotFound(DMError, errno=_errno.ENXIO):
    """The named device does not exist."""


class DeviceExists(DMError, errno=_errno.EEXIST):
    """A device with this name or uuid already exists."""


class DeviceBusy(DMError, errno=_errno.EBUSY):
    """The device is open or otherwise in use."""


class InvalidTable(DMError, errno=_errno.EINVAL):
    """A table (or its text) was rejected; the message carries the reason."""


class TargetNotSupported(InvalidTable):
    """The table names a target type this backend does not provide."""


class InvalidName(DMError, errno=_errno.EINVAL):
    """A device name or uuid breaks the kernel's rules."""


class InvalidArgument(DMError, errno=_errno.EINVAL):
    """A size, unit, region or option given by the caller is not acceptable."""


class DeviceConflict(InvalidArgument):
    """Two roles of one request name the same bytes (``dmtools.identity.ensure_disjoint``).

    EINVAL, not EBUSY: the request contradicts itself (a COW that is also the origin, a log that
    is also a leg); nothing else holds the device. ``DeviceBusy`` is for a device another user
    holds (a mount, an exclusive opener, another engine's table).
    """


class InvalidStatus(DMError, errno=_errno.EINVAL):
    """A status line could not be parsed."""


class DeviceIOError(DMError, errno=_errno.EIO):
    """An I/O error on a device or endpoint."""


class NoSpace(DeviceIOError, errno=_errno.ENOSPC):
    """The device or COW area is full."""


class CorruptMetadata(DMError, errno=_errno.EINVAL):
    """On-disk metadata (COW header, mirror log) is corrupt or of an unknown version."""


class SnapshotInvalid(DMError, errno=_errno.EIO):
    """The snapshot has been invalidated (COW full or an I/O error)."""


class PoolNotWritable(DMError, errno=_errno.EOPNOTSUPP):
    """A thin pool refused a change: it is read-only, out of metadata space or failed (dm-thin.c
    ``pool_message``: ``-EOPNOTSUPP``), or it needs a check."""


class OperationCancelled(DMError, errno=_errno.ECANCELED):
    """A long operation was cancelled by its caller."""


class DaemonError(DMError, errno=_errno.ECONNREFUSED):
    """The userspace engine's daemon could not be reached or refused a request."""


class LoopError(DMError):
    """A loop-device operation failed."""


def quietly(*steps: Callable[[], object],
            errors: type[BaseException] | tuple[type[BaseException], ...] = DMError) -> None:
    """Run undo or release steps, each even if an earlier one failed: what they raise of ``errors``
    (``DMError`` unless told) is dropped, as the caller re-raises the error that made it undo, or
    must release everything whatever fails."""
    for step in steps:
        try:
            step()
        except errors:
            pass


# errno → error class used when a device-mapper verb fails with a bare errno.
ERRNO_CLASSES: dict[int, type[DMError]] = {
    _errno.ENXIO: DeviceNotFound,
    _errno.ENODEV: DeviceNotFound,
    _errno.EEXIST: DeviceExists,
    _errno.EBUSY: DeviceBusy,
    _errno.EINVAL: InvalidTable,
    _errno.EIO: DeviceIOError,
    _errno.ENOSPC: NoSpace,
}


def from_errno(err: int, message: str, *, operation: str | None = None, device: str | None = None) -> DMError:
    """Build the error class that fits ``err`` (``DMError`` when none is specific)."""
    cls = ERRNO_CLASSES.get(err, DMError)
    return cls(message, errno=err, operation=operation, device=device)
