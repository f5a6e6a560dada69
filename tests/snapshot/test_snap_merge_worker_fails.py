"""Whatever stops the snapshot-merge worker is a failed merge, as in dm-snap.c (``merge_callback``,
``snapshot_merge_next_chunks``: ``merge_failed`` set, merge shut down): a kcopyd read error (the COW
fails), a write error (the origin fails) and an unexpected exception in the worker all leave the
status ``Merge failed``; the origin reads the merged data for the chunks merged so far and the
snapshot's data from the COW for the rest; a retried ``SnapshotManager.merge`` finishes the merge."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest

import snapshot.targets.merge as merge_mod
from dmtools.errors import DeviceBusy, DMError
from dmtools.testing.trip import Switch, install
from snapshot import SnapshotManager
from test_snapshot_cli import run

SIZE = 512 * 1024
CB = 4096
CHUNKS = SIZE // CB
#: chunks the snapshot changes: even ones only, so that every chunk is a merge run of its own
CHANGED = 12


def _origin_and_snapshot(eng: Any, tmp_path: Path, data: bytes) -> tuple[SnapshotManager, Path, Path]:
    """Origin ``vol`` (a file holding ``data``) with persistent snapshot ``s1``: manager, files."""
    vol = tmp_path / "vol.img"
    vol.write_bytes(data)
    cow = tmp_path / "cow.img"
    cow.write_bytes(bytes(256 * 1024))
    eng.create("vol", f"0 {SIZE // 512} linear {vol} 0")
    mgr = SnapshotManager(eng)
    mgr.create("vol", str(cow), "s1", chunk_size=CB // 512)
    return mgr, vol, cow


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
def test_failed_merge_keeps_data_and_retries(engine: Any, tmp_path: Path, fault: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    eng = engine
    install(eng)
    rng = random.Random(fault)
    base = rng.randbytes(SIZE)
    mgr, vol, cow = _origin_and_snapshot(eng, tmp_path, base)
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


def test_cli_reports_and_retries_a_failed_merge(engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``snapshot merge`` fails with LVM's words, ``snapshot status`` says ``Merge failed``, the
    origin cannot be reactivated while open (nothing changes), and ``snapshot merge`` again retries.
    The kernel raises no dm event for a failed merge (only for an invalidated snapshot): the
    device's event counter does not move when the worker fails."""
    eng = engine
    monkeypatch.setattr("dmtools.cli.common.open_backend", lambda args: eng)
    rng = random.Random(3)
    data = rng.randbytes(SIZE)
    mgr, vol, _ = _origin_and_snapshot(eng, tmp_path, data)
    with eng.open_endpoint("vol") as ep:  # the origin changes; merging rolls it back to ``data``
        for c in range(0, CHUNKS, 3):
            ep.write(rng.randbytes(CB), c * CB)
    release = threading.Event()
    real = merge_mod.do_origin

    def gated(*args: Any, **kwargs: Any) -> None:
        assert release.wait(60), "the test never released the merge worker"
        raise RuntimeError("injected bug in the merge worker")

    monkeypatch.setattr(merge_mod, "do_origin", gated)
    assert run(["snapshot", "merge", "s1", "--no-wait"]) == 0
    capsys.readouterr()
    events_before = eng.info("vol").event_nr
    release.set()
    with pytest.raises(DMError, match=r"Merge failed\. Retry merge or inspect manually\."):
        run(["snapshot", "merge", "s1", "--timeout", "60"])
    assert eng.info("vol").event_nr == events_before
    assert run(["--json", "snapshot", "status", "s1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["state"], shown["status"], shown["merging"]) == ("Merge failed", "Merge failed", True)
    monkeypatch.setattr(merge_mod, "do_origin", real)
    with eng.open_endpoint("vol", writable=False) as ep:
        buf = bytearray(SIZE)
        ep.readinto(buf, 0)
        assert bytes(buf) == data
        with pytest.raises(DeviceBusy, match="origin is open"):
            run(["snapshot", "merge", "s1", "--timeout", "60"])
    assert eng.status("vol")[0].params == "Merge failed"
    assert run(["snapshot", "merge", "s1", "--timeout", "60"]) == 0
    assert "merged s1" in capsys.readouterr().out
    assert vol.read_bytes() == data
    assert not eng.exists("s1-cow")


def test_retry_that_cannot_recreate_the_origin_says_how(engine: Any, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry removes the failed origin and creates it again; when that create fails, the error
    names the one table that reads the origin right, and creating it by hand lets the merge finish."""
    eng = engine
    rng = random.Random("recreate")
    base = rng.randbytes(SIZE)
    mgr, vol, _cow = _origin_and_snapshot(eng, tmp_path, base)
    with eng.open_endpoint("s1") as ep:
        for c in range(0, CHUNKS, 2)[:CHANGED]:
            ep.write(rng.randbytes(CB), c * CB)
    with eng.open_endpoint("s1", writable=False) as ep:
        expected = bytearray(SIZE)
        ep.readinto(expected, 0)
    real = merge_mod.do_origin
    calls: list[int] = []

    def buggy(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("injected bug in the merge worker")
        real(*args, **kwargs)

    monkeypatch.setattr(merge_mod, "do_origin", buggy)
    with pytest.raises(DMError, match="Merge failed"):
        mgr.merge("s1", timeout=60)
    monkeypatch.undo()
    uuid = eng.info("vol").uuid
    create = eng.create

    def refuse(name: str, *args: Any, **kwargs: Any) -> None:
        raise DMError("out of memory (injected)", operation="create", device=name)

    monkeypatch.setattr(eng, "create", refuse)
    with pytest.raises(DMError) as caught:
        mgr.merge("s1", timeout=60)
    monkeypatch.undo()
    message = str(caught.value)
    assert "out of memory (injected)" in message and "no data is lost" in message
    assert not eng.exists("vol")
    table = message.rsplit("table '", 1)[1].rstrip("'")
    assert table.split()[2] == "snapshot-merge"
    create("vol", table, uuid=uuid)
    assert _read_origin(eng) == bytes(expected)
    mgr.merge("s1", timeout=60)
    assert vol.read_bytes() == bytes(expected)
    assert not eng.exists("s1")
