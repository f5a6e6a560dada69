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
        if self.fail_writes:
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
