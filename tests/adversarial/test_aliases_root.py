"""Root tier: the commands that take two or more devices, given two spellings of one image's bytes.

Spellings (``spellings.py``): every file-system spelling, plus the loop device, ``/dev/block/M:m``,
``M:m``, a second loop device over the same file, a loop device at an offset that overlaps, the
loop's backing file as the kernel reports it, and a userspace-engine ``linear`` device over it
(its exposed path and its name). Commands run as a user runs them (``dmtools --backend userspace``
in-process, through the daemon of ``DMTOOLS_RUN_DIR``); each case must be refused with a one-line
error and a non-zero exit and change nothing, or be handled safely; every image's checksum and
every table are compared before and after.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmtools.blockdev import BlockDevice, aligned_buffer
from dmtools.engine.rundir import run_dir
from dmtools.testing.leftovers import remove_devices
from spellings import (Spelling, assert_refused, block_spellings, digests, file_spellings, make_images, realized,
                       run_cli, within)

pytestmark = pytest.mark.root

MiB = 1 << 20
SECTORS = MiB // 512
SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
IMAGES = ("origin", "cow", "leg0", "leg1", "log", "src", "dst")


@dataclass
class World:
    """Images, their spellings, and the userspace backend (the daemon of this run)."""

    root: Path
    dm: Any
    tag: str
    images: dict[str, Path]
    spell: dict[str, list[Spelling]] = field(default_factory=dict)

    def of(self, image: str, kind: str) -> str:
        """The ``kind`` spelling of ``image``."""
        return next(s.ref for s in self.spell[image] if s.kind == kind)

    def name(self, what: str) -> str:
        return f"{what}-{self.tag}-dmtt"

    def ours(self) -> dict[str, str]:
        return {e.name: str(self.dm.table(e.name)) for e in self.dm.list() if self.tag in e.name}

    def state(self) -> tuple[dict[str, str], dict[str, str]]:
        """Checksums of every image and the tables of this test's devices."""
        return digests(*self.images.values()), self.ours()


@pytest.fixture
def world(tmp_path: Path, make_loop: Callable[..., Any]) -> Iterator[World]:
    import dmtools

    tag = uuid.uuid4().hex[:6]
    images = make_images(tmp_path / "img", IMAGES)
    mapper = os.path.join(run_dir(), "mapper")
    with dmtools.open("userspace") as dm:
        w = World(tmp_path, dm, tag, images)
        for name, path in images.items():
            w.spell[name] = file_spellings(path, tmp_path / "links") + block_spellings(
                path, tmp_path / "links", make_loop, w.name(f"e{name}"), mapper)
        try:
            yield w
        finally:
            assert remove_devices(dm, lambda name: w.tag in name) == []


def paths(w: World, image: str) -> st.SearchStrategy[Spelling]:
    """Spellings of ``image`` that are paths (not device names)."""
    return st.sampled_from([s for s in w.spell[image] if not s.name_only])


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    return run_cli(capsys, "--backend", "userspace", *argv)


def refused(w: World, capsys: pytest.CaptureFixture[str], spellings: tuple[Spelling, ...], *argv: str) -> None:
    """Run ``dmtools ARGV`` with the engine devices ``spellings`` name live, from the directory
    their relative spellings need; it must fail with one line and change no image and no table."""
    with realized(w.dm, *spellings):
        before = w.state()
        with within(*spellings):
            rc, err = cli(capsys, *argv)
        assert rc != 0, f"accepted: dmtools {' '.join(argv)}"
        assert_refused(rc, err)
        assert w.state() == before


# -- snapshot --------------------------------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_snapshot_create_with_a_cow_aliasing_a_live_stack_is_refused(world: World, capsys: pytest.CaptureFixture[str],
                                                                     data: Any) -> None:
    w = world
    origin = w.name("o")
    if not w.dm.exists(origin):  # a live stack: origin over its loop, snapshot s1 on the cow image
        w.dm.create(origin, f"0 {SECTORS} linear {w.of('origin', 'loop')} 0")
        rc, err = cli(capsys, "snapshot", "create", origin, "--cow", w.of("cow", "loop"), "--name", w.name("s1"),
                      "--chunk-size", "4K")
        assert rc == 0, err
    cow = data.draw(paths(w, data.draw(st.sampled_from(["origin", "cow"]))))
    refused(w, capsys, (cow,), "snapshot", "create", origin, "--cow", cow.ref, "--name", w.name("s2"))


