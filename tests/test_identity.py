"""Device identity (``dmtools.identity``): every spelling of the same bytes resolves the same.

Unit tier: files, symlinks, relative paths, NBD URIs, and tables of the in-process engine
(``linear``, ``striped``, stacked, conservative targets) compared with a per-sector reference
mapping. Root tier: real loop devices (second loops, offsets, ``/dev/block/M:m``, deleted
backing files), partitions, and the exposed userspace engine.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmtools import loop
from dmtools.engine import Engine
from dmtools.errors import DeviceConflict, DeviceNotFound, InvalidArgument
from dmtools.identity import Extent, Identity, ensure_disjoint, identify, normalize_nbd_uri, users
from dmtools.testing.loops import no_leaked_loops  # noqa: F401 (autouse fixture)

MiB = 1 << 20
SECTOR = 512


def _file(path: Path) -> tuple[str, int, int]:
    st_ = os.stat(path)
    return ("file", st_.st_dev, st_.st_ino)


def _devno(name: str, engine: Engine) -> str:
    return engine.device_ref(name)


# --- Extent ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0, 10), (10, 20), False),
        ((0, 11), (10, 20), True),
        ((5, None), (0, 6), True),
        ((5, None), (0, 5), False),
        ((0, None), (1 << 40, None), True),
        ((3, 4), (3, 4), True),
    ],
)
def test_extent_overlap(a: tuple[int, int | None], b: tuple[int, int | None], expected: bool) -> None:
    base = ("file", 1, 2)
    x, y = Extent(base, *a), Extent(base, *b)
    assert x.overlaps(y) is expected and y.overlaps(x) is expected
    assert not x.overlaps(Extent(("file", 1, 3), *a))


# --- files -----------------------------------------------------------------------------------------
def test_file_spellings_resolve_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = tmp_path / "c.img"
    img.write_bytes(b"\0" * 4096)
    (tmp_path / "link").symlink_to(img)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    hard = tmp_path / "hard"
    os.link(img, hard)
    spellings = [str(img), "../c.img", str(tmp_path / "link"), str(hard), str(tmp_path / "sub" / ".." / "c.img")]
    idents = [identify(s) for s in spellings]
    want = frozenset({Extent(_file(img), 0, None)})
    for ident in idents:
        assert ident.extents == want
        assert ident.overlaps(idents[0])
    assert idents[1].path == str(img) and idents[1].ref == "../c.img"


def test_relative_path_uses_cwd_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.img").write_bytes(b"a")
    (tmp_path / "b" / "x.img").write_bytes(b"b")
    monkeypatch.chdir(tmp_path / "a")
    here = identify("x.img")
    there = identify("x.img", cwd=str(tmp_path / "b"))
    assert here.path == str(tmp_path / "a" / "x.img")
    assert there.path == str(tmp_path / "b" / "x.img")
    assert not here.overlaps(there)


def test_bad_references(tmp_path: Path) -> None:
    with pytest.raises(DeviceNotFound):
        identify(tmp_path / "missing")
    with pytest.raises(InvalidArgument, match="not a block device or regular file"):
        identify(tmp_path)
    with pytest.raises(InvalidArgument):
        identify("")
    with pytest.raises(DeviceNotFound):
        identify("4095:1048575")


def test_nbd_uris_normalized() -> None:
    a = identify("nbd://Example.COM/disk")
    b = identify("NBD://example.com:10809/disk")
    c = identify("nbd://example.com:10810/disk")
    assert a.extents == b.extents and a.path == "nbd://example.com:10809/disk"
    assert not a.overlaps(c)
    assert normalize_nbd_uri("nbd+unix:///e?socket=/run/s") == "nbd+unix:///e?socket=/run/s"


# --- engine tables ---------------------------------------------------------------------------------
def _image(tmp_path: Path, name: str, size: int = 4 * MiB) -> Path:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_linear_over_file_is_the_file(engine: Engine, tmp_path: Path) -> None:
    img = _image(tmp_path, "a.img")
    engine.create("lin", f"0 2048 linear {img} 2048")
    ident = identify(_devno("lin", engine), dm=engine)
    assert ident.extents == {Extent(_file(img), MiB, 2 * MiB)}
    assert ident.overlaps(identify(img))
    assert not ident.overlaps(identify(img).slice(0, MiB))
    assert ident.slice(4096, 512).extents == {Extent(_file(img), MiB + 4096, MiB + 4608)}
    assert ident.via == (ident.path, str(img))
    assert "backed by" in ident.describe() and str(img) in ident.describe()


def test_stacked_linears_and_zero(engine: Engine, tmp_path: Path) -> None:
    a, b = _image(tmp_path, "a.img"), _image(tmp_path, "b.img")
    engine.create("low", f"0 4096 linear {a} 0\n4096 4096 linear {b} 0")
    low = _devno("low", engine)
    engine.create("top", f"0 1024 zero\n1024 4096 linear {low} 2048")
    ident = identify(_devno("top", engine), dm=engine)
    # top sectors 1024..5120 = low sectors 2048..6144 = a[2048..4096) + b[0..2048)
    assert ident.extents == {Extent(_file(a), MiB, 2 * MiB), Extent(_file(b), 0, MiB)}
    assert ident.slice(0, 1024 * SECTOR).extents == frozenset()
    assert users(identify(b), engine) == ["low", "top"]
    assert users(identify(b).slice(MiB, MiB), engine) == ["low"]
    assert users(identify(b).slice(2 * MiB, MiB), engine) == []


def test_conservative_target_takes_every_device(engine: Engine, tmp_path: Path) -> None:
    from dmtools.engine.target_driver import TargetDriver

    class Opaque(TargetDriver):
        name = "opaque-test"
        version = (1, 0, 0)

        def __init__(self, ctx: Any, start: int, length: int, args: Any) -> None:
            super().__init__(ctx, start, length, args)
            self.devices.extend(ctx.get_device(a) for a in args)

        def read(self, buf: memoryview, offset: int) -> None:
            buf[:] = bytes(len(buf))

        def write(self, buf: memoryview, offset: int) -> None:
            pass

        def table_params(self) -> str:
            return " ".join(h.name for h in self.devices)

    engine.register_target(Opaque)
    a, b = _image(tmp_path, "a.img"), _image(tmp_path, "b.img")
    engine.create("op", f"0 2048 opaque-test {a} {b}")
    ident = identify(_devno("op", engine), dm=engine)
    want = {Extent(_file(a), 0, None), Extent(_file(b), 0, None)}
    assert ident.extents == want
    assert ident.slice(0, 512).extents == want


def _reference_extents(mapping: Callable[[int], tuple[Any, int] | None], start: int, end: int) -> set[Extent]:
    """Per-sector mapping merged into maximal runs: what ``slice`` must return."""
    runs: dict[Any, list[list[int]]] = {}
    for sector in range(start // SECTOR, end // SECTOR):
        hit = mapping(sector)
        if hit is None:
            continue
        base, off = hit
        lst = runs.setdefault(base, [])
        if lst and lst[-1][1] == off:
            lst[-1][1] = off + 1
        else:
            lst.append([off, off + 1])
    return {Extent(base, s * SECTOR, e * SECTOR) for base, lst in runs.items() for s, e in lst}


def _merge(extents: frozenset[Extent]) -> set[Extent]:
    by: dict[Any, list[tuple[int, int]]] = {}
    for x in extents:
        assert x.end is not None
        by.setdefault(x.base, []).append((x.start, x.end))
    out = set()
    for base, lst in by.items():
        lst.sort()
        cur = list(lst[0])
        for s, e in lst[1:]:
            if s <= cur[1]:
                cur[1] = max(cur[1], e)
            else:
                out.add(Extent(base, cur[0], cur[1]))
                cur = [s, e]
        out.add(Extent(base, cur[0], cur[1]))
    return out


@pytest.fixture(scope="module")
def striped_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, Identity, Callable[[int], Any]]]:
    """``st``: zero | striped 3 legs, 8-sector chunks | linear, over three files."""
    tmp = tmp_path_factory.mktemp("striped")
    e = Engine()
    files = [_image(tmp, f"s{i}.img", MiB) for i in range(3)]
    bases = [_file(f) for f in files]
    legs = " ".join(f"{f} {16 * i}" for i, f in enumerate(files))
    e.create("st", f"0 16 zero\n16 192 striped 3 8 {legs}\n208 40 linear {files[0]} 1000")

    def mapping(sector: int) -> tuple[Any, int] | None:
        if sector < 16:
            return None
        if sector < 208:
            rel = sector - 16
            chunk, within = divmod(rel, 8)
            leg = chunk % 3
            return bases[leg], 16 * leg + (chunk // 3) * 8 + within
        return bases[0], 1000 + sector - 208

    try:
        yield e, identify(e.device_ref("st"), dm=e), mapping
    finally:
        e.close()


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_slice_matches_per_sector_mapping(striped_world: tuple[Engine, Identity, Callable[[int], Any]],
                                          data: st.DataObject) -> None:
    _, ident, mapping = striped_world
    start = data.draw(st.integers(0, 247)) * SECTOR
    end = data.draw(st.integers(start // SECTOR + 1, 248)) * SECTOR
    assert _merge(ident.slice(start, end - start).extents) == _reference_extents(mapping, start, end)
    # slicing a slice is slicing the device
    inner = data.draw(st.integers(0, (end - start) // SECTOR - 1)) * SECTOR
    assert (ident.slice(start, end - start).slice(inner, SECTOR).extents == ident.slice(start + inner, SECTOR).extents)


def test_ensure_disjoint_names_roles_and_alias(engine: Engine, tmp_path: Path) -> None:
    img, other = _image(tmp_path, "c.img"), _image(tmp_path, "o.img")
    engine.create("cowdev", f"0 8192 linear {img} 0")
    ref = _devno("cowdev", engine)
    with pytest.raises(DeviceConflict) as exc:
        ensure_disjoint({"--cow": str(img), "the origin": ref}, dm=engine)
    msg = str(exc.value)
    assert msg == f"--cow {img} and the origin {ref} share bytes ({ref} is backed by {img})"
    assert exc.value.errno == 22
    (tmp_path / "link").symlink_to(img)
    with pytest.raises(DeviceConflict) as exc:
        ensure_disjoint({"--cow": str(img), "the origin": str(tmp_path / "link")})
    assert str(exc.value) == (f"--cow {img} and the origin {tmp_path / 'link'} are the same bytes "
                              f"({tmp_path / 'link'} is {img})")
    ok = ensure_disjoint({"origin": str(other), "--cow": ref}, dm=engine)
    assert set(ok) == {"origin", "--cow"}
    engine.create("half", f"0 10 linear {img} 4")
    with pytest.raises(DeviceConflict, match="share bytes"):
        ensure_disjoint({"a": ref, "b": _devno("half", engine)}, dm=engine)


def test_table_that_loops_is_refused_not_recursed(engine: Engine, tmp_path: Path) -> None:
    # The engine refuses cycles itself; a resolver given a backend must not recurse forever
    # even when a backend reports one (a fake backend at the seam).
    from dmtools.backend import DeviceEntry
    from dmtools.table import Table

    class Cyclic:
        backend = "userspace"

        def list(self) -> list[DeviceEntry]:
            return [DeviceEntry("a", 0, 1, 0, ""), DeviceEntry("b", 0, 2, 0, "")]

        def table(self, name: str, inactive: bool = False) -> Table:
            return Table.parse("0 8 linear 0:2 0" if name == "a" else "0 8 linear 0:1 0")

        def device_path(self, name: str) -> str:
            raise DeviceNotFound("not exposed")

    with pytest.raises(InvalidArgument, match="maps itself"):
        identify("0:1", dm=Cyclic())  # type: ignore[arg-type]


# --- root tier: loop devices, partitions, the exposed engine ---------------------------------------
root = pytest.mark.root


@root
def test_loop_spellings(make_image: Callable[..., Path], make_loop: Callable[..., Any],
                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = make_image(8 * MiB)
    lo1, lo2 = make_loop(img), make_loop(img)
    part = make_loop(img, offset=MiB, sizelimit=2 * MiB)
    base = _file(img)
    whole = frozenset({Extent(base, 0, None)})
    monkeypatch.chdir("/dev")
    for spelling in (lo1.path, lo2.path, lo1.devno, f"/dev/block/{lo1.devno}", os.path.basename(lo1.path), str(img)):
        assert identify(spelling).extents == whole, spelling
    ident = identify(part.path)
    assert ident.extents == {Extent(base, MiB, 3 * MiB)}
    assert ident.describe() == f"{part.path} (backed by {img})"
    assert ident.slice(MiB, 4096).extents == {Extent(base, 2 * MiB, 2 * MiB + 4096)}
    assert not identify(str(img)).slice(3 * MiB, MiB).overlaps(ident)
    with pytest.raises(DeviceConflict, match=f"is backed by {img}"):
        ensure_disjoint({"--cow": str(img), "the origin": lo1.path})
    # A loop over a loop resolves through both.
    lo3 = make_loop(part.path, offset=4096)
    assert identify(lo3.path).extents == {Extent(base, MiB + 4096, 3 * MiB)}


@root
def test_loop_over_deleted_file_keeps_its_inode(make_image: Callable[..., Path], make_loop: Callable[..., Any]) -> None:
    img = make_image(MiB)
    base = _file(img)
    lo = make_loop(img)
    os.unlink(img)
    assert identify(lo.path).extents == {Extent(base, 0, None)}


def _mbr(parts: list[tuple[int, int]]) -> bytes:
    """A DOS partition table: ``(start_sector, sectors)`` primary Linux partitions."""
    table = bytearray(512)
    for i, (start, count) in enumerate(parts):
        struct.pack_into("<B3sB3sII", table, 446 + 16 * i, 0, b"\0\0\0", 0x83, b"\0\0\0", start, count)
    table[510:512] = b"\x55\xaa"
    return bytes(table)


@pytest.mark.kernel  # the VM's kernel scans partition tables on loop devices; this host's does not
def test_partition_is_its_disk_range(make_image: Callable[..., Path], make_loop: Callable[..., Any]) -> None:
    img = make_image(8 * MiB)
    with open(img, "r+b") as f:
        f.write(_mbr([(2048, 4096), (6144, 8192)]))
    lo = make_loop(img, partscan=True)
    from dmtools.engine.expose import udev_settle

    udev_settle()
    p1, p2 = f"{lo.path}p1", f"{lo.path}p2"
    assert os.path.exists(p1) and os.path.exists(p2)
    base = _file(img)
    i1, i2 = identify(p1), identify(p2)
    assert i1.extents == {Extent(base, MiB, 3 * MiB)}
    assert i2.extents == {Extent(base, 3 * MiB, 7 * MiB)}
    assert not i1.overlaps(i2) and i1.overlaps(identify(lo.path))
    assert i1.via == (p1, lo.path, str(img))


@root  # exposed_engine after make_loop: the engine is closed first, and lets go of the loop device
def test_exposed_engine_devices(make_image: Callable[..., Path], make_loop: Callable[..., Any], exposed_engine: Engine,
                                tmp_path: Path) -> None:
    img = make_image(8 * MiB)
    lo = make_loop(img)
    exposed_engine.create("lin", f"0 4096 linear {lo.path} 2048")
    mapper = exposed_engine.device_path("lin")
    fuse_file = loop.info(os.path.realpath(mapper)).backing_file
    assert fuse_file is not None and fuse_file.startswith(str(tmp_path / "run"))
    want = {Extent(_file(img), MiB, 3 * MiB)}
    for spelling in (mapper, os.path.realpath(mapper), exposed_engine.device_ref("lin"), fuse_file):
        assert identify(spelling, dm=exposed_engine).extents == want, spelling
    assert users(identify(lo.path), exposed_engine) == ["lin"]
    assert users(identify(str(img)).slice(4 * MiB, MiB), exposed_engine) == []
    with pytest.raises(DeviceConflict):
        ensure_disjoint({"--log": str(img), "leg 1": mapper}, dm=exposed_engine)
    # Without the backend, or with another one, the engine of this process is asked.
    for other in (None, Engine()):
        for spelling in (mapper, fuse_file):
            assert identify(spelling, dm=other).extents == want, (spelling, other)
        if other is not None:
            other.close()


@root
def test_daemon_devices_seen_without_their_backend(make_image: Callable[..., Path], make_loop: Callable[..., Any],
                                                   tmp_path: Path) -> None:
    """A reference to the daemon's exposed device is resolved through that daemon, whatever
    backend the caller holds; a daemon that does not answer makes it an error, not a guess."""
    from dmtools.engine.client import open_userspace
    from dmtools.engine.expose import clear_stale
    from dmtools.errors import DaemonError

    img = make_image(8 * MiB)
    lo = make_loop(img)
    run_dir = str(tmp_path / "run")
    client = open_userspace(run_dir)
    try:
        client.create("d-dmtt", f"0 4096 linear {lo.path} 2048")
        mapper = client.device_path("d-dmtt")
        want = {Extent(_file(img), MiB, 3 * MiB)}
        assert identify(mapper).extents == want
        assert identify(mapper, dm=client).extents == want
        pid = client.ping()["pid"]
    finally:
        client.close()
    os.kill(pid, 9)
    while os.path.exists(f"/proc/{pid}"):
        time.sleep(0.02)
    try:
        with pytest.raises(DaemonError, match="does not answer"):
            identify(mapper)
    finally:
        clear_stale(run_dir)
