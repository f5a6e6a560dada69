"""Kernel tier (``scripts/vmtest tests/adversarial``): the cases of issue 15 on real device-mapper.

The commands run on the kernel backend as a user runs them (``dmtools --backend kernel``); the
stacks are the kernel's (dm-snapshot, dm-mirror) over loop devices. Each aliasing spelling is
refused with one line and a non-zero exit, and the images, the tables and the live snapshot's
status are the same afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmtools.cli import main as cli_main
from dmtools.testing.leftovers import remove_devices
from spellings import digests, file_spellings, make_images, within

pytestmark = pytest.mark.kernel

MiB = 1 << 20
SECTORS = MiB // 512


@pytest.fixture
def stack(kernel_dm: Any, tmp_path: Path, make_loop: Callable[..., Any]) -> Iterator[dict[str, Any]]:
    """Origin ``o`` (linear over a loop), snapshot ``s1`` with its COW on a loop device over file C,
    mirror ``m`` over two loop legs and a loop log; removed afterwards."""
    tag = f"a{uuid.uuid4().hex[:6]}"
    images = make_images(tmp_path / "img", ("origin", "cow", "leg0", "leg1", "log", "spare", "free"))
    loops = {n: make_loop(p).path for n, p in images.items() if n != "free"}
    names = {"o": f"{tag}o-dmtt", "s1": f"{tag}s1-dmtt", "m": f"{tag}m-dmtt", "x": f"{tag}x-dmtt"}
    kernel_dm.create(names["o"], f"0 {SECTORS} linear {loops['origin']} 0")
    assert kcli("snapshot", "create", names["o"], "--cow", loops["cow"], "--name", names["s1"], "--chunk-size", "4K")[0] == 0
    assert kcli("mirror", "create", names["m"], loops["leg0"], loops["leg1"], "--log", loops["log"],
                "--region-size", "64K", "--nosync")[0] == 0
    try:
        yield {"dm": kernel_dm, "images": images, "loops": loops, "names": names, "tmp": tmp_path}
    finally:
        remove_devices(kernel_dm, lambda name: name.startswith(tag))


def kcli(*argv: str) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli_main.main(["--backend", "kernel", *argv])
    return rc, err.getvalue()


def state(s: dict[str, Any]) -> tuple[dict[str, str], dict[str, str], str]:
    dm = s["dm"]
    tables = {e.name: str(dm.table(e.name)) for e in dm.list() if e.name.endswith("-dmtt")}
    return digests(*s["images"].values()), tables, dm.status(s["names"]["s1"])[0].params


def refused(s: dict[str, Any], *argv: str, cwd: Any = None) -> None:
    before = state(s)
    with within(*([cwd] if cwd else [])):
        rc, err = kcli(*argv)
    assert rc != 0, f"accepted: dmtools {' '.join(argv)}"
    assert len(err.strip().splitlines()) == 1 and err.startswith("dmtools: "), err
    assert state(s) == before


def test_a_live_cow_named_by_its_file_is_refused(stack: dict[str, Any], make_loop: Callable[..., Any]) -> None:
    """The case that destroyed a snapshot: ``--cow F`` where /dev/loopX over F is a live COW."""
    s = stack
    s["dm"].create(s["names"]["x"], f"0 {SECTORS} linear {s['loops']['spare']} 0")
    second = make_loop(s["images"]["cow"]).path
    for sp in file_spellings(s["images"]["cow"], s["tmp"] / "links"):
        refused(s, "snapshot", "create", s["names"]["x"], "--cow", sp.ref, "--name", "y-dmtt", cwd=sp)
    for ref in (second, f"/dev/mapper/{s['names']['s1']}-cow", s["loops"]["cow"]):
        refused(s, "snapshot", "create", s["names"]["x"], "--cow", ref, "--name", "y-dmtt")
    # the origin's own bytes, and the snapshot's -real
    refused(s, "snapshot", "create", s["names"]["o"], "--cow", str(s["images"]["origin"]), "--name", "y-dmtt")
    refused(s, "snapshot", "create", s["names"]["x"], "--cow", f"/dev/mapper/{s['names']['o']}-real", "--name", "y-dmtt")


def test_export_onto_the_cow_through_another_device_is_refused(stack: dict[str, Any],
                                                                make_loop: Callable[..., Any]) -> None:
    s = stack
    dm = s["dm"]
    dm.create(s["names"]["x"], f"0 {SECTORS} linear {make_loop(s['images']['cow']).path} 0")
    for out in (str(s["images"]["cow"]), make_loop(s["images"]["cow"]).path, f"/dev/mapper/{s['names']['x']}"):
        refused(s, "snapshot", "export", "--origin", str(s["images"]["origin"]), "--cow", s["loops"]["cow"], out,
                "--force")


def test_mirror_log_or_new_leg_aliasing_a_leg_is_refused(stack: dict[str, Any], make_loop: Callable[..., Any]) -> None:
    s = stack
    img, loops = s["images"], s["loops"]
    free = make_loop(img["free"]).path
    refused(s, "mirror", "create", "n-dmtt", free, loops["spare"], "--log", str(img["spare"]))  # log = leg 1
    refused(s, "mirror", "create", "n-dmtt", free, str(img["free"]))  # leg 1 = leg 0
    refused(s, "mirror", "create", "n-dmtt", loops["leg0"], loops["spare"])  # a leg of a live mirror
    refused(s, "mirror", "repair", s["names"]["m"], "1", str(img["leg0"]))
    refused(s, "mirror", "repair", s["names"]["m"], "1", str(img["log"]))
    refused(s, "copy", str(img["spare"]), loops["leg1"], "--quiet")
    rdev = os.stat(loops["leg1"]).st_rdev
    refused(s, "copy", str(img["spare"]), f"{os.major(rdev)}:{os.minor(rdev)}", "--quiet")


def test_copy_onto_a_file_that_a_live_table_maps_through_a_loop_is_refused(stack: dict[str, Any]) -> None:
    """A file destination is looked up in the kernel's tables when a loop device is over it (the
    copy skips the kernel backend only for files no loop device reaches): mirror leg 1's image."""
    s = stack
    before = state(s)
    for dest in (str(s["images"]["leg1"]), os.path.relpath(s["images"]["leg1"])):
        rc, err = kcli("copy", str(s["images"]["spare"]), dest, "--quiet")
        assert rc != 0 and "in use by device" in err and s["names"]["m"] in err, err
        assert len(err.strip().splitlines()) == 1
    assert state(s) == before