@SETTINGS
@given(data=st.data())
def test_snapshot_export_onto_an_input_is_refused(world: World, capsys: pytest.CaptureFixture[str], data: Any) -> None:
    w = world
    if not (w.root / "made").exists():  # a COW with exceptions, its snapshot gone
        origin = w.name("o")
        w.dm.create(origin, f"0 {SECTORS} linear {w.images['origin']} 0")
        assert cli(capsys, "snapshot", "create", origin, "--cow", str(w.images["cow"]), "--name", w.name("s"),
                   "--chunk-size", "4K")[0] == 0
        with BlockDevice(w.dm.device_path(origin), writable=True) as dev:
            dev.write(b"\xee" * 8192, 65536)
            dev.flush()
        assert cli(capsys, "snapshot", "remove", w.name("s"))[0] == 0
        w.dm.remove(origin)
        (w.root / "made").touch()
    out = data.draw(paths(w, data.draw(st.sampled_from(["origin", "cow"]))))
    origin_in = data.draw(paths(w, "origin"))
    cow_in = data.draw(paths(w, "cow"))
    force = ["--force"] if data.draw(st.booleans()) else []
    refused(w, capsys, (out, origin_in, cow_in), "snapshot", "export", "--origin", origin_in.ref, "--cow",
            cow_in.ref, out.ref, *force)


# -- mirror ----------------------------------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_mirror_create_with_aliased_legs_or_log_is_refused(world: World, capsys: pytest.CaptureFixture[str],
                                                           data: Any) -> None:
    w = world
    images = ["leg0", "leg1", "log"]
    a, b = data.draw(st.lists(st.integers(0, 2), min_size=2, max_size=2, unique=True))
    images[b] = images[a]
    legs0, legs1, log = (data.draw(paths(w, i)) for i in images)
    refused(w, capsys, (legs0, legs1, log), "mirror", "create", w.name("m"), legs0.ref, legs1.ref, "--log", log.ref,
            "--region-size", "64K")


@SETTINGS
@given(data=st.data())
def test_mirror_repair_onto_a_live_leg_or_the_log_is_refused(world: World, capsys: pytest.CaptureFixture[str],
                                                             data: Any) -> None:
    w = world
    m = w.name("m")
    if not w.dm.exists(m):
        rc, err = cli(capsys, "mirror", "create", m, w.of("leg0", "loop"), w.of("leg1", "loop"),
                      "--log", w.of("log", "loop"), "--region-size", "64K", "--nosync")
        assert rc == 0, err
    new = data.draw(paths(w, data.draw(st.sampled_from(["leg0", "leg1", "log"]))))
    refused(w, capsys, (new,), "mirror", "repair", m, "1", new.ref)


# -- copy ------------------------------------------------------------------------------------------
HALF = MiB // 2


def _device(s: Spelling) -> str:
    """Which device a spelling reaches the image through (the same device: a memmove is safe)."""
    return {"loop": "loop", "dev-block": "loop", "devno": "loop", "mknod": "loop", "second-loop": "second",
            "hardlink-loop": "hardlink-loop", "offset-loop": "offset", "engine-path": "engine",
            "engine-name": "engine"}.get(s.kind, "file")


def _bytes(s: Spelling, sector: int) -> range:
    """The image bytes that 64 sectors at ``sector`` of spelling ``s`` are."""
    start = (HALF if s.kind == "offset-loop" else 0) + sector * 512
    return range(start, start + 64 * 512)


@SETTINGS
@given(data=st.data())
def test_copy_between_spellings_of_one_image_is_refused_or_safe(world: World, capsys: pytest.CaptureFixture[str],
                                                                data: Any) -> None:
    """Two destinations sharing bytes, a source sharing bytes with a destination through another
    device, and a destination a live table maps are refused; disjoint bytes are copied, and the
    same device on both sides is a memmove."""
    w = world
    a, b = data.draw(paths(w, "dst")), data.draw(paths(w, "dst"))
    two_dests = data.draw(st.booleans())
    sa, sb = data.draw(st.integers(0, 64)), data.draw(st.integers(0, 64))
    ra, rb = _bytes(a, sa), _bytes(b, sb)
    disjoint = ra.stop <= rb.start or rb.stop <= ra.start
    # The engine device a spelling may stand on maps the whole image: every other spelling of the
    # image is then a device a live table maps (refused as a destination); the engine device itself
    # is a destination like any other.
    engine_live = bool(a.under or b.under)

    def in_use(dest: Spelling) -> bool:
        return engine_live and _device(dest) != "engine"

    if two_dests:
        args = [f"{w.images['src']}@0+64", f"{a.ref}@{sa}", f"{b.ref}@{sb}"]
        expect_ok = disjoint and not in_use(a) and not in_use(b)
    else:
        args = [f"{a.ref}@{sa}+64", f"{b.ref}@{sb}"]
        expect_ok = not in_use(b) and (disjoint or _device(a) == _device(b))
    # Earlier examples of this run wrote into the image: the expected result is computed from what
    # it holds now, with memmove's semantics when one device is on both sides.
    expected = bytearray(w.images["dst"].read_bytes())
    if two_dests:
        data_in = w.images["src"].read_bytes()[: 64 * 512]
        expected[ra.start:ra.stop] = data_in
        expected[rb.start:rb.stop] = data_in
    else:
        expected[rb.start:rb.stop] = expected[ra.start:ra.stop]
    with realized(w.dm, a, b):
        before = w.state()
        with within(a, b):
            rc, err = cli(capsys, "copy", *args, "--quiet")
        if not expect_ok:
            assert_refused(rc, err)
            assert w.state() == before
            return
    assert rc == 0, err
    assert w.images["dst"].read_bytes() == bytes(expected)


