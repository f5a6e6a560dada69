"""The userspace mirror target killed at random moments: the on-disk log never claims a region in
sync that is not, and a new activation on what survived ends with identical legs."""

from __future__ import annotations

import random

import pytest

from dmtools.testing.memory import MemoryEndpoint
from mirror.format import LogImage
from mirror.target import MirrorTarget
from mirror_memdev import CrashEndpoint, FakeContext, PowerCut, build_mirror

NREG, RSIZE = 16, 4096  # 16 regions of 4 KiB
SECTORS = NREG * RSIZE // 512


def _identical(legs: list[MemoryEndpoint], r: int) -> bool:
    a = legs[0].data[r * RSIZE : (r + 1) * RSIZE]
    return all(leg.data[r * RSIZE : (r + 1) * RSIZE] == a for leg in legs[1:])


def _target(devs: dict[str, MemoryEndpoint], nlegs: int) -> MirrorTarget:
    params = f"disk 2 log 8 {nlegs} " + " ".join(f"leg{i} 0" for i in range(nlegs))
    t: MirrorTarget = build_mirror(FakeContext(devs), SECTORS, params)
    return t


@pytest.mark.parametrize("seed", range(100))
def test_target_resync_killed_at_random_moment(seed: int) -> None:
    rng = random.Random(seed)
    nlegs = rng.choice((2, 3))
    power = PowerCut(rng.randrange(0, 80), rng)
    devs: dict[str, MemoryEndpoint] = {}
    base = rng.randbytes(NREG * RSIZE)
    dirty = set(rng.sample(range(NREG), rng.randrange(1, NREG + 1)))
    for i in range(nlegs):
        leg = CrashEndpoint(NREG * RSIZE, f"leg{i}", power)
        leg.data[:] = base
        if i:
            for r in dirty:
                leg.data[r * RSIZE : (r + 1) * RSIZE] = rng.randbytes(RSIZE)
        leg.flushed[:] = leg.data
        devs[f"leg{i}"] = leg
    log = CrashEndpoint(8192, "log", power)
    img = LogImage.new(NREG, in_sync=True)
    for r in dirty:
        img.clean.clear(r)
    log.data[: img.io_bytes] = img.pack()
    log.flushed[:] = log.data
    devs["log"] = log
    t = _target(devs, nlegs)
    t.resume()
    for _ in range(rng.randrange(0, 4)):  # writes racing the resync
        off = rng.randrange(0, NREG * RSIZE // 512 - 8) * 512
        t.write(memoryview(rng.randbytes(4096)), off)
    t.wait_in_sync(0.05 * rng.randrange(0, 4))
    power.cut = True  # whatever has not happened yet never reaches the disks
    t.destroy()

    after: dict[str, MemoryEndpoint] = {name: ep.after_crash() for name, ep in devs.items()}  # type: ignore[attr-defined]
    legs = [after[f"leg{i}"] for i in range(nlegs)]
    crashed = LogImage.read(after["log"])
    for r in range(NREG):
        if crashed.clean.test(r):
            assert _identical(legs, r), f"seed {seed}: region {r} marked clean but legs differ"
    t2 = _target(after, nlegs)
    t2.resume()
    try:
        assert t2.wait_in_sync(10)
        t2.presuspend()
        t2.postsuspend()
    finally:
        t2.destroy()
    assert all(leg.data == legs[0].data for leg in legs[1:])
    assert LogImage.read(after["log"]).out_of_sync() == []
