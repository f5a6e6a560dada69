"""``DeviceEndpoint``: an engine device as an ``Endpoint``, for kcopyd, the managers and tables.

An open endpoint counts in the device's open count (``remove`` refuses the device until it is
closed), like an open of ``/dev/mapper/NAME`` does in the kernel.
"""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING, Any

from dmtools.endpoint import Endpoint
from dmtools.errors import DeviceIOError

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.claims import Claim
    from dmtools.engine.device import Device


class DeviceEndpoint(Endpoint):
    """Byte-addressed I/O on an engine device, through its live table and suspend gate."""

    device: "Device"

    def __init__(self, device: "Device", *, writable: bool = True) -> None:
        device.acquire()
        self.device = device
        self.name = device.name
        self._writable = writable
        self._closed = False
        self._lock = threading.Lock()
        #: the claim on the device's exposed block device held for a table using it (``resolve``).
        self.claim: "Claim | None" = None

    @property
    def size(self) -> int:
        return self.device.size

    @property
    def read_only(self) -> bool:
        return not self._writable or self.device.read_only

    def _check(self, operation: str) -> None:
        if self._closed:
            raise DeviceIOError("endpoint is closed", errno=errno.EBADF, operation=operation, device=self.name)

    def readinto(self, buf: Any, offset: int) -> int:
        self._check("read")
        return self.device.read(buf, offset)

    def write(self, buf: Any, offset: int) -> int:
        self._check("write")
        if not self._writable:
            raise DeviceIOError("endpoint is read-only", errno=errno.EBADF, operation="write", device=self.name)
        return self.device.write(buf, offset)

    def write_durable(self, buf: Any, offset: int) -> int:
        """A write with ``REQ_FUA`` through the device's table (one FUA write on an NBD export)."""
        self._check("write")
        if not self._writable:
            raise DeviceIOError("endpoint is read-only", errno=errno.EBADF, operation="write", device=self.name)
        return self.device.write(buf, offset, durable=True)

    def flush(self) -> None:
        self._check("flush")
        self.device.flush()

    def zero(self, offset: int, length: int) -> None:
        self._check("zero")
        if not self._writable:
            raise DeviceIOError("endpoint is read-only", errno=errno.EBADF, operation="zero", device=self.name)
        self.device.zero(offset, length)

    def discard(self, offset: int, length: int) -> None:
        self._check("discard")
        self.device.discard(offset, length)

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        self._check("data_extents")
        return self.device.data_extents(offset, length)

    def close(self) -> None:
        """Drop this opener (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.claim is not None:
            self.claim.release()
        self.device.release()

    def __repr__(self) -> str:
        return f"DeviceEndpoint({self.name!r}, writable={self._writable})"