# -- tables on the engine --------------------------------------------------------------------------
@SETTINGS
@given(data=st.data())
def test_two_tables_over_one_image_are_refused_or_coherent(world: World, capsys: pytest.CaptureFixture[str],
                                                           data: Any) -> None:
    w = world
    a, b = data.draw(paths(w, "dst")), data.draw(paths(w, "dst"))
    x, y = w.name("x"), w.name("y")
    with realized(w.dm, a, b):
        with within(a, b):
            for n, s in ((x, a), (y, b)):
                rc, err = cli(capsys, "dm", "create", n, "--table", f"0 {SECTORS // 2} linear {s.ref} 0")
                if rc != 0:
                    assert_refused(rc, err)
                    assert not w.dm.exists(n)
        try:
            if not (w.dm.exists(x) and w.dm.exists(y)):
                return
            # both live: writes through one are what the other reads (nothing cached apart)
            buf = aligned_buffer(4096)
            buf[:] = os.urandom(4096)
            with BlockDevice(w.dm.device_path(x), writable=True, direct=True) as dx:
                dx.write(buf, 8192)
                dx.flush()
            back = aligned_buffer(4096)
            with BlockDevice(w.dm.device_path(y), direct=True) as dy:
                dy.readinto(back, 8192)
            offset_b = SECTORS // 2 * 512 if b.kind == "offset-loop" else 0
            offset_a = SECTORS // 2 * 512 if a.kind == "offset-loop" else 0
            if offset_a == offset_b:
                assert bytes(back) == bytes(buf)
        finally:
            for n in (y, x):
                if w.dm.exists(n):
                    w.dm.remove(n, retry=True)


# -- every spelling, every command, once -----------------------------------------------------------
KINDS = ["absolute", "symlink", "symlink-chain", "relative", "dotdot", "loop", "dev-block", "mknod", "devno",
         "second-loop", "offset-loop", "backing-file", "engine-path"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_spelling_is_refused_by_each_command(world: World, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    """The hypothesis tests above draw a few pairs; this one gives every spelling to every
    command once, against live stacks: a snapshot (origin and COW on loop devices), a mirror
    (legs and log on loop devices)."""
    w = world
    o, m = w.name("o"), w.name("m")
    w.dm.create(o, f"0 {SECTORS} linear {w.of('origin', 'loop')} 0")
    assert cli(capsys, "snapshot", "create", o, "--cow", w.of("cow", "loop"), "--name", w.name("s1"),
               "--chunk-size", "4K")[0] == 0
    assert cli(capsys, "mirror", "create", m, w.of("leg0", "loop"), w.of("leg1", "loop"), "--log",
               w.of("log", "loop"), "--region-size", "64K", "--nosync")[0] == 0

    def sp(image: str) -> Spelling:
        return next(s for s in w.spell[image] if s.kind == kind)

    # the bytes sp(image) names start half-way into the image for the offset loop
    at = str(HALF // 512) if kind == "offset-loop" else "0"
    absolute = {image: str(path) for image, path in w.images.items()}
    refused(w, capsys, (sp("cow"),), "snapshot", "create", o, "--cow", sp("cow").ref, "--name", w.name("s2"))
    refused(w, capsys, (sp("origin"),), "snapshot", "create", o, "--cow", sp("origin").ref, "--name", w.name("s2"))
    refused(w, capsys, (sp("cow"),), "snapshot", "export", "--origin", absolute["origin"], "--cow", absolute["cow"],
            sp("cow").ref, "--force")
    refused(w, capsys, (sp("src"),), "mirror", "create", w.name("m2"), absolute["src"], sp("src").ref,
            "--region-size", "64K")
    refused(w, capsys, (sp("dst"),), "mirror", "create", w.name("m2"), absolute["src"], absolute["dst"], "--log",
            sp("dst").ref, "--region-size", "64K")
    refused(w, capsys, (sp("leg0"),), "mirror", "repair", m, "1", sp("leg0").ref)
    refused(w, capsys, (sp("log"),), "mirror", "repair", m, "1", sp("log").ref)
    refused(w, capsys, (sp("dst"),), "copy", f"{absolute['src']}@0+64", f"{absolute['dst']}@{at}", f"{sp('dst').ref}@0",
            "--quiet")
    memmove = ("copy", f"{sp('dst').ref}@0+64", f"{absolute['dst']}@{at}", "--quiet")
    if _device(sp("dst")) != "file":  # the same bytes through another device: no safe order
        refused(w, capsys, (sp("dst"),), *memmove, *(["--allow-in-use"] if kind == "engine-path" else []))
        return
    before = w.state()
    with within(sp("dst")):
        assert cli(capsys, *memmove)[0] == 0  # the same file on both sides: a memmove onto itself
    assert w.state() == before
