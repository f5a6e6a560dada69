"""Fixtures for the root CLI tests: a recording fake backend at the ``open_backend`` seam, and a runner."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from dmtools.backend import DeviceEntry, DeviceInfo, StatusLine, Versions
from dmtools.cli import main as cli_main
from dmtools.table import Table


@dataclass
class FakeDM:
    """A ``DeviceMapper`` stand-in that records every call and answers from canned data."""

    devices: dict[str, DeviceInfo] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)
    inactive: dict[str, str] = field(default_factory=dict)
    statuses: dict[str, list[StatusLine]] = field(default_factory=dict)
    dependencies: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    fail: Exception | None = None
    response: str | None = None
    closed: int = 0
    backend: str = "fake"

    def add(self, name: str, table: str = "", *, uuid: str = "", minor: int = 0, **info: Any) -> None:
        """A device ``name`` with a live ``table`` (empty: no table)."""
        count = len(table.splitlines())
        self.devices[name] = DeviceInfo(name=name, uuid=uuid, live_table=bool(table), major=254, minor=minor,
                                        target_count=count, **info)
        self.tables[name] = table

    def _record(self, *call: Any) -> None:
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail

    def create(self, name: str, table: Table | None = None, *, uuid: str = "", readonly: bool = False) -> DeviceInfo:
        self._record("create", name, None if table is None else str(table), uuid, readonly)
        return DeviceInfo(name=name, uuid=uuid, live_table=table is not None, major=254, minor=7,
                          read_only=readonly, target_count=len(table) if table is not None else 0)

    def load(self, name: str, table: Table, *, readonly: bool = False) -> None:
        self._record("load", name, str(table), readonly)

    def suspend(self, name: str, *, noflush: bool = False) -> None:
        self._record("suspend", name, noflush)

    def resume(self, name: str) -> None:
        self._record("resume", name)

    def remove(self, name: str, *, retry: bool = False, deferred: bool = False) -> None:
        self._record("remove", name, retry, deferred)

    def clear(self, name: str) -> None:
        self._record("clear", name)

    def rename(self, name: str, new_name: str) -> None:
        self._record("rename", name, new_name)

    def info(self, name: str, *, open_count: bool = True) -> DeviceInfo:
        self._record("info", name)
        return self.devices[name]

    def table(self, name: str, *, inactive: bool = False) -> Table:
        self._record("table", name, inactive)
        return Table.parse((self.inactive if inactive else self.tables)[name])

    def status(self, name: str, *, inactive: bool = False) -> list[StatusLine]:
        self._record("status", name, inactive)
        return self.statuses.get(name, [])

    def message(self, name: str, sector: int, message: str) -> str | None:
        self._record("message", name, sector, message)
        return self.response

    def deps(self, name: str) -> list[tuple[int, int]]:
        self._record("deps", name)
        return self.dependencies.get(name, [])

    def list(self) -> list[DeviceEntry]:
        self._record("list")
        # deliberately unsorted: the CLI orders by name like the kernel's name tree
        return [DeviceEntry(i.name, i.major, i.minor, i.event_nr, i.uuid) for i in reversed(self.devices.values())]

    def targets(self) -> dict[str, tuple[int, int, int]]:
        self._record("targets")
        return {"striped": (1, 7, 0), "linear": (1, 5, 0), "snapshot-origin": (1, 9, 0)}

    def version(self) -> Versions:
        self._record("version")
        return Versions(library="1.02.196", driver="4.48.0", backend="")

    def wait_event(self, name: str, event_nr: int = 0, timeout: float | None = None) -> int:
        self._record("wait_event", name, event_nr, timeout)
        return event_nr + 1

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def fake_dm(monkeypatch: pytest.MonkeyPatch) -> FakeDM:
    """A ``FakeDM`` returned by ``open_backend``; ``fake_dm.opened_with`` lists the ``--backend`` values."""
    dm = FakeDM()
    opened: list[str] = []

    def open_backend(args: Any) -> FakeDM:
        opened.append(args.backend)
        return dm

    monkeypatch.setattr("dmtools.cli.common.open_backend", open_backend)
    dm.opened_with = opened  # type: ignore[attr-defined]
    return dm


@pytest.fixture
def opened_by_dmtools_open(monkeypatch: pytest.MonkeyPatch) -> tuple[FakeDM, list[str]]:
    """A ``FakeDM`` behind ``dmtools.open`` itself: the real ``open_backend`` seam is kept."""
    import dmtools

    dm = FakeDM()
    opened: list[str] = []

    def fake_open(backend: str = "auto") -> FakeDM:
        opened.append(backend)
        return dm

    monkeypatch.setattr(dmtools, "open", fake_open)
    return dm, opened


@pytest.fixture
def stdin(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``stdin(text)`` makes ``sys.stdin`` a pipe-like stream holding ``text``."""

    def set_stdin(text: str) -> None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))

    return set_stdin


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``run(*argv)`` -> ``(rc, stdout, stderr)`` of the in-process CLI with ``propagate=True``."""

    def go(*argv: str, propagate: bool = True) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = cli_main.main(list(argv), propagate=propagate)
        out, err = capsys.readouterr()
        return rc, out, err

    return go
