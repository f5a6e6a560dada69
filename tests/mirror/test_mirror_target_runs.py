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


def test_file_legs_recover_adjacent_regions_in_one_job(eng: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    data = random.Random(3).randbytes(SIZE)
    a.write_bytes(data)
    b.write_bytes(b"")
    os.truncate(b, SIZE)
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
