"""Built-in targets: ``linear``, ``striped``, ``zero`` and ``error``.

Each is built from its typed value (:mod:`dmtools.target_values`), whose parsing already raised
the kernel's argument errors; what is left here needs the context (a device that cannot be
opened). Table, status and IMA text follow the kernel's ``drivers/md/dm-linear.c``,
``dm-stripe.c``, ``dm-zero.c`` and ``dm-target.c`` (io-err); versions are those of Linux 6.16+.
"""

from __future__ import annotations

import errno
from typing import Callable, NamedTuple

from dmtools.endpoint import read_full
from dmtools.engine.target_driver import SECTOR, DeviceHandle, TargetDriver, TargetContext, fill_zero
from dmtools.errors import DeviceIOError
from dmtools.status import StripedStatus
from dmtools.target_values import Error, Linear, Striped, Target


class FileLayout(NamedTuple):
    """How a ``linear`` or ``striped`` target lays its bytes on its devices (the exposure's C
    data path moves them: ``dmtools.engine.fastpath``).

    ``chunk`` bytes go to each leg in turn (0: one leg, no chunks); ``legs`` are the devices with
    the byte offset where the target's area starts on each.
    """

    chunk: int
    legs: tuple[tuple[DeviceHandle, int], ...]


class LinearTarget(TargetDriver):
    """``linear <dev> <offset>``: a contiguous range of one device."""

    name = "linear"
    version = (1, 5, 0)  # dm-linear.c
    value_type = Linear
    pipe_io = True

    def __init__(self, ctx: TargetContext, start: int, length: int, value: Linear) -> None:
        super().__init__(ctx, start, length)
        self.offset = value.offset
        self.dev = self.open_device(value.device)
        self.check_area(self.dev, self.offset, length)
        self._base = self.offset * SECTOR

    def read(self, buf: memoryview, offset: int) -> None:
        read_full(self.dev, buf, self._base + offset)

    def write(self, buf: memoryview, offset: int) -> None:
        self.dev.write(buf, self._base + offset)

    def read_to(self, pipe: int, offset: int, length: int) -> None:
        self.dev.splice_to(pipe, self._base + offset, length)

    def file_layout(self) -> FileLayout:
        """One leg, no chunks: byte ``o`` of the target is byte ``base + o`` of the device."""
        return FileLayout(0, ((self.dev, self._base),))

    def write_durable(self, buf: memoryview, offset: int) -> None:
        # dm-linear remaps a REQ_FUA bio to the one device below, flag kept (drivers/md/dm-linear.c)
        self.dev.write_durable(buf, self._base + offset)

    def discard(self, offset: int, length: int) -> None:
        self.dev.discard(self._base + offset, length)

    def zero(self, offset: int, length: int) -> None:
        self.dev.zero(self._base + offset, length)

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        ext = self.dev.data_extents(self._base + offset, length)
        return None if ext is None else [(o - self._base, n) for o, n in ext]

    def ima_status(self) -> str:
        """``…,device_name=<dev>,start=<offset>;`` (``linear_status``, STATUSTYPE_IMA)."""
        return f"{self.ima_prefix()},device_name={self.dev.name},start={self.offset};"


