"""Kernel tier (run: scripts/vmtest): a source leg that fails (its table replaced by ``error``) under
the kernel's dm-raid1 and under our userspace target, with and without ``handle_errors``: the same
health letters, the same sync counts, the same read outcomes, and the manager's verdict.

What the kernel does (dm-raid1.c, dm-region-hash.c):

- with ``handle_errors`` every region's recovery fails, stays out of sync (``complete_resync_work(reg,
  0)``) and leg 0 shows ``S``; reads of unsynced regions fail (the default leg has errors);
- without it the failed copies are marked in sync (the unsafe rule), the letters reset to ``A`` at
  full sync, and a read fails on leg 0 (``R``) then returns what leg 1 holds — not the data.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest

from dmtools.blockdev import BlockDevice, aligned_buffer
from dmtools.errors import DeviceIOError
from dmtools.testing.wait import wait_until
from mirror.manager import MirrorManager
from mirror.resync import RecoveryFailed
from test_mirror_kernel import _loops

pytestmark = pytest.mark.kernel

SIZE = 1 << 20
SECTORS = SIZE // 512
REGION = 128  # 64 KiB: 16 regions
NR = SIZE // (REGION * 512)
WAIT = 60.0


def _classify(got: bytes | None, data: bytes, r: int) -> str:
    if got is None:
        return "eio"
    return "data" if got == data[r * REGION * 512:(r + 1) * REGION * 512] else "not-data"


def _outcome(dm: Any, name: str, data: bytes, handle_errors: bool,
             read_region: Callable[[int], bytes | None]) -> dict[str, Any]:
    """Let the resync settle, then the manager's verdict, the status and each region's read."""
    mm = MirrorManager(dm)
    verdict: Any = None
    if handle_errors:
        with pytest.raises(RecoveryFailed) as info:
            mm.resync(name, timeout=WAIT)
        verdict = (info.value.regions, info.value.legs)
    else:
        wait_until(lambda: mm.status(name).fully_in_sync, "the unsafe rule to mark every region in sync", WAIT)
    before = mm.status(name)
    reads = [_classify(read_region(r), data, r) for r in range(NR)]
    after = mm.status(name)
    return {"verdict": verdict, "before": (before.health, before.in_sync, before.regions),
            "reads": reads, "after": (after.health, after.in_sync)}


def _kernel_case(kernel_dm: Any, make_image: Any, make_loop: Any, dm_name: str, data: bytes,
                 handle_errors: bool) -> dict[str, Any]:
    a, b, logdev = _loops(make_image, make_loop, 3, size=SIZE, data=data)
    src = f"{dm_name[:-5]}-src-dmtt"
    kernel_dm.create(src, f"0 {SECTORS} linear {a} 0")
    try:
        kernel_dm.load(src, f"0 {SECTORS} error")
        kernel_dm.resume(src)
        MirrorManager(kernel_dm).create(dm_name, [kernel_dm.device_path(src), b], log=logdev,
                                        region_size=REGION, handle_errors=handle_errors)
        path = kernel_dm.device_path(dm_name)

        def read_region(r: int) -> bytes | None:
            with BlockDevice(path, direct=True) as dev:  # no readahead into the next region
                buf = aligned_buffer(REGION * 512)
                try:
                    dev.readinto(buf, r * REGION * 512)
                except (OSError, DeviceIOError):
                    return None
                return bytes(buf)

        return _outcome(kernel_dm, dm_name, data, handle_errors, read_region)
    finally:
        for name in (dm_name, src):
            if kernel_dm.exists(name):
                kernel_dm.remove(name, retry=True)


def _userspace_case(tmp_path: Any, data: bytes, handle_errors: bool) -> dict[str, Any]:
    from dmtools.engine import Engine

    eng = Engine()
    try:
        paths = []
        for i, content in enumerate((data, bytes(SIZE), bytes(64 << 10))):
            p = tmp_path / f"u{int(handle_errors)}{i}"
            p.write_bytes(content)
            paths.append(str(p))
        eng.create("src", f"0 {SECTORS} linear {paths[0]} 0")
        eng.load("src", f"0 {SECTORS} error")
        eng.resume("src")
        MirrorManager(eng).create("m", [eng.device_ref("src"), paths[1]], log=paths[2], region_size=REGION,
                                  handle_errors=handle_errors)

        def read_region(r: int) -> bytes | None:
            buf = bytearray(REGION * 512)
            with eng.open_endpoint("m", writable=False) as ep:
                try:
                    ep.readinto(buf, r * REGION * 512)
                except DeviceIOError:
                    return None
            return bytes(buf)

        return _outcome(eng, "m", data, handle_errors, read_region)
    finally:
        eng.close()


@pytest.mark.parametrize("handle_errors", [True, False], ids=["handle_errors", "unsafe"])
def test_failing_source_same_as_the_kernel(kernel_dm: Any, make_image: Any, make_loop: Any, dm_name: str,
                                           tmp_path: Any, handle_errors: bool) -> None:
    data = os.urandom(SIZE)
    kernel = _kernel_case(kernel_dm, make_image, make_loop, dm_name, data, handle_errors)
    ours = _userspace_case(tmp_path, data, handle_errors)
    if handle_errors:
        assert kernel["before"] == ("SA", 0, NR) and kernel["reads"] == ["eio"] * NR
        assert kernel["verdict"] == (list(range(NR)), [0])  # regions from the kernel's disk log
    else:
        # the letters reset at full sync; udev's probe of the new device may already have read
        # leg 0 (R) on the kernel, while nothing reads ours: compare the letters after our reads
        assert kernel["before"] in (("AA", NR, NR), ("RA", NR, NR)) and ours["before"] == ("AA", NR, NR)
        assert kernel["after"] == ("RA", NR)
        assert "data" not in kernel["reads"] and "eio" not in kernel["reads"]
        ours["before"] = kernel["before"]
    assert ours == kernel


def test_kernel_repair_from_a_failed_source_exits_with_the_regions(kernel_dm: Any, make_image: Any,
                                                                   make_loop: Any, dm_name: str) -> None:
    """A kernel mirror without handle_errors: the manager rebuilds with handle_errors, so the regions
    it could not copy are reported and stay out of sync instead of being marked in sync."""
    data = os.urandom(SIZE)
    a, b, c, logdev = _loops(make_image, make_loop, 4, size=SIZE, data=data)
    with open(b, "r+b") as f:
        f.write(data)
    src = f"{dm_name[:-5]}-src-dmtt"
    kernel_dm.create(src, f"0 {SECTORS} linear {a} 0")
    mm = MirrorManager(kernel_dm)
    try:
        mm.create(dm_name, [kernel_dm.device_path(src), b], log=logdev, region_size=REGION, nosync=True,
                  handle_errors=False)
        kernel_dm.load(src, f"0 {SECTORS} error")
        kernel_dm.resume(src)
        with pytest.raises(RecoveryFailed) as info:
            mm.repair(dm_name, 1, c)
        assert info.value.legs == [0] and info.value.regions == list(range(NR))
        st = mm.status(dm_name)
        assert st.health[0] == "S" and st.in_sync == 0 and "handle_errors" in st.features
    finally:
        for name in (dm_name, src):
            if kernel_dm.exists(name):
                kernel_dm.remove(name, retry=True)
