"""A monitor killed at every point where it touches the disk loses and repeats nothing.

The scenario (devices added, a snapshot crossing thresholds several at a time and going invalid,
a mirror leg failing with the ``degraded`` policy, a rename, a removal) runs once uninterrupted
for reference, then once per I/O operation of that run with a "kill" just before that operation
(and, for writes, halfway through it): the operation and everything after it in that process never
happen, as with SIGKILL. A new monitor then starts over the same state directory and output file
and the scenario goes on. The output file must hold the reference's events, numbered 1..N, each
once; a policy action cut off by the kill is reported as interrupted instead of run again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest

from dmtools.events import StateStore
from dmtools.events.delivery import JsonLinesFile
from dmtools.monitor import Monitor, MonitorConfig, PolicySettings

from ev_fakes import MIRROR_TABLE, SNAP_TABLE, FakeDM, mirror_status, snap_status


real_write, real_replace, real_truncate, real_unlink = os.write, os.replace, os.ftruncate, os.unlink


class Killed(BaseException):
    """The process died here (nothing after it runs)."""


class Disk:
    """Counts the durable operations (``write``, ``fsync``, ``replace``, ``ftruncate``, ``unlink``) and kills
    the process at operation ``kill_at`` (1-based; 0: never); ``torn``: a write there is cut in
    half. ``fsync`` itself is skipped: a killed process loses nothing from the page cache."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kill_at: int = 0, torn: bool = False) -> None:
        self.count = 0
        self.kill_at = kill_at
        self.torn = torn
        self.dead = False
        self.kinds: list[str] = []

        def op(kind: str, action: Callable[[], Any], half: Callable[[], Any] | None = None) -> Any:
            if self.dead:
                raise Killed(kind)
            self.count += 1
            self.kinds.append(kind)
            if self.count == self.kill_at:
                self.dead = True
                if self.torn and half is not None:
                    half()
                raise Killed(kind)
            return action()

        monkeypatch.setattr(os, "write", lambda fd, data: op(
            "write", lambda: real_write(fd, data), lambda: real_write(fd, bytes(data)[: len(data) // 2])))
        monkeypatch.setattr(os, "fsync", lambda fd: op("fsync", lambda: None))
        monkeypatch.setattr(os, "replace", lambda a, b: op("replace", lambda: real_replace(a, b)))
        monkeypatch.setattr(os, "ftruncate", lambda fd, n: op("ftruncate", lambda: real_truncate(fd, n)))
        monkeypatch.setattr(os, "unlink", lambda path: op("unlink", lambda: real_unlink(path)))


def steps(dm: FakeDM) -> list[Callable[[], None]]:
    legs = ("250:10", "250:11")
    return [
        lambda: None,
        lambda: dm.set_status("snap", snap_status(87)),
        lambda: dm.set_status("mir", mirror_status("DA", in_sync=3, legs=legs), event=True),
        lambda: (dm.set_status("snap", snap_status(96)), dm.add("z", [(0, 8, "zero", "", "")])),
        lambda: (dm.rename("z", "z2"), dm.set_status("snap", "Invalid", event=True)),
        lambda: dm.remove("mir"),
    ]


def scenario(tmp_path: Path, disk: Disk) -> tuple[list[dict[str, Any]], int]:
    """Run every step with one monitor run each, restarting after a kill; return the output
    file's events and how many kills happened."""
    dm = FakeDM()
    dm.add("snap", [(0, 2048, "snapshot", SNAP_TABLE, snap_status(10))])
    dm.add("mir", [(0, 4096, "mirror", MIRROR_TABLE, mirror_status("AA"))])
    config = MonitorConfig(PolicySettings(warn=(80, 85, 90, 95), mirror_policy="degraded"))
    out = str(tmp_path / "events.jsonl")
    kills = 0
    for step in steps(dm):
        step()
        while True:
            store = sink = None
            try:
                store = StateStore("fake", str(tmp_path / "state"), lock=True)
                sink = JsonLinesFile(out)
                Monitor(dm, config, store=store, event_numbers=False, uevents=False).run(sink, once=True)
                break
            except Killed:
                kills += 1
                disk.dead = False  # a new process starts
                disk.kill_at = 0
            finally:
                for held in (sink, store):
                    if held is not None:
                        held.close()  # what the kernel does for a dead process's descriptors
    with open(out) as f:
        return [json.loads(line) for line in f], kills


def view(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["seq"], e["device"], e["event"], e.get("threshold"), e.get("new"), e.get("old_name"),
             e.get("policy")) for e in events]


def test_killed_at_every_io_operation_loses_and_repeats_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = Disk(monkeypatch)
    reference, kills = scenario(tmp_path / "reference", counter)
    assert kills == 0
    assert [e["seq"] for e in reference] == list(range(1, len(reference) + 1))
    kinds = [e["event"] for e in reference]
    assert kinds.count("snapshot-usage") == 4 and "snapshot-invalidated" in kinds
    assert kinds.count("policy") == 1 and "device-renamed" in kinds
    total = counter.count
    assert total > 40 and {"write", "fsync", "replace", "unlink"} <= set(counter.kinds)
    interrupted = 0
    for kill_at in range(1, total + 1):
        for torn in (False, True):
            if torn and counter.kinds[kill_at - 1] != "write":
                continue
            disk = Disk(monkeypatch, kill_at, torn)
            got, kills = scenario(tmp_path / f"k{kill_at}{'t' if torn else ''}", disk)
            assert kills == 1, (kill_at, torn)
            assert view(got) == view(reference), (kill_at, torn, counter.kinds[kill_at - 1])
            for mine, ref in zip(got, reference):
                if mine["event"] == "policy" and mine["detail"] != ref["detail"]:
                    assert "interrupted" in mine["detail"] and not mine["ok"]
                    interrupted += 1
    print(f"{total} I/O operations, {counter.kinds.count('write')} writes; {interrupted} plans interrupted")
    assert interrupted >= 1  # the kill between a plan's start and its end was among them
