"""The userspace target interface: what ``snapshot/``, ``mirror/`` and the built-in targets implement.

A target maps one contiguous range of an engine device (``start``/``length`` in 512-byte sectors)
the way a kernel ``struct target_type`` does (``include/linux/device-mapper.h``):

- **build**: ``TargetDriver.build(ctx, start, length, value)`` (the kernel's ``ctr``) is what the
  engine calls, with the line's typed value from :mod:`dmtools.target_values`: the text was parsed
  and checked once, by ``Table.parse``, which raises the kernel's ``ti->error`` words for bad
  arguments. A built-in target (``linear``, ``snapshot``, ``mirror``...) reads its value and never
  parses strings; it opens the devices the value names through ``ctx.get_device``
  (``dm_get_device``) and raises ``InvalidTable`` only for what needs the context (a device that
  cannot be opened, one too small). Nothing it opened stays open when it raises: the engine
  releases every device the target opened.
- **third-party targets** (registered under the ``dmtools.targets`` entry-point group or with
  ``Engine.register_target``) have no value type of their own: ``Table.parse`` gives them a
  ``GenericTarget`` whose text is kept verbatim, and the default ``build`` hands its arguments
  (split by the kernel's ``dm_split_args``) to ``construct(ctx, start, length, args)``.
- **I/O**: ``read(buf, offset)`` fills all of ``buf``; ``write(buf, offset)`` writes all of it.
  ``offset`` is in **bytes relative to the target's start** and the range never crosses the
  target's end. A failed I/O raises ``DeviceIOError`` (or ``OSError``). ``flush`` makes completed
  writes durable; ``discard`` drops a range (``zero`` writes zeros).
- **text**: ``status()`` returns the kernel's STATUSTYPE_INFO text and ``ima_status()`` the
  STATUSTYPE_IMA text (``dmsetup measure``; ``ima_prefix()`` builds its
  ``target_name=…,target_version=…`` head). The STATUSTYPE_TABLE line is the typed value printed
  by ``str(table)``, each device shown as the kernel shows it (``major:minor``,
  ``DeviceHandle.name``): ``table_value(value)`` is the value the target was built from, unless
  the target prints something else (``table_params()``, text of its own, as a third-party
  target does).
- **control**: ``message(args)`` answers a target message (``None`` when it has no answer; raise
  ``InvalidArgument`` for a message it does not understand). ``presuspend``/``postsuspend`` run
  around a suspend (in-flight I/O drained in between), ``preresume`` may refuse a resume by
  raising, ``resume`` runs once the table is live again, ``destroy`` (the kernel's ``dtr``) runs when
  the table is dropped; the engine then closes the devices the target opened.
- **events**: ``ctx.event()`` is ``dm_table_event``: it bumps the device's event number and wakes
  ``wait_event`` callers.

Register a target type under the ``dmtools.targets`` entry-point group (name → ``module:Class``);
the engine loads it by the name used in tables, as the kernel loads ``dm-<name>`` on demand.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, Sequence, TypeVar

from dmtools.endpoint import Endpoint, ForwardingEndpoint
from dmtools.errors import InvalidArgument, InvalidTable
from dmtools.units import SECTOR

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.engine.passthrough import Passthrough
    from dmtools.target_values import Target as TargetValue

_T = TypeVar("_T")

#: A shared read-only buffer of zeros (1 MiB) for zero-filling without allocating.
ZEROS = bytes(1 << 20)


def fill_zero(buf: memoryview) -> None:
    """Zero ``buf`` in place."""
    zeros = memoryview(ZEROS)
    for pos in range(0, len(buf), len(ZEROS)):
        n = min(len(ZEROS), len(buf) - pos)
        buf[pos : pos + n] = zeros[:n]


class DeviceHandle(ForwardingEndpoint):
    """A device a target opened through ``ctx.get_device`` (the kernel's ``struct dm_dev``).

    I/O is in bytes from the start of the underlying device. ``name`` is what the kernel prints in
    tables and status lines: ``major:minor`` for block devices and engine devices, the path for a
    regular file (which has no device number). It is the device as a value names it: text made
    from it is escaped by the value's formatter (``dmtools.target_values.format_args``).
    """

    def __init__(self, inner: Endpoint, name: str, major: int, minor: int, path: str) -> None:
        super().__init__(inner, name)
        self.major = major
        self.minor = minor
        self.path = path

    @property
    def devno(self) -> tuple[int, int] | None:
        """``(major, minor)`` or ``None`` for a regular file."""
        return None if self.major < 0 else (self.major, self.minor)

    @property
    def sectors(self) -> int:
        """Size in 512-byte sectors (rounded down)."""
        return self.inner.size // SECTOR

    def splice_to(self, pipe: int, offset: int, length: int) -> None:
        self.inner.splice_to(pipe, offset, length)

    def write_durable(self, buf: Any, offset: int) -> int:
        """The device's own durable write (one FUA write on an NBD export that offers it)."""
        return self.inner.write_durable(buf, offset)

    def close(self) -> None:
        """Handles are closed by the engine when the table that opened them is destroyed."""

    def __repr__(self) -> str:
        return f"DeviceHandle({self.name!r}, path={self.path!r})"


class TargetContext(Protocol):
    """What the engine gives a target (``ti->table`` and ``dm_get_device`` in the kernel)."""

    @property
    def device_name(self) -> str:
        """Name of the mapped device the table belongs to."""

    @property
    def readonly(self) -> bool:
        """True when the table was loaded read-only (devices open read-only)."""

    @property
    def noflush_suspending(self) -> bool:
        """True during a ``noflush`` suspend (``dm_noflush_suspending``)."""

    @property
    def suspended(self) -> bool:
        """True while the device holding the table is suspended (``dm_suspended``)."""

    @property
    def device(self) -> Any:
        """The mapped device the table belongs to (``dm_table_get_md``): an identity for state
        kept per mapped device, such as dm-thin's pool object."""

    def get_device(self, ref: str, *, writable: bool | None = None) -> DeviceHandle:
        """Open a device named in the table (path or ``major:minor``); raises ``InvalidTable``."""

    def event(self) -> None:
        """Raise a device event (``dm_table_event``)."""

    def target_state(self, key: str, factory: Callable[[], _T]) -> _T:
        """The engine's state for target module ``key`` (its globals), ``factory()`` on first use."""


class TargetDriver(abc.ABC):
    """Base class of every userspace target; see the module docstring for the contract."""

    #: the target type name used in tables (``"linear"``).
    name: ClassVar[str] = ""
    #: the version ``targets()`` reports (the kernel's ``target_type.version``).
    version: ClassVar[tuple[int, int, int]] = (0, 0, 0)
    #: the typed table value the target is built from (``Linear``...); ``None`` for a third-party
    #: target, which is built from a ``GenericTarget``'s arguments by :meth:`construct`.
    value_type: ClassVar[type[TargetValue] | None] = None

    def __init__(self, ctx: TargetContext, start: int, length: int, args: Sequence[str] = ()) -> None:
        self.ctx = ctx
        self.start = start
        self.length = length
        self.args = list(args)
        #: devices this target opened, in table order (``iterate_devices``); filled by subclasses.
        self.devices: list[DeviceHandle] = []
        #: ``(device, start, length)`` areas the target maps, checked at resume (``check_area``).
        self.areas: list[tuple[DeviceHandle, int, int]] = []

    @classmethod
    def construct(cls, ctx: TargetContext, start: int, length: int, args: Sequence[str]) -> "TargetDriver":
        """Build the target from its table arguments (the kernel's ``ctr``)."""
        return cls(ctx, start, length, args)

    @classmethod
    def build(cls, ctx: TargetContext, start: int, length: int, value: "TargetValue") -> "TargetDriver":
        """Build the runtime target for the typed table value ``value`` (what the engine calls).

        A target with a :attr:`value_type` is constructed from ``value`` itself (checked to be of
        that type); one without (third-party, given a ``GenericTarget``) gets the value's
        arguments through :meth:`construct`.
        """
        if cls.value_type is None:
            return cls.construct(ctx, start, length, value.args())
        make: Callable[..., TargetDriver] = cls
        return make(ctx, start, length, expect(value, cls.value_type))

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self.length * SECTOR

    # --- I/O ------------------------------------------------------------------------------
    #: True when the target puts the bytes it reads into a pipe itself (:meth:`read_to`,
    #: ``splice(2)`` where its devices have a file descriptor) and never hands an I/O back with
    #: ``RequeueIO``: the exposure's FUSE read replies then carry them without a buffer in Python.
    pipe_io: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass that changes read (a test target failing on demand) but not the pipe path
        # would be bypassed by it: it reads through read only.
        if "pipe_io" not in cls.__dict__ and "read" in cls.__dict__:
            cls.pipe_io = False

    def read_to(self, pipe: int, offset: int, length: int) -> None:
        """Put the ``length`` bytes at ``offset`` into the pipe ``pipe`` (only if ``pipe_io``)."""
        raise NotImplementedError(f"{self.name} does not move bytes into pipes")

    @abc.abstractmethod
    def read(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the data at ``offset`` bytes from the target's start."""

    @abc.abstractmethod
    def write(self, buf: memoryview, offset: int) -> None:
        """Write ``buf`` at ``offset`` bytes from the target's start."""

    def flush(self) -> None:
        """Make completed writes durable on every device (a PREFLUSH to each)."""
        for dev in self.devices:
            dev.flush()

    def write_durable(self, buf: memoryview, offset: int) -> None:
        """Write ``buf`` at ``offset``, durable on return (a bio with ``REQ_FUA``): here a write and
        then a flush of every device; a target that passes FUA down (``linear``) overrides it."""
        self.write(buf, offset)
        self.flush()

    def discard(self, offset: int, length: int) -> None:
        """Discard ``length`` bytes at ``offset``; the default does nothing (discard is a hint)."""

    def zero(self, offset: int, length: int) -> None:
        """Write zeros (REQ_OP_WRITE_ZEROES); the default writes from a shared zero buffer."""
        zeros = memoryview(ZEROS)
        for pos in range(offset, offset + length, len(ZEROS)):
            self.write(zeros[: min(len(ZEROS), offset + length - pos)], pos)

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        """Ranges (target-relative bytes) that may hold data, or ``None`` when unknown."""
        return None

    def passthrough(self) -> "Passthrough | None":
        """What the exposure's C data path may pass this target's requests onto itself (a
        ``snapshot-origin``: :mod:`dmtools.engine.passthrough`); ``None``, the default, leaves
        them to ``read`` and ``write``. Asked when the exposure installs the live table's map."""
        return None

    # --- text -----------------------------------------------------------------------------
    def status(self) -> str:
        """STATUSTYPE_INFO text; empty for targets without a status function."""
        return ""

    def table_value(self, value: "TargetValue") -> "TargetValue":
        """What the kernel prints back for this target (STATUSTYPE_TABLE), as a value.

        ``value`` is the value the target was built from; the engine shows each device it names
        as the kernel does (``major:minor``). The default is ``value`` itself, or, for a target
        that prints its own text (:meth:`table_params`), that text parsed.
        """
        params = self.table_params()
        if params is None:
            return value
        from dmtools.target_values import Target

        return Target.parse(value.target_type, params)

    def table_params(self) -> str | None:
        """STATUSTYPE_TABLE text of its own, devices as ``major:minor``; ``None`` (the default)
        prints the value the target was built from (see :meth:`table_value`)."""
        return None

    def ima_status(self) -> str:
        """STATUSTYPE_IMA text: what the kernel measures into IMA and ``dmsetup measure`` prints.

        The default is empty, which is what the kernel returns for a target type without a status
        function (``retrieve_status`` in ``drivers/md/dm-ioctl.c``, e.g. ``zero`` and ``error``)
        and what most targets with one emit for STATUSTYPE_IMA. Targets that measure themselves
        return ``ima_prefix()`` followed by ``,key=value`` pairs and a closing ``;``, as their
        kernel counterpart formats them.
        """
        return ""

    def ima_prefix(self) -> str:
        """``target_name=NAME,target_version=X.Y.Z``: the kernel's ``DMEMIT_TARGET_NAME_VERSION``
        (``include/linux/device-mapper.h``), from this class's ``name`` and ``version``."""
        major, minor, patch = self.version
        return f"target_name={self.name},target_version={major}.{minor}.{patch}"

    # --- control --------------------------------------------------------------------------
    def message(self, args: Sequence[str]) -> str | None:
        """Handle a target message; targets without messages refuse them as the kernel does."""
        raise InvalidArgument(f"target {self.name} does not handle messages", operation="message")

    def presuspend(self) -> None:
        """Called before in-flight I/O is drained on suspend."""

    def presuspend_undo(self) -> None:
        """Called when a suspend is abandoned after ``presuspend``."""

    def postsuspend(self) -> None:
        """Called once the device is quiet."""

    def preresume(self) -> None:
        """Called before the table goes live; raise to refuse the resume."""

    def resume(self) -> None:
        """Called once the table is live again."""

    def destroy(self) -> None:
        """Release target resources (the engine closes the devices afterwards)."""

    # --- helpers for subclasses -----------------------------------------------------------
    def open_device(self, ref: str, error: str = "Device lookup failed") -> DeviceHandle:
        """Open ``ref`` through ``ctx.get_device`` and add it to :attr:`devices`.

        A device that cannot be opened raises ``InvalidTable`` with the kernel's ``ti->error``
        words ``error`` (what the target's ``ctr`` says when ``dm_get_device`` fails) followed by
        the reason; ``DeviceBusy`` (claimed elsewhere) passes through.
        """
        try:
            handle = self.ctx.get_device(ref)
        except InvalidTable as err:
            raise self.fail(f"{error}: {err.message}") from err
        self.devices.append(handle)
        return handle

    def fail(self, message: str) -> InvalidTable:
        """An ``InvalidTable`` carrying the kernel-style ``ti->error`` text for this target."""
        return InvalidTable(f"{self.name}: {message}", operation="load", device=self.ctx.device_name)

    def check_area(self, dev: DeviceHandle, start: int, length: int) -> None:
        """Declare that this target maps ``length`` sectors of ``dev`` from ``start``.

        The engine validates declared areas when the table goes live (at ``resume``), as the
        kernel does in ``dm_calculate_queue_limits``/``device_area_is_invalid`` (dm-table.c): an
        area past the end of its device, or not aligned to its logical block size, fails the
        resume, not the load.
        """
        self.areas.append((dev, start, length))

    def area_errors(self) -> list[str]:
        """What is wrong with the declared areas (empty when they fit their devices)."""
        out = []
        for dev, start, length in self.areas:
            size = dev.sectors
            if not size:
                continue
            if start >= size or start + length > size:
                out.append(f"{dev.name} too small for target: start={start}, len={length}, "
                           f"dev_size={size}")
                continue
            lbs = max(1, dev.logical_block_size // SECTOR)
            if lbs > 1 and start % lbs:
                out.append(f"start={start} not aligned to h/w logical block size "
                           f"{dev.logical_block_size} of {dev.name}")
            elif lbs > 1 and length % lbs:
                out.append(f"len={length} not aligned to h/w logical block size "
                           f"{dev.logical_block_size} of {dev.name}")
        return out


_V = TypeVar("_V", bound="TargetValue")


def expect(value: "TargetValue", value_type: type[_V]) -> _V:
    """``value`` as a ``value_type``; ``InvalidTable`` when a target type was registered under a
    name whose table values are of another type."""
    if not isinstance(value, value_type):
        raise InvalidTable(f"{value.target_type}: expected a {value_type.__name__} value, "
                           f"not {type(value).__name__}", operation="load")
    return value

