"""Unit tier: every command and API taking two or more devices, given two spellings of one file.

The spellings are those a file system alone gives (``spellings.file_spellings``): an absolute
path, a symlink, a chain of symlinks, a relative path from another directory, a path through
``..``. Each case is refused (one-line error, non-zero exit, nothing created) or handled safely,
and every image's checksum is compared before and after. The in-process userspace engine stands
in for device-mapper; the root tier (``test_aliases_root.py``) adds loop and dm spellings.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kcopyd
from dmtools.cli import main as cli_main
from dmtools.engine import Engine
from dmtools.errors import DeviceBusy, DeviceConflict, DMError
from mirror.manager import MirrorManager, resync_offline
from snapshot.manager import SnapshotManager
from spellings import Spelling, assert_refused, digests, file_spellings, make_images, run_cli, within

MiB = 1 << 20
SECTORS = MiB // 512
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
IMAGES = ("origin", "cow", "leg0", "leg1", "log", "spare", "src", "dst")


@dataclass
class World:
    """Images with their spellings, one in-process engine, and what it held at the start."""

    root: Path
    eng: Engine
    images: dict[str, Path]
    spell: dict[str, list[Spelling]] = field(default_factory=dict)

    def linear(self, name: str, image: str) -> bool:
        """Create engine device ``name`` over ``image`` unless it exists; True when created."""
        if self.eng.exists(name):
            return False
        self.eng.create(name, f"0 {SECTORS} linear {self.images[image]} 0")
        return True

    def state(self) -> tuple[dict[str, str], dict[str, str]]:
        """Checksums of every image, and every engine device's table."""
        tables = {e.name: str(self.eng.table(e.name)) for e in self.eng.list()}
        return digests(*self.images.values()), tables


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    images = make_images(tmp_path / "img", IMAGES)
    eng = Engine()
    w = World(tmp_path, eng, images)
    w.spell = {n: file_spellings(p, tmp_path / "links") for n, p in images.items()}
    try:
        yield w
    finally:
        eng.close()


def spelled(w: World, image: str) -> st.SearchStrategy[Spelling]:
    return st.sampled_from(w.spell[image])


# -- snapshot export --------------------------------------------------------------------------------
@pytest.fixture
def snap(world: World) -> World:
    """A persistent COW with exceptions on ``cow`` for the origin ``origin`` (snapshot removed)."""
    eng = world.eng
    world.linear("o-dmtt", "origin")
    mgr = SnapshotManager(eng)
    mgr.create("o-dmtt", str(world.images["cow"]), "s-dmtt", chunk_size=8)
    with eng.open_endpoint("o-dmtt") as ep:
        ep.write(b"\xaa" * 64 * 1024, 128 * 1024)
    mgr.remove("s-dmtt")
    eng.remove("o-dmtt")
    return world


@SETTINGS
@given(data=st.data())
def test_export_onto_its_own_input_is_refused(snap: World, capsys: pytest.CaptureFixture[str], data: Any) -> None:
    victim = data.draw(st.sampled_from(["origin", "cow"]))
    out = data.draw(spelled(snap, victim))
    origin = data.draw(spelled(snap, "origin"))
    cow = data.draw(spelled(snap, "cow"))
    force = data.draw(st.booleans())
    before = snap.state()
    with within(out, origin, cow):
        rc, err = run_cli(capsys, "snapshot", "export", "--origin", origin.ref, "--cow", cow.ref, out.ref,
                          *(["--force"] if force else []))
    assert_refused(rc, err, "same bytes", "share bytes")
    assert snap.state() == before


def test_export_onto_an_existing_file_says_what_it_does(snap: World, capsys: pytest.CaptureFixture[str]) -> None:
    out = snap.root / "out.img"
    out.write_bytes(b"x" * 3 * MiB)
    rc, err = run_cli(capsys, "snapshot", "export", "--origin", str(snap.images["origin"]), "--cow",
                      str(snap.images["cow"]), str(out))
    assert_refused(rc, err, "--force")
    assert out.stat().st_size == 3 * MiB  # never silently shrunk
    capsys.readouterr()
    assert cli_main.main(["snapshot", "export", "--origin", str(snap.images["origin"]), "--cow",
                          str(snap.images["cow"]), str(out), "--force"]) == 0
    assert f"truncated from {3 * MiB} to {MiB} bytes" in capsys.readouterr().out
    view = out.read_bytes()
    assert len(view) == MiB and view == bytes([1]) * MiB  # the snapshot's view: the origin before the write


