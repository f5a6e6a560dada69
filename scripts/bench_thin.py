#!/usr/bin/env python3
"""Thin provisioning benchmarks (issue 13), ours and the kernel's in one report.

Write throughput on a thin volume against the same writes on a ``linear`` device (first writes,
with and without zeroing of new blocks), and on a thin volume that has a snapshot (every write
breaks sharing) against the same writes on an origin with one classic snapshot. Run on the
userspace engine here (in-process, with the engine's CPU time per write); inside the VM
(``--kernel``, run by ``scripts/vmtest --exec``) the same workloads run on the kernel's targets
over loop devices, and their ratios are printed beside ours.

Each ratio is measured within a round: both sides one after the other, in an order that reverses
every round, each on a fresh device over backing files written out once for the whole run (the
same file state for every device: holes a zeroing pool punched are written back before the next
measurement), after a ``sync`` and a garbage collection; the median of the rounds' ratios is
printed with its range and every round's ratio. One untimed round goes first.

``fio`` (``bench_common.fio``: direct I/O, sequential 1 MiB and random 4 KiB at queue depth 1 and
16) then writes the exposed thin volume (``skip_block_zeroing``, every write a first write) and an
exposed linear device of the same size: the userspace engine's FUSE + loop devices here (root and
``/dev/fuse``), ``/dev/mapper`` in the VM.

Then ``thin dump``/``thin check`` against the C++ tools (``scripts/bench thin_tools``).

``--only profile`` (not part of the default run) counts, load-independently, the Python function
calls per write of the write workloads (the flush included) on linear and thin volumes, with the
functions that take the most own time (cProfile).

Goals: provisioning writes without zeroing >= 0.8x linear; snapshot writes >= 2x the classic
snapshot's; dump and check within 3x of thin_dump/thin_check using <= 128 MiB.

    scripts/bench thin [--size 64M] [--random-writes 2000] [--rounds 11] [--repeat 3] [--mappings 1000000]
                       [--fio-runtime S] [--no-kernel] [--only writes|fio|tools|profile ...] [--json]
"""

from __future__ import annotations

import argparse
import gc
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
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import FIO_JOBS, fio, fio_available, in_vm, loadavg  # noqa: E402
from dmtools.units import parse_size  # noqa: E402

SECTOR = 512
MiB = 1 << 20
#: LVM's defaults: 64 KiB thin-pool chunks, 4 KiB classic snapshot chunks.
THIN_BLOCK = 128
SNAP_CHUNK = 8
GOALS = {"thin_nozero_vs_linear": 0.8, "thin_snapshot_vs_classic": 2.0}


