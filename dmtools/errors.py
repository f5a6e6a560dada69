"""Errors named for the condition they report.

Every error carries the ``errno`` (when one applies), the ``operation`` that failed (a dmsetup verb
such as ``"create"`` or an I/O operation such as ``"read"``) and the ``device`` it concerned.
"""

from __future__ import annotations

import errno as _errno


class DMError(Exception):
    """Base class of every error raised by dmtools."""

    default_errno: int | None = None

    def __init__(
        self,
        message: str,
        *,
        errno: int | None = None,
        operation: str | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno if errno is not None else self.default_errno
        self.operation = operation
        self.device = device

    def __str__(self) -> str:
        parts = []
        if self.operation:
            parts.append(self.operation)
        if self.device:
            parts.append(self.device)
        prefix = " ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


class KernelUnavailable(DMError):
    """Kernel device-mapper (``/dev/mapper/control``) or libdevmapper cannot be used."""

    default_errno = _errno.ENODEV


class DeviceNotFound(DMError):
    """The named device does not exist."""

    default_errno = _errno.ENXIO


class DeviceExists(DMError):
    """A device with this name or uuid already exists."""

    default_errno = _errno.EEXIST


class DeviceBusy(DMError):
    """The device is open or otherwise in use."""

    default_errno = _errno.EBUSY


class InvalidTable(DMError):
    """A table (or its text) was rejected; the message carries the reason."""

    default_errno = _errno.EINVAL


class TargetNotSupported(InvalidTable):
    """The table names a target type this backend does not provide."""


class InvalidName(DMError):
    """A device name or uuid breaks the kernel's rules."""

    default_errno = _errno.EINVAL


class InvalidArgument(DMError):
    """A size, unit, region or option given by the caller is not acceptable."""

    default_errno = _errno.EINVAL


class DeviceConflict(InvalidArgument):
    """Two roles of one request name the same bytes (``dmtools.identity.ensure_disjoint``).

    EINVAL, not EBUSY: the request contradicts itself (a COW that is also the origin, a log that
    is also a leg); nothing else holds the device. ``DeviceBusy`` is for a device another user
    holds (a mount, an exclusive opener, another engine's table).
    """


class InvalidStatus(DMError):
    """A status line could not be parsed."""

    default_errno = _errno.EINVAL


class DeviceIOError(DMError):
    """An I/O error on a device or endpoint."""

    default_errno = _errno.EIO


class NoSpace(DeviceIOError):
    """The device or COW area is full."""

    default_errno = _errno.ENOSPC


class CorruptMetadata(DMError):
    """On-disk metadata (COW header, mirror log) is corrupt or of an unknown version."""

    default_errno = _errno.EINVAL


class SnapshotInvalid(DMError):
    """The snapshot has been invalidated (COW full or an I/O error)."""

    default_errno = _errno.EIO


class PoolNotWritable(DMError):
    """A thin pool refused a change: it is read-only, out of metadata space or failed (dm-thin.c
    ``pool_message``: ``-EOPNOTSUPP``), or it needs a check."""

    default_errno = _errno.EOPNOTSUPP


class OperationCancelled(DMError):
    """A long operation was cancelled by its caller."""

    default_errno = _errno.ECANCELED


class DaemonError(DMError):
    """The userspace engine's daemon could not be reached or refused a request."""

    default_errno = _errno.ECONNREFUSED


class LoopError(DMError):
    """A loop-device operation failed."""


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


def from_errno(
    err: int, message: str, *, operation: str | None = None, device: str | None = None
) -> DMError:
    """Build the error class that fits ``err`` (``DMError`` when none is specific)."""
    cls = ERRNO_CLASSES.get(err, DMError)
    return cls(message, errno=err, operation=operation, device=device)