# -- snapshot create / activate ---------------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_snapshot_cow_aliasing_a_live_stack_is_refused(world: World, data: Any) -> None:
    eng = world.eng
    if world.linear("o-dmtt", "origin"):
        SnapshotManager(eng).create("o-dmtt", str(world.images["cow"]), "s1-dmtt", chunk_size=8)
        world.linear("o2-dmtt", "spare")
    victim = data.draw(st.sampled_from(["origin", "cow", "spare"]))
    cow = data.draw(spelled(world, victim))
    origin = data.draw(st.sampled_from(["o-dmtt", "o2-dmtt"]))
    verb = data.draw(st.sampled_from(["create", "activate"]))
    before = world.state()
    mgr = SnapshotManager(eng)
    with within(cow), pytest.raises((DeviceConflict, DeviceBusy)) as err:
        getattr(mgr, verb)(origin, cow.ref, "s2-dmtt")
    assert cow.ref in str(err.value) or str(world.images[victim]) in str(err.value)
    assert world.state() == before


# -- mirror create / repair / resync-offline -------------------------------------------------------
def _aliased_roles(data: Any, w: World, n: int) -> tuple[list[Spelling], Spelling]:
    """``n`` legs and a log, two of which (drawn) are spellings of one image."""
    images = ["leg0", "leg1", "spare"][:n] + ["log"]
    a, b = data.draw(st.lists(st.integers(0, n), min_size=2, max_size=2, unique=True))
    images[b] = images[a]
    roles = [data.draw(spelled(w, image)) for image in images]
    return roles[:n], roles[n]


@SETTINGS
@given(data=st.data())
def test_mirror_create_with_aliased_legs_or_log_is_refused(world: World, data: Any) -> None:
    legs, log = _aliased_roles(data, world, data.draw(st.integers(2, 3)))
    before = world.state()
    with within(*legs, log), pytest.raises(DeviceConflict, match="share bytes|same bytes"):
        MirrorManager(world.eng).create("m-dmtt", [s.ref for s in legs], log=log.ref, region_size=128)
    assert world.state() == before and not world.eng.exists("m-dmtt")


@SETTINGS
@given(data=st.data())
def test_mirror_repair_onto_a_live_leg_or_the_log_is_refused(world: World, data: Any) -> None:
    mm = MirrorManager(world.eng)
    if not world.eng.exists("m-dmtt"):
        mm.create("m-dmtt", [str(world.images["leg0"]), str(world.images["leg1"])], log=str(world.images["log"]),
                  region_size=128, nosync=True)
    new = data.draw(spelled(world, data.draw(st.sampled_from(["leg0", "leg1", "log"]))))
    before = world.state()
    with within(new), pytest.raises((DeviceConflict, DeviceBusy)):
        mm.repair("m-dmtt", 1, new.ref)
    assert world.state() == before


@SETTINGS
@given(data=st.data())
def test_mirror_add_leg_aliasing_a_leg_is_refused(world: World, data: Any) -> None:
    world.linear("l-dmtt", "leg0")
    new = data.draw(spelled(world, "leg0"))
    before = world.state()
    with within(new), pytest.raises((DeviceConflict, DeviceBusy)):
        MirrorManager(world.eng).add_leg("l-dmtt", new.ref, region_size=128)
    assert world.state() == before


@SETTINGS
@given(data=st.data())
def test_mirror_resync_offline_with_aliased_legs_or_log_is_refused(world: World, data: Any) -> None:
    legs, log = _aliased_roles(data, world, 2)
    before = world.state()
    with within(*legs, log), pytest.raises(DeviceConflict):
        resync_offline([s.ref for s in legs], log.ref, region_size=128)
    assert world.state() == before


