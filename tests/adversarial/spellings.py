"""Every spelling of one image's bytes (issue 15, item 1), for the adversarial property tests.

``file_spellings`` needs only a file (unit tier): its absolute path, a symlink, a chain of
symlinks, a relative path from another directory, a path through ``..``, a hard link. ``block_spellings``
(root tier) adds the loop device over it, ``/dev/block/M:m``, ``M:m``, a second loop device over
the same file, a loop device attached through a hard link of the file, a loop device at an
offset that still overlaps, a second device node (mknod) for
the loop's ``dev_t``, the loop's backing file as the
kernel reports it, and a userspace-engine ``linear`` device over it: its exposed path and its
name. A test picks pairs of spellings with hypothesis and hands them to a command.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20


@dataclass(frozen=True)
class Spelling:
    """``ref`` names bytes of one image; relative refs mean something only from ``cwd``.

    ``name_only`` spellings are device names (for commands that take a device-mapper device).
    """

    kind: str
    ref: str
    cwd: str | None = None
    name_only: bool = False
    #: the table of the engine device this spelling names (``engine-*`` kinds), see ``realized``
    under: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.ref}" + (f" (from {self.cwd})" if self.cwd else "")


@contextlib.contextmanager
def within(*spellings: Spelling) -> Iterator[None]:
    """Run from the directory the relative spellings need (at most one distinct one)."""
    dirs = {s.cwd for s in spellings if s.cwd}
    assert len(dirs) <= 1, f"spellings need different working directories: {dirs}"
    old = os.getcwd()
    if dirs:
        os.chdir(dirs.pop())
    try:
        yield
    finally:
        os.chdir(old)


def file_spellings(image: Path, scratch: Path) -> list[Spelling]:
    """The spellings of a regular file that need nothing but a file system."""
    image = image.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    stem = image.name
    link = scratch / f"link-{stem}"
    chain2 = scratch / f"chain2-{stem}"
    chain1 = scratch / f"chain1-{stem}"
    for l_, target in ((link, image), (chain2, image), (chain1, chain2)):
        if not l_.is_symlink():
            l_.symlink_to(target)
    elsewhere = scratch / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return [
        Spelling("absolute", str(image)),
        Spelling("symlink", str(link)),
        Spelling("symlink-chain", str(chain1)),
        Spelling("relative", os.path.relpath(image, elsewhere), cwd=str(elsewhere)),
        Spelling("dotdot", f"{image.parent}/../{image.parent.name}/./{stem}"),
        Spelling("hardlink", str(_hardlink(image, scratch))),
    ]


def _hardlink(image: Path, scratch: Path) -> Path:
    """A hard link of ``image`` in ``scratch`` (one file system: both live under the test's tmp)."""
    hard = scratch / f"hard-{image.name}"
    if not hard.exists():
        os.link(image, hard)
    return hard


def block_spellings(image: Path, scratch: Path, make_loop: Callable[..., Any], engine_name: str,
                    mapper: str) -> list[Spelling]:
    """The spellings that need loop devices and the userspace engine (root tier).

    Loop devices are attached here (``make_loop`` detaches them). The ``engine-path`` and
    ``engine-name`` spellings name a userspace-engine ``linear`` device ``engine_name`` over the
    first loop device, exposed under ``mapper``: :func:`realized` creates it only while a test
    uses one of them (a live table over the image makes it "in use" for every command).
    """
    size = image.stat().st_size
    lp = make_loop(image)
    second = make_loop(image)
    linked = make_loop(_hardlink(image.resolve(), scratch))  # its backing_file is the link's path
    shifted = make_loop(image, offset=size // 2)  # shares the second half
    st = os.stat(lp.path)
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    with open(f"/sys/dev/block/{major}:{minor}/loop/backing_file") as f:
        backing = f.read().strip()
    dev_block = f"/dev/block/{major}:{minor}"
    if not os.path.exists(dev_block):  # no udev here: the same link under the scratch directory
        dev_block = str(scratch / "dev" / "block" / f"{major}:{minor}")
        os.makedirs(os.path.dirname(dev_block), exist_ok=True)
        if not os.path.lexists(dev_block):
            os.symlink(lp.path, dev_block)
    node = scratch / f"node-{image.name}"  # another device node for the same dev_t
    if not node.exists():
        os.mknod(node, stat.S_IFBLK | 0o600, st.st_rdev)
    return [
        Spelling("loop", lp.path),
        Spelling("dev-block", dev_block),
        Spelling("mknod", str(node)),
        Spelling("devno", f"{major}:{minor}"),
        Spelling("second-loop", second.path),
        Spelling("hardlink-loop", linked.path),
        Spelling("offset-loop", shifted.path),
        Spelling("backing-file", backing),
        Spelling("engine-path", os.path.join(mapper, engine_name), under=f"0 {size // 512} linear {lp.path} 0"),
        Spelling("engine-name", engine_name, name_only=True, under=f"0 {size // 512} linear {lp.path} 0"),
    ]


@contextlib.contextmanager
def realized(dm: Any, *spellings: Spelling) -> Iterator[None]:
    """Create the engine devices the ``engine-*`` spellings name, and remove them afterwards."""
    made: list[str] = []
    try:
        for s in spellings:
            name = os.path.basename(s.ref)
            if s.under and name not in made:
                dm.create(name, s.under)
                made.append(name)
        yield
    finally:
        for name in reversed(made):
            dm.remove(name, retry=True)


def make_images(folder: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """One 1 MiB image per name, ``dmtt-NAME.img``, the i-th filled with byte ``i + 1``."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for i, name in enumerate(names):
        images[name] = folder / f"dmtt-{name}.img"
        images[name].write_bytes(bytes([i + 1]) * MiB)
    return images


def digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's (or block device's) whole content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def run_cli(capsys: Any, *argv: str) -> tuple[int, str]:
    """The CLI in-process: exit status and stderr (stdout dropped)."""
    from dmtools.cli import main as cli_main

    capsys.readouterr()
    rc = cli_main.main(list(argv))
    return rc, capsys.readouterr().err


def assert_refused(rc: int, err: str, *words: str) -> None:
    """A refusal: non-zero exit and one ``dmtools:`` line of stderr (naming one of ``words``)."""
    assert rc != 0, "accepted"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dmtools: ") and "Traceback" not in err, err
    assert not words or any(w in lines[0] for w in words), lines[0]


def digests(*paths: str | os.PathLike[str]) -> dict[str, str]:
    """``{path: sha256}`` of every image, to compare before and after a refused command."""
    return {os.fspath(p): digest(p) for p in paths}
