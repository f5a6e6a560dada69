"""Helpers for the events tests: image files, the devices of a scenario on either backend, a
recording backend."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmtools.errors import DMError
from dmtools.events import Watcher
from dmtools.monitor import Monitor
from dmtools.testing.loops import image_ref
from mirror.manager import MirrorManager
from snapshot.manager import SnapshotManager

MiB = 1 << 20


class Stack:
    """The devices a test makes on one backend, removed (topmost first) at the end whatever
    happened. On the kernel (``make_loop`` given) images sit under loop devices; the userspace
    engine takes the image files themselves."""

    def __init__(self, dm: Any, base: str, make_image: Callable[..., Path],
                 make_loop: Callable[..., Any] | None = None) -> None:
        self.dm = dm
        self.base = base[: -len("-dmtt")]
        self.make_image = make_image
        self.make_loop = make_loop
        self.snapshots: list[str] = []
        self.devices: list[str] = []

    def name(self, tag: str) -> str:
        return f"{self.base}{tag}-dmtt"

    def linear(self, tag: str, size: int) -> str:
        """A linear device ``name(tag)`` over a new image of ``size`` bytes."""
        name = self.name(tag)
        self.dm.create(name, f"0 {size // 512} linear {image_ref(self.make_image(size, name=tag), self.make_loop)} 0")
        self.devices.append(name)
        return name

    def snapshot(self, cow_bytes: int) -> tuple[str, str, Path]:
        """A 16 MiB origin and a snapshot of it with a COW of ``cow_bytes``: origin, snapshot and COW file."""
        origin = self.linear("o", 16 * MiB)
        cow_file = self.make_image(cow_bytes, name="cow")
        snap = self.name("s")
        SnapshotManager(self.dm).create(origin, image_ref(cow_file, self.make_loop), snap, chunk_size=8)
        self.snapshots.append(snap)
        return origin, snap, cow_file

    def mirror(self) -> tuple[str, list[str], list[str]]:
        """A mirror ``name("m")`` over linear legs ``l0`` and ``l1`` (4 MiB, resynced), with
        ``handle_errors`` and no guard (the monitor under test owns the failures), and a spare
        ``l2``: the mirror, the three legs' names and their table references."""
        legs = [self.linear(f"l{i}", 4 * MiB) for i in range(3)]
        refs = [self.dm.device_ref(n) for n in legs]
        name = self.name("m")
        self.devices.append(name)
        MirrorManager(self.dm).create(name, refs[:2], handle_errors=True, region_size=1024, monitor=False)
        MirrorManager(self.dm).resync(name)
        return name, legs, refs

    def cleanup(self) -> None:
        sm = SnapshotManager(self.dm)
        for snap in reversed(self.snapshots):
            try:
                sm.remove(snap)
            except DMError:
                pass
        for name in reversed(self.devices):
            for n in (name, f"{name}-real"):
                try:
                    if self.dm.exists(n):
                        self.dm.remove(n, retry=True)
                except DMError:
                    pass


def collect_events(source: Monitor | Watcher, until: Callable[[Any], bool],
                   timeout: float) -> tuple[list[Any], threading.Thread]:
    """A started thread collecting ``(time, event)`` from ``source.events`` up to the first event
    ``until`` accepts."""
    got: list[Any] = []
    stop = threading.Event()

    def run() -> None:
        for ev in source.events(timeout=timeout, stop=stop):
            got.append((time.monotonic(), ev))
            if until(ev):
                stop.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return got, thread


def fail_leg_under_writer(dm: Any, mirror: str, leg: str) -> tuple[float, threading.Thread, list[str]]:
    """Write 64 KiB of ``x`` to ``mirror``, turn leg device ``leg`` into an ``error`` device, then
    write to the mirror in a thread (with handle_errors the write is held until the monitor acts):
    when the failure began, the writer, and its outcome once it ends."""
    with dm.open_endpoint(mirror) as ep:
        ep.write(b"x" * 65536, 0)
        ep.flush()
    dm.load(leg, "0 8192 error")  # the leg's disk dies
    dm.resume(leg)
    result: list[str] = []

    def write() -> None:
        try:
            with dm.open_endpoint(mirror) as ep:
                ep.write(b"y" * 65536, MiB)
                ep.flush()
            result.append("ok")
        except DMError as err:
            result.append(type(err).__name__)

    started = time.monotonic()
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return started, writer, result


class Recorder:
    """A backend that notes every ``load``, ``suspend`` and ``resume`` (verb, device) in order."""

    def __init__(self, dm: Any) -> None:
        self._dm = dm
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dm, name)

    def load(self, name: str, table: Any, **kw: Any) -> Any:
        self.calls.append(("load", name))
        return self._dm.load(name, table, **kw)

    def suspend(self, name: str, **kw: Any) -> Any:
        self.calls.append(("suspend", name))
        return self._dm.suspend(name, **kw)

    def resume(self, name: str) -> Any:
        self.calls.append(("resume", name))
        return self._dm.resume(name)

    def handovers(self, origin: str, snap: str) -> int:
        """How many times the snapshot stack was refreshed in libdm's order: the snapshot and its
        ``-cow`` loaded, suspended top-down (origin first), resumed bottom-up (origin last)."""
        cow = f"{snap}-cow"
        sequence = [("load", snap), ("load", cow), ("suspend", origin), ("suspend", snap),
                    ("suspend", cow), ("resume", cow), ("resume", snap), ("resume", origin)]
        n = len(sequence)
        return sum(self.calls[i:i + n] == sequence for i in range(len(self.calls) - n + 1))


def policies(name: str) -> Any:
    """The upper layers' policy implementations (what the ``dmtools.policies`` entry points name)."""
    from mirror.guard import MirrorGuard
    from mirror.manager import MirrorManager
    from snapshot.manager import SnapshotManager
    from thin.manager import ThinPoolManager

    return {"snapshot-extend": SnapshotManager, "mirror-repair": MirrorManager,
            "mirror-remove": MirrorGuard, "thin-extend": ThinPoolManager}[name]
