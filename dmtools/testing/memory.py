"""In-memory endpoints for tests: a RAM disk that journals its I/O, and one whose reads wait on a gate.

- :class:`MemoryEndpoint` is a ``bytearray`` device. Every write, zero and flush is journaled as
  ``(op, name, offset, length)``; several devices may share one journal, so a test can check the
  order of I/O across them (a dirty mark before the data, the data before the clean mark).
  ``fail_reads``/``fail_writes``/``fail_flush`` switch failures on and off while a test runs
  (:class:`~dmtools.testing.faults.FaultyEndpoint` fails chosen places instead).
- :class:`GatedEndpoint` holds its reads until the test opens ``gate``, so copies stay in flight
  for as long as a test needs them there; it counts them (``in_flight``, ``peak``).

The style follows nbdkit's ``memory`` plugin and ``delay`` filter: the device states what it does,
the test states what must follow.
"""

from __future__ import annotations

import errno as _errno
import threading
from typing import Any

from dmtools.endpoint import Endpoint
from dmtools.errors import DeviceIOError, NoSpace

__all__ = ["GatedEndpoint", "Journal", "MemoryEndpoint"]

#: ``(op, device name, offset, length)`` per write, zero or flush (``offset, length`` 0 for a flush).
Journal = list[tuple[str, str, int, int]]


class MemoryEndpoint(Endpoint):
    """A device held in a ``bytearray`` (``data``), its I/O journaled in ``journal``.

    ``size`` is a byte count or the initial contents. ``set_extents`` makes ``data_extents`` known.
    """

    #: settable, unlike ``Endpoint.zoned``: a test makes the device zoned
    zoned = False

    def __init__(self, size: int | bytes | bytearray, name: str = "memory", journal: Journal | None = None, *,
                 logical_block_size: int = 512) -> None:
        self.data = bytearray(size)
        self.name = name
        self.journal: Journal = journal if journal is not None else []
        self.fail_reads = False
        self.fail_writes = False
        self.fail_flush = False
        self.lock = threading.Lock()
        self._lbs = logical_block_size
        self._extents: list[tuple[int, int]] | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def logical_block_size(self) -> int:
        return self._lbs

    def set_extents(self, extents: list[tuple[int, int]] | None) -> None:
        """Declare the allocated ranges (``None``: unknown); callers keep holes zero."""
        self._extents = extents

    def _fail(self, op: str) -> DeviceIOError:
        return DeviceIOError(f"injected {op} error", errno=_errno.EIO, operation=op, device=self.name)

    def readinto(self, buf: Any, offset: int) -> int:
        if self.fail_reads:
            raise self._fail("read")
        mv = memoryview(buf).cast("B")
        n = max(0, min(len(mv), len(self.data) - offset))
        mv[:n] = self.data[offset : offset + n]
        return n

    def _put(self, op: str, offset: int, data: Any) -> None:
        if self.fail_writes:
            raise self._fail(op)
        end = offset + len(data)
        if end > len(self.data):
            raise NoSpace(f"{op} past the end ({end} > {len(self.data)})", operation=op, device=self.name)
        with self.lock:
            self.data[offset:end] = data
            self.journal.append((op, self.name, offset, len(data)))

    def write(self, buf: Any, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        self._put("write", offset, mv)
        return len(mv)

    def zero(self, offset: int, length: int) -> None:
        self._put("zero", offset, bytes(length))

    def flush(self) -> None:
        if self.fail_flush:
            raise self._fail("flush")
        with self.lock:
            self.journal.append(("flush", self.name, 0, 0))

    def data_extents(self, offset: int, length: int) -> list[tuple[int, int]] | None:
        if self._extents is None:
            return None
        end = offset + length
        out = []
        for o, n in self._extents:
            lo, hi = max(o, offset), min(o + n, end)
            if lo < hi:
                out.append((lo, hi - lo))
        return out


class GatedEndpoint(MemoryEndpoint):
    """A :class:`MemoryEndpoint` whose reads wait until ``gate`` is set.

    The gate starts closed (``open=True`` starts it open). ``reading`` is set by the first read;
    ``in_flight`` counts the reads being served and ``peak`` the most at once. A read held longer
    than ``timeout`` seconds fails with EIO, so a broken test cannot hang.
    """

    def __init__(self, *args: Any, open: bool = False, timeout: float = 30.0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.gate = threading.Event()
        if open:
            self.gate.set()
        self.timeout = timeout
        self.reading = threading.Event()
        self.in_flight = 0
        self.peak = 0

    def readinto(self, buf: Any, offset: int) -> int:
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        self.reading.set()
        try:
            if not self.gate.wait(self.timeout):
                raise DeviceIOError("gate never opened", errno=_errno.EIO, operation="read", device=self.name)
            return super().readinto(buf, offset)
        finally:
            with self.lock:
                self.in_flight -= 1
