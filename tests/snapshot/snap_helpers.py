"""In-memory endpoints for the snapshot tests: fast, and able to log or fail I/O."""

from __future__ import annotations

import threading
from typing import Any

from dmtools.endpoint import Endpoint
from dmtools.errors import DeviceIOError


class MemoryEndpoint(Endpoint):
    """A byte array behind the Endpoint interface; ``log`` records ``(op, offset, length)``."""

    def __init__(self, size: int, name: str = "mem", data: bytes | None = None) -> None:
        self.data = bytearray(size) if data is None else bytearray(data)
        self.name = name
        self.log: list[tuple[str, int, int]] = []
        self.fail_writes_at: set[int] = set()  # byte offsets whose writes raise
        self.fail_all = False
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.data)

    def readinto(self, buf: Any, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        if self.fail_all:
            raise DeviceIOError("injected read error", operation="read", device=self.name)
        n = max(0, min(len(mv), len(self.data) - offset))
        mv[:n] = self.data[offset : offset + n]
        return n

    def write(self, buf: Any, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        if self.fail_all or offset in self.fail_writes_at:
            raise DeviceIOError("injected write error", operation="write", device=self.name)
        if offset + len(mv) > len(self.data):
            raise DeviceIOError("write past end", operation="write", device=self.name)
        with self._lock:
            self.data[offset : offset + len(mv)] = mv
            self.log.append(("write", offset, len(mv)))
        return len(mv)

    def flush(self) -> None:
        if self.fail_all:
            raise DeviceIOError("injected flush error", operation="flush", device=self.name)
        with self._lock:
            self.log.append(("flush", 0, 0))


def register_snapshot_targets(engine: Any) -> None:
    """Make the engine load our targets even before the entry points are installed."""
    from snapshot.targets import TARGETS

    registry = getattr(engine, "_registry", None)
    if registry is None:
        return
    try:
        registry.get("snapshot")
    except Exception:  # noqa: BLE001 - entry points missing: register the classes directly
        registry._classes.update(TARGETS)
