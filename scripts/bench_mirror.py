#!/usr/bin/env python3
"""Mirror benchmarks (issue 6), measured in one run and printed as ratios against peers:

1. full resync of an inactive mirror (every region out of sync on its disk log) against a raw
   kcopyd copy of the same size (what ``dmtools copy`` runs), both flushed, in ``--copy-repeat``
   rounds, each running both in turn (which goes first alternates): medians, ranges, CPU seconds
   and each round's ratio; goal >= 1.0x (issue 12); and the
   userspace ``mirror`` target's own full resync (core log), until the mirror is removed;
2. a resync with 10 % of the regions dirty against the full resync: goal <= 15 % of the time;
3. rate-limited resyncs (offline, paced submissions: bytes over the time until the last copy
   completed; the userspace target's own limit: bytes over the time until the mirror reports
   in sync) against their limit: goal within 10 %;
4. sequential write throughput to an in-sync userspace mirror (2 legs, disk log) against one leg
   alone (a linear device on the same engine), through the engine's API: goal >= 0.45x (both legs
   on one disk: the physical limit is 0.5x);
5. external peers on the mirror exposed as a block device (root, FUSE and loop devices): ``dd
   bs=1M oflag=direct`` and fio (sequential 1 MiB and random 4 KiB writes, queue depth 1 and 16,
   ``--direct=1``) on the exposed mirror against the same job on a file beside its legs (one leg);
6. the same dd and fio jobs on the kernel's dm-mirror in the VM (``scripts/vmtest``: a disk log in
   sync, two loop devices over files against a third one alone, ``--vm-size`` bytes, one run: the
   VM's CPU is emulated), the kernel's ratio printed beside ours (``--no-kernel`` leaves it out).

Every ratio is the mirror's rate over one leg's, measured in the same run; the load average is
printed beside the results (busy CPUs lower the ratios).

    scripts/bench mirror [--size 256M] [--peer-size 256M] [--region-size 512K] [--rate 64M]
                         [--repeat 3] [--runtime 3] [--vm-size 32M] [--no-kernel] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dmtools.blockdev import BlockDevice  # noqa: E402
from dmtools.units import format_size, parse_size  # noqa: E402
from mirror.format import LogImage, region_count  # noqa: E402
from mirror.resync import OfflineResync  # noqa: E402
from bench_common import FIO_JOBS, fio, fio_available, in_vm, loadavg  # noqa: E402


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


def raw_vs_full(src: Path, dst: Path, log: Path, size: int, nr: int, region: int,
                raw_first: bool) -> tuple[float, float, float, float]:
    """One round: a raw kcopyd copy of ``src`` onto a blank ``dst`` and a full resync of the two
    as legs (every region out of sync on ``log``), in the order given; the seconds of each, then
    the CPU seconds of each (this process: kcopyd's threads are in it)."""
    took: dict[str, tuple[float, float]] = {}
    for what in (("raw", "full") if raw_first else ("full", "raw")):
        blank(dst, size)
        write_log(log, nr, None)
        c0 = time.process_time()
        secs = raw_copy(src, dst, size) if what == "raw" else offline([src, dst], log, region)[0]
        took[what] = (secs, time.process_time() - c0)
    return took["raw"][0], took["full"][0], took["raw"][1], took["full"][1]


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


def dd_write(path: str, size: int) -> float:
    """``dd bs=1M oflag=direct conv=notrunc,fdatasync`` of ``size`` bytes onto ``path``; bytes/s."""
    t0 = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={size >> 20}", "oflag=direct",
                    "conv=notrunc,fdatasync", "status=none"], check=True)
    return size / (time.monotonic() - t0)


