"""dmtools: Linux device-mapper from Python.

Tables and typed targets (``Table``), the ``DeviceMapper`` verbs on the kernel or the embedded
userspace engine (``open``, ``Engine``), endpoints for I/O and loop devices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dmtools import lazy
from dmtools.errors import (
    CorruptMetadata, DeviceBusy, DeviceConflict, DeviceExists, DeviceIOError, DeviceNotFound, DMError, InvalidArgument,
    InvalidName, InvalidStatus, InvalidTable, KernelUnavailable, NoSpace, SnapshotInvalid, TargetNotSupported,
)
from dmtools.version import __version__

if TYPE_CHECKING:  # pragma: no cover - loaded on first use, see __getattr__
    from dmtools.backend import DeviceEntry, DeviceInfo, DeviceMapper, StatusLine, Versions
    from dmtools.backends import open
    from dmtools.endpoint import Endpoint, NullEndpoint
    from dmtools.engine import Engine
    from dmtools.table import Table


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

#: Loaded on first use, so that ``import dmtools`` (and the CLI's start) costs only the errors.
__getattr__ = lazy.exports(
    __name__,
    {
        "DeviceEntry": "dmtools.backend:DeviceEntry",
        "DeviceInfo": "dmtools.backend:DeviceInfo",
        "DeviceMapper": "dmtools.backend:DeviceMapper",
        "StatusLine": "dmtools.backend:StatusLine",
        "Versions": "dmtools.backend:Versions",
        "open": "dmtools.backends:open",
        "Endpoint": "dmtools.endpoint:Endpoint",
        "NullEndpoint": "dmtools.endpoint:NullEndpoint",
        "Engine": "dmtools.engine:Engine",
        "Table": "dmtools.table:Table",
    },
)
