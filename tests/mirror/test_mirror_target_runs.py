"""The mirror target's recovery between regular files copies adjacent regions in one kcopyd job."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Iterator

import pytest

import kcopyd
from dmtools.engine import Engine
from mirror.manager import MirrorManager
from mirror.target import MirrorTarget

REGION_BYTES = 64 << 10
SIZE = 4 << 20


@pytest.fixture
def eng() -> Iterator[Any]:
    e = Engine()
    e.register_target(MirrorTarget)
    yield e
    e.close()


def _legs(tmp_path: Path, seed: int) -> tuple[Path, Path, bytes]:
    """Leg files ``a`` (random data from ``seed``) and ``b`` (a hole of the same size), and the data."""
    a, b = tmp_path / "a", tmp_path / "b"
    data = random.Random(seed).randbytes(SIZE)
    a.write_bytes(data)
    b.write_bytes(b"")
    os.truncate(b, SIZE)
    return a, b, data


def test_file_legs_recover_adjacent_regions_in_one_job(eng: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    a, b, data = _legs(tmp_path, 3)
    jobs: list[int] = []
    real = kcopyd.Client.copy

    def copy(client: Any, src: Any, dests: Any, *args: Any, **kw: Any) -> Any:
        jobs.append(src.count * 512)
        return real(client, src, dests, *args, **kw)

    monkeypatch.setattr(kcopyd.Client, "copy", copy)
    mm = MirrorManager(eng)
    mm.create("runs", [str(a), str(b)], region_size=REGION_BYTES // 512)
    mm.resync("runs", poll=0.01)
    with eng.open_endpoint("runs") as ep:
        ep.flush()
    mm.remove("runs")
    assert b.read_bytes() == data
    assert sum(jobs) == SIZE  # every region copied once
    assert len(jobs) < SIZE // REGION_BYTES and max(jobs) > REGION_BYTES


def test_a_failed_run_is_copied_again_region_by_region(eng: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose job fails is redone a region at a time, so that only regions that really cannot
    be copied fail (here the seam fails every job of more than one region, once each)."""
    a, b, data = _legs(tmp_path, 4)
    failed: list[int] = []
    singles: list[int] = []
    real = kcopyd.Client.copy

    def copy(client: Any, src: Any, dests: Any, flags: int = 0, notify: Any = None, context: Any = None,
             **kw: Any) -> Any:
        if src.count * 512 > REGION_BYTES:
            failed.append(src.sector)
            job = real(client, src, dests, flags, lambda r, w, c: notify(False, 1, c), context, **kw)
            return job
        singles.append(src.sector)
        return real(client, src, dests, flags, notify, context, **kw)

    monkeypatch.setattr(kcopyd.Client, "copy", copy)
    mm = MirrorManager(eng)
    mm.create("redo", [str(a), str(b)], region_size=REGION_BYTES // 512)
    mm.resync("redo", poll=0.01)
    status = eng.status("redo")[0].params
    with eng.open_endpoint("redo") as ep:
        ep.flush()
    mm.remove("redo")
    assert failed, "some runs were copied as one job"
    assert len(singles) == SIZE // REGION_BYTES == len(set(singles))  # each region once, alone
    assert b.read_bytes() == data
    assert " AA " in f" {status} "  # no leg was failed