class StripedTarget(TargetDriver):
    """``striped <#stripes> <chunk_sectors> [<dev> <offset>]...``: chunks round-robin over devices."""

    name = "striped"
    version = (1, 7, 0)  # dm-stripe.c
    value_type = Striped
    pipe_io = True

    def __init__(self, ctx: TargetContext, start: int, length: int, value: Striped) -> None:
        super().__init__(ctx, start, length)
        self.stripes = len(value.stripes)
        self.chunk_sectors = value.chunk_size
        self.width = length // self.stripes
        self.offsets = [leg.offset for leg in value.stripes]
        for leg in value.stripes:
            dev = self.open_device(leg.device, "Couldn't parse stripe destination")
            self.check_area(dev, leg.offset, self.width)
        #: per-stripe I/O error counts (status health letters, ``stripe_end_io``).
        self.errors = [0] * self.stripes
        self._chunk_bytes = self.chunk_sectors * SECTOR

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """Split a byte range into ``(stripe, device_byte_offset, buf_start, n)`` pieces."""
        out = []
        cb = self._chunk_bytes
        pos = 0
        while pos < length:
            here = offset + pos
            chunk, within = divmod(here, cb)
            row, stripe = divmod(chunk, self.stripes)
            n = min(cb - within, length - pos)
            dev_off = self.offsets[stripe] * SECTOR + row * cb + within
            out.append((stripe, dev_off, pos, n))
            pos += n
        return out

    def _io(self, offset: int, length: int, move: Callable[[DeviceHandle, int, int, int], object]) -> None:
        """``move(device, device_offset, buf_start, n)`` for each piece, counting errors per stripe."""
        for stripe, dev_off, pos, n in self._pieces(offset, length):
            try:
                move(self.devices[stripe], dev_off, pos, n)
            except (OSError, DeviceIOError):
                self.errors[stripe] += 1
                if self.errors[stripe] < 15:  # DM_IO_ERROR_THRESHOLD in dm-stripe.c
                    self.ctx.event()
                raise

    def read(self, buf: memoryview, offset: int) -> None:
        self._io(offset, len(buf), lambda dev, off, pos, n: read_full(dev, buf[pos : pos + n], off))

    def write(self, buf: memoryview, offset: int) -> None:
        self._io(offset, len(buf), lambda dev, off, pos, n: dev.write(buf[pos : pos + n], off))

    def read_to(self, pipe: int, offset: int, length: int) -> None:
        self._io(offset, length, lambda dev, off, pos, n: dev.splice_to(pipe, off, n))

    def file_layout(self) -> FileLayout:
        """Chunks round-robin over the legs, as :meth:`_pieces` splits them."""
        return FileLayout(self._chunk_bytes, tuple((dev, off * SECTOR) for dev, off in zip(self.devices, self.offsets)))

    def discard(self, offset: int, length: int) -> None:
        for stripe, dev_off, _pos, n in self._pieces(offset, length):
            self.devices[stripe].discard(dev_off, n)

    def zero(self, offset: int, length: int) -> None:
        for stripe, dev_off, _pos, n in self._pieces(offset, length):
            self.devices[stripe].zero(dev_off, n)

    def status(self) -> str:
        health = "".join("D" if e else "A" for e in self.errors)
        return str(StripedStatus(tuple(d.name for d in self.devices), health))

    def ima_status(self) -> str:
        """``…,stripes=N,chunk_size=C`` then ``,stripe_<i>_device_name=…,stripe_<i>_physical_start=…,
        stripe_<i>_status=A|D`` per stripe and a closing ``;`` (``stripe_status``, STATUSTYPE_IMA)."""
        parts = [f"{self.ima_prefix()},stripes={self.stripes},chunk_size={self.chunk_sectors}"]
        for i, (dev, off, err) in enumerate(zip(self.devices, self.offsets, self.errors)):
            parts.append(f",stripe_{i}_device_name={dev.name},stripe_{i}_physical_start={off}"
                         f",stripe_{i}_status={'D' if err else 'A'}")
        return "".join(parts) + ";"


class ZeroTarget(TargetDriver):
    """``zero``: reads return zeros, writes and discards are dropped.

    dm-zero.c has no status function, so status and IMA text are empty (the base class's). It is
    built by the default ``build`` (the ``Zero`` value has no arguments), so third-party targets
    that reuse its I/O under another name build the same way.
    """

    name = "zero"
    version = (1, 2, 0)  # dm-zero.c

    def read(self, buf: memoryview, offset: int) -> None:
        fill_zero(buf)

    def write(self, buf: memoryview, offset: int) -> None:
        return None

    def zero(self, offset: int, length: int) -> None:
        return None

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        return []


class ErrorTarget(TargetDriver):
    """``error [<dev> <offset>]``: every I/O fails (io-err in dm-target.c).

    io-err has no status function, so status and IMA text are empty (the base class's).
    """

    name = "error"
    version = (1, 7, 0)  # dm-target.c
    value_type = Error

    def __init__(self, ctx: TargetContext, start: int, length: int, value: Error) -> None:
        super().__init__(ctx, start, length)
        # With a <dev> <offset> the kernel opens the device (for its limits), like linear.
        if value.device is not None:
            self.open_device(value.device)

    def _fail(self, op: str) -> DeviceIOError:
        return DeviceIOError("I/O error (error target)", errno=errno.EIO, operation=op, device=self.ctx.device_name)

    def read(self, buf: memoryview, offset: int) -> None:
        raise self._fail("read")

    def write(self, buf: memoryview, offset: int) -> None:
        raise self._fail("write")

    def discard(self, offset: int, length: int) -> None:
        raise self._fail("discard")

    def zero(self, offset: int, length: int) -> None:
        raise self._fail("write")

    def flush(self) -> None:
        return None

    def table_value(self, value: Target) -> Target:
        """io-err has no status function: the kernel prints no parameters."""
        return Error()

