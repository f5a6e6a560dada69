"""Whatever stops the snapshot-merge worker is a failed merge, as in dm-snap.c (``merge_callback``,
``snapshot_merge_next_chunks``: ``merge_failed`` set, merge shut down): a kcopyd read error (the COW
fails), a write error (the origin fails) and an unexpected exception in the worker all leave the
status ``Merge failed``; the origin reads the merged data for the chunks merged so far and the
snapshot's data from the COW for the rest; a retried ``SnapshotManager.merge`` finishes the merge."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

import snapshot.targets.merge as merge_mod
from dmtools.errors import DMError
from dmtools.testing.trip import Switch, install
from snapshot import SnapshotManager

SIZE = 512 * 1024
CB = 4096
CHUNKS = SIZE // CB
#: chunks the snapshot changes: even ones only, so that every chunk is a merge run of its own
CHANGED = 12


def _trip_over(eng: Any, name: str, path: Path, sw: Switch) -> None:
    """Reload ``name`` (a linear map of ``path``) as a ``trip`` of the same file."""
    length = eng.table(name).lines[0].length
    eng.load(name, f"0 {length} trip {path} 0 {sw.name}")
    eng.suspend(name)
    eng.resume(name)


def _read_origin(eng: Any) -> bytes:
    with eng.open_endpoint("vol", writable=False) as ep:
        buf = bytearray(SIZE)
        ep.readinto(buf, 0)
    return bytes(buf)


@pytest.mark.parametrize("fault", ["cow-read", "origin-write", "worker-bug"])
def test_failed_merge_keeps_data_and_retries(snap_engine: Any, tmp_path: Path, fault: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    eng = snap_engine
    install(eng)
    rng = random.Random(fault)
    base = rng.randbytes(SIZE)
    vol = tmp_path / "vol.img"
    vol.write_bytes(base)
    cow = tmp_path / "cow.img"
    cow.write_bytes(bytes(256 * 1024))
    eng.create("vol", f"0 {SIZE // 512} linear {vol} 0")
    mgr = SnapshotManager(eng)
    mgr.create("vol", str(cow), "s1", chunk_size=CB // 512)
    sw = Switch(f"merge-{fault}")
    _trip_over(eng, "s1-cow", cow, sw)
    _trip_over(eng, "vol-real", vol, sw if fault == "origin-write" else Switch(f"spare-{fault}"))
    order = rng.sample(range(0, CHUNKS, 2), CHANGED)  # exceptions in this order; merged newest first
    with eng.open_endpoint("s1") as ep:
        for c in order:
            ep.write(rng.randbytes(CB), c * CB)
    with eng.open_endpoint("s1", writable=False) as ep:
        expected = bytearray(SIZE)
        ep.readinto(expected, 0)
    runs_before_fault = 4
    if fault == "cow-read":
        sw.fail_after_more(runs_before_fault)
    elif fault == "origin-write":
        sw.fail_writes_after_more(runs_before_fault)
    else:
        real = merge_mod.do_origin
        calls = []

        def buggy(*args: Any, **kwargs: Any) -> None:
            calls.append(1)
            if len(calls) > runs_before_fault:
                raise RuntimeError("injected bug in the merge worker")
            real(*args, **kwargs)

        monkeypatch.setattr(merge_mod, "do_origin", buggy)
    with pytest.raises(DMError, match="Merge failed"):
        mgr.merge("s1", timeout=60)
    assert eng.status("vol")[0].params == "Merge failed"
    assert mgr.status("s1").state == "Merge failed"
    assert mgr.status("s1").to_dict()["status"] == "Merge failed"
    sw.heal()
    monkeypatch.undo()
    # merged newest first: the origin file holds the snapshot's data for the last k chunks
    # written, its own data for the others; the device reads the snapshot's data everywhere
    on_file = vol.read_bytes()
    merged = [c for c in order if on_file[c * CB:(c + 1) * CB] == expected[c * CB:(c + 1) * CB]]
    k = len(merged)
    assert 0 < k < CHANGED, merged
    assert merged == order[CHANGED - k:], (merged, order)
    for c in range(CHUNKS):
        if c not in merged:
            assert on_file[c * CB:(c + 1) * CB] == base[c * CB:(c + 1) * CB], f"chunk {c}"
    assert _read_origin(eng) == bytes(expected)
    # the retry reloads the merge table; the exceptions left on the COW merge now
    mgr.merge("s1", timeout=60)
    assert vol.read_bytes() == bytes(expected)
    assert _read_origin(eng) == bytes(expected)
    assert not eng.exists("s1") and not eng.exists("s1-cow")
    assert eng.table("vol").lines[0].target_type != "snapshot-merge"
