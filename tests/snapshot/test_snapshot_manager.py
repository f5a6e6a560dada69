"""``SnapshotManager`` on the in-process userspace engine (the kernel tier repeats it on the kernel)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from dmtools.errors import (CorruptMetadata, DeviceBusy, DeviceConflict, DeviceExists, DeviceNotFound, InvalidArgument,
                            SnapshotInvalid)
from dmtools.testing.threads import HeldAt, take_turns
from snapshot import SnapshotManager

SIZE = 512 * 1024
CB = 4096


@pytest.fixture
def vol(engine: Any, tmp_path: Path) -> tuple[Any, bytes]:
    data = random.Random(5).randbytes(SIZE)
    path = tmp_path / "vol.img"
    path.write_bytes(data)
    engine.create("vol", f"0 {SIZE // 512} linear {path} 0")
    return engine, data


def cow(tmp_path: Path, name: str, size: int = 256 * 1024) -> str:
    p = tmp_path / f"{name}.cow"
    with open(p, "wb") as f:
        f.write(b"\xff" * 8192)  # garbage: create must wipe the header
        f.truncate(size)
    return str(p)


def read(eng: Any, name: str) -> bytes:
    buf = bytearray(SIZE)
    with eng.open_endpoint(name, writable=False) as ep:
        ep.readinto(buf, 0)
    return bytes(buf)


def write(eng: Any, name: str, data: bytes, offset: int) -> None:
    with eng.open_endpoint(name) as ep:
        ep.write(data, offset)


def test_create_list_status_remove(vol: tuple[Any, bytes], tmp_path: Path) -> None:
    eng, data = vol
    mgr = SnapshotManager(eng)
    info = mgr.create("vol", cow(tmp_path, "s1"), "s1")
    assert info.name == "s1" and info.origin == "vol" and info.state == "active"
    assert info.status.format() == "16/512 16"
    assert eng.table("vol").lines[0].target.target_type == "snapshot-origin"
    assert eng.exists("vol-real") and eng.exists("s1-cow")
    write(eng, "vol", b"n" * CB, 0)
    assert read(eng, "s1") == data
    mgr.create("vol", cow(tmp_path, "s2"), "s2", chunk_size=16)
    assert [i.name for i in mgr.list()] == ["s1", "s2"]
    assert mgr.status("s1").status.format() == "24/512 16"
    assert mgr.status("s2").to_dict()["chunk_size"] == 16
    mgr.remove("s1")
    assert eng.table("vol").lines[0].target.target_type == "snapshot-origin"
    mgr.remove("s2")
    assert eng.table("vol").lines[0].target.target_type == "linear"
    assert not eng.exists("vol-real") and not eng.exists("s1-cow") and not eng.exists("s2-cow")
    assert read(eng, "vol")[:CB] == b"n" * CB and read(eng, "vol")[CB:] == data[CB:]


def test_merge_with_progress_restores_plain_origin(vol: tuple[Any, bytes], tmp_path: Path) -> None:
    eng, data = vol
    mgr = SnapshotManager(eng, poll_interval=0.01)
    mgr.create("vol", cow(tmp_path, "s1"), "s1")
    for off in range(0, SIZE // 2, 3 * CB):
        write(eng, "vol", b"w" * CB, off)
    seen: list[tuple[int, int]] = []
    mgr.merge("s1", progress=lambda d, t: seen.append((d, t)), timeout=30)
    assert read(eng, "vol") == data
    assert seen and seen[-1][0] == seen[-1][1]
    assert eng.table("vol").lines[0].target.target_type == "linear"
    assert not eng.exists("s1") and not eng.exists("s1-cow") and not eng.exists("vol-real")


def test_merge_keeps_other_snapshots(vol: tuple[Any, bytes], tmp_path: Path) -> None:
    eng, data = vol
    mgr = SnapshotManager(eng, poll_interval=0.01)
    mgr.create("vol", cow(tmp_path, "s1"), "s1")
    write(eng, "vol", b"1" * CB, 0)
    mid = read(eng, "vol")
    mgr.create("vol", cow(tmp_path, "s2"), "s2")
    assert mgr.merge("s1", wait=False) is None
    assert mgr.status("s1").merging
    mgr.merge("s1", timeout=30)  # resumes waiting and finishes
    assert read(eng, "vol") == data and read(eng, "s2") == mid
    assert eng.table("vol").lines[0].target.target_type == "snapshot-origin"
    assert [i.name for i in mgr.list()] == ["s2"]


def test_activate_after_restart(vol: tuple[Any, bytes], tmp_path: Path) -> None:
    eng, data = vol
    mgr = SnapshotManager(eng)
    c = cow(tmp_path, "s1")
    mgr.create("vol", c, "s1", chunk_size=16)
    write(eng, "vol", b"r" * 3 * CB, 5 * CB)
    after = read(eng, "vol")
    mgr.remove("s1")  # a "reboot": tables gone, COW and origin keep their data
    with pytest.raises(DeviceConflict, match="the origin vol share bytes"):
        mgr.activate("vol", str(tmp_path / "vol.img"), "x")  # the origin's own file
    info = mgr.activate("vol", c, "s1")
    assert info.chunk_size == 16
    assert read(eng, "s1") == data and read(eng, "vol") == after


def test_refusals_change_nothing(vol: tuple[Any, bytes], tmp_path: Path) -> None:
    eng, data = vol
    mgr = SnapshotManager(eng)
    small = cow(tmp_path, "small", 2 * CB)
    with pytest.raises(InvalidArgument, match="3 chunks"):
        mgr.create("vol", small, "s0")
    c = cow(tmp_path, "s1")
    mgr.create("vol", c, "s1")
    with pytest.raises(DeviceBusy, match="in use"):
        mgr.create("vol", c, "s9")
    with pytest.raises(DeviceExists):
        mgr.create("vol", cow(tmp_path, "s3"), "s1")
    with pytest.raises(InvalidArgument, match="power of 2"):
        mgr.create("vol", cow(tmp_path, "s4"), "s4", chunk_size=12)
    assert sorted(e.name for e in eng.list()) == ["s1", "s1-cow", "vol", "vol-real"]
    bad = cow(tmp_path, "bad")
    with pytest.raises(CorruptMetadata):
        mgr.activate("vol", bad, "s5")
    assert Path(bad).read_bytes()[:4] == b"\xff" * 4


def test_create_rolls_back_on_failure(vol: tuple[Any, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    eng, data = vol
    mgr = SnapshotManager(eng)
    before = str(eng.table("vol"))
    real_create = eng.create

    def failing(name: str, *a: Any, **kw: Any) -> Any:
        if name == "s1":
            raise DeviceExists("injected", device=name)
        return real_create(name, *a, **kw)

    monkeypatch.setattr(eng, "create", failing)
    with pytest.raises(DeviceExists, match="injected"):
        mgr.create("vol", cow(tmp_path, "s1"), "s1")
    assert str(eng.table("vol")) == before and not eng.info("vol").suspended
    assert sorted(e.name for e in eng.list()) == ["vol"]
    assert read(eng, "vol") == data


def test_merge_refuses_invalid_snapshot(vol: tuple[Any, bytes], tmp_path: Path) -> None:
    eng, _ = vol
    mgr = SnapshotManager(eng)
    mgr.create("vol", cow(tmp_path, "s1", 4 * CB), "s1")
    write(eng, "vol", b"x" * 4 * CB, 0)
    assert mgr.status("s1").state == "Invalid"
    with pytest.raises(SnapshotInvalid):
        mgr.merge("s1")
    mgr.remove("s1")
    assert eng.table("vol").lines[0].target.target_type == "linear"


def test_extend_grows_a_file_cow_through_handover(vol: tuple[Any, bytes], tmp_path: Path) -> None:
    eng, data = vol
    mgr = SnapshotManager(eng)
    path = cow(tmp_path, "s1", 16 * CB)  # header, one area, 14 data chunks
    mgr.create("vol", path, "s1")
    write(eng, "vol", b"a" * 10 * CB, 0)
    res = mgr.extend("s1", 50)
    assert (res.old_bytes, res.new_bytes, res.file, res.loop, res.cow_device) == (
        16 * CB, 24 * CB, path, None, "s1-cow")
    assert Path(path).stat().st_size == 24 * CB and eng.table("s1-cow").size == 24 * CB // 512
    assert mgr.status("s1").status.format() == f"{12 * 8}/{24 * 8} 16"
    # the new space is used: more chunks than the old COW held are copied, the view holds
    write(eng, "vol", b"b" * 10 * CB, 10 * CB)
    assert mgr.status("s1").state == "active" and read(eng, "s1") == data
    assert not eng.info("s1").suspended and not eng.info("vol").suspended
    # at least one chunk, rounded up to whole chunks
    assert mgr.extend("s1", 1).new_bytes == 25 * CB


def test_extend_refusals_change_nothing(vol: tuple[Any, bytes], tmp_path: Path) -> None:
    eng, _data = vol
    mgr = SnapshotManager(eng)
    path = cow(tmp_path, "s1", 16 * CB)
    mgr.create("vol", path, "s1")
    tables = {n: str(eng.table(n)) for n in ("vol", "s1", "s1-cow", "vol-real")}
    with pytest.raises(InvalidArgument, match="positive integer"):
        mgr.extend("s1", 0)
    with pytest.raises(DeviceNotFound, match="no such snapshot"):
        mgr.extend("vol", 20)
    assert Path(path).stat().st_size == 16 * CB
    assert {n: str(eng.table(n)) for n in tables} == tables


def test_a_cow_held_by_another_tool_is_not_wiped(vol: tuple[Any, bytes], tmp_path: Path) -> None:
    """``create`` zeroes the COW's header before its tables claim the COW: a COW that another
    tool, an engine or a mount holds (``dmtools.claims``; the root tier mounts one) is refused
    with DeviceBusy before that write, and its bytes stay as they were."""
    from dmtools import claims

    eng, data = vol
    c = cow(tmp_path, "held")
    before = Path(c).read_bytes()
    with claims.claim(c, holder="another tool"):
        with pytest.raises(DeviceBusy, match="claimed"):
            SnapshotManager(eng).create("vol", c, "s1")
        assert Path(c).read_bytes() == before
    assert sorted(e.name for e in eng.list()) == ["vol"] and read(eng, "vol") == data
    SnapshotManager(eng).create("vol", c, "s1")  # released: the same create goes through
    assert Path(c).read_bytes()[:4] != before[:4]


#: case -> (origin name, origin uuid, snapshot name, devices already there as (name, uuid), error)
_LAYER_CASES: dict[str, tuple[str, str, str, list[tuple[str, str]], str]] = {
    "long name": ("o" * 125, "", "s1", [], "InvalidName"),  # o...o-real: 130 bytes
    "long uuid": ("vol", "u" * 125, "s1", [], "InvalidName"),  # u...u-real: 130 bytes
    "-real exists": ("vol", "", "s1", [("vol-real", "")], "DeviceExists"),
    # U...U-pppp...-cow: 136 bytes, was cut to 128 and so the same for every name of that prefix
    "long cow uuid": ("vol", "U" * 100, "p" * 30 + "a", [], "InvalidName"),
    # origin U-a's snapshot b has U-a-b-cow, the uuid origin U's snapshot a-b would get
    "cow uuid taken": ("vol", "U", "a-b", [("b-cow", "U-a-b-cow")], "DeviceExists"),
    "-real uuid taken": ("vol", "U", "s1", [("other", "U-real")], "DeviceExists"),
}


@pytest.mark.parametrize("case", list(_LAYER_CASES))
def test_a_layer_that_cannot_be_made_leaves_the_cow_alone(engine: Any, tmp_path: Path, case: str) -> None:
    """The first snapshot of an origin makes ``ORIGIN-real`` with the uuid ``UUID-real``, and each
    snapshot ``NAME-cow`` with ``UUID-NAME-cow``: when such a name or uuid is too long for the
    kernel (127 / 128 bytes) or a live device has it, ``create`` fails before it zeroes the COW's
    header, and nothing is made."""
    from dmtools import errors

    origin, uuid, name, others, error = _LAYER_CASES[case]
    img = tmp_path / "vol.img"
    img.write_bytes(random.Random(5).randbytes(SIZE))
    engine.create(origin, f"0 {SIZE // 512} linear {img} 0", uuid=uuid)
    for other, other_uuid in others:
        engine.create(other, "0 8 zero", uuid=other_uuid)
    c = cow(tmp_path, "s1")
    before = Path(c).read_bytes()
    with pytest.raises(getattr(errors, error)):
        SnapshotManager(engine).create(origin, c, name)
    assert Path(c).read_bytes() == before
    assert sorted(e.name for e in engine.list()) == sorted([origin] + [n for n, _ in others])


@pytest.mark.root
def test_extend_grows_a_cow_on_a_loop_device_with_an_offset(vol: tuple[Any, bytes], tmp_path: Path,
                                                             make_loop: Any) -> None:
    """A COW on a loop device that starts ``offset`` bytes into its file (``losetup -o``) grows by
    growing the file to offset + the new size; the bytes before the offset stay as they were."""
    eng, data = vol
    mgr = SnapshotManager(eng)
    img = tmp_path / "shared.img"
    img.write_bytes(b"\x77" * (64 * CB) + bytes(16 * CB))  # someone else's 256 KiB, then the COW
    lo = make_loop(img, offset=64 * CB)
    mgr.create("vol", lo.path, "s1")
    write(eng, "vol", b"a" * 10 * CB, 0)
    res = mgr.extend("s1", 50)
    assert (res.old_bytes, res.new_bytes, res.loop) == (16 * CB, 24 * CB, lo.path)
    assert img.stat().st_size == 88 * CB and eng.table("s1-cow").size == 24 * CB // 512
    write(eng, "vol", b"b" * 10 * CB, 10 * CB)  # more chunks than the old COW held
    assert mgr.status("s1").state == "active" and read(eng, "s1") == data
    mgr.remove("s1")
    assert img.read_bytes()[:64 * CB] == b"\x77" * (64 * CB)


@pytest.mark.parametrize("other", ["create", "merge"])
def test_two_managers_of_one_origin_take_turns(vol: tuple[Any, bytes], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, other: str) -> None:
    """Manager A creates snapshot s2 of vol and is stopped past its checks (the origin's table
    read); manager B then creates s3 of vol, or merges s1 into it. B waits for vol's lock (seen
    in /proc/locks), then both succeed and the stack is whole: without the lock A went on from
    its stale reading (a second vol-real: DeviceExists; or a -real the merge had removed)."""
    eng, data = vol
    monkeypatch.setenv("DMTOOLS_RUN_DIR", str(tmp_path / "run"))
    if other == "merge":
        SnapshotManager(eng).create("vol", cow(tmp_path, "s1"), "s1")
        write(eng, "vol", b"m" * CB, 0)
    held = HeldAt(eng, "create")
    b_mgr = SnapshotManager(eng, poll_interval=0.01)
    locks = tmp_path / "run" / "locks"
    take_turns(lambda: SnapshotManager(held).create("vol", cow(tmp_path, "s2"), "s2"),
               (lambda: b_mgr.create("vol", cow(tmp_path, "s3"), "s3")) if other == "create" else (
                   lambda: b_mgr.merge("s1", timeout=60)),
               held, lambda: list(locks.glob("*")) if locks.is_dir() else [])
    mgr = SnapshotManager(eng)
    assert [i.name for i in mgr.list()] == (["s2", "s3"] if other == "create" else ["s2"])
    assert all(i.state == "active" and i.origin == "vol" for i in mgr.list())
    assert eng.table("vol").lines[0].target.target_type == "snapshot-origin"
    assert read(eng, "vol") == data  # a merge of s1 brought the origin back to data
    write(eng, "vol", b"z" * CB, CB)
    assert read(eng, "s2") == (data if other == "create" else b"m" * CB + data[CB:])  # vol when A made it
    assert list((tmp_path / "run" / "locks").iterdir()) == []  # released locks leave no file
