"""In-memory endpoints for the mirror tests: a RAM disk, an event recorder and fault switches."""

from __future__ import annotations

import threading
from typing import Any

from dmtools.endpoint import Endpoint
from dmtools.errors import DeviceIOError


class MemEndpoint(Endpoint):
    """A RAM-backed endpoint that records writes/flushes in a shared journal and can be failed."""

    def __init__(
        self,
        size: int,
        name: str = "mem",
        journal: "list[tuple[str, str, int, int]] | None" = None,
        lbs: int = 512,
    ) -> None:
        self.name = name
        self.data = bytearray(size)
        self.journal = journal if journal is not None else []
        self.lbs = lbs
        self.fail_reads = False
        self.fail_writes = False
        self.fail_flush = False
        #: writes touching [start, end) fail (a bad stretch of the device)
        self.bad_range: tuple[int, int] | None = None
        self.lock = threading.Lock()
        self.flushed = bytearray(size)  # what would survive a power cut

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def logical_block_size(self) -> int:
        return self.lbs

    def readinto(self, buf: Any, offset: int) -> int:
        if self.fail_reads:
            raise DeviceIOError("injected read error", operation="read", device=self.name)
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), len(self.data) - offset))
        mv[:n] = self.data[offset : offset + n]
        return n

    def write(self, buf: Any, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        if self.fail_writes or (
            self.bad_range is not None and offset < self.bad_range[1] and offset + len(mv) > self.bad_range[0]
        ):
            raise DeviceIOError("injected write error", operation="write", device=self.name)
        if offset + len(mv) > len(self.data):
            raise DeviceIOError("write past end", operation="write", device=self.name)
        with self.lock:
            self.data[offset : offset + len(mv)] = mv
            self.journal.append(("write", self.name, offset, len(mv)))
        return len(mv)

    def flush(self) -> None:
        if self.fail_flush:
            raise DeviceIOError("injected flush error", operation="flush", device=self.name)
        with self.lock:
            self.flushed[:] = self.data
            self.journal.append(("flush", self.name, 0, 0))


class GatedEndpoint(MemEndpoint):
    """A MemEndpoint whose reads block while ``gate`` is clear (to hold a resync copy mid-flight)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.gate = threading.Event()
        self.gate.set()
        self.reading = threading.Event()
        self.active = 0
        self.peak = 0

    def readinto(self, buf: Any, offset: int) -> int:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        self.reading.set()
        try:
            if not self.gate.wait(10):
                raise DeviceIOError("gate never opened", operation="read", device=self.name)
            return super().readinto(buf, offset)
        finally:
            with self.lock:
                self.active -= 1


class FakeContext:
    """A ``TargetContext`` over in-memory devices, counting events."""

    def __init__(self, devices: "dict[str, MemEndpoint]") -> None:
        from dmtools.engine.target_driver import DeviceHandle

        self.devices = devices
        self.handles: dict[str, DeviceHandle] = {}
        self.events = 0
        self.device_name = "mirror-test"
        self.readonly = False
        self.noflush_suspending = False

    def get_device(self, ref: str, *, writable: bool | None = None) -> Any:
        from dmtools.engine.target_driver import DeviceHandle
        from dmtools.errors import InvalidTable

        if ref not in self.devices:
            raise InvalidTable(f"Device lookup failure: {ref}")
        if ref not in self.handles:
            minor = list(self.devices).index(ref)
            self.handles[ref] = DeviceHandle(self.devices[ref], f"7:{minor}", 7, minor, ref)
        return self.handles[ref]

    def put_device(self, handle: Any) -> None:
        pass

    def event(self) -> None:
        self.events += 1


def build_mirror(ctx: FakeContext, length: int, params: str) -> Any:
    """The ``mirror`` target for table parameters ``params``, built as the engine builds it."""
    from dmtools.table import Table
    from mirror.target import MirrorTarget

    return MirrorTarget.build(ctx, 0, length, Table.parse(f"0 {length} mirror {params}").lines[0].target)


class PowerCut:
    """A shared power switch for several ``CrashEndpoint``s: after ``ops_left`` I/O operations the
    power goes; later writes and flushes are lost and every device keeps what was flushed plus a
    random subset of the writes it had not flushed yet."""

    def __init__(self, ops_left: int, rng: Any) -> None:
        self.ops_left = ops_left
        self.rng = rng
        self.cut = False
        self.lock = threading.Lock()

    def tick(self) -> bool:
        """Count one operation; True when it must be dropped."""
        with self.lock:
            if self.cut:
                return True
            self.ops_left -= 1
            if self.ops_left < 0:
                self.cut = True
                return True
            return False


class CrashEndpoint(MemEndpoint):
    """A RAM disk with a volatile write cache, on a ``PowerCut``."""

    def __init__(self, size: int, name: str, power: PowerCut) -> None:
        super().__init__(size, name)
        self.power = power
        self.unflushed: list[tuple[int, bytes]] = []

    def write(self, buf: Any, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        if self.power.tick():
            return len(mv)
        n = super().write(mv, offset)
        with self.lock:
            self.unflushed.append((offset, bytes(mv)))
        return n

    def flush(self) -> None:
        if self.power.tick():
            return
        super().flush()
        with self.lock:
            self.unflushed.clear()

    def after_crash(self) -> MemEndpoint:
        """The device as found after the power cut."""
        out = MemEndpoint(len(self.data), self.name)
        out.data[:] = self.flushed
        for off, data in self.unflushed:
            if self.power.rng.random() < 0.5:
                out.data[off : off + len(data)] = data
        out.flushed[:] = out.data
        return out