# -- kcopyd and dmtools copy ------------------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_kcopyd_destinations_sharing_bytes_are_refused(world: World, data: Any) -> None:
    a, b = data.draw(spelled(world, "dst")), data.draw(spelled(world, "dst"))
    count = data.draw(st.integers(1, 256))
    sa, sb = data.draw(st.integers(0, SECTORS - count)), data.draw(st.integers(0, SECTORS - count))
    before = world.state()
    src = kcopyd.Region(str(world.images["src"]), 0, count)
    with within(a, b), kcopyd.Client(num_pages=16) as kc:
        if sa < sb + count and sb < sa + count:
            with pytest.raises(DMError, match="share bytes"):
                kc.copy(src, [kcopyd.Region(a.ref, sa, count), kcopyd.Region(b.ref, sb, count)])
            assert world.state() == before
            return
        job = kc.copy(src, [kcopyd.Region(a.ref, sa, count), kcopyd.Region(b.ref, sb, count)])
        assert job.wait(60) and job.ok
    data_after = world.images["dst"].read_bytes()  # disjoint ranges of one file: both written
    for s in (sa, sb):
        assert data_after[s * 512:(s + count) * 512] == bytes([IMAGES.index("src") + 1]) * count * 512


@SETTINGS
@given(data=st.data())
def test_dmtools_copy_destinations_sharing_bytes_are_refused(world: World, capsys: pytest.CaptureFixture[str],
                                                              data: Any) -> None:
    new = world.root / "img" / "dmtt-new.img"
    fresh = [  # spellings of a file that does not exist yet
        Spelling("absolute", str(new)),
        Spelling("dangling-symlink", str(world.root / "links" / "dangling")),
        Spelling("relative", "../../img/dmtt-new.img", cwd=str(world.root / "links" / "elsewhere")),
    ]
    if not os.path.lexists(fresh[1].ref):
        os.symlink(new, fresh[1].ref)
    pool = data.draw(st.sampled_from([world.spell["dst"], fresh]))
    a, b = data.draw(st.sampled_from(pool)), data.draw(st.sampled_from(pool))
    before = world.state()
    with within(a, b):
        rc, err = run_cli(capsys, "copy", f"{world.images['src']}@0+64", f"{a.ref}@0", f"{b.ref}@32", "--quiet")
    assert_refused(rc, err, "share bytes")
    assert world.state() == before
    assert not new.exists()


# -- tables on the engine ---------------------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_two_tables_over_one_file_are_refused_or_coherent(world: World, data: Any) -> None:
    eng = world.eng
    for n in ("x-dmtt", "y-dmtt"):
        if eng.exists(n):
            eng.remove(n)
    a, b = data.draw(spelled(world, "spare")), data.draw(spelled(world, "spare"))
    with within(a, b):
        eng.create("x-dmtt", f"0 {SECTORS} linear {os.path.abspath(a.ref)} 0")
        before = world.state()
        try:
            eng.create("y-dmtt", f"0 {SECTORS} linear {os.path.abspath(b.ref)} 0")
        except DeviceBusy:
            assert world.state() == before and not eng.exists("y-dmtt")
            return
    payload = os.urandom(4096)
    with eng.open_endpoint("x-dmtt") as x, eng.open_endpoint("y-dmtt") as y:
        x.write(payload, 8192)
        x.flush()
        buf = bytearray(4096)
        y.readinto(buf, 8192)
    assert bytes(buf) == payload


# -- claims: what another engine or tool holds is not written ---------------------------------------
@pytest.mark.parametrize("command", ["export", "resync-offline", "copy"])
def test_a_device_claimed_by_another_tool_is_not_written(snap: World, capsys: pytest.CaptureFixture[str],
                                                         command: str) -> None:
    from dmtools import claims

    w, img = snap, snap.images
    victim = {"export": img["spare"], "resync-offline": img["leg1"], "copy": img["dst"]}[command]
    argv = {
        "export": ["snapshot", "export", "--origin", str(img["origin"]), "--cow", str(img["cow"]), str(victim),
                   "--force"],
        "resync-offline": ["mirror", "resync-offline", str(img["leg0"]), str(victim), "--log", "core",
                           "--region-size", "64K"],
        "copy": ["copy", f"{img['src']}@0+64", str(victim), "--quiet"],
    }[command]
    before = w.state()
    with claims.claim(victim, holder="another tool"):
        rc, err = run_cli(capsys, *argv)
    assert_refused(rc, err, "claimed", "busy", "in use")
    assert w.state() == before
    rc, err = run_cli(capsys, *argv)  # released: the same command goes through
    assert rc == 0, err
