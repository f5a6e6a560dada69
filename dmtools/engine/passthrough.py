"""Snapshot origins in the exposure's C data path: requests passed straight onto the origin device.

A ``snapshot-origin`` table maps its device onto the origin device (LVM's ``-real``) at the same
offsets. An origin read never copies (dm-snap.c ``origin_map``), and neither does a write whose
chunks every snapshot holds already: fastio.c serves both (``dmf_slot_set_origin``) through the
origin device's own map, which must be in use (that device's suspend then holds them: they go to
Python, which waits at its gate). Every other write runs the target's Python ``write``, which
copies first.

Which writes need no copy is a :class:`WriteThrough`, a set of 4 KiB granules shared with C. The
target that owns it marks granules only once the exceptions covering them are durable, and empties
it before anything that could make a copy necessary again (a snapshot resumed, merged or
invalidated); emptying it waits for the C writes that relied on it. The target may also give the
set its snapshots' first writes (:meth:`WriteThrough.first_writes`): a write the set misses is
then made in C with its copies first (fastio.c ``first_write``), and marks the set; emptying the
set withdraws them. A target offers this through
``TargetDriver.passthrough``; :func:`origin_map` is what the exposure's slot installs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dmtools._ffi import fastio
from dmtools.engine.device import Device

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.engine.device import LoadedTable
    from dmtools.engine.target_driver import DeviceHandle

#: bytes of a granule (``GRANULE_SHIFT`` in fastio.c).
GRANULE = 4096


class WriteThrough:
    """The granules of an origin of ``size`` bytes whose writes need no copy first (see the module
    docstring); empty when made. Methods may be called from any thread, before and after
    :meth:`close` (they do nothing after it)."""

    def __init__(self, lib: fastio.FastIO, size: int) -> None:
        self._lib = lib
        self.size = size
        self._lock = threading.Lock()
        self._handle = lib.chunks_new(size)
        #: the exposure's session whose slot installed a map with this set (its slots' ids mean
        #: something only there), None before.
        self.session: Any = None
        #: called once a map with this set was installed (the owner installs its first writes).
        self.on_install: Callable[[], None] | None = None

    @classmethod
    def create(cls, size: int) -> "WriteThrough | None":
        """An empty set, or ``None`` where the C data path is unavailable."""
        lib = fastio.load()
        return None if lib is None else cls(lib, size)

    @contextlib.contextmanager
    def held(self) -> Iterator[int]:
        """The C set (``struct dmf_chunks``) for the block, 0 once closed (it cannot close
        meanwhile)."""
        with self._lock:
            yield self._handle

    def mark(self, offset: int, length: int) -> None:
        """Writes to the granules lying wholly in ``[offset, offset+length)`` need no copy (every
        snapshot's exception for them is durable)."""
        with self._lock:
            if self._handle and length > 0:
                self._lib.chunks_mark(self._handle, offset, length)

    def installed(self, session: Any) -> None:
        """A slot of ``session`` installed a map with this set."""
        self.session = session
        hook = self.on_install
        if hook is not None:
            hook()

    def first_writes(self, snaps: list[tuple[int, int, int]]) -> None:
        """Writes the set misses are made in C with each of ``snaps``' copies first (``(C
        state address, COW device's slot, chunk bytes)`` in copy order; none for an empty list),
        once the C writes relying on the set are done."""
        with self._lock:
            if self._handle:
                self._lib.chunks_first(self._handle, snaps)

    def clear(self) -> None:
        """Every write needs Python again: empty the set and withdraw its first writes once the
        C writes relying on them are done."""
        with self._lock:
            if self._handle:
                self._lib.chunks_clear(self._handle)

    def count(self) -> int:
        """How many granules the set holds."""
        with self._lock:
            return self._lib.chunks_count(self._handle) if self._handle else 0

    def close(self) -> None:
        """Drop this reference (a map installed with the set keeps its own until replaced)."""
        with self._lock:
            handle, self._handle = self._handle, 0
        if handle:
            self._lib.chunks_put(handle)


@dataclass(frozen=True)
class Passthrough:
    """What a target's requests pass straight onto (``TargetDriver.passthrough``): byte ``o`` of the
    target is byte ``o`` of ``lower`` (an engine device); writes only where ``writes`` holds them."""

    lower: "DeviceHandle"
    writes: WriteThrough


def origin_map(table: "LoadedTable", session: Any) -> tuple[WriteThrough, int] | None:
    """``(writes, lower slot)`` of a table that is one passthrough target whose device has a slot
    of ``session`` (a ``fastpath.Session``), for ``dmf_slot_set_origin``; else ``None``."""
    if len(table.targets) != 1 or table.starts[0] != 0:
        return None
    found = table.targets[0].passthrough()
    if found is None:
        return None
    lower = found.lower.inner.device  # None for a file or an NBD export
    slot = lower.fast_path if isinstance(lower, Device) else None
    if slot is None or slot.session is not session:
        return None
    return found.writes, slot.handle