class Store:
    """Backing files kept for a whole benchmark run, each written out in full once and synced.

    Every device of every round starts from the same file state: blocks allocated and written
    (no round pays ext4's allocation or unwritten-extent conversion at its flush, nor the
    discards of the previous round's deleted files, which the ``discard`` mount option issues at
    the next journal commit: the flush being measured). What a new device needs is done as LVM
    does it: a thin pool's metadata and a snapshot's COW start with their first 4 KiB zeroed.
    On the kernel, each file has one loop device for the run.

    The zeroing pool's thin volume has backing files of its own (``data-zero``, ``meta-zero``):
    its random writes punch a hole in each block it zeroes, and the holes written back by
    :meth:`settle` get new extents, so the file ends up in pieces where the volumes write (at
    64 MiB, up to 30 extents in the data file's first 64 MiB after a few rounds; the linear
    device's file one extent). A 1 MiB direct write there is several requests: measured with
    the no-zeroing volume on that shared file, 414-432 us per sequential 1 MiB write against
    352-353 us on a file of its own (linear 314-343 us; medians of 7 rounds, two runs each),
    and seq thin/linear 0.70-0.81x against 0.70-0.92x (medians of six runs 0.78x and 0.87x).
    Only that volume punches holes; the no-zeroing and the snapshot's pool share ``data`` and
    ``meta``.
    """

    def __init__(self, work: Path, kernel: bool) -> None:
        self.dir = work / "store"
        self.dir.mkdir()
        self.kernel = kernel
        self.paths: dict[str, tuple[str, int]] = {}
        self.loops: list[Any] = []
        #: bytes of holes written back by :meth:`settle` in the run.
        self.rewritten = 0

    def get(self, name: str, size: int, fill: bool = False) -> str:
        """The device path of backing ``name`` (``size`` bytes, zeros or random data), made on first use."""
        if name in self.paths:
            dev, have = self.paths[name]
            if have != size:
                raise ValueError(f"backing {name} is {have} bytes, not {size}")
            return dev
        path = self.dir / f"{name}.img"
        with open(path, "wb") as f:
            block = os.urandom(MiB) if fill else bytes(MiB)
            for _ in range(size // MiB):
                f.write(block)
            f.write(block[:size % MiB])
            os.fsync(f.fileno())
        dev = str(path)
        if self.kernel:
            from dmtools import loop

            attached = loop.attach(path)
            self.loops.append(attached)
            dev = str(attached.path)
        self.paths[name] = (dev, size)
        return dev

    def settle(self) -> int:
        """Put the files back in the state they were written out in, and drop their cached pages;
        returns the bytes rewritten.

        A pool that zeroes new blocks zeroes a file's by punching a hole (``Endpoint.zero``, as the
        kernel's loop device does for a write-zeroes), so the next device on that file would
        write into holes and pay ext4's allocation (measured: thin without zeroing 956-1775 MiB/s
        over the 185 MiB of holes 4000 random first writes with zeroing leave, 2644-2689 with
        them written back). Holes are written back with zeros (what they read) and synced; then
        every measurement starts with none of the files' pages cached, whatever the workloads
        before it left in the page cache (a direct write over cached pages must invalidate them;
        a buffered write into a cached page skips allocating one)."""
        from dmtools.blockdev import BlockDevice

        rewritten = 0
        for path in sorted(self.dir.iterdir()):
            with BlockDevice(path) as dev:
                size, extents = dev.size, dev.data_extents(0, dev.size)
            if extents is None:  # the file system cannot tell: taken as written
                extents = [(0, size)]
            ends = [0] + [at + n for at, n in extents]
            holes = [(a, b) for a, b in zip(ends, [at for at, _ in extents] + [size]) if b > a]
            fd = os.open(path, (os.O_RDWR if holes else os.O_RDONLY) | os.O_CLOEXEC)
            try:
                if holes:
                    zeros = bytes(MiB)
                    for start, end in holes:
                        for at in range(start, end, MiB):
                            n = min(MiB, end - at)
                            if os.pwrite(fd, zeros[:n], at) != n:
                                raise OSError(f"short write to {path} at byte {at}")
                        rewritten += end - start
                    os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        self.rewritten += rewritten
        return rewritten

    def close(self) -> None:
        if self.kernel:
            from dmtools import loop

            for dev in self.loops:
                loop.detach(dev)
        for path in self.dir.iterdir():
            path.unlink()
        self.dir.rmdir()


def wipe(path: str, length: int = 4096) -> None:
    """Zero the first ``length`` bytes of a device, durably (lvcreate's wipe of a new volume)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, bytes(length), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


class Rig:
    """Backing files (loop devices on the kernel) and the backend's devices, removed at the end."""

    def __init__(self, work: Path, kernel: bool, tag: str, expose: bool = False, store: Store | None = None) -> None:
        self.work, self.kernel, self.tag, self.store = work, kernel, tag, store
        self.loops: list[Any] = []
        self.names: list[str] = []
        self.cleanups: list[Callable[[], None]] = []  # run first, newest first
        if kernel:
            from dmtools.kernel import KernelBackend

            self.dm: Any = KernelBackend()
        else:
            from dmtools.engine import Engine

            self.dm = Engine(expose=True, run_dir=str(work / "run")) if expose else Engine()

    def backing(self, name: str, size: int, fill: bool = False) -> str:
        """A file of ``size`` bytes (allocated, so no run pays the file system's allocation; random
        data with ``fill``); on the kernel, a loop device over it. With a :class:`Store`, its
        written-out file of that name."""
        if self.store is not None:
            return self.store.get(name, size, fill)
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

    def block_device(self, name: str) -> str:
        """The device's block device: ``/dev/mapper`` on the kernel, the exposure here."""
        return str(self.dm.device_path(name))

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
            if p.is_file():
                p.unlink()


def _pool(rig: Rig, size: int, zero: bool, files: str = "") -> str:
    """A new pool over backing files ``meta{files}`` and ``data{files}`` (see :class:`Store` for
    why a zeroing pool's thin volume has files of its own)."""
    meta = rig.backing(f"meta{files}", 16 * MiB)
    wipe(meta)  # a new pool: it formats metadata whose superblock is zeroes
    data = rig.backing(f"data{files}", 2 * size + 64 * MiB)
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


def _measure(work: Path, kernel: bool, store: Store, build: Callable[[Rig], str],
             run: Callable[[Any], float]) -> tuple[float, float]:
    """``(bytes/s, CPU seconds)`` of one workload on a device built fresh by ``build`` (every write a
    first write), measured from the same settled state every time: the previous round's dirty
    pages and journal written back (``sync``), none of the backing files' pages cached, Python's
    garbage collected. The CPU time is this
    process's (the engine's, on the userspace engine)."""
    rig = Rig(work, kernel, "w", store=store)
    try:
        ep = rig.endpoint(build(rig))
        try:
            gc.collect()
            os.sync()
            store.settle()
            cpu = time.process_time()
            rate = run(ep)
            return rate, time.process_time() - cpu
        finally:
            ep.close()
    finally:
        rig.close()


def _linear(size: int) -> Callable[[Rig], str]:
    return lambda rig: rig.create("lin", f"0 {size // SECTOR} linear {rig.backing('lin', size)} 0")


def _thin_volume(size: int, zero: bool) -> Callable[[Rig], str]:
    def build(rig: Rig) -> str:
        pool = _pool(rig, size, zero, "-zero" if zero else "")
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


def io_pressure() -> float | None:
    """The share of the last minute in which some task waited for I/O (``/proc/pressure/io``,
    ``some avg60``, percent): other processes' disk traffic, which the load average hides, moves
    the flushes measured here."""
    try:
        with open("/proc/pressure/io") as f:
            some = f.readline().split()
    except OSError:
        return None
    return float(dict(kv.split("=") for kv in some[1:])["avg60"])


#: The ratios the benchmark prints: ``(ours, peer)`` configurations measured in the same round.
PAIRS = {"thin_zero_vs_linear": ("thin (zeroing)", "linear"),
         "thin_nozero_vs_linear": ("thin (skip_block_zeroing)", "linear"),
         "thin_snapshot_vs_classic": ("thin with a snapshot", "classic snapshot")}


def bench_writes(work: Path, size: int, nrandom: int, repeat: int, kernel: bool, warmup: int = 1) -> dict[str, Any]:
    """MiB/s per configuration and workload (medians of ``repeat`` rounds) and the goal ratios:
    each the median, with its range, of the ratios of the rounds.

    Every round measures every configuration once per workload, in an order that reverses from
    one round to the next (ABBA: neither side of a ratio is always measured first, nor always
    after the same neighbour), and each side of a ratio next to the other. ``warmup`` untimed
    rounds go first (the interpreter's first calls, the backing files' first use)."""
    rng = random.Random(7)
    offsets = [b * 4096 for b in rng.sample(range(size // 4096), nrandom)]
    configs = {  # each pair's two sides next to each other
        "linear": _linear(size),
        "thin (skip_block_zeroing)": _thin_volume(size, False),
        "thin (zeroing)": _thin_volume(size, True),
        "thin with a snapshot": _thin_snapshot(size),
        "classic snapshot": _classic_snapshot(size),
    }
    workloads: dict[str, Callable[[Any], float]] = {
        "seq_1m": lambda ep: _seq(ep, size), "random_4k": lambda ep: _random(ep, offsets)}
    store = Store(work, kernel)
    runs: list[dict[str, dict[str, float]]] = []
    try:
        for i in range(warmup + repeat):
            order = list(configs.items())
            if i % 2:
                order.reverse()
            row: dict[str, dict[str, float]] = {name: {} for name in configs}
            for job, run in workloads.items():
                for name, build in order:
                    rate, cpu = _measure(work, kernel, store, build, run)
                    row[name][job], row[name][f"{job}_cpu"] = rate, cpu
            if i >= warmup:
                runs.append(row)
        rewritten = store.rewritten
    finally:
        store.close()
    med = {name: {k: statistics.median(r[name][k] for r in runs) for k in runs[0][name]} for name in configs}
    out: dict[str, Any] = {"engine": "kernel" if kernel else "userspace", "size_mib": size >> 20,
                           "random_writes": nrandom, "repeat": repeat, "loadavg": loadavg(),
                           "io_pressure": io_pressure(),
                           "MiB/s": {n: {k: round(v / MiB, 1) for k, v in row.items() if not k.endswith("_cpu")}
                                     for n, row in med.items()},
                           # this process's CPU: seconds per GiB of sequential writes, us per random write
                           "cpu": {n: {"seq_1m_s_per_gib": round(row["seq_1m_cpu"] * (1 << 30) / size, 2),
                                       "random_4k_us_per_write": round(row["random_4k_cpu"] * 1e6 / nrandom, 1)}
                                   for n, row in med.items()}}
    ratios: dict[str, dict[str, float]] = {}
    spread: dict[str, dict[str, list[float]]] = {}
    rounds: dict[str, dict[str, list[float]]] = {}
    for pair, (ours, peer) in PAIRS.items():
        for job in workloads:
            per_round = [round(r[ours][job] / r[peer][job], 3) for r in runs]
            ratios.setdefault(pair, {})[job] = round(statistics.median(per_round), 3)
            spread.setdefault(pair, {})[job] = [min(per_round), max(per_round)]
            rounds.setdefault(pair, {})[job] = per_round
    out["ratios"] = ratios
    out["ratio_range"] = spread
    out["ratio_rounds"] = rounds
    # the order of the configurations in each timed round: "forward" as listed, else reversed
    out["round_order"] = ["reverse" if i % 2 else "forward" for i in range(warmup, warmup + repeat)]
    out["holes_rewritten_mib"] = round(rewritten / MiB, 1)
    return out


def bench_profile(work: Path, size: int, nrandom: int, top: int = 6) -> dict[str, Any]:
    """Python calls per write of each write workload (flush included) and the functions with the
    most own time, on linear and thin volumes of the in-process engine (cProfile)."""
    import cProfile
    import pstats

    offsets = [b * 4096 for b in random.Random(7).sample(range(size // 4096), nrandom)]
    workloads: dict[str, tuple[Callable[[Any], float], int]] = {
        "seq_1m": (lambda ep: _seq(ep, size), size // MiB), "random_4k": (lambda ep: _random(ep, offsets), nrandom)}
    configs = {"linear": _linear(size), "thin (zeroing)": _thin_volume(size, True),
               "thin (skip_block_zeroing)": _thin_volume(size, False)}
    out: dict[str, Any] = {"loadavg": round(loadavg(), 2), "size_mib": size >> 20, "random_writes": nrandom,
                           "configs": {}}
    for name, build in configs.items():
        for job, (run, writes) in workloads.items():
            rig = Rig(work, False, "prof")
            try:
                ep = rig.endpoint(build(rig))
                try:
                    prof = cProfile.Profile()
                    prof.runcall(run, ep)
                finally:
                    ep.close()
            finally:
                rig.close()
            stats = pstats.Stats(prof)
            own = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])  # type: ignore[attr-defined]
            total = sum(v[2] for _, v in own) or 1.0
            out["configs"].setdefault(name, {})[job] = {
                "calls_per_write": round(stats.total_calls / writes, 1),  # type: ignore[attr-defined]
                "top": [(f"{Path(f).name}:{line}({fn})", round(100 * v[2] / total, 1)) for (f, line, fn), v in own[:top]]}
    return out


def _exposure_missing(kernel: bool) -> str | None:
    """Why fio cannot run on this engine's block devices here, or ``None``."""
    missing = fio_available()
    if missing or kernel:
        return missing
    from dmtools.engine.expose import exposure_possible

    return exposure_possible()


def bench_fio(work: Path, size: int, repeat: int, kernel: bool, runtime: float | None = None) -> dict[str, Any] | str:
    """fio's jobs on an exposed linear device and an exposed thin volume (every write a first
    write: each job gets fresh devices); MiB/s medians of ``repeat`` rounds, the thin/linear ratio
    per job and, on the userspace engine, this process's CPU seconds per job (FUSE + engine).
    ``runtime`` bounds each job in seconds (the VM's rates are slow; its ratios are wanted)."""
    missing = _exposure_missing(kernel)
    if missing:
        return missing
    configs = {"linear": _linear(size), "thin": _thin_volume(size, False)}
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in configs}
    cpu: dict[str, dict[str, list[float]]] = {name: {} for name in configs}
    for i in range(repeat):
        for job, bs, qd in FIO_JOBS:
            for n, (name, build) in enumerate(configs.items()):
                rig = Rig(work, kernel, f"f{i}{n}", expose=True)
                try:
                    path = rig.block_device(build(rig))
                    before = os.times()
                    res = fio(path, write=True, bs=bs, iodepth=qd, size=size, runtime=runtime)
                    after = os.times()
                    runs[name].setdefault(job, []).append(res.mib_s)
                    cpu[name].setdefault(job, []).append(after.user + after.system - before.user - before.system)
                finally:
                    rig.close()
    med = {name: {job: statistics.median(v) for job, v in row.items()} for name, row in runs.items()}
    return {"engine": "kernel" if kernel else "userspace", "size_mib": size >> 20, "repeat": repeat,
            "runtime": runtime, "loadavg": loadavg(),
            "MiB/s": {name: {job: round(v, 1) for job, v in row.items()} for name, row in med.items()},
            "thin_vs_linear": {job: round(med["thin"][job] / med["linear"][job], 3) for job in med["linear"]},
            "cpu_s": None if kernel else {name: {job: round(statistics.median(v), 2) for job, v in row.items()}
                                          for name, row in cpu.items()}}


def _in_vm(args: argparse.Namespace, sections: list[str]) -> dict[str, Any] | str:
    """The write and fio benchmarks on the kernel's targets, in the VM; their JSON, or why not."""
    # QEMU without KVM: fio jobs run 2 s at most there, as the other benchmarks' VM runs do.
    argv = ["--kernel", "--json", "--size", args.size, "--random-writes", str(args.random_writes),
            "--repeat", str(args.repeat), "--rounds", str(min(args.rounds, 5)),
            "--fio-runtime", str(min(args.fio_runtime or 2.0, 2.0))]
    for section in sections:
        argv += ["--only", section]
    # Backing files of a run: linear, two thin data files (twice the size and 64 MiB each: the
    # zeroing pool's and the others'), metadata, the classic snapshot's origin and COW, and the
    # fio part's: more than the VM's /tmp holds at --size 512M ("No space left on device"), so
    # they go on a scratch disk.
    size = parse_size(args.size, "b")
    return in_vm(Path(__file__).resolve(), argv, modules=("dm-thin-pool",), scratch=8 * size + (1 << 30))


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
              f"median of {ours['repeat']} rounds; load average {ours['loadavg']:.2f}, "
              f"I/O pressure {ours.get('io_pressure')}%")
        print(f"{'MiB/s':28} {'seq 1M':>10} {'rand 4K':>10}" + (f" {'kernel seq':>11} {'kernel 4K':>10}"
                                                                  if isinstance(theirs, dict) else "")
              + f" {'CPU s/GiB':>10} {'CPU us/4K':>10}")
        for name, row in ours["MiB/s"].items():
            line = f"{name:28} {row['seq_1m']:>10} {row['random_4k']:>10}"
            if isinstance(theirs, dict):
                k = theirs["MiB/s"][name]
                line += f" {k['seq_1m']:>11} {k['random_4k']:>10}"
            c = ours["cpu"][name]
            print(line + f" {c['seq_1m_s_per_gib']:>10} {c['random_4k_us_per_write']:>10}")
        print(f"ratios: median of the {ours['repeat']} rounds' ratios (their range)")
        for name, row in ours["ratios"].items():
            goal = f" (goal >= {GOALS[name]}x)" if name in GOALS else ""
            kern = ""
            if isinstance(theirs, dict):
                kr = theirs["ratios"][name]
                kern = f"   kernel: seq {kr['seq_1m']}x, 4K {kr['random_4k']}x"
            rng = ours["ratio_range"][name]
            print(f"{name:28} seq {row['seq_1m']}x ({rng['seq_1m'][0]}-{rng['seq_1m'][1]}), "
                  f"4K {row['random_4k']}x ({rng['random_4k'][0]}-{rng['random_4k'][1]}){goal}{kern}")
        order = "".join("F" if o == "forward" else "R" for o in ours.get("round_order", []))
        print(f"every round's ratio (round order {order}: F as the table lists the configurations, "
              f"R reversed; {ours.get('holes_rewritten_mib')} MiB of punched holes written back between measurements)")
        for name, jobs in ours["ratio_rounds"].items():
            for job, per_round in jobs.items():
                print(f"    {name:28} {job:9} " + " ".join(f"{r:.3f}" for r in per_round))
        if isinstance(theirs, str):
            print(f"kernel: {theirs}")
    _print_fio(results.get("fio"), results.get("fio_kernel"))
    prof = results.get("profile")
    if prof:
        print(f"Python calls per write (cProfile, flush included), {prof['size_mib']} MiB, "
              f"{prof['random_writes']} random 4 KiB writes; load average {prof['loadavg']}")
        for name, jobs in prof["configs"].items():
            print(f"{name:28} " + "  ".join(f"{job} {row['calls_per_write']}" for job, row in jobs.items()))
            for job, row in jobs.items():
                print(f"    own time, {job}: " + ", ".join(f"{f} {pct}%" for f, pct in row["top"]))
    if "tools" in results:
        print("tools:", json.dumps(results["tools"]))


def _print_fio(ours: dict[str, Any] | str | None, theirs: dict[str, Any] | str | None) -> None:
    if ours is None:
        return
    if isinstance(ours, str):
        print(f"fio: not run here: {ours}")
        return
    kern = isinstance(theirs, dict)
    print(f"fio on exposed devices (direct, first writes), {ours['size_mib']} MiB, median of {ours['repeat']}; "
          f"load average {ours['loadavg']:.2f}")
    print(f"{'MiB/s':12} {'linear':>9} {'thin':>9} {'thin/lin':>9}"
          + (f" {'k linear':>9} {'k thin':>9} {'k ratio':>9}" if kern else "")
          + f" {'CPU s lin':>10} {'CPU s thin':>10}")
    for job in ours["thin_vs_linear"]:
        line = (f"{job:12} {ours['MiB/s']['linear'][job]:>9} {ours['MiB/s']['thin'][job]:>9} "
                f"{ours['thin_vs_linear'][job]:>8}x")
        if kern:
            assert isinstance(theirs, dict)
            line += (f" {theirs['MiB/s']['linear'][job]:>9} {theirs['MiB/s']['thin'][job]:>9} "
                     f"{theirs['thin_vs_linear'][job]:>8}x")
        print(line + f" {ours['cpu_s']['linear'][job]:>10} {ours['cpu_s']['thin'][job]:>10}")
    if isinstance(theirs, str):
        print(f"fio kernel: {theirs}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="64M", help="thin volume size (default 64M)")
    p.add_argument("--random-writes", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=3, help="rounds of the fio and tools parts (default 3)")
    p.add_argument("--rounds", type=int, default=11,
                   help="rounds of the write part (default 11; 5 at most in the VM): each ratio is the median "
                        "of the rounds' ratios")
    p.add_argument("--mappings", type=int, default=1_000_000, help="mapped blocks for the tools benchmark")
    p.add_argument("--only", choices=("writes", "fio", "tools", "profile"), action="append",
                   help="run only these parts (repeatable; default: all)")
    p.add_argument("--fio-runtime", type=float, default=None,
                   help="seconds each fio job may run at most (default: the whole device once; 2 in the VM)")
    p.add_argument("--no-kernel", action="store_true", help="skip the VM run of the kernel's targets")
    p.add_argument("--kernel", action="store_true", help=argparse.SUPPRESS)  # inside the VM
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    size = parse_size(args.size, "b")
    only = args.only or ["writes", "fio", "tools"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-thin-") as tmp:
        if "writes" in only:
            results["writes"] = bench_writes(Path(tmp), size, args.random_writes, args.rounds, args.kernel)
        if "fio" in only:
            results["fio"] = bench_fio(Path(tmp), size, args.repeat, args.kernel, args.fio_runtime)
        if "profile" in only and not args.kernel:
            results["profile"] = bench_profile(Path(tmp), size, args.random_writes)
    vm_parts = [s for s in ("writes", "fio") if s in only]
    if vm_parts and not args.kernel and not args.no_kernel:
        vm = _in_vm(args, vm_parts)
        for part in vm_parts:
            results[f"{part}_kernel"] = vm.get(part, "missing from the VM's output") if isinstance(vm, dict) else vm
    if "tools" in only and not args.kernel:
        results["tools"] = _tools(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
