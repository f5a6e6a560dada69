"""A test target that starts failing at a chosen moment, as dm-flakey or an ``error`` reload would.

``trip <dev> <offset> <switch>`` maps like ``linear``; the named :class:`Switch` decides when it
fails: after ``fail_after`` reads (counted from creation) every read, write and zeroing fails with
EIO, the way a leg whose table was replaced by ``error`` does. Register it on an in-process engine
with :func:`install`. The moment is a read count, not a time, so a seeded run is repeatable.
Used by the mirror (failing source during resync, repair, rebuild) and snapshot merge tests.
"""

from __future__ import annotations

import errno
import threading
from typing import Any

from dmtools.engine.basic_targets import LinearTarget
from dmtools.engine.target_driver import TargetContext
from dmtools.errors import DeviceIOError, InvalidTable
from dmtools.target_values import Linear, Target, format_args

SWITCHES: dict[str, "Switch"] = {}


class Switch:
    """When a ``trip`` device fails: after ``fail_after`` reads (``None``: never, until ``trip()``)."""

    def __init__(self, name: str, fail_after: int | None = None) -> None:
        self.name = name
        self.fail_after = fail_after
        self.reads = 0
        self.writes = 0
        #: writes (and zeroings) fail, reads still work, once ``writes > write_fail_after``.
        self.write_fail_after: int | None = None
        self.failing = False
        self.lock = threading.Lock()
        SWITCHES[name] = self

    def trip(self) -> None:
        """Fail every I/O from now on."""
        with self.lock:
            self.failing = True

    def fail_after_more(self, reads: int) -> None:
        """Fail every I/O once ``reads`` more reads went through."""
        with self.lock:
            self.fail_after = self.reads + reads

    def fail_writes_after_more(self, writes: int) -> None:
        """Fail every write (reads go on) once ``writes`` more writes went through."""
        with self.lock:
            self.write_fail_after = self.writes + writes

    def heal(self) -> None:
        """Work again (the device came back), and never fail by count."""
        with self.lock:
            self.failing = False
            self.fail_after = None
            self.write_fail_after = None

    def check(self, op: str) -> None:
        """Count ``op``; raise EIO when the device is failing."""
        with self.lock:
            if op == "read":
                self.reads += 1
                if self.fail_after is not None and self.reads > self.fail_after:
                    self.failing = True
                failing = self.failing
            else:
                self.writes += 1
                limit = self.write_fail_after
                failing = self.failing or (limit is not None and self.writes > limit)
        if failing:
            raise DeviceIOError(f"{op} failed (trip {self.name})", errno=errno.EIO, operation=op, device=self.name)


class TripTarget(LinearTarget):
    """``trip <dev> <offset> <switch>``: ``linear`` until its switch trips."""

    name = "trip"
    version = (1, 0, 0)

    def __init__(self, ctx: TargetContext, start: int, length: int, value: Linear, switch: str) -> None:
        super().__init__(ctx, start, length, value)
        self.switch = SWITCHES[switch]

    @classmethod
    def build(cls, ctx: TargetContext, start: int, length: int, value: Target) -> TripTarget:
        """``value`` is the ``GenericTarget`` of a ``trip`` line: a ``linear`` line and a switch."""
        args = value.args()
        if len(args) != 3 or args[2] not in SWITCHES:
            raise InvalidTable("trip: needs <dev> <offset> <switch> (a Switch made by the test)")
        return cls(ctx, start, length, Linear.from_args(args[:2]), args[2])

    def read(self, buf: memoryview, offset: int) -> None:
        self.switch.check("read")
        super().read(buf, offset)

    def write(self, buf: memoryview, offset: int) -> None:
        self.switch.check("write")
        super().write(buf, offset)

    def zero(self, offset: int, length: int) -> None:
        self.switch.check("write")
        super().zero(offset, length)

    def table_params(self) -> str:
        return format_args([self.dev.name, str(self.offset), self.switch.name])


def install(engine: Any) -> None:
    """Make the ``trip`` target available to ``engine``'s tables."""
    engine.register_target(TripTarget)


def read_pieces(ep: Any, piece: int, count: int) -> list[bytes | None]:
    """Read ``count`` pieces of ``piece`` bytes from endpoint ``ep``: each one's bytes, or ``None``
    where the read failed with EIO (any other error is raised)."""
    out: list[bytes | None] = []
    for i in range(count):
        buf = bytearray(piece)
        try:
            ep.readinto(buf, i * piece)
        except DeviceIOError as err:
            if err.errno != errno.EIO:
                raise
            out.append(None)
            continue
        out.append(bytes(buf))
    return out
