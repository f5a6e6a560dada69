"""dmtools: Linux device-mapper from Python.

Tables and typed targets (``Table``), the ``DeviceMapper`` verbs on the kernel or the embedded
userspace engine (``open``, ``Engine``), endpoints for I/O and loop devices.
"""

from __future__ import annotations

from dmtools import lazy
from dmtools.errors import (CorruptMetadata, DeviceBusy, DeviceConflict, DeviceExists, DeviceIOError, DeviceNotFound,
                            DMError, InvalidArgument, InvalidName, InvalidStatus, InvalidTable, KernelUnavailable,
                            NoSpace, SnapshotInvalid, TargetNotSupported)
from dmtools.version import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)

if TYPE_CHECKING:  # pragma: no cover - loaded on first use, see __getattr__
    from dmtools.backend import DeviceEntry, DeviceInfo, DeviceMapper, StatusLine, Versions
    from dmtools.backends import open
    from dmtools.endpoint import Endpoint, NullEndpoint
    from dmtools.engine import Engine
    from dmtools.table import Table

#: Loaded on first use, so that ``import dmtools`` (and the CLI's start) costs only the errors.
__getattr__, _LAZY = lazy.package(__name__, {
    "dmtools.backend": "DeviceEntry DeviceInfo DeviceMapper StatusLine Versions",
    "dmtools.backends": "open",
    "dmtools.endpoint": "Endpoint NullEndpoint",
    "dmtools.engine": "Engine",
    "dmtools.table": "Table",
})
#: the errors imported above, and the names loaded on first use
__all__ = sorted([n for n, v in list(globals().items()) if isinstance(v, type) and issubclass(v, DMError)] + _LAZY)
