"""Mirror test rigs over ``dmtools.testing.memory``: a target context and a power cut."""

from __future__ import annotations

import threading
from typing import Any

from dmtools.testing.memory import MemoryEndpoint


class FakeContext:
    """A ``TargetContext`` over in-memory devices, counting events."""

    def __init__(self, devices: "dict[str, MemoryEndpoint]") -> None:
        from dmtools.engine.target_driver import DeviceHandle

        self.devices = devices
        self.handles: dict[str, DeviceHandle] = {}
        self.events = 0
        self.device_name = "mirror-test"
        self.readonly = False
        self.noflush_suspending = False
        self.device = self  # the mapped device's identity (state kept per device)
        self.state: dict[str, Any] = {}

    def get_device(self, ref: str, *, writable: bool | None = None) -> Any:
        from dmtools.engine.target_driver import DeviceHandle
        from dmtools.errors import InvalidTable

        if ref not in self.devices:
            raise InvalidTable(f"Device lookup failure: {ref}")
        if ref not in self.handles:
            minor = list(self.devices).index(ref)
            self.handles[ref] = DeviceHandle(self.devices[ref], f"7:{minor}", 7, minor, ref)
        return self.handles[ref]

    def event(self) -> None:
        self.events += 1

    def target_state(self, key: str, factory: Any) -> Any:
        if key not in self.state:
            self.state[key] = factory()
        return self.state[key]


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


class CrashEndpoint(MemoryEndpoint):
    """A RAM disk with a volatile write cache, on a ``PowerCut``: ``flushed`` is what survives."""

    def __init__(self, size: int, name: str, power: PowerCut) -> None:
        super().__init__(size, name)
        self.power = power
        self.flushed = bytearray(size)
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
            self.flushed[:] = self.data
            self.unflushed.clear()

    def after_crash(self) -> MemoryEndpoint:
        """The device as found after the power cut."""
        out = MemoryEndpoint(self.flushed, self.name)
        for off, data in self.unflushed:
            if self.power.rng.random() < 0.5:
                out.data[off : off + len(data)] = data
        return out
