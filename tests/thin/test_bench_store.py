"""``scripts/bench thin``'s backing store: every measurement starts from the files as written out.

A pool that zeroes new blocks punches holes in its data file (``Endpoint.zero``); the next device on
that file would then write into holes and pay the file system's allocation, which made the
sequential ratio of thin without zeroing depend on the configuration measured before it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from dmtools.blockdev import BlockDevice

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location("bench_thin_under_test", ROOT / "scripts" / "bench_thin.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def _holes(path: str) -> list[tuple[int, int]]:
    with BlockDevice(path) as dev:
        size, extents = dev.size, dev.data_extents(0, dev.size)
    if extents is None:
        pytest.skip("this file system does not report holes")
    out, pos = [], 0
    for at, n in extents:
        if at > pos:
            out.append((pos, at - pos))
        pos = at + n
    if pos < size:
        out.append((pos, size - pos))
    return out


def test_settle_writes_back_punched_holes_and_keeps_the_data(bench: ModuleType, tmp_path: Path) -> None:
    store = bench.Store(tmp_path, False)
    try:
        data = store.get("data", 4 * MiB, fill=True)
        lin = store.get("lin", 2 * MiB)
        with open(data, "rb") as f:
            before = f.read()
        with BlockDevice(data, writable=True) as dev:  # what a zeroing pool does to two blocks
            dev.zero(64 << 10, 64 << 10)
            dev.zero(3 * MiB, 128 << 10)
        holes = _holes(data)
        if not holes:
            pytest.skip("this file system does not punch holes")
        assert sum(n for _at, n in holes) == 192 << 10

        assert store.settle() == 192 << 10
        assert _holes(data) == [] and _holes(lin) == []
        with open(data, "rb") as f:
            after = f.read()
        expect = bytearray(before)
        expect[64 << 10:128 << 10] = bytes(64 << 10)
        expect[3 * MiB:3 * MiB + (128 << 10)] = bytes(128 << 10)
        assert after == bytes(expect)  # the holes read zeros before and after; the rest is untouched
        assert store.settle() == 0  # nothing left to write back
        assert store.rewritten == 192 << 10
    finally:
        store.close()
    assert not tmp_path.joinpath("store").exists()



def test_zeroing_pool_punches_holes_only_in_files_of_its_own(bench: ModuleType, tmp_path: Path) -> None:
    """The zeroing pool's random writes punch holes, which come back as new extents: the file
    the no-zeroing volume (compared with linear) and the snapshot's pool write must not be it."""
    size = 4 * MiB
    store = bench.Store(tmp_path, False)
    asked: list[str] = []
    get = store.get
    store.get = lambda name, *args: (asked.append(name), get(name, *args))[1]
    files: dict[str, set[str]] = {}
    try:
        for name, build in (("zero", bench._thin_volume(size, True)), ("nozero", bench._thin_volume(size, False)),
                            ("snapshot", bench._thin_snapshot(size))):
            asked.clear()
            rig = bench.Rig(tmp_path, False, "t", store=store)
            try:
                with rig.endpoint(build(rig)) as ep:
                    ep.write(bytes(4096), 0)  # a working pool over those files
                    ep.flush()
            finally:
                rig.close()
            files[name] = set(asked)
    finally:
        store.close()
    assert files["zero"] == {"meta-zero", "data-zero"}
    assert files["nozero"] == {"meta", "data"}
    assert files["snapshot"] == {"meta", "data"}  # the no-zeroing volume's: no holes there
