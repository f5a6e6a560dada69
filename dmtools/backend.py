"""The ``DeviceMapper`` interface: dmsetup's verbs, implemented by the kernel and userspace backends.

This module imports no implementation; :mod:`dmtools.backends` chooses and opens one.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dmtools.closing import Closing

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.endpoint import Endpoint
    from dmtools.table import Table


@dataclass(frozen=True)
class DeviceInfo:
    """What ``dmsetup info`` reports for one device (the kernel's ``struct dm_info`` plus identity)."""

    name: str
    uuid: str = ""
    exists: bool = True
    suspended: bool = False
    live_table: bool = False
    inactive_table: bool = False
    open_count: int = 0
    event_nr: int = 0
    major: int = 0
    minor: int = 0
    read_only: bool = False
    target_count: int = 0
    deferred_remove: bool = False
    internal_suspend: bool = False

    @property
    def state(self) -> str:
        """``ACTIVE`` or ``SUSPENDED``, as dmsetup prints it."""
        return "SUSPENDED" if self.suspended else "ACTIVE"

    @property
    def devno(self) -> str:
        """``major:minor``."""
        return f"{self.major}:{self.minor}"


@dataclass(frozen=True)
class DeviceEntry:
    """One row of ``list``: name, device number, event number and uuid."""

    name: str
    major: int
    minor: int
    event_nr: int = 0
    uuid: str = ""


@dataclass(frozen=True)
class StatusLine:
    """One target's status: ``start length target_type params`` as ``dmsetup status`` prints it."""

    start: int
    length: int
    target_type: str
    params: str

    def __str__(self) -> str:
        return f"{self.start} {self.length} {self.target_type}" + (f" {self.params}" if self.params else "")

    def dmsetup_text(self) -> str:
        """The line exactly as ``dmsetup status`` prints it (``"%llu %llu %s %s\\n"``)."""
        return f"{self.start} {self.length} {self.target_type} {self.params}\n"


@dataclass(frozen=True)
class Versions:
    """Library and driver versions (``dmsetup version``)."""

    library: str
    driver: str
    backend: str = ""


@dataclass
class Event:
    """A device event number returned by ``wait_event``."""

    name: str
    event_nr: int
    extra: dict[str, str] = field(default_factory=dict)


class DeviceMapper(Closing, abc.ABC):
    """dmsetup's verbs with the kernel's semantics.

    A device is created empty or with a table; ``load`` fills the inactive slot; ``resume`` swaps it
    live; a suspended device queues I/O; ``remove`` refuses an open device.
    """

    #: ``"kernel"`` or ``"userspace"``.
    backend: str = ""

    @abc.abstractmethod
    def create(self, name: str, table: "Table | str | None" = None, *, uuid: str = "",
               readonly: bool = False) -> DeviceInfo:
        """Create a device, empty or with a live table (create → load → resume, rolled back on failure)."""

    @abc.abstractmethod
    def load(self, name: str, table: "Table | str", *, readonly: bool = False) -> None:
        """Load ``table`` into the inactive slot of ``name``."""

    @abc.abstractmethod
    def suspend(self, name: str, *, noflush: bool = False) -> None:
        """Suspend ``name``: new I/O is held until ``resume``."""

    @abc.abstractmethod
    def resume(self, name: str) -> None:
        """Resume ``name``, swapping in the inactive table if one is loaded."""

    @abc.abstractmethod
    def remove(self, name: str, *, retry: bool = False, deferred: bool = False) -> None:
        """Remove ``name``; raises ``DeviceBusy`` when it is open (unless ``deferred``)."""

    @abc.abstractmethod
    def clear(self, name: str) -> None:
        """Drop the inactive table of ``name``."""

    @abc.abstractmethod
    def rename(self, name: str, new_name: str) -> None:
        """Rename a device."""

    @abc.abstractmethod
    def info(self, name: str, *, open_count: bool = True) -> DeviceInfo:
        """Return ``DeviceInfo``; raises ``DeviceNotFound`` when absent.

        ``open_count=False`` lets a backend whose count costs work leave it out (``-1``): the
        userspace engine counts the openers of an exposed device by opening it ``O_EXCL`` for a
        moment and scanning every process's file descriptors, which a watcher that never reads
        the count must not do twice a second (a user's own exclusive open, ``mount`` or ``mkfs``,
        could meet that moment and fail with EBUSY). The kernel always reports the count."""

    @abc.abstractmethod
    def table(self, name: str, *, inactive: bool = False) -> "Table":
        """Return the live (or inactive) table with devices as ``major:minor``."""

    @abc.abstractmethod
    def status(self, name: str, *, inactive: bool = False) -> list[StatusLine]:
        """Return each target's status line."""

    def measure(self, name: str, *, inactive: bool = False) -> list[StatusLine]:
        """Return each target's IMA measurement text (``dmsetup measure``, STATUSTYPE_IMA).

        Lines have the shape of ``status``'s; ``params`` holds what the kernel measures into IMA
        for the target: for most types ``target_name=…,target_version=…`` and ``,key=value``
        pairs ending in ``;``, empty for types that measure nothing (``zero``, ``error``).
        ``inactive`` measures the inactive table. Raises ``DeviceNotFound``; a backend that
        cannot measure raises ``TargetNotSupported`` (this default does).
        """
        from dmtools.errors import TargetNotSupported

        raise TargetNotSupported(
            f"{type(self).__name__} cannot report IMA measurements", operation="measure", device=name
        )

    @abc.abstractmethod
    def message(self, name: str, sector: int, message: str) -> str | None:
        """Send a target message; return the response text if the target gave one."""

    @abc.abstractmethod
    def deps(self, name: str) -> list[tuple[int, int]]:
        """Return the ``(major, minor)`` of every device the live table uses."""

    @abc.abstractmethod
    def list(self) -> list[DeviceEntry]:
        """List every device."""

    @abc.abstractmethod
    def targets(self) -> dict[str, tuple[int, int, int]]:
        """Return target type → version."""

    @abc.abstractmethod
    def version(self) -> Versions:
        """Return library and driver versions."""

    @abc.abstractmethod
    def wait_event(self, name: str, event_nr: int = 0, timeout: float | None = None) -> int:
        """Wait until the device's event number exceeds ``event_nr``; return the new number."""

    @abc.abstractmethod
    def device_path(self, name: str) -> str:
        """Path of the block device node for ``name`` (``/dev/mapper/NAME`` on the kernel)."""

    @abc.abstractmethod
    def device_ref(self, name: str) -> str:
        """How to name device ``name`` inside another table of this backend."""

    @abc.abstractmethod
    def open_endpoint(self, name: str, *, writable: bool = True) -> "Endpoint":
        """Open ``name`` for I/O as an endpoint (for kcopyd and the managers)."""

    def exists(self, name: str) -> bool:
        """True when a device called ``name`` exists."""
        from dmtools.errors import DeviceNotFound

        try:
            return self.info(name).exists
        except DeviceNotFound:
            return False

    def close(self) -> None:
        """Release the backend's resources."""


#: How long a removal waits for passing openers to close a device (udev's blkid probe after the
#: change event that closing a written device raises, a scanner): libdm's dm_task_retry_remove
#: tries DM_IOCTL_RETRIES (25) times DM_RETRY_USLEEP_DELAY (200 ms) apart (libdm-iface.c).
REMOVE_WAIT = 5.0


def wait_closed(dm: DeviceMapper, name: str, timeout: float | None = None) -> int:
    """Wait up to ``timeout`` seconds (default :data:`REMOVE_WAIT`) for ``name``'s open count to
    reach 0.

    Polls the count (from 10 ms, doubling to 100 ms) rather than sleeping blindly, so a probe
    that ends at once costs milliseconds. Returns the last count seen: 0 when the device is
    closed, else the openers still holding it when the time ran out.
    """
    deadline = time.monotonic() + (REMOVE_WAIT if timeout is None else timeout)
    delay = 0.01
    while True:
        count = dm.info(name).open_count
        left = deadline - time.monotonic()
        if count == 0 or left <= 0:
            return count
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.1)
