"""Choosing and opening a ``DeviceMapper`` implementation: the kernel's or the userspace engine.

Kept apart from :mod:`dmtools.backend` (the interface) so that the interface imports no
implementation; each implementation is imported only when it is opened.
"""

from __future__ import annotations

import os

from dmtools.backend import DeviceMapper
from dmtools.linux import CONTROL_PATH

__all__ = ["kernel_available", "open"]


def kernel_available() -> bool:
    """True when ``/dev/mapper/control`` exists and can be opened."""
    try:
        fd = os.open(CONTROL_PATH, os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def open(backend: str = "auto") -> DeviceMapper:  # noqa: A001 - the public name is dmtools.open
    """Return a ``DeviceMapper``: ``"kernel"``, ``"userspace"`` or ``"auto"`` (kernel where it works)."""
    if backend == "auto":
        backend = "kernel" if kernel_available() else "userspace"
    if backend == "kernel":
        from dmtools.kernel import KernelBackend

        return KernelBackend()
    if backend == "userspace":
        from dmtools.engine.client import open_userspace

        return open_userspace()
    from dmtools.errors import InvalidArgument

    raise InvalidArgument(f"unknown backend {backend!r} (auto, kernel or userspace)", operation="open")