def peer_jobs(mirror: str, one: str, size: int, repeat: int, runtime: float) -> dict[str, Any]:
    """dd and the fio jobs on ``mirror`` and on ``one`` (one leg alone), alternating; medians.

    Returns ``{job: {"mirror": bytes/s, "one": bytes/s, "ratio": mirror/one}}``; fio jobs also
    carry IOPS. Sequential jobs cover ``size`` once; random ones run ``runtime`` seconds.
    """
    out: dict[str, Any] = {}
    rates: dict[str, list[float]] = {"mirror": [], "one": []}
    for _ in range(repeat):
        for side, path in (("one", one), ("mirror", mirror)):
            rates[side].append(dd_write(path, size))
    out["dd_1m_direct"] = _ratio(rates)
    if fio_available() is not None:
        out["fio_skipped"] = fio_available()
        return out
    for name, bs, qd in FIO_JOBS:
        res: dict[str, list[Any]] = {"mirror": [], "one": []}
        for _ in range(max(1, repeat // 2)):
            for side, path in (("one", one), ("mirror", mirror)):
                res[side].append(fio(path, write=True, bs=bs, iodepth=qd, size=size,
                                     runtime=None if bs == "1M" else runtime))
        row = _ratio({k: [r.bw for r in v] for k, v in res.items()})
        row["mirror_iops"] = statistics.median(r.iops for r in res["mirror"])
        row["one_iops"] = statistics.median(r.iops for r in res["one"])
        out[f"fio_{name}"] = row
    return out


def _ratio(rates: dict[str, list[float]]) -> dict[str, Any]:
    m, o = statistics.median(rates["mirror"]), statistics.median(rates["one"])
    return {"mirror": m, "one": o, "ratio": m / o}


def filled(path: Path, size: int) -> None:
    """A file of ``size`` bytes, every block allocated (written once)."""
    fill(path, size, 5)


def bench_exposed(d: Path, size: int, region: int, repeat: int, runtime: float) -> dict[str, Any]:
    """Section 5: the userspace mirror exposed as a block device against one leg (a file)."""
    from dmtools.engine import Engine
    from dmtools.engine.expose import exposure_possible
    from mirror.target import MirrorTarget

    reason = exposure_possible()
    if reason:
        return {"skipped": reason}
    legs = [d / "x0", d / "x1"]
    one, log = d / "x-one", d / "x-log"
    for p in (*legs, one):
        filled(p, size)
    write_log(log, region_count(size // 512, region), [])
    eng = Engine(expose=True, run_dir=str(d / "run"))
    try:
        eng.register_target(MirrorTarget)
        eng.create("bench-xmirror", f"0 {size // 512} mirror disk 2 {log} {region} 2 {legs[0]} 0 {legs[1]} 0")
        try:
            out = peer_jobs(eng.device_path("bench-xmirror"), str(one), size, repeat, runtime)
        finally:
            eng.remove("bench-xmirror")
    finally:
        eng.close()
    out["loadavg"] = loadavg()
    return out


def kernel_peer(size: int, region: int, repeat: int, runtime: float) -> dict[str, Any]:
    """Section 6, run inside the VM: the kernel's dm-mirror (disk log in sync, two loop devices
    over files) against a third loop device alone, with the same jobs."""
    from dmtools import loop
    from dmtools.kernel import KernelBackend
    from dmtools.status import parse_mirror_status

    d = Path(tempfile.mkdtemp(prefix="bench-mirror-vm-", dir="/tmp"))
    files = [d / "k0", d / "k1", d / "k-one"]
    for p in files:  # allocated without writing them (the VM's CPU is emulated, and slow)
        with open(p, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    write_log(d / "k-log", region_count(size // 512, region), [])
    loops = [loop.attach(p) for p in (*files, d / "k-log")]
    dm = KernelBackend()
    name = f"bench-kmirror-{os.getpid()}"
    try:
        l0, l1, lone, llog = (lp.path for lp in loops)
        dm.create(name, f"0 {size // 512} mirror disk 2 {llog} {region} 2 {l0} 0 {l1} 0")
        try:
            st = parse_mirror_status(dm.status(name)[0].params)
            if st.in_sync != st.regions:  # the kernel read our in-sync log: nothing to resync
                raise RuntimeError(f"the kernel's mirror is not in sync: {st}")
            out = peer_jobs(dm.device_path(name), lone, size, repeat, runtime)
        finally:
            dm.remove(name, retry=True)
    finally:
        for lp in loops:
            loop.detach(lp)
        dm.close()
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--region-size", default="512K")
    ap.add_argument("--rate", default="64M", help="rate limit for the rate tests (bytes/s)")
    ap.add_argument("--dir", default=None, help="where the images go (default: a temporary directory)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the resync comparisons (median)")
    ap.add_argument("--copy-repeat", type=int, default=9,
                    help="rounds of the raw copy against the full resync, each in turn (median and range)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-kernel", action="store_true", help="leave out the kernel's dm-mirror in the VM")
    ap.add_argument("--peer-size", default="256M", help="bytes of the dd and sequential fio jobs")
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds of each random fio job")
    ap.add_argument("--vm-size", default="32M",
                    help="bytes of the sequential jobs in the VM (its CPU is emulated: one run each)")
    ap.add_argument("--kernel-peer", action="store_true", help=argparse.SUPPRESS)  # inside the VM
    args = ap.parse_args()
    size = parse_size(args.size, "b") >> 20 << 20
    region = parse_size(args.region_size, "b") // 512
    rate = parse_size(args.rate, "b")
    peer_size = parse_size(args.peer_size, "b") >> 20 << 20
    if args.kernel_peer:
        print(json.dumps(kernel_peer(peer_size, region, args.repeat, args.runtime)))
        return 0

    nr = region_count(size // 512, region)
    out: dict[str, Any] = {"size_bytes": size, "region_sectors": region, "regions": nr, "loadavg_start": loadavg()}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-mirror-") as tmp:
        d = Path(tmp)
        src, dst, log = d / "leg0", d / "leg1", d / "log"
        fill(src, size, 1)

        dirties: list[float] = []
        targets: list[float] = []
        dirty = sorted(random.Random(2).sample(range(nr), max(1, nr // 10)))
        pairs: list[tuple[float, float, float, float]] = []
        for i in range(args.copy_repeat):  # interleaved, first one then the other: the disk is shared
            pairs.append(raw_vs_full(src, dst, log, size, nr, region, raw_first=i % 2 == 0))
        raws = [p[0] for p in pairs]
        fulls = [p[1] for p in pairs]
        for _ in range(args.repeat):  # interleaved, medians: the machine is shared
            write_log(log, nr, dirty)
            dirties.append(offline([src, dst], log, region)[0])
            blank(dst, size)
            targets.append(target_full_resync([src, dst], region))
        out["raw_copy_s"] = statistics.median(raws)
        out["full_resync_s"] = statistics.median(fulls)
        out["full_vs_raw"] = out["raw_copy_s"] / out["full_resync_s"]
        out["copy_rounds"] = len(pairs)
        out["raw_copy_s_range"] = [min(raws), max(raws)]
        out["full_resync_s_range"] = [min(fulls), max(fulls)]
        out["raw_copy_cpu_s"] = statistics.median(p[2] for p in pairs)
        out["full_resync_cpu_s"] = statistics.median(p[3] for p in pairs)
        ratios = sorted(p[0] / p[1] for p in pairs)
        out["full_vs_raw_rounds"] = [ratios[0], statistics.median(ratios), ratios[-1]]
        out["loadavg_copies"] = loadavg()
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
        out["loadavg_writes"] = loadavg()
        for p in (src, dst, *legs_part):
            p.unlink()

        out["exposed"] = bench_exposed(d, peer_size, region, args.repeat, args.runtime)
    if args.no_kernel:
        out["kernel"] = {"skipped": "--no-kernel"}
    else:  # after the measurements here: the VM takes a core for itself
        out["kernel"] = in_vm(Path(__file__).resolve(), [
            "--kernel-peer", "--peer-size", args.vm_size, "--region-size", args.region_size,
            "--repeat", "1", "--runtime", str(min(args.runtime, 2.0))], ("dm-mirror",))

    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    mb = lambda s: format_size(int(size / s)) + "/s"  # noqa: E731
    print(f"mirror benchmark: {format_size(size)}, {nr} regions of {format_size(region * 512)}")
    rng = lambda k: "[{:.2f}-{:.2f}]".format(*out[k])  # noqa: E731
    print(f"  raw kcopyd copy        {out['raw_copy_s']:.2f} s {rng('raw_copy_s_range')}  {mb(out['raw_copy_s'])}"
          f"  CPU {out['raw_copy_cpu_s']:.2f} s")
    print(f"  full resync            {out['full_resync_s']:.2f} s {rng('full_resync_s_range')}  "
          f"{mb(out['full_resync_s'])}  CPU {out['full_resync_cpu_s']:.2f} s"
          f"  = {out['full_vs_raw']:.2f}x raw copy (goal >= 1.0x)")
    print(f"    per round (raw copy time over resync time, {out['copy_rounds']} rounds, load average "
          f"{out['loadavg_copies']:.1f}): min {out['full_vs_raw_rounds'][0]:.2f}x, median "
          f"{out['full_vs_raw_rounds'][1]:.2f}x, max {out['full_vs_raw_rounds'][2]:.2f}x")
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
          f"  = {out['mirror_vs_one_leg']:.2f}x one leg (goal >= 0.45x, limit 0.5x; load average "
          f"{out['loadavg_writes']:.1f})")
    print_peers(out["exposed"], out["kernel"], peer_size)
    return 0


def print_peers(ours: dict[str, Any], kernel: dict[str, Any] | str, size: int) -> None:
    """Sections 5 and 6: each job's rates on the mirror and one leg, our ratio and the kernel's."""
    print(f"exposed mirror vs one leg (dd and fio writes, --direct=1, {format_size(size)} sequential here; "
          "both legs and the lone leg on one disk; the VM's legs are loop devices over its /tmp):")
    if "skipped" in ours:
        print(f"  skipped: {ours['skipped']}")
        return
    if isinstance(kernel, str):
        kernel = {"skipped": kernel}
    mbs = lambda v: f"{v / 2**20:8.1f} MiB/s"  # noqa: E731
    print(f"  {'job':<18} {'mirror':>14} {'one leg':>14} {'ratio':>7}   kernel dm-mirror (VM)")
    for job, row in ours.items():
        if not isinstance(row, dict):
            continue
        k = kernel.get(job) if "skipped" not in kernel else None
        kern = (f"{k['ratio']:.2f}x ({mbs(k['mirror']).strip()} vs {mbs(k['one']).strip()})" if k
                else kernel.get("skipped", "-"))
        print(f"  {job:<18} {mbs(row['mirror'])} {mbs(row['one'])} {row['ratio']:6.2f}x   {kern}")
    if "fio_skipped" in ours:
        print(f"  fio: {ours['fio_skipped']}")
    print(f"  load average after: {ours['loadavg']:.1f}")


if __name__ == "__main__":
    sys.exit(main())
