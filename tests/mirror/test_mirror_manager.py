"""MirrorManager on the userspace engine over image files."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from dmtools.errors import CorruptMetadata, DeviceExists, DeviceNotFound, InvalidArgument
from mirror import MirrorManager
from mirror.format import LogImage, format_log, inspect

MB = 1 << 20
SIZE = 4 * MB
REGION = 128  # 64 KiB -> 64 regions


def _image(tmp_path: Path, name: str, size: int = SIZE, data: bytes | None = None) -> str:
    p = tmp_path / name
    with open(p, "wb") as f:
        if data is not None:
            f.write(data)
        f.truncate(size)
    return str(p)


def _same(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


@pytest.fixture
def mm(engine: Any) -> MirrorManager:
    return MirrorManager(engine)


def test_create_resync_status_remove(mm: MirrorManager, tmp_path: Path) -> None:
    a = _image(tmp_path, "a", data=os.urandom(SIZE))
    b = _image(tmp_path, "b")
    st = mm.create("m1", [a, b], region_size=REGION)
    assert st.regions == 64 and st.log_type == "core" and st.legs == (a, b)
    seen: list[tuple[int, int]] = []
    st = mm.resync("m1", progress=lambda d, t: seen.append((d, t)), timeout=20)
    assert st.fully_in_sync and st.health == "AA" and st.percent == 100.0
    assert st.status_text == f"2 {a} {b} 64/64 1 AA 1 core"
    assert st.table_text == f"core 1 128 2 {a} 0 {b} 0 1 handle_errors"  # the default, as LVM
    assert seen[-1] == (SIZE, SIZE)
    assert _same(a, b)
    assert [s.name for s in mm.list()] == ["m1"]
    assert mm.status("m1").to_dict()["legs"][1] == {"device": b, "health": "A"}
    mm.remove("m1")
    with pytest.raises(DeviceNotFound):
        mm.status("m1")


def test_disk_log_create_formats_the_log(mm: MirrorManager, tmp_path: Path) -> None:
    a, b = _image(tmp_path, "a"), _image(tmp_path, "b")
    lg = _image(tmp_path, "log", size=64 * 1024, data=b"\xee" * 4096)
    st = mm.create("m2", [a, b], log=lg, region_size=REGION, nosync=True)
    assert st.fully_in_sync and st.log_type == "disk" and st.log_health == "A"
    rep = inspect(lg)
    assert rep.nr_regions == 64 and rep.fully_in_sync


@pytest.mark.parametrize("case", ["sizes", "region", "small-log", "one-leg"])
def test_bad_input_is_refused_with_nothing_written(mm: MirrorManager, tmp_path: Path, case: str) -> None:
    a = _image(tmp_path, "a")
    b = _image(tmp_path, "b", size=SIZE - 4096 if case == "sizes" else SIZE)
    lg = _image(tmp_path, "log", size=1024 if case == "small-log" else 64 * 1024, data=b"\xee" * 1024)
    before = {p: Path(p).read_bytes() for p in (a, b, lg)}
    legs = [a] if case == "one-leg" else [a, b]
    region = 1000 if case == "region" else REGION
    with pytest.raises(InvalidArgument):
        mm.create("bad", legs, log=lg, region_size=region)
    assert {p: Path(p).read_bytes() for p in (a, b, lg)} == before
    assert not mm.dm.exists("bad")


def test_activate_refuses_a_corrupt_log(mm: MirrorManager, tmp_path: Path) -> None:
    a, b = _image(tmp_path, "a"), _image(tmp_path, "b")
    lg = _image(tmp_path, "log", size=64 * 1024, data=b"junk" * 256)
    with pytest.raises(CorruptMetadata):
        mm.activate("m3", [a, b], log=lg, region_size=REGION)
    assert Path(lg).read_bytes()[:8] == b"junkjunk" and not mm.dm.exists("m3")


def test_offline_resync_then_activate_in_sync(mm: MirrorManager, tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    a, b = _image(tmp_path, "a", data=data), _image(tmp_path, "b", data=data)
    lg = _image(tmp_path, "log", size=64 * 1024)
    img = format_log(mm.open_ref(lg, writable=True), 64, in_sync=True)
    with open(b, "r+b") as f:  # regions 3 and 9 differ on leg b
        for r in (3, 9):
            f.seek(r * 65536)
            f.write(os.urandom(65536))
            img.clean.clear(r)
    with mm.open_ref(lg, writable=True) as ep:
        img.write(ep)
    res = mm.resync_offline([a, b], lg, region_size=REGION)
    assert res.regions_copied == 2 and _same(a, b)
    st = mm.activate("m4", [a, b], log=lg, region_size=REGION)
    assert st.fully_in_sync and st.status_text.split()[3] == "64/64"


def test_a_log_of_another_region_size_is_refused_not_misread(mm: MirrorManager, tmp_path: Path) -> None:
    """A log made with 256 KiB regions (16 of them) read with the 64 KiB of REGION: dm-log.c's resume
    would take it as a resize, its bits landing on the wrong regions; clean bit 1 (256 KiB region 1,
    clean) then covers 64 KiB region 1, which lies in dirty region 0 and differs: never copied."""
    data = os.urandom(SIZE)
    a, b = _image(tmp_path, "a", data=data), _image(tmp_path, "b", data=data)
    with open(b, "r+b") as f:
        f.seek(65536)  # a write that reached leg a only, in 256 KiB region 0 (64 KiB region 1)
        f.write(os.urandom(4096))
    lg = _image(tmp_path, "log", size=64 * 1024)
    img = format_log(mm.open_ref(lg, writable=True), 16, in_sync=True)
    img.clean.clear(0)
    with mm.open_ref(lg, writable=True) as ep:
        img.write(ep)
    before = {p: Path(p).read_bytes() for p in (a, b, lg)}
    for act in (lambda: mm.resync_offline([a, b], lg, region_size=REGION),
                lambda: mm.activate("m9", [a, b], log=lg, region_size=REGION)):
        with pytest.raises(InvalidArgument, match=r"holds 16 regions.*--region-size 256K gives 16"):
            act()
    assert {p: Path(p).read_bytes() for p in (a, b, lg)} == before and not mm.dm.exists("m9")
    assert mm.resync_offline([a, b], lg, region_size=512).regions_copied == 1 and _same(a, b)  # its own size


def test_rate_limited_resync(mm: MirrorManager, tmp_path: Path) -> None:
    a, b = _image(tmp_path, "a", size=MB, data=os.urandom(MB)), _image(tmp_path, "b", size=MB)
    mm.create("m5", [a, b], region_size=REGION, nosync=True)
    t0 = time.monotonic()
    mm.resync("m5", rate=2 * MB, leg=1, timeout=20)  # rebuild 1 MiB at 2 MiB/s: ~0.5 s
    took = time.monotonic() - t0
    assert 0.4 <= took <= 2.5, took  # never faster than the limit; slower only under load
    assert _same(a, b)


def test_split_and_add_leg(mm: MirrorManager, tmp_path: Path) -> None:
    a = _image(tmp_path, "a", data=os.urandom(SIZE))
    b, c = _image(tmp_path, "b"), _image(tmp_path, "c")
    mm.create("m6", [a, b], region_size=REGION)
    mm.resync("m6", timeout=20)
    assert mm.split("m6", 1, "m6-split") == "m6-split"
    assert mm.dm.table("m6").lines[0].target_type == "linear"
    assert str(mm.dm.table("m6-split").lines[0].target) == f"linear {b} 0"
    st = mm.add_leg("m6", c, region_size=REGION)
    assert st.fully_in_sync and len(st.legs) == 2 and _same(a, c)


def test_repair_resyncs_every_leg_and_trusts_the_log_again(mm: MirrorManager, tmp_path: Path) -> None:
    """Every leg gets the copy, as on the kernel: the new leg goes live on a ``sync`` log, never in
    sync before it is copied (tests/mirror/test_mirror_new_leg_window.py); copying to it alone
    needed a window in which it counted as in sync. The ``sync`` argument is dropped after."""
    data = os.urandom(SIZE)
    a, b, c = (_image(tmp_path, n, data=data) for n in "abc")
    d = _image(tmp_path, "d")
    lg = _image(tmp_path, "log", size=64 * 1024)
    mm.create("m7", [a, b, c], log=lg, region_size=REGION, nosync=True)
    os.utime(b, ns=(0, 0))
    st = mm.repair("m7", 2, d)
    assert st.fully_in_sync and st.legs[2] == d and _same(a, d) and _same(a, b)
    assert os.stat(b).st_mtime_ns != 0  # the healthy leg was written too
    assert st.table_text == f"disk 2 {lg} 128 3 {a} 0 {b} 0 {d} 0 1 handle_errors"
    assert LogImage.read(mm.open_ref(lg)).out_of_sync() == []
    with pytest.raises(InvalidArgument, match="resync source"):
        mm.repair("m7", 0, b)


def test_leg_failed_through_error_target_then_repaired(mm: MirrorManager, engine: Any, tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    a, b = _image(tmp_path, "a", data=data), _image(tmp_path, "b", data=data)
    n = SIZE // 512
    engine.create("leg0", f"0 {n} linear {a} 0")
    engine.create("leg1", f"0 {n} linear {b} 0")
    legs = [engine.device_ref("leg0"), engine.device_ref("leg1")]
    mm.create("m8", legs, region_size=REGION, nosync=True, handle_errors=True, keep_log=True)
    engine.load("leg1", f"0 {n} error")
    engine.resume("leg1")
    with engine.open_endpoint("m8") as ep:
        ep.write(b"x" * 4096, 0)
    st = mm.status("m8")
    assert st.health == "AD" and st.in_sync == 63
    assert st.status_text == f"2 {legs[0]} {legs[1]} 63/64 1 AD 1 core"
    c = _image(tmp_path, "c")
    st = mm.repair("m8", 1, c)
    assert st.fully_in_sync and st.health == "AA"
    assert _same(a, c) and Path(a).read_bytes()[:4096] == b"x" * 4096


def test_split_is_all_or_nothing(mm: MirrorManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _image(tmp_path, "a", data=os.urandom(SIZE)), _image(tmp_path, "b")
    mm.create("m8", [a, b], region_size=REGION)
    mm.resync("m8", timeout=20)
    table = str(mm.dm.table("m8"))
    mm.dm.create("taken", "0 8 zero")
    with pytest.raises(DeviceExists):  # a name in use: refused before the mirror changes
        mm.split("m8", 1, "taken")
    assert str(mm.dm.table("m8")) == table
    real = mm.dm.create

    def beaten(name: str, *args: Any, **kwargs: Any) -> Any:  # another program takes the name first
        real(name, "0 8 zero")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(mm.dm, "create", beaten)
    with pytest.raises(DeviceExists):  # the mirror gets its leg back
        mm.split("m8", 1, "late")
    assert str(mm.dm.table("m8")) == table and mm.dm.table("late").lines[0].target_type == "zero"
