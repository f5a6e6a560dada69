"""A snapshot merge whose COW starts failing at a random moment (issue 15): the merge stops with
``Merge failed`` and the manager says so; no chunk is taken off the exception table before its data
reached the origin, so every read of the origin returns the snapshot's data or EIO while the COW
fails, and exactly the snapshot's data once it reads again."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from dmtools.errors import DMError
from dmtools.testing.trip import Switch, install, read_pieces
from snapshot import SnapshotManager

SIZE = 512 * 1024
CB = 4096
CHUNKS = SIZE // CB
#: seeded runs, each failing the COW after a different number of reads
RUNS = 20


def _read_chunks(eng: Any, name: str) -> list[bytes | None]:
    """Each chunk of ``name``, or ``None`` where the read failed with EIO."""
    with eng.open_endpoint(name, writable=False) as ep:
        return read_pieces(ep, CB, CHUNKS)


def _run(eng: Any, tmp_path: Path, seed: int) -> bool:
    """One merge with the COW failing after a seeded number of reads; True when it failed."""
    rng = random.Random(seed)
    base = rng.randbytes(SIZE)
    vol = tmp_path / f"vol{seed}.img"
    vol.write_bytes(base)
    cow = tmp_path / f"cow{seed}.img"
    cow.write_bytes(bytes(256 * 1024))
    sw = Switch(f"cow{seed}")
    eng.create("vol", f"0 {SIZE // 512} linear {vol} 0")
    mgr = SnapshotManager(eng)
    mgr.create("vol", str(cow), "s1", chunk_size=CB // 512)
    # the manager's S-cow device maps the COW file: it becomes a trip over the same file
    cow_table = eng.table("s1-cow")
    eng.load("s1-cow", f"0 {cow_table.lines[0].length} trip {cow} 0 {sw.name}")
    eng.suspend("s1-cow")
    eng.resume("s1-cow")
    with eng.open_endpoint("s1") as ep:  # the snapshot diverges from the origin in random chunks
        for c in rng.sample(range(CHUNKS), 40):
            ep.write(rng.randbytes(CB), c * CB)
    with eng.open_endpoint("s1", writable=False) as ep:
        expected = bytearray(SIZE)
        ep.readinto(expected, 0)
    sw.fail_after_more(rng.randrange(60))
    failed = False
    try:
        mgr.merge("s1", timeout=60)
    except DMError as err:
        assert "Merge failed" in str(err), err
        failed = True
    try:
        chunks = _read_chunks(eng, "vol")
        for c, got in enumerate(chunks):
            assert got is None or got == expected[c * CB:(c + 1) * CB], f"chunk {c}"
        if failed:
            assert "Merge failed" in eng.status("vol")[0].params
            sw.heal()  # the COW reads again: the chunks left on it are still the snapshot's
            assert _read_chunks(eng, "vol") == [expected[c * CB:(c + 1) * CB] for c in range(CHUNKS)]
        else:
            assert chunks == [expected[c * CB:(c + 1) * CB] for c in range(CHUNKS)]
            assert vol.read_bytes() == bytes(expected)
    finally:
        sw.heal()
        for name in ("vol", "s1", "s1-cow", "vol-real"):
            if eng.exists(name):
                eng.remove(name)
    return failed


def test_merge_from_a_failing_cow_never_loses_a_chunk(engine: Any, tmp_path: Path) -> None:
    install(engine)
    failed = [_run(engine, tmp_path, seed) for seed in range(RUNS)]
    assert 0 < sum(failed) < RUNS, failed  # the seeds cover failed and finished merges
