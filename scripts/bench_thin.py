#!/usr/bin/env python3
"""Thin provisioning benchmarks (issue 13), ours and the kernel's in one report.

Write throughput on a thin volume against the same writes on a ``linear`` device (first writes,
with and without zeroing of new blocks), and on a thin volume that has a snapshot (every write
breaks sharing) against the same writes on an origin with one classic snapshot. Run on the
userspace engine here; inside the VM (``--kernel``, run by ``scripts/vmtest --exec``) the same
workloads run on the kernel's targets over loop devices, and their ratios are printed beside ours.
Then ``thin dump``/``thin check`` against the C++ tools (``scripts/bench thin_tools``).

Goals: provisioning writes without zeroing >= 0.8x linear; snapshot writes >= 2x the classic
snapshot's; dump and check within 3x of thin_dump/thin_check using <= 128 MiB.

    scripts/bench thin [--size 64M] [--random-writes 2000] [--repeat 3] [--mappings 1000000]
                       [--no-kernel] [--only writes|tools] [--json]
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dmtools.units import parse_size  # noqa: E402

SECTOR = 512
MiB = 1 << 20
#: LVM's defaults: 64 KiB thin-pool chunks, 4 KiB classic snapshot chunks.
THIN_BLOCK = 128
SNAP_CHUNK = 8
GOALS = {"thin_nozero_vs_linear": 0.8, "thin_snapshot_vs_classic": 2.0}


class Rig:
    """Backing files (loop devices on the kernel) and the backend's devices, removed at the end."""

    def __init__(self, work: Path, kernel: bool, tag: str) -> None:
        self.work, self.kernel, self.tag = work, kernel, tag
        self.loops: list[Any] = []
        self.names: list[str] = []
        self.cleanups: list[Callable[[], None]] = []  # run first, newest first
        if kernel:
            from dmtools.kernel import KernelBackend

            self.dm: Any = KernelBackend()
        else:
            from dmtools.engine import Engine

            self.dm = Engine()

    def backing(self, name: str, size: int, fill: bool = False) -> str:
        """A file of ``size`` bytes (allocated, so no run pays the file system's allocation; random
        data with ``fill``); on the kernel, a loop device over it."""
        path = self.work / f"{self.tag}-{name}.img"
        with open(path, "wb") as f:
            if fill:
                block = os.urandom(MiB)
                for _ in range(size // MiB):
                    f.write(block)
            f.truncate(size)
            os.posix_fallocate(f.fileno(), 0, size)
        if not self.kernel:
            return str(path)
        from dmtools import loop

        dev = loop.attach(path)
        self.loops.append(dev)
        return str(dev.path)

    def create(self, name: str, table: str) -> str:
        full = f"bench{os.getpid()}{self.tag}{name}"
        self.dm.create(full, table)
        self.names.append(full)
        return full

    def ref(self, name: str) -> str:
        return self.dm.device_path(name) if self.kernel else self.dm.device_ref(name)

    def endpoint(self, name: str) -> Any:
        if self.kernel:
            from dmtools.blockdev import BlockDevice

            return BlockDevice(self.dm.device_path(name), writable=True)
        return self.dm.open_endpoint(name)

    def close(self) -> None:
        for cleanup in reversed(self.cleanups):
            cleanup()
        for name in reversed(self.names):
            self.dm.remove(name, retry=True)  # udev (in the VM) may be probing it
        if self.kernel:
            from dmtools import loop

            for dev in self.loops:
                loop.detach(dev)
        self.dm.close()
        for p in self.work.iterdir():
            p.unlink()


def _pool(rig: Rig, size: int, zero: bool) -> str:
    meta = rig.backing("meta", 16 * MiB)
    data = rig.backing("data", 2 * size + 64 * MiB)
    blocks = (2 * size + 64 * MiB) // SECTOR
    features = "" if zero else " 1 skip_block_zeroing"
    return rig.create("pool", f"0 {blocks} thin-pool {meta} {data} {THIN_BLOCK} 0{features}")


def _thin(rig: Rig, pool: str, dev_id: int, size: int, name: str) -> str:
    return rig.create(name, f"0 {size // SECTOR} thin {rig.ref(pool)} {dev_id}")


def _seq(ep: Any, size: int) -> float:
    """Bytes/s of sequential 1 MiB writes over the whole device, flushed."""
    buf = os.urandom(MiB)
    t0 = time.perf_counter()
    for off in range(0, size, MiB):
        ep.write(buf, off)
    ep.flush()
    return size / (time.perf_counter() - t0)


def _random(ep: Any, offsets: list[int]) -> float:
    """Bytes/s of 4 KiB writes at ``offsets`` (distinct blocks), flushed."""
    small = os.urandom(4096)
    t0 = time.perf_counter()
    for off in offsets:
        ep.write(small, off)
    ep.flush()
    return len(offsets) * 4096 / (time.perf_counter() - t0)


def _measure(work: Path, kernel: bool, tag: str, size: int, offsets: list[int],
             build: Callable[[Rig], str]) -> dict[str, float]:
    """Each workload on a device built fresh by ``build``, so every write is a first write."""
    workloads: dict[str, Callable[[Any], float]] = {
        "seq_1m": lambda ep: _seq(ep, size), "random_4k": lambda ep: _random(ep, offsets)}
    out: dict[str, float] = {}
    for name, run in workloads.items():
        rig = Rig(work, kernel, tag)
        try:
            ep = rig.endpoint(build(rig))
            try:
                out[name] = run(ep)
            finally:
                ep.close()
        finally:
            rig.close()
    return out


def _linear(size: int) -> Callable[[Rig], str]:
    return lambda rig: rig.create("lin", f"0 {size // SECTOR} linear {rig.backing('lin', size)} 0")


def _thin_volume(size: int, zero: bool) -> Callable[[Rig], str]:
    def build(rig: Rig) -> str:
        pool = _pool(rig, size, zero)
        rig.dm.message(pool, 0, "create_thin 0")
        return _thin(rig, pool, 0, size, "thin")
    return build


def _thin_snapshot(size: int) -> Callable[[Rig], str]:
    """A fully written thin volume with a snapshot of it: every write to the volume breaks sharing."""
    def build(rig: Rig) -> str:
        pool = _pool(rig, size, True)
        rig.dm.message(pool, 0, "create_thin 0")
        vol = _thin(rig, pool, 0, size, "thin")
        with rig.endpoint(vol) as ep:
            block = os.urandom(MiB)
            for off in range(0, size, MiB):
                ep.write(block, off)
            ep.flush()
        rig.dm.suspend(vol)  # as lvcreate -s does: the origin is quiet while the snapshot is taken
        rig.dm.message(pool, 0, "create_snap 1 0")
        rig.dm.resume(vol)
        return vol
    return build


def _classic_snapshot(size: int) -> Callable[[Rig], str]:
    """An origin of written data with one persistent snapshot (chunk 4 KiB, LVM's default)."""
    def build(rig: Rig) -> str:
        from snapshot import SnapshotManager

        vol = rig.create("vol", f"0 {size // SECTOR} linear {rig.backing('vol', size, fill=True)} 0")
        cow = rig.backing("cow", size + size // 64 + 64 * SNAP_CHUNK * SECTOR)
        manager = SnapshotManager(rig.dm)
        manager.create(vol, cow, f"{vol}s", chunk_size=SNAP_CHUNK)
        rig.cleanups.append(lambda: manager.remove(f"{vol}s"))
        return vol
    return build


def bench_writes(work: Path, size: int, nrandom: int, repeat: int, kernel: bool) -> dict[str, Any]:
    """MiB/s per configuration and workload (medians of ``repeat`` rounds), and the goal ratios."""
    rng = random.Random(7)
    offsets = [b * 4096 for b in rng.sample(range(size // 4096), nrandom)]
    configs = {
        "linear": _linear(size),
        "thin (zeroing)": _thin_volume(size, True),
        "thin (skip_block_zeroing)": _thin_volume(size, False),
        "thin with a snapshot": _thin_snapshot(size),
        "classic snapshot": _classic_snapshot(size),
    }
    runs = [{name: _measure(work, kernel, f"{i}{n}", size, offsets, build)
             for n, (name, build) in enumerate(configs.items())} for i in range(repeat)]
    med = {name: {k: statistics.median(r[name][k] for r in runs) for k in runs[0][name]} for name in configs}
    out: dict[str, Any] = {"engine": "kernel" if kernel else "userspace", "size_mib": size >> 20,
                           "random_writes": nrandom, "repeat": repeat,
                           "MiB/s": {n: {k: round(v / MiB, 1) for k, v in row.items()} for n, row in med.items()}}
    ratios: dict[str, dict[str, float]] = {}
    for k in med["linear"]:
        ratios.setdefault("thin_zero_vs_linear", {})[k] = round(med["thin (zeroing)"][k] / med["linear"][k], 3)
        ratios.setdefault("thin_nozero_vs_linear", {})[k] = round(
            med["thin (skip_block_zeroing)"][k] / med["linear"][k], 3)
        ratios.setdefault("thin_snapshot_vs_classic", {})[k] = round(
            med["thin with a snapshot"][k] / med["classic snapshot"][k], 3)
    out["ratios"] = ratios
    return out


def _in_vm(args: argparse.Namespace) -> dict[str, Any] | str:
    """The same write benchmark on the kernel's targets, in the VM; its JSON, or why it is missing."""
    cmd = (f"modprobe dm-thin-pool && {sys.executable} {Path(__file__).resolve()} --kernel --only writes --json "
           f"--size {args.size} --random-writes {args.random_writes} --repeat {args.repeat}")
    res = subprocess.run([str(ROOT / "scripts" / "vmtest"), "--exec", cmd], capture_output=True, text=True)
    text = res.stdout
    start = text.find("{")
    if res.returncode != 0 or start < 0:
        return f"the VM run failed ({res.returncode}): {(res.stderr or text).strip().splitlines()[-1:]}"
    decoder = json.JSONDecoder()
    value, _ = decoder.raw_decode(text[start:])
    return value["writes"]


def _tools(args: argparse.Namespace) -> Any:
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_thin_tools.py"), "--mappings",
                          str(args.mappings), "--repeat", str(args.repeat), "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def _print(results: dict[str, Any]) -> None:
    ours = results.get("writes")
    theirs = results.get("writes_kernel")
    if ours:
        print(f"thin writes, {ours['size_mib']} MiB devices, {ours['random_writes']} random 4 KiB writes, "
              f"median of {ours['repeat']}; load average {os.getloadavg()[0]:.2f}")
        print(f"{'MiB/s':28} {'seq 1M':>10} {'rand 4K':>10}" + (f" {'kernel seq':>11} {'kernel 4K':>10}"
                                                                  if isinstance(theirs, dict) else ""))
        for name, row in ours["MiB/s"].items():
            line = f"{name:28} {row['seq_1m']:>10} {row['random_4k']:>10}"
            if isinstance(theirs, dict):
                k = theirs["MiB/s"][name]
                line += f" {k['seq_1m']:>11} {k['random_4k']:>10}"
            print(line)
        for name, row in ours["ratios"].items():
            goal = f" (goal >= {GOALS[name]}x)" if name in GOALS else ""
            kern = ""
            if isinstance(theirs, dict):
                kr = theirs["ratios"][name]
                kern = f"   kernel: seq {kr['seq_1m']}x, 4K {kr['random_4k']}x"
            print(f"{name:28} seq {row['seq_1m']}x, 4K {row['random_4k']}x{goal}{kern}")
        if isinstance(theirs, str):
            print(f"kernel: {theirs}")
    if "tools" in results:
        print("tools:", json.dumps(results["tools"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="64M", help="thin volume size (default 64M)")
    p.add_argument("--random-writes", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--mappings", type=int, default=1_000_000, help="mapped blocks for the tools benchmark")
    p.add_argument("--only", choices=("writes", "tools"))
    p.add_argument("--no-kernel", action="store_true", help="skip the VM run of the kernel's targets")
    p.add_argument("--kernel", action="store_true", help=argparse.SUPPRESS)  # inside the VM
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    size = parse_size(args.size, "b")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-thin-") as tmp:
        if args.only in (None, "writes"):
            results["writes"] = bench_writes(Path(tmp), size, args.random_writes, args.repeat, args.kernel)
            if not args.kernel and not args.no_kernel:
                results["writes_kernel"] = _in_vm(args)
    if args.only in (None, "tools") and not args.kernel:
        results["tools"] = _tools(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
