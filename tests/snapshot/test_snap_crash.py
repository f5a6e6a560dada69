"""Crash consistency: SIGKILL a process writing to an origin with snapshots at random moments; after
each kill, re-activation shows every snapshot as the origin was at its creation (plus its own
acknowledged writes) and the origin holding every acknowledged write."""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from snap_crash_writer import SECTORS, plan

from dmtools.engine import Engine
from dmtools.testing.crash import kill_after_acks
from snapshot import SnapshotManager

RUNS = int(os.environ.get("SNAPSHOT_CRASH_RUNS", "100"))
WRITER = Path(__file__).with_name("snap_crash_writer.py")


def _first_diff(a: bytes, b: bytes) -> str:
    i = next((k for k in range(len(a)) if a[k] != b[k]), -1)
    if i < 0:
        return "equal"
    return f"first difference at byte {i}: got {a[max(0, i - 8):i + 12]!r}, expected {b[max(0, i - 8):i + 12]!r}"


def _check(view: bytes, model: bytearray, maybe: "tuple[int, bytes] | None", what: str) -> None:
    if maybe is None:
        assert view == bytes(model), f"{what}: {_first_diff(view, bytes(model))}"
        return
    off, data = maybe
    end = off + len(data)
    assert view[:off] == bytes(model[:off]) and view[end:] == bytes(model[end:]), (
        f"{what} (in flight: {len(data)} bytes at {off}): {_first_diff(view, bytes(model))}"
    )
    torn = view[off:end]
    old = bytes(model[off:end])
    assert all(b in (o, n) for b, o, n in zip(torn, old, data)), f"{what}: in-flight write is neither old nor new"


def one_run(work: Path, seed: int) -> int:
    rng = random.Random(seed)
    initial = rng.randbytes(SECTORS * 512)
    (work / "vol.img").write_bytes(initial)
    chunks = [rng.choice([8, 16, 32]) for _ in range(rng.choice([1, 2]))]
    for i in range(len(chunks)):
        with open(work / f"s{i}.cow", "wb") as f:
            f.truncate(3 * SECTORS * 512)
    acked = kill_after_acks(WRITER, [str(work), str(seed), ",".join(map(str, chunks))], rng, 40) - 1
    names = [f"s{i}" for i in range(len(chunks))]
    writes = plan(seed, names)
    models = {n: bytearray(initial) for n in ["vol", *names]}
    for dev, sector, count, data in writes[: acked + 1]:
        models[dev][sector * 512 : sector * 512 + len(data)] = data
    inflight = writes[acked + 1] if acked + 1 < len(writes) else None

    eng = Engine()
    try:
        eng.create("vol", f"0 {SECTORS} linear {work / 'vol.img'} 0")
        mgr = SnapshotManager(eng)
        for n in names:
            mgr.activate("vol", str(work / f"{n}.cow"), n)
            assert mgr.status(n).state == "active"
        for n in ["vol", *names]:
            buf = bytearray(SECTORS * 512)
            with eng.open_endpoint(n, writable=False) as ep:
                ep.readinto(buf, 0)
            maybe = None
            if inflight is not None and inflight[0] == n:
                maybe = (inflight[1] * 512, inflight[3])
            _check(bytes(buf), models[n], maybe, f"seed {seed} device {n} after {acked + 1} acks")
    finally:
        eng.close()
    return acked + 1


def _run_in(tmp_path: Path, seed: int) -> int:
    work = tmp_path / f"run{seed}"
    work.mkdir()
    try:
        return one_run(work, seed)
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()


def test_sigkill_writer_then_reactivate(tmp_path: Path) -> None:
    # two runs at a time: each spends most of its time in the writer's fsyncs
    with ThreadPoolExecutor(max_workers=2) as pool:
        acks = list(pool.map(lambda seed: _run_in(tmp_path, seed), range(RUNS)))
    assert len(acks) == RUNS
    assert sum(acks) > RUNS  # the kills landed after real work, not only during set-up
