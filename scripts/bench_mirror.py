#!/usr/bin/env python3
"""Mirror benchmarks (issue 6), measured in one run and printed as ratios against peers:

1. full resync of an inactive mirror (every region out of sync on its disk log) against a raw
   kcopyd copy of the same size (what ``dmtools copy`` runs), both flushed: goal >= 0.9x; and the
   userspace ``mirror`` target's own full resync (core log), until the mirror is removed;
2. a resync with 10 % of the regions dirty against the full resync: goal <= 15 % of the time;
3. rate-limited resyncs (offline, paced submissions: bytes over the time until the last copy
   completed; the userspace target's own limit: bytes over the time until the mirror reports
   in sync) against their limit: goal within 10 %;
4. sequential write throughput to an in-sync userspace mirror (2 legs, disk log) against one leg
   alone (a linear device on the same engine).

    scripts/bench mirror [--size 256M] [--region-size 512K] [--rate 64M] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dmtools.blockdev import BlockDevice  # noqa: E402
from dmtools.units import format_size, parse_size  # noqa: E402
from mirror.format import LogImage, region_count  # noqa: E402
from mirror.resync import OfflineResync  # noqa: E402


def fill(path: Path, size: int, seed: int) -> None:
    """Write ``size`` bytes of incompressible, non-zero data (a random MiB, varied per MiB)."""
    rnd = random.Random(seed)
    block = bytearray(rnd.randbytes(1 << 20))
    with open(path, "wb") as f:
        for i in range(size >> 20):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def blank(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def write_log(path: Path, nr: int, dirty: list[int] | None) -> None:
    """A disk log with ``dirty`` regions out of sync (all of them when ``dirty`` is None)."""
    img = LogImage.new(nr, in_sync=dirty is not None)
    for r in dirty or []:
        img.clean.clear(r)
    with open(path, "wb") as f:
        f.write(img.pack())
        f.truncate(max(img.io_bytes, 1 << 20))


def raw_copy(src: Path, dst: Path, size: int) -> float:
    import kcopyd

    t0 = time.monotonic()
    with BlockDevice(src) as s, BlockDevice(dst, writable=True) as d, kcopyd.Client(num_pages=2048) as kc:
        job = kc.copy(kcopyd.Region(s, 0, size // 512), [kcopyd.Region(d, 0, size // 512)])
        job.wait()
        d.flush()
    return time.monotonic() - t0


def offline(legs: list[Path], log: Path, region: int, rate: int | None = None,
            copy_time: bool = False) -> tuple[float, int]:
    eps = [BlockDevice(p, writable=True) for p in legs]
    lep = BlockDevice(log, writable=True)
    try:
        rs = OfflineResync(eps, lep, region_size=region, rate=rate)
        t0 = time.monotonic()
        res = rs.run()
        took = time.monotonic() - t0
        assert res.ok, res
        return (res.copy_seconds if copy_time else took), res.bytes_copied
    finally:
        for ep in (*eps, lep):
            ep.close()


def engine():  # type: ignore[no-untyped-def]
    from dmtools.engine import Engine
    from mirror.target import MirrorTarget

    eng = Engine()
    eng.register_target(MirrorTarget)
    return eng


def target_rate(legs: list[Path], size: int, region: int, rate: int) -> tuple[float, int]:
    """Rebuild leg 1 of an in-sync userspace mirror at ``rate``; return (seconds, bytes)."""
    from mirror.manager import MirrorManager

    eng = engine()
    try:
        mm = MirrorManager(eng)
        mm.create("bench-rate", [str(p) for p in legs], region_size=region, nosync=True)
        t0 = time.monotonic()
        mm.resync("bench-rate", rate=rate, leg=1, poll=0.02)
        return time.monotonic() - t0, size
    finally:
        eng.close()


def target_full_resync(legs: list[Path], region: int) -> float:
    """Seconds for the userspace ``mirror`` target to resync a core-log mirror (every region)."""
    from mirror.manager import MirrorManager

    eng = engine()
    try:
        mm = MirrorManager(eng)
        t0 = time.monotonic()
        mm.create("bench-full", [str(p) for p in legs], region_size=region)
        mm.resync("bench-full", poll=0.01)
        with eng.open_endpoint("bench-full") as ep:
            ep.flush()  # the copies made durable, as the raw copy's
        took = time.monotonic() - t0
        mm.remove("bench-full")
        return took
    finally:
        eng.close()


def seq_write(eng, name: str, size: int, chunk: int = 1 << 20) -> float:  # type: ignore[no-untyped-def]
    buf = os.urandom(chunk)
    with eng.open_endpoint(name) as ep:
        t0 = time.monotonic()
        for off in range(0, size, chunk):
            ep.write(buf, off)
        ep.flush()
        return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--region-size", default="512K")
    ap.add_argument("--rate", default="64M", help="rate limit for the rate tests (bytes/s)")
    ap.add_argument("--dir", default=None, help="where the images go (default: a temporary directory)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the copy/resync comparisons (median)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size = parse_size(args.size, "b") >> 20 << 20
    region = parse_size(args.region_size, "b") // 512
    rate = parse_size(args.rate, "b")
    nr = region_count(size // 512, region)
    out: dict[str, float] = {"size_bytes": size, "region_sectors": region, "regions": nr}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-mirror-") as tmp:
        d = Path(tmp)
        src, dst, log = d / "leg0", d / "leg1", d / "log"
        fill(src, size, 1)

        raws, fulls, dirties, targets = [], [], [], []
        dirty = sorted(random.Random(2).sample(range(nr), max(1, nr // 10)))
        for _ in range(args.repeat):  # interleaved, medians: the machine is shared
            blank(dst, size)
            raws.append(raw_copy(src, dst, size))
            blank(dst, size)
            write_log(log, nr, None)
            fulls.append(offline([src, dst], log, region)[0])
            write_log(log, nr, dirty)
            dirties.append(offline([src, dst], log, region)[0])
            blank(dst, size)
            targets.append(target_full_resync([src, dst], region))
        out["raw_copy_s"] = statistics.median(raws)
        out["full_resync_s"] = statistics.median(fulls)
        out["full_vs_raw"] = out["raw_copy_s"] / out["full_resync_s"]
        out["dirty10_resync_s"] = statistics.median(dirties)
        out["target_resync_s"] = statistics.median(targets)
        out["target_vs_raw"] = out["raw_copy_s"] / out["target_resync_s"]
        out["dirty10_vs_full"] = out["dirty10_resync_s"] / out["full_resync_s"]

        # rate limits: a slice big enough for a few seconds at the limit, at most the whole volume
        part = min(size, max(rate * 4, 8 << 20)) >> 20 << 20
        nr_part = region_count(part // 512, region)
        legs_part = [d / "p0", d / "p1"]
        fill(legs_part[0], part, 3)
        blank(legs_part[1], part)
        write_log(log, nr_part, None)
        secs, nbytes = offline(legs_part, log, region, rate=rate, copy_time=True)
        out["offline_rate_limit"] = rate
        out["offline_rate_achieved"] = nbytes / secs
        out["offline_rate_ratio"] = out["offline_rate_achieved"] / rate
        blank(legs_part[1], part)
        secs, nbytes = target_rate(legs_part, part, region, rate)
        out["target_rate_achieved"] = nbytes / secs
        out["target_rate_ratio"] = out["target_rate_achieved"] / rate

        # write throughput: in-sync userspace mirror vs one leg alone
        blank(dst, size)
        ones, mirrors = [], []
        eng = engine()
        try:
            for _ in range(args.repeat):
                eng.create("bench-one", f"0 {size // 512} linear {dst} 0")
                ones.append(seq_write(eng, "bench-one", size))
                eng.remove("bench-one")
                write_log(log, nr, [])
                eng.create("bench-mirror", f"0 {size // 512} mirror disk 2 {log} {region} 2 {src} 0 {dst} 0")
                mirrors.append(seq_write(eng, "bench-mirror", size))
                eng.remove("bench-mirror")
        finally:
            eng.close()
        out["one_leg_write_s"] = statistics.median(ones)
        out["mirror_write_s"] = statistics.median(mirrors)
        out["mirror_vs_one_leg"] = out["one_leg_write_s"] / out["mirror_write_s"]

    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    mb = lambda s: format_size(int(size / s)) + "/s"  # noqa: E731
    print(f"mirror benchmark: {format_size(size)}, {nr} regions of {format_size(region * 512)}")
    print(f"  raw kcopyd copy        {out['raw_copy_s']:.2f} s  {mb(out['raw_copy_s'])}")
    print(f"  full resync            {out['full_resync_s']:.2f} s  {mb(out['full_resync_s'])}"
          f"  = {out['full_vs_raw']:.2f}x raw copy (goal >= 0.9x)")
    print(f"  userspace target       {out['target_resync_s']:.2f} s  {mb(out['target_resync_s'])}"
          f"  = {out['target_vs_raw']:.2f}x raw copy (resync inside the engine's mirror target)")
    print(f"  10% dirty resync       {out['dirty10_resync_s']:.2f} s"
          f"  = {100 * out['dirty10_vs_full']:.1f}% of full (goal <= 15%)")
    print(f"  offline rate limit     {format_size(rate)}/s -> {format_size(int(out['offline_rate_achieved']))}/s"
          f"  = {out['offline_rate_ratio']:.3f}x (goal 0.9-1.1)")
    print(f"  target rate limit      {format_size(rate)}/s -> {format_size(int(out['target_rate_achieved']))}/s"
          f"  = {out['target_rate_ratio']:.3f}x (goal 0.9-1.1)")
    print(f"  writes, one leg        {out['one_leg_write_s']:.2f} s  {mb(out['one_leg_write_s'])}")
    print(f"  writes, 2-leg mirror   {out['mirror_write_s']:.2f} s  {mb(out['mirror_write_s'])}"
          f"  = {out['mirror_vs_one_leg']:.2f}x one leg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
