"""STATUSTYPE_IMA text of the snapshot targets (dm-snap.c ``snapshot_status``/``origin_status``),
what ``dmsetup measure`` prints for them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from snap_stack import Stack

from dmtools.errors import DeviceIOError

CB = 4096
SIZE = 64 * 1024


def target(eng: Any, name: str) -> Any:
    return eng._get(name, "test").live.targets[0]


def expected(kind: str, version: str, origin: str, cow: str, valid: str = "y", failed: str = "n", over: str = "n") -> str:
    return (
        f"target_name={kind},target_version={version},snap_origin_name={origin},snap_cow_name={cow},"
        f"snap_valid={valid},snap_merge_failed={failed},snapshot_overflowed={over};"
    )


@pytest.fixture
def st(engine: Any, tmp_path: Path) -> Stack:
    return Stack(engine, tmp_path, random.Random(3).randbytes(SIZE))


def test_snapshot_and_origin(engine: Any, st: Stack) -> None:
    st.add_snapshot("s1", 16 * CB)
    real = engine.device_ref(st.real)
    cow = str(st.snaps["s1"])
    assert target(engine, "s1").ima_status() == expected("snapshot", "1.16.0", real, cow)
    assert target(engine, st.base).ima_status() == ""  # origin_status emits nothing


def test_overflow_and_invalid(engine: Any, st: Stack) -> None:
    st.add_snapshot("s1", 3 * CB, store="PO")
    real = engine.device_ref(st.real)
    st.write("s1", b"1" * CB, 0)
    with pytest.raises(DeviceIOError):
        st.write("s1", b"2" * CB, CB)
    tgt = target(engine, "s1")
    assert tgt.ima_status() == expected("snapshot", "1.16.0", real, str(st.snaps["s1"]), over="y")
    st.write(st.base, b"o" * CB, 9 * CB)  # an origin write needing space invalidates it
    assert tgt.ima_status() == expected("snapshot", "1.16.0", real, str(st.snaps["s1"]), "n", "n", "y")


def test_merge_target(engine: Any, st: Stack) -> None:
    st.add_snapshot("s1", 16 * CB)
    real = engine.device_ref(st.real)
    cow = str(st.snaps["s1"])
    engine.suspend(st.base)
    engine.suspend("s1")
    engine.load(st.base, f"0 {st.sectors} snapshot-merge {real} {cow} P 8")
    engine.resume(st.base)
    tgt = target(engine, st.base)
    assert tgt.ima_status() == expected("snapshot-merge", "1.5.0", real, cow)
    # the handed-over source: invalid from here on
    engine.resume("s1")
    assert target(engine, "s1").ima_status() == expected("snapshot", "1.16.0", real, cow, valid="n")
    tgt._fail("test")  # merge_failed, as after a kcopyd error
    assert tgt.ima_status() == expected("snapshot-merge", "1.5.0", real, cow, failed="y")
