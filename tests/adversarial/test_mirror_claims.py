"""``mirror create`` and ``add-leg`` format a disk log before the table that claims it is loaded: a
log or leg that another tool claims, or a mounted file system given as the log, must be refused
before that write, not overwritten and then refused by the table's own claim.

Unit tier: files claimed by another tool (``dmtools.claims``) on the in-process engine. Root and
kernel tiers: an ext4 file system mounted on a loop device, given as the log.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_lazy_fixtures import lf

from dmtools import claims
from dmtools.backend import DeviceMapper
from dmtools.errors import DeviceBusy
from mirror.manager import MirrorManager

MiB = 1 << 20
SIZE = 2 * MiB


def _images(folder: Path) -> dict[str, str]:
    out = {}
    for i, name in enumerate(("leg0", "leg1", "log", "spare")):
        path = folder / f"dmtt-{name}.img"
        path.write_bytes(bytes([i + 1]) * (SIZE if name != "log" else 64 * 1024))
        out[name] = str(path)
    return out


def _digests(paths: Any) -> dict[str, str]:
    out = {}
    for p in paths:
        with open(p, "rb") as f:
            out[p] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.parametrize("verb, victim", [("create", "log"), ("create", "leg1"), ("add_leg", "log"),
                                          ("add_leg", "spare")])
def test_a_claimed_log_or_leg_is_refused_before_the_log_is_formatted(engine: Any, tmp_path: Path, verb: str,
                                                                     victim: str) -> None:
    img = _images(tmp_path)
    mm = MirrorManager(engine)
    if verb == "add_leg":
        engine.create("l-dmtt", f"0 {SIZE // 512} linear {img['leg0']} 0")
    before = _digests(img.values()), [e.name for e in engine.list()]
    with claims.claim(img[victim], holder="another tool"), pytest.raises(DeviceBusy, match="claimed"):
        if verb == "create":
            mm.create("m-dmtt", [img["leg0"], img["leg1"]], log=img["log"], region_size=128)
        else:
            mm.add_leg("l-dmtt", img["spare"], log=img["log"], region_size=128)
    assert (_digests(img.values()), [e.name for e in engine.list()]) == before
    if verb == "add_leg":
        assert str(engine.table("l-dmtt")).split()[2] == "linear"


@pytest.fixture
def mounted_log(make_image: Callable[..., Path], make_loop: Callable[..., Any], tmp_path: Path) -> Iterator[str]:
    """A loop device with an ext4 file system mounted on it (a file written there)."""
    lo = make_loop(make_image(16 * MiB, name="fs"))
    subprocess.run(["mkfs.ext4", "-q", "-F", lo.path], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", lo.path, str(mnt)], check=True)
    try:
        (mnt / "kept").write_bytes(b"data of a mounted file system\n")
        os.sync()
        yield lo.path
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        fsck = subprocess.run(["e2fsck", "-fn", lo.path], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout  # the file system was never written


def _head(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, 64 * 1024)
        os.readv(fd, [buf])
        return bytes(buf)
    finally:
        os.close(fd)


#: the in-process userspace engine (root tier), or the kernel (in the VM)
BACKENDS = [pytest.param(lf("engine"), id="engine", marks=pytest.mark.root),
            pytest.param(lf("kernel_dm"), id="kernel", marks=pytest.mark.kernel)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("verb", ["create", "add_leg"])
def test_a_mounted_file_system_given_as_the_log_is_not_written(backend: DeviceMapper, mounted_log: str,
                                                               make_image: Callable[..., Path],
                                                               make_loop: Callable[..., Any], dm_name: str,
                                                               verb: str) -> None:
    legs = [make_loop(make_image(SIZE, name=f"leg{i}")).path for i in range(2)]
    before = _head(mounted_log)
    mm = MirrorManager(backend)
    try:
        if verb == "add_leg":
            backend.create(dm_name, f"0 {SIZE // 512} linear {legs[0]} 0")
        with pytest.raises(DeviceBusy, match="mounted on"):
            if verb == "create":
                mm.create(dm_name, legs, log=mounted_log, region_size=128, monitor=False)
            else:
                mm.add_leg(dm_name, legs[1], log=mounted_log, region_size=128)
        assert _head(mounted_log) == before
        assert backend.exists(dm_name) == (verb == "add_leg")
    finally:
        if backend.exists(dm_name):
            backend.remove(dm_name)
