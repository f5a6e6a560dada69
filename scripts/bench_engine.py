#!/usr/bin/env python3
"""Benchmark: sequential 1 MiB I/O through an exposed userspace ``linear`` device vs its backing file.

One run measures both sides with the same access pattern (``O_DIRECT``, 1 MiB requests, one
stream, writes ended by ``fsync``): the backing file directly and ``<run_dir>/mapper/NAME`` (loop
device → FUSE → engine → backing file), alternating over a few rounds with caches dropped before
each pass. It prints the median MB/s of each and the ratio (goal: ≥ 0.5× of the backing file). Needs root, ``/dev/fuse`` and loop devices.

``--cycle`` measures instead what a table's devices cost: in-process create/remove cycles of a
``linear`` device over an image file (the reference is identified and claimed, and the loop
devices over the file are looked up: ``dmtools.claims``, ``dmtools.loop_index``) against the same
cycle of a ``zero`` device (no device to claim), alternating, with the number of bound loop
devices on the machine (each one is looked at when the loop index is rebuilt).

Usage: scripts/bench_engine.py [--size-mib 256] [--dir DIR] | --cycle [--cycles 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmtools.blockdev import aligned_buffer  # noqa: E402
from dmtools.engine import Engine  # noqa: E402
from dmtools.engine.expose import exposure_possible  # noqa: E402

MiB = 1 << 20


def _drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def _cpu() -> float:
    """CPU seconds used by this process (all threads, the FUSE workers included)."""
    t = os.times()
    return t.user + t.system


def _seq(path: str, size: int, write: bool) -> float:
    """Sequential 1 MiB O_DIRECT writes (then fsync) or reads over ``size`` bytes; returns MB/s."""
    buf = aligned_buffer(MiB)
    buf[:] = os.urandom(4096) * (MiB // 4096)
    fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT)
    try:
        start = time.perf_counter()
        for off in range(0, size, MiB):
            if write:
                os.pwritev(fd, [buf], off)
            else:
                os.preadv(fd, [buf], off)
        if write:
            os.fsync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    return size / elapsed / 1e6


def _cycles(image: str, rounds: int, cycles: int) -> dict[str, list[float]]:
    """ms per in-process create/remove cycle of a linear device over ``image`` and of a zero one."""
    from dmtools import loop_index

    eng = Engine()
    runs: dict[str, list[float]] = {"linear": [], "zero": []}
    try:
        tables = {"linear": f"0 2048 linear {image} 0", "zero": "0 2048 zero"}
        for table in tables.values():  # warm: imports, the loop index
            eng.create("cycle-dmtt", table)
            eng.remove("cycle-dmtt")
        scans = loop_index.index.scans + loop_index.index.updates
        for _ in range(rounds):
            for key, table in tables.items():
                start = time.perf_counter()
                for _ in range(cycles):
                    eng.create("cycle-dmtt", table)
                    eng.remove("cycle-dmtt")
                runs[key].append((time.perf_counter() - start) / cycles * 1e3)
        runs["index_rebuilds"] = [float(loop_index.index.scans + loop_index.index.updates - scans)]
    finally:
        eng.close()
    return runs


def _bound_loops() -> int:
    try:
        return sum(os.path.exists(f"/sys/block/{n}/loop") for n in os.listdir("/sys/block")
                   if n.startswith("loop"))
    except OSError:
        return 0


def main_cycle(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="dmtt-bench-", dir=args.dir) as tmp:
        image = os.path.join(tmp, "backing.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        runs = _cycles(image, args.rounds, args.cycles)
    lin, zero = statistics.median(runs["linear"]), statistics.median(runs["zero"])
    loops = _bound_loops()
    rebuilds = int(runs["index_rebuilds"][0])
    if args.json:
        print(json.dumps({"benchmark": "engine-cycle", "cycles": args.cycles, "rounds": args.rounds,
                          "linear_ms": lin, "zero_ms": zero, "ratio": lin / zero,
                          "bound_loops": loops, "index_rebuilds": rebuilds, "runs": runs,
                          "loadavg": os.getloadavg()[0]}))
        return 0
    if args.verbose:
        for k in ("linear", "zero"):
            print(f"  {k}: " + " ".join(f"{x:.3f}" for x in runs[k]))
    print(f"engine create/remove cycle, in-process, {args.cycles} cycles x {args.rounds} alternating "
          f"rounds, {loops} bound loop devices, load average {os.getloadavg()[0]:.1f}")
    print(f"  linear over a file {lin:.3f} ms  zero {zero:.3f} ms  ratio {lin / zero:.1f}x  "
          f"(identity + claim: {lin - zero:.3f} ms; loop index updated {rebuilds} times by "
          "other loop devices' uevents)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="bytes moved per pass (MiB)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--dir", default=None, help="directory for the backing image")
    parser.add_argument("--verbose", action="store_true", help="print every round")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--cycle", action="store_true",
                        help="measure in-process create/remove cycles instead (see above)")
    parser.add_argument("--cycles", type=int, default=300, help="cycles per round (--cycle)")
    args = parser.parse_args(argv)
    if args.cycle:
        return main_cycle(args)
    reason = exposure_possible()
    if reason:
        print(f"bench engine: skipped: {reason}", file=sys.stderr)
        return 2
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="dmtt-bench-", dir=args.dir) as tmp:
        image = os.path.join(tmp, "backing.img")
        with open(image, "wb") as f:
            f.truncate(size)
        eng = Engine(expose=True, run_dir=os.path.join(tmp, "run"))
        try:
            eng.create("bench-dmtt", f"0 {size // 512} linear {image} 0")
            dev = eng.device_path("bench-dmtt")
            runs: dict[str, list[float]] = {k: [] for k in ("fw", "fr", "ew", "er")}
            cpu: dict[str, float] = {"ew": 0.0, "er": 0.0}
            # Warm once (allocates the image's blocks), then alternate the two sides each round so
            # that noise from other work on the machine hits both alike; report the medians.
            _seq(image, size, True)
            for _ in range(args.rounds):
                for key, path, write in (("fw", image, True), ("ew", dev, True),
                                         ("fr", image, False), ("er", dev, False)):
                    _drop_caches()
                    before = _cpu()
                    runs[key].append(_seq(path, size, write))
                    if key in cpu:
                        cpu[key] += _cpu() - before
            eng.remove("bench-dmtt")
        finally:
            eng.close()
    fw, fr, ew, er = (statistics.median(runs[k]) for k in ("fw", "fr", "ew", "er"))
    gib = size * args.rounds / (1 << 30)
    if args.json:
        print(json.dumps({
            "benchmark": "engine", "size_mib": args.size_mib, "rounds": args.rounds,
            "write": {"file_mbs": fw, "engine_mbs": ew, "ratio": ew / fw},
            "read": {"file_mbs": fr, "engine_mbs": er, "ratio": er / fr},
            "engine_cpu_s_per_gib": {"write": cpu["ew"] / gib, "read": cpu["er"] / gib},
            "goal": 0.5, "runs": runs, "loadavg": os.getloadavg()[0],
        }))
        return 0
    if args.verbose:
        for k, v in runs.items():
            print(f"  {k}: " + " ".join(f"{x:.0f}" for x in v))
    print(f"engine: sequential 1 MiB O_DIRECT, {args.size_mib} MiB per pass, "
          f"median of {args.rounds} alternating rounds, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"  write: backing file {fw:8.1f} MB/s  exposed linear {ew:8.1f} MB/s  ratio {ew / fw:.2f}x")
    print(f"  read:  backing file {fr:8.1f} MB/s  exposed linear {er:8.1f} MB/s  ratio {er / fr:.2f}x")
    print(f"  engine process CPU (FUSE threads + engine): write {cpu['ew'] / gib:.2f} s/GiB, "
          f"read {cpu['er'] / gib:.2f} s/GiB (the engine's cost; ratios suffer when CPUs are busy)")
    print(f"  goal >= 0.5x: write {'met' if ew / fw >= 0.5 else 'NOT met'}, "
          f"read {'met' if er / fr >= 0.5 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
