"""A fake ``DeviceMapper`` at the seam the event layer reads: list, info, table, status, wait_event.

Tests set status texts directly (``set_status``) to play a snapshot filling up or a mirror leg
failing, without any target doing I/O.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from dmtools.backend import DeviceEntry, DeviceInfo, DeviceMapper, StatusLine, Versions
from dmtools.errors import DeviceExists, DeviceNotFound
from dmtools.table import Table


@dataclass
class FakeDevice:
    name: str
    uuid: str
    minor: int
    lines: list[list[Any]] = field(default_factory=list)  # [start, length, type, params, status]
    suspended: bool = False
    event_nr: int = 0
    removed: bool = False


class FakeDM(DeviceMapper):
    """Devices whose tables and status texts the test sets."""

    backend = "fake"

    def __init__(self) -> None:
        self._devs: dict[str, FakeDevice] = {}
        self._cond = threading.Condition()
        self._minor = 0
        self.calls: list[str] = []

    # --- test controls --------------------------------------------------------------------
    def add(self, name: str, lines: list[tuple[int, int, str, str, str]], uuid: str = "") -> None:
        with self._cond:
            if name in self._devs:
                raise DeviceExists("exists", device=name)
            self._devs[name] = FakeDevice(name, uuid, self._minor, [list(x) for x in lines])
            self._minor += 1

    def set_status(self, name: str, status: str, index: int = 0, *, event: bool = False) -> None:
        with self._cond:
            self._devs[name].lines[index][4] = status
            if event:
                self._devs[name].event_nr += 1
                self._cond.notify_all()

    def set_suspended(self, name: str, value: bool) -> None:
        with self._cond:
            self._devs[name].suspended = value

    # --- DeviceMapper ---------------------------------------------------------------------
    def _get(self, name: str) -> FakeDevice:
        dev = self._devs.get(name)
        if dev is None:
            raise DeviceNotFound("no such device", device=name)
        return dev

    def create(self, name: str, table: Any = None, *, uuid: str = "", readonly: bool = False) -> DeviceInfo:
        self.add(name, [], uuid)
        return self.info(name)

    def load(self, name: str, table: Any, *, readonly: bool = False) -> None:
        raise NotImplementedError

    def suspend(self, name: str, *, noflush: bool = False) -> None:
        self.calls.append(f"suspend {name}")
        self.set_suspended(name, True)

    def resume(self, name: str) -> None:
        self.calls.append(f"resume {name}")
        self.set_suspended(name, False)

    def remove(self, name: str, *, retry: bool = False, deferred: bool = False) -> None:
        with self._cond:
            dev = self._devs.pop(name)
            dev.removed = True
            dev.event_nr += 1
            self._cond.notify_all()

    def clear(self, name: str) -> None:
        raise NotImplementedError

    def rename(self, name: str, new_name: str) -> None:
        with self._cond:
            dev = self._devs.pop(name)
            dev.name = new_name
            self._devs[new_name] = dev
            dev.event_nr += 1
            self._cond.notify_all()

    def info(self, name: str, *, open_count: bool = True) -> DeviceInfo:
        with self._cond:
            dev = self._get(name)
            return DeviceInfo(name=dev.name, uuid=dev.uuid, suspended=dev.suspended, live_table=bool(dev.lines),
                              event_nr=dev.event_nr, major=250, minor=dev.minor, target_count=len(dev.lines))

    def table(self, name: str, *, inactive: bool = False) -> Table:
        with self._cond:
            dev = self._get(name)
            return Table.parse("\n".join(f"{s} {n} {t} {p}" for s, n, t, p, _st in dev.lines))

    def status(self, name: str, *, inactive: bool = False) -> list[StatusLine]:
        with self._cond:
            dev = self._get(name)
            return [StatusLine(s, n, t, st) for s, n, t, _p, st in dev.lines]

    def message(self, name: str, sector: int, message: str) -> str | None:
        raise NotImplementedError

    def deps(self, name: str) -> list[tuple[int, int]]:
        return []

    def list(self) -> list[DeviceEntry]:
        with self._cond:
            return [DeviceEntry(d.name, 250, d.minor, d.event_nr, d.uuid)
                    for d in sorted(self._devs.values(), key=lambda d: d.name)]

    def targets(self) -> dict[str, tuple[int, int, int]]:
        return {}

    def version(self) -> Versions:
        return Versions("fake", "4.50.0", "fake")

    def wait_event(self, name: str, event_nr: int = 0, timeout: float | None = None) -> int:
        with self._cond:
            dev = self._get(name)
            self._cond.wait_for(lambda: dev.event_nr != event_nr or dev.removed, timeout)
            if dev.removed:
                raise DeviceNotFound("device was removed", device=name)
            return dev.event_nr

    def device_path(self, name: str) -> str:
        return f"/dev/fake/{name}"

    def device_ref(self, name: str) -> str:
        return f"250:{self._get(name).minor}"

    def open_endpoint(self, name: str, *, writable: bool = True) -> Any:
        raise NotImplementedError


SNAP_TABLE = "250:100 250:101 P 8"
MIRROR_TABLE = "core 1 1024 2 250:10 0 250:11 0 1 handle_errors"


def snap_status(percent: float, total: int = 10000) -> str:
    """A persistent snapshot's usage status at ``percent`` of ``total`` sectors."""
    return f"{int(total * percent / 100)}/{total} 16"


def mirror_status(health: str = "AA", in_sync: int = 4, regions: int = 4,
                  legs: tuple[str, ...] = ("250:10", "250:11")) -> str:
    return f"{len(legs)} {' '.join(legs)} {in_sync}/{regions} 1 {health} 1 core"
