"""dmtools: Linux device-mapper from Python.

Tables and typed targets (``Table``), the ``DeviceMapper`` verbs on the kernel or the embedded
userspace engine (``open``, ``Engine``), endpoints for I/O and loop devices.
"""

from __future__ import annotations

from typing import Any

from dmtools.backend import DeviceEntry, DeviceInfo, DeviceMapper, StatusLine, Versions
from dmtools.backends import open
from dmtools.endpoint import Endpoint, NullEndpoint
from dmtools.errors import (
    CorruptMetadata,
    DeviceBusy,
    DeviceConflict,
    DeviceExists,
    DeviceIOError,
    DeviceNotFound,
    DMError,
    InvalidArgument,
    InvalidName,
    InvalidStatus,
    InvalidTable,
    KernelUnavailable,
    NoSpace,
    SnapshotInvalid,
    TargetNotSupported,
)

__version__ = "0.1.0"

__all__ = [
    "CorruptMetadata",
    "DMError",
    "DeviceBusy",
    "DeviceConflict",
    "DeviceEntry",
    "DeviceExists",
    "DeviceIOError",
    "DeviceInfo",
    "DeviceMapper",
    "DeviceNotFound",
    "Endpoint",
    "Engine",
    "InvalidArgument",
    "InvalidName",
    "InvalidStatus",
    "InvalidTable",
    "KernelUnavailable",
    "NoSpace",
    "NullEndpoint",
    "SnapshotInvalid",
    "StatusLine",
    "Table",
    "TargetNotSupported",
    "Versions",
    "open",
]

_LAZY = {
    "Table": ("dmtools.table", "Table"),
    "Engine": ("dmtools.engine", "Engine"),
}


def __getattr__(name: str) -> Any:
    """Load ``Table`` and ``Engine`` on first use."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dmtools' has no attribute {name!r}")
