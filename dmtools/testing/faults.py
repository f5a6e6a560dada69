"""Endpoints for tests: fault injection, slowness, and an in-memory device.

- :class:`FaultyEndpoint` wraps any endpoint and fails reads or writes touching chosen sectors, or a
  seeded fraction of blocks (deterministic per block, whatever the request sizes or thread order),
  returns short reads, and reports ENOSPC past a chosen offset. Every request is recorded in
  ``ops`` so tests can check what was read and written, and in which order.
- :class:`SlowEndpoint` delays requests, or holds them until a gate opens, so tests can keep I/O in
  flight deterministically.
- :class:`~dmtools.testing.memory.MemoryEndpoint` (a ``bytearray`` device) is re-exported here.

The style follows nbdkit's ``error`` and ``delay`` filters: a wrapper states where faults happen and
the test states whether the copy must fail or carry on.
"""

from __future__ import annotations

import bisect
import contextlib
import errno as _errno
import threading
import time
from typing import Any, Iterable, Iterator

from dmtools.endpoint import Endpoint, ForwardingEndpoint
from dmtools.errors import DeviceIOError, InvalidArgument, NoSpace
from dmtools.testing.memory import MemoryEndpoint
from dmtools.units import SECTOR

__all__ = ["FaultyEndpoint", "SlowEndpoint", "MemoryEndpoint", "WrappedEndpoint"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """A well-mixed 64-bit hash (SplitMix64's finaliser)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _ranges(spec: Iterable[int | range | tuple[int, int]] | None) -> tuple[list[int], list[int]]:
    """Normalise sectors, ``range`` objects and ``(start, count)`` pairs to sorted, merged ranges."""
    pairs: list[tuple[int, int]] = []
    for item in spec or ():
        if isinstance(item, range):
            if item.step != 1:
                raise InvalidArgument("fault ranges must be contiguous")
            pairs.append((item.start, item.stop))
        elif isinstance(item, tuple):
            start, count = item
            pairs.append((start, start + count))
        elif isinstance(item, int) and not isinstance(item, bool):
            pairs.append((item, item + 1))
        else:
            raise InvalidArgument(f"not a sector, range or (start, count): {item!r}")
    pairs.sort()
    starts: list[int] = []
    ends: list[int] = []
    for s, e in pairs:
        if e <= s:
            continue
        if starts and s <= ends[-1]:
            ends[-1] = max(ends[-1], e)
        else:
            starts.append(s)
            ends.append(e)
    return starts, ends


def _hits(starts: list[int], ends: list[int], first: int, last: int) -> bool:
    """True when sectors ``[first, last)`` meet one of the ranges."""
    i = bisect.bisect_right(starts, last - 1) - 1
    return i >= 0 and ends[i] > first


class WrappedEndpoint(ForwardingEndpoint):
    """Forward every operation to ``inner`` (the base of the test wrappers).

    ``fileno()`` and ``direct_fileno()`` are ``None``, ``plain_fd`` -1 and ``is_regular_file``
    False so copiers cannot bypass the wrapper.
    """

    def __init__(self, inner: Endpoint, name: str | None = None) -> None:
        super().__init__(inner, name or f"{type(self).__name__}({inner.name})")

    def fileno(self) -> int | None:
        return None

    def plain_fd(self, length: int, write: bool) -> int:
        return -1

    def direct_fileno(self) -> tuple[int, int] | None:
        return None

    @property
    def is_regular_file(self) -> bool:
        return False


class FaultyEndpoint(WrappedEndpoint):
    """Inject faults into ``inner``'s I/O.

    ``read_errors``/``write_errors``: sectors (ints), ``range`` objects or ``(start, count)`` pairs
    whose requests fail with EIO. ``read_error_rate``/``write_error_rate``: fraction of
    ``rate_block``-byte blocks that fail, chosen by ``seed`` (the same blocks fail on every run).
    ``short_reads``: when > 0, a read returns at most that many bytes per call.
    ``nospace_from``: writes (and zeroing) reaching this byte offset fail with ENOSPC.
    ``ops`` records ``(op, offset, length, ok)`` for every request, in the order they happened;
    ``fileno()`` is ``None`` and ``is_regular_file`` False so copiers cannot bypass the wrapper.
    """

    def __init__(self, inner: Endpoint, *, read_errors: Iterable[int | range | tuple[int, int]] | None = None,
                 write_errors: Iterable[int | range | tuple[int, int]] | None = None, read_error_rate: float = 0.0,
                 write_error_rate: float = 0.0, seed: int = 0, rate_block: int = 4096, short_reads: int = 0,
                 nospace_from: int | None = None, name: str | None = None) -> None:
        super().__init__(inner, name)
        for what, rate in (("read_error_rate", read_error_rate), ("write_error_rate", write_error_rate)):
            if not 0.0 <= rate <= 1.0:
                raise InvalidArgument(f"{what} must be within 0..1, not {rate!r}")
        if rate_block < SECTOR or rate_block % SECTOR:
            raise InvalidArgument(f"rate_block must be a multiple of {SECTOR}, not {rate_block}")
        self._read = _ranges(read_errors)
        self._write = _ranges(write_errors)
        self._read_rate = read_error_rate
        self._write_rate = write_error_rate
        self._seed = seed
        self._rate_block = rate_block
        self.short_reads = short_reads
        self.nospace_from = nospace_from
        self.ops: list[tuple[str, int, int, bool]] = []
        self._lock = threading.Lock()

    def _rate_hit(self, rate: float, salt: int, offset: int, length: int) -> bool:
        if rate <= 0.0 or length <= 0:
            return False
        threshold = int(rate * (1 << 64))
        mix = _splitmix64(self._seed * 2 + salt)
        for blk in range(offset // self._rate_block, (offset + length - 1) // self._rate_block + 1):
            if _splitmix64(blk ^ mix) < threshold:
                return True
        return False

    def _fails(self, op: str, offset: int, length: int) -> bool:
        if length <= 0:
            return False
        first, last = offset // SECTOR, -(-(offset + length) // SECTOR)
        if op == "read":
            return _hits(*self._read, first, last) or self._rate_hit(self._read_rate, 0, offset, length)
        return _hits(*self._write, first, last) or self._rate_hit(self._write_rate, 1, offset, length)

    def _record(self, op: str, offset: int, length: int, ok: bool) -> None:
        with self._lock:
            self.ops.append((op, offset, length, ok))

    def _check_write(self, op: str, offset: int, length: int) -> None:
        if self.nospace_from is not None and offset + length > self.nospace_from:
            self._record(op, offset, length, False)
            raise NoSpace(f"injected ENOSPC at offset {max(offset, self.nospace_from)}",
                          errno=_errno.ENOSPC, operation=op, device=self.name)
        if self._fails("write", offset, length):
            self._record(op, offset, length, False)
            raise DeviceIOError(f"injected write error in {offset}+{length}", errno=_errno.EIO, operation=op,
                                device=self.name)

    def readinto(self, buf: Any, offset: int) -> int:
        mv = memoryview(buf).cast("B")
        if self.short_reads > 0 and len(mv) > self.short_reads:
            mv = mv[: self.short_reads]
        if self._fails("read", offset, len(mv)):
            self._record("read", offset, len(mv), False)
            raise DeviceIOError(f"injected read error in {offset}+{len(mv)}", errno=_errno.EIO, operation="read",
                                device=self.name)
        n = self.inner.readinto(mv, offset)
        self._record("read", offset, n, True)
        return n

    def write(self, buf: Any, offset: int) -> int:
        length = memoryview(buf).nbytes
        self._check_write("write", offset, length)
        n = self.inner.write(buf, offset)
        self._record("write", offset, n, True)
        return n

    def zero(self, offset: int, length: int) -> None:
        self._check_write("zero", offset, length)
        self.inner.zero(offset, length)
        self._record("zero", offset, length, True)

    def written(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of every successful write or zero, in completion order."""
        with self._lock:
            return [(o, n) for op, o, n, ok in self.ops if ok and op in ("write", "zero")]


class SlowEndpoint(WrappedEndpoint):
    """Delay each request by ``delay`` seconds and/or hold it until ``gate`` is set.

    ``started`` is set when the first request arrives; ``in_flight`` counts requests being served.
    A request held longer than ``gate_timeout`` fails with EIO (so a broken test cannot hang).
    """

    def __init__(self, inner: Endpoint, *, delay: float = 0.0, gate: threading.Event | None = None,
                 gate_timeout: float = 30.0, name: str | None = None) -> None:
        super().__init__(inner, name)
        self.delay = delay
        self.gate = gate
        self.gate_timeout = gate_timeout
        self.started = threading.Event()
        self.in_flight = 0
        self.requests = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _serving(self, op: str) -> Iterator[None]:
        """Count the request in flight while it is held at the gate, delayed and served."""
        with self._lock:
            self.in_flight += 1
            self.requests += 1
        try:
            self.started.set()
            if self.gate is not None and not self.gate.wait(self.gate_timeout):
                raise DeviceIOError("gate never opened", errno=_errno.EIO, operation=op, device=self.name)
            if self.delay:
                time.sleep(self.delay)
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def readinto(self, buf: Any, offset: int) -> int:
        with self._serving("read"):
            return self.inner.readinto(buf, offset)

    def write(self, buf: Any, offset: int) -> int:
        with self._serving("write"):
            return self.inner.write(buf, offset)

    def zero(self, offset: int, length: int) -> None:
        with self._serving("zero"):
            self.inner.zero(offset, length)
