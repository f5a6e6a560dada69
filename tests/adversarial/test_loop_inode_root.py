"""Root tier: a loop device is the bytes of its backing *inode*, whatever path names the file.

A hard link and a bind mount of a file that a loop device exposes are that device: identity says
they overlap, and a claim of the file is refused while the loop device is held (mounted, or open
``O_EXCL`` as ``mount`` and ``mkfs`` open it). The index of loop devices (``dmtools.loop_index``)
is cached; a loop device attached after it was built is seen all the same.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmtools import loop_index
from dmtools.claims import Holder, loops_over
from dmtools.errors import DeviceBusy
from dmtools.identity import Extent, identify

pytestmark = pytest.mark.root

MiB = 1 << 20


def _file(path: Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return ("file", st.st_dev, st.st_ino)


def _refused_while_held(loop_path: str, name: str) -> None:
    """With ``loop_path`` held as ``mount`` holds it (``O_EXCL``), a claim of ``name`` is refused."""
    fd = os.open(loop_path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    try:
        with pytest.raises(DeviceBusy, match=f"in use through {loop_path}"):
            Holder("test").claim(name)
    finally:
        os.close(fd)


@pytest.fixture
def bind_dir(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """``(source, target)``: ``target`` is a bind mount of ``source`` (unmounted afterwards)."""
    source, target = tmp_path / "src", tmp_path / "bind"
    source.mkdir()
    target.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        yield source, target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_hard_link_of_a_loop_backing_file(make_image: Callable[..., Path],
                                          make_loop: Callable[..., Any], tmp_path: Path) -> None:
    img = make_image(4 * MiB)
    hard = tmp_path / "hard.img"
    os.link(img, hard)
    lo = make_loop(img, offset=MiB)
    # identity: the link is the loop's file, and a loop attached through the link is too
    assert identify(str(hard)).overlaps(identify(lo.path))
    via_link = make_loop(hard)
    assert identify(via_link.path).extents == {Extent(_file(img), 0, None)}
    assert identify(via_link.path).overlaps(identify(lo.path))
    # claims: both loop devices are found over either name
    for name in (img, hard):
        assert {p for p, _ in loops_over(str(name))} == {lo.path, via_link.path}
    _refused_while_held(lo.path, str(hard))
    _refused_while_held(via_link.path, str(img))
    holder = Holder("test")
    try:
        holder.claim(str(hard)).release()  # nobody holds either loop device: free
    finally:
        holder.close()


def test_bind_mount_of_a_loop_backing_file(bind_dir: tuple[Path, Path], make_loop: Callable[..., Any]) -> None:
    source, target = bind_dir
    img = source / "b.img"
    with open(img, "wb") as f:
        f.truncate(2 * MiB)
    lo = make_loop(img)
    other = target / "b.img"
    assert os.path.realpath(other) != os.path.realpath(img)
    assert identify(str(other)).overlaps(identify(lo.path))
    assert [p for p, _ in loops_over(str(other))] == [lo.path]
    _refused_while_held(lo.path, str(other))


def test_a_loop_attached_after_the_index_was_built_is_seen(make_image: Callable[..., Path]) -> None:
    img = make_image(MiB)
    st = os.stat(img)
    assert loops_over(str(img)) == []  # builds the index (or finds it current)
    before = (loop_index.index.scans, loop_index.index.updates)
    from dmtools import loop

    lo = loop.attach(str(img))  # not the fixture's: this test detaches it itself
    try:
        assert [p for p, _ in loops_over(str(img))] == [lo.path]
        # seen through the attach's uevent (or a full scan, had uevents been lost meanwhile)
        assert (loop_index.index.scans, loop_index.index.updates) != before
        _refused_while_held(lo.path, str(img))
    finally:
        assert loop.detach(lo)
    assert loop_index.loops_over_inode(st.st_dev, st.st_ino) == []
