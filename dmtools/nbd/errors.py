"""Errors of the NBD client: the library is missing, or the server cannot be reached."""

from __future__ import annotations

import errno as _errno

from dmtools.errors import DMError

__all__ = ["NbdUnavailable", "NbdConnectionError"]


class NbdUnavailable(DMError):
    """libnbd's Python bindings (Debian package ``python3-libnbd``) cannot be imported."""

    default_errno = _errno.ENOSYS


class NbdConnectionError(DMError):
    """The NBD server could not be reached, refused the export, or the handshake failed."""

    default_errno = _errno.ENOTCONN
