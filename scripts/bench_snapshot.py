#!/usr/bin/env python3
"""Snapshot benchmarks (issues 5 and 12): origin writes with 0, 1 and 4 snapshots, as ratios to no
snapshot, ours and the kernel's side by side, and loading a persistent COW of 1,000,000 exceptions.

Write workloads (fresh volume each; the origin holds data): sequential 1 MiB first writes, the same
rewritten (the 0, 1 and 4 snapshot volumes a pass each in turn, ``REWRITE_ROUNDS`` rounds), sequential first writes from 4 writers, random 4 KiB first writes from one writer and
from 16. Each is measured three ways:

- ``ours: API``: through the userspace engine's in-process endpoint; every write returns once its
  copy-on-write is committed (copy and exception record durable), so one writer pays two flushes
  per first write;
- ``ours: node``: buffered writes to the exposed block device (``<run_dir>/mapper/vol``), then
  fsync, as a program writing to the volume does;
- ``kernel: node``: the same code on ``/dev/mapper/vol`` with the kernel's dm-snapshot, in the VM
  (``bench_common.in_vm``; ``--no-kernel`` leaves it out).

fio (``bench_common.FIO_JOBS``: sequential 1 MiB and random 4 KiB, queue depth 1 and 16,
``--direct=1``) runs on the origin's node with 0 and 1 snapshot, here and in the VM: first writes,
and rewrites (``<job> rewrite``: the volume written all over first, untimed).

A first write must wait for two flushes (the COW data, then the exception record: dm-snap-persistent.c
commits with REQ_PREFLUSH|REQ_FUA), so a writer at queue depth 1 is bounded by what a flush costs on
the storage, not by code. The kernel runs twice in the VM (``--vm-storage``): on the VM's tmpfs,
where a flush costs nothing, and on an ext4 disk image kept on this host's file system
(``DMTOOLS_VM_DISKS``: a guest flush is an fdatasync of the image here), whose flushes cost what
ours do. The storage table prints each place's flush cost and the ceilings it puts on the ratios
of one writer (``flush_bound``).

``--settle S`` rests ``S`` seconds (``bench_common.settle``) before each measurement of our rows
and after the VM's run, so that the memory freed before it (the previous volumes, QEMU's 3 GiB)
has been handed back to the host alike for every measurement. It is off by default: it did not
keep the node's sequential first writes with 1 snapshot from falling to 0.12-0.15x with twice the
CPU, which happens in runs after a VM (alternated with the kernel column, at load 5-11 from other
VMs: 0.137-0.149x and 4.1-4.9 CPU s/GiB with 3 s, 0.185-0.510x and 2.1-4.2 without).

``--only profile`` shows where a random 4 KiB first write and a 1 MiB rewrite spend their time
(system calls, fdatasync's share, Python calls and the functions with the most own time).

    scripts/bench snapshot [--size 32M] [--repeat 3] [--no-kernel] [--vm-storage both|tmpfs|disk] [--no-fio]
                           [--settle S] [--only load|writes|profile] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections import deque
from itertools import repeat
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_common import FIO_JOBS, add_settle_option, fio, fio_available, in_vm, loadavg, settle  # noqa: E402
from dmtools.engine.expose import exposure_possible  # noqa: E402
from dmtools.units import parse_size  # noqa: E402
from snapshot.store.format import (  # noqa: E402
    SECTOR,
    DiskHeader,
    area_location,
    exceptions_per_area,
    skip_metadata,
)


def make_cow(path: Path, exceptions: int, chunk: int = 8, seed: int = 1) -> int:
    """Write a sparse persistent COW holding ``exceptions`` random exceptions; return its size."""
    cb = chunk * SECTOR
    epa = exceptions_per_area(chunk)
    rng = random.Random(seed)
    olds = array("Q", rng.sample(range(exceptions * 8), exceptions))
    news = array("Q")
    nf = 2
    for _ in range(exceptions):
        news.append(nf)
        nf = skip_metadata(nf + 1, chunk)
    size = (nf + 1) * cb
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(DiskHeader.new(chunk).pack(cb))
        for k, first in enumerate(range(0, exceptions, epa)):
            recs = array("Q", bytes(16 * min(epa, exceptions - first)))
            recs[0::2] = olds[first : first + epa]
            recs[1::2] = news[first : first + epa]
            f.seek(area_location(k, chunk) * cb)
            f.write(recs.tobytes())
        if exceptions % epa == 0:  # the terminator area is zero already (sparse)
            pass
    return size


def _vm_hwm_kib() -> int:
    """Peak resident set of this process (VmHWM; unlike ru_maxrss it is reset by exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _load_child(path: str) -> None:
    """Run in a fresh interpreter: load the COW, print time and peak memory as JSON."""
    import tracemalloc

    from dmtools.blockdev import BlockDevice
    from snapshot.store import PersistentStore

    rss0 = _vm_hwm_kib()
    with BlockDevice(path) as cow:
        t0, c0 = time.perf_counter(), time.process_time()
        store = PersistentStore(cow, 0)
        store.read_metadata()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        rss1 = _vm_hwm_kib()
        count = len(store.table)
        table_bytes = store.table.memory_bytes()
        del store
        tracemalloc.start()
        store = PersistentStore(cow, 0)
        store.read_metadata()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    print(
        json.dumps(
            {
                "exceptions": count,
                "seconds": round(elapsed, 3),
                "cpu_seconds": round(cpu, 3),  # less sensitive to other load on the host
                "peak_rss_growth_mib": round((rss1 - rss0) / 1024, 1),
                "peak_traced_mib": round(peak / 2**20, 1),
                "table_mib": round(table_bytes / 2**20, 1),
            }
        )
    )


def bench_load(exceptions: int, workdir: Path) -> dict[str, object]:
    """Build the COW, then load it in a child process so memory figures are its own."""
    path = workdir / "million.cow"
    t0 = time.perf_counter()
    make_cow(path, exceptions)
    built = time.perf_counter() - t0
    out = subprocess.run([sys.executable, __file__, "--load-child", str(path)], check=True, capture_output=True,
                         text=True, timeout=300).stdout
    result: dict[str, object] = json.loads(out)
    result["build_seconds"] = round(built, 2)
    result["goal"] = "<= 1 s, <= 64 MiB"
    path.unlink()
    return result


class _Stack:
    """``vol`` with ``nsnaps`` persistent snapshots, on ``dm`` (the userspace engine or the kernel).

    ``node`` writes through the device's block-device node (``/dev/mapper/vol`` for the kernel,
    the exposed ``<run_dir>/mapper/vol`` for the engine), buffered, as a program writing to the
    volume does; otherwise through the engine's in-process endpoint, where every write returns
    once its copy-on-write is committed.
    """

    def __init__(self, dm: Any, work: Path, size: int, nsnaps: int, chunk: int, tag: str,
                 kernel: bool, node: bool = False) -> None:
        from snapshot import SnapshotManager

        self.dm = dm
        self.loops: list[Any] = []
        self.kernel = kernel
        origin = work / f"{tag}-vol.img"
        with open(origin, "wb") as f:
            # A volume in use holds data: first writes then copy data, not holes (a sparse
            # origin would let the copy-on-write skip its reads and writes).
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
            f.truncate(size)
            os.fsync(f.fileno())  # every configuration starts clean: no final flush pays for setup
        cow_size = size + size // 64 + 64 * chunk * SECTOR
        cows: list[Path] = []
        for i in range(nsnaps):
            cow = work / f"{tag}-s{i}.cow"
            with open(cow, "wb") as f:
                f.truncate(cow_size)
            cows.append(cow)
        self.files = [origin, *cows]
        self.vol = f"bench{os.getpid()}{tag}"
        if kernel:
            from dmtools import loop

            self.loops = [loop.attach(origin)] + [loop.attach(c) for c in cows]
            devs = [lp.path for lp in self.loops]
        else:
            devs = [str(origin)] + [str(c) for c in cows]
        self.dm.create(self.vol, f"0 {size // SECTOR} linear {devs[0]} 0")
        self.mgr = SnapshotManager(self.dm)
        self.snaps = [f"{self.vol}s{i}" for i in range(nsnaps)]
        for name, cow_dev in zip(self.snaps, devs[1:]):
            self.mgr.create(self.vol, cow_dev, name, chunk_size=chunk)
        self.path = self.dm.device_path(self.vol) if node or kernel else ""
        if self.path:
            from dmtools.blockdev import BlockDevice

            self.ep: Any = BlockDevice(self.path, writable=True)
        else:
            self.ep = self.dm.open_endpoint(self.vol)

    def close(self) -> None:
        self.ep.close()
        for name in self.snaps:
            self.mgr.remove(name)
        self.dm.remove(self.vol, retry=True)  # udev (in the VM) may be probing it after the writes
        if self.kernel:
            from dmtools import loop

            for lp in self.loops:
                loop.detach(lp)
        for f in self.files:
            f.unlink()


def _threads(ep: Any, offsets: list[int], buf: bytes, threads: int) -> tuple[float, float]:
    """Bytes/s of writing ``buf`` at ``offsets`` from ``threads`` writers at once (a queue depth,
    as writeback or a database gives), the flush included; and this process's CPU seconds per GiB
    written (the writers and, for our engine, the engine: a figure other load barely moves)."""
    import threading

    def run(first: int) -> None:
        for off in offsets[first::threads]:
            ep.write(buf, off)

    t0, c0 = time.perf_counter(), time.process_time()
    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    ep.flush()
    nbytes = len(offsets) * len(buf)
    return nbytes / (time.perf_counter() - t0), (time.process_time() - c0) / (nbytes / 2**30)


#: suffix of a workload's CPU figure in a row of ``_write_rows``.
CPU = " cpu"


#: the workloads of one configuration, in the order they are printed.
WORKLOADS = ("seq_first", "seq_rewrite", "seq_first_4_writers", "random_4k", "random_4k_16_writers")
#: goals of issue 12 for one snapshot (four: sequential first writes), as ratios to no snapshot.
GOALS = {"1 snapshots": {"seq_first": 0.8, "seq_rewrite": 0.95, "random_4k": 0.5}, "4 snapshots": {"seq_first": 0.5}}


def _open_dm(kernel: bool, node: bool, work: Path) -> Any:
    """The kernel backend, or a userspace engine (exposing its devices when ``node``)."""
    if kernel:
        from dmtools.kernel import KernelBackend

        return KernelBackend()
    from dmtools.engine import Engine
    from snapshot.targets import TARGETS

    dm = Engine(expose=True, run_dir=str(work / "run")) if node else Engine()
    for name, cls in TARGETS.items():  # the entry points' classes, also where the package is not installed
        dm.register_target(cls, name)
    return dm


def bench_writes(work: Path, size: int, chunk: int, nrandom: int, kernel: bool = False,
                 repeat: int = 1, node: bool = False, rest: float = 0.0) -> dict[str, object]:
    """MiB/s of origin writes with 0, 1 and 4 snapshots, and each as a ratio to 0 snapshots.

    With ``repeat`` > 1 the configurations are measured in turn that many times (0, 1, 4, 0, 1,
    4, ...), so a slow phase of a shared machine hits each alike; the medians are reported.
    ``rest``: seconds of rest (``bench_common.settle``) before the warm-up and before each
    measurement, after the memory the one before freed (its volumes removed, a VM's exit).
    """
    (work / "run").mkdir(exist_ok=True)
    dm = _open_dm(kernel, node, work)
    try:
        settle(rest)
        _warm(dm, work, size, chunk, kernel, node)
        measured = []
        for _ in range(repeat):
            settle(rest)
            measured.append(_write_rows(dm, work, size, chunk, nrandom, kernel, node))
    finally:
        dm.close()
    runs = [r for r, _ in measured]
    pairs = sorted(ratio for _, ratios in measured for ratio in ratios)
    rows = {
        name: {k: statistics.median(r[name][k] for r in runs) for k in runs[0][name]}
        for name in runs[0]
    }
    base = rows["0 snapshots"]
    out: dict[str, object] = {
        "engine": "kernel" if kernel else "userspace",
        "path": "block device node, buffered" if node or kernel else "engine endpoint (in-process)",
        "size_mib": size >> 20,
        "chunk_sectors": chunk,
        "repeat": repeat,
        "settle_seconds": rest,
        "loadavg": round(loadavg(), 2),
    }
    for name, row in rows.items():
        out[name] = {
            k: {"MiB/s": round(v / 2**20, 1), "ratio": round(v / base[k], 3),
                "cpu_s_per_gib": round(row[k + CPU], 3)}
            for k, v in row.items() if not k.endswith(CPU)
        }
    # the range of the rewrite's ratio: each round's 1-snapshot pass over the 0-snapshot pass
    out["seq_rewrite_1_snapshot_pass_ratios"] = [round(pairs[0], 3), round(statistics.median(pairs), 3),
                                                 round(pairs[-1], 3)]
    if repeat > 1:
        out["runs_seq_first_1_snapshot_ratio"] = [
            round(r["1 snapshots"]["seq_first"] / r["0 snapshots"]["seq_first"], 3) for r in runs
        ]
        out["runs_seq_rewrite_1_snapshot_ratio"] = [
            round(r["1 snapshots"]["seq_rewrite"] / r["0 snapshots"]["seq_rewrite"], 3) for r in runs
        ]
    return out


#: rewrite passes over each configuration's volume per measurement, in turn (0, 1, 4, then 1,
#: 4, 0, ...): one 1 MiB pass over a volume takes a tenth of a second on this storage, where a
#: neighbour's I/O moves it by half.
REWRITE_ROUNDS = 5


def _write_rows(dm: Any, work: Path, size: int, chunk: int, nrandom: int, kernel: bool,
                node: bool) -> tuple[dict[str, dict[str, float]], list[float]]:
    """One measurement of every configuration: bytes/s per workload; and the ratios of each
    round's 1-snapshot rewrite pass to its 0-snapshot pass.

    Two volumes per configuration: on the first, sequential first writes over its first half
    from one writer, over its second half from four; then the three configurations' volumes are
    rewritten whole, ``REWRITE_ROUNDS`` passes each, in turn (the median pass counts), so a busy
    moment of the shared storage falls on each alike. On the second, random 4 KiB first writes to
    distinct blocks from one writer, then to others from 16.
    """
    buf = os.urandom(1 << 20)
    small = os.urandom(4096)
    blocks = random.Random(7).sample(range(size // 4096), min(2 * nrandom, size // 4096))
    one, many = [b * 4096 for b in blocks[: len(blocks) // 2]], [b * 4096 for b in blocks[len(blocks) // 2 :]]
    seq = list(range(0, size, len(buf)))
    half = len(seq) // 2
    counts = (0, 1, 4)
    rows: dict[str, dict[str, float]] = {f"{n} snapshots": {} for n in counts}
    stacks: dict[int, _Stack] = {}
    passes: dict[int, list[tuple[float, float]]] = {n: [] for n in counts}
    try:
        for n in counts:
            row = rows[f"{n} snapshots"]
            st = stacks[n] = _Stack(dm, work, size, n, chunk, f"q{n}", kernel, node)
            row["seq_first"], row["seq_first" + CPU] = _threads(st.ep, seq[:half], buf, 1)
            row["seq_first_4_writers"], row["seq_first_4_writers" + CPU] = _threads(st.ep, seq[half:], buf, 4)
        for i in range(REWRITE_ROUNDS):
            for n in counts[i % len(counts):] + counts[: i % len(counts)]:
                passes[n].append(_threads(stacks[n].ep, seq, buf, 1))
    finally:
        for st in stacks.values():
            st.close()
    for n in counts:
        row = rows[f"{n} snapshots"]
        row["seq_rewrite"] = statistics.median(rate for rate, _ in passes[n])
        row["seq_rewrite" + CPU] = statistics.median(cpu for _, cpu in passes[n])
    pairs = [a[0] / b[0] for a, b in zip(passes[1], passes[0])]
    for n in counts:
        row = rows[f"{n} snapshots"]
        st = _Stack(dm, work, size, n, chunk, f"r{n}", kernel, node)
        try:
            row["random_4k"], row["random_4k" + CPU] = _threads(st.ep, one, small, 1)
            row["random_4k_16_writers"], row["random_4k_16_writers" + CPU] = _threads(st.ep, many, small, 16)
        finally:
            st.close()
    return rows, pairs


def _warm(dm: Any, work: Path, size: int, chunk: int, kernel: bool, node: bool) -> None:
    """An untimed pass on a volume without snapshots: code loaded, page-cache pages touched once
    (in the VM a page touched for the first time costs much more), so the first measured
    configuration is not the one that pays for it."""
    st = _Stack(dm, work, size, 0, chunk, "warm", kernel, node)
    try:
        _threads(st.ep, list(range(0, size, 1 << 20)), os.urandom(1 << 20), 4)
        _threads(st.ep, [b * 4096 for b in range(0, size // 4096, 7)], os.urandom(4096), 16)
    finally:
        st.close()


#: suffix of a fio job run on a volume written all over first (every chunk copied: rewrites).
REWRITE = " rewrite"


def bench_fio(work: Path, size: int, chunk: int, kernel: bool, runtime: float) -> dict[str, object]:
    """fio's jobs (``bench_common.FIO_JOBS``, ``--direct=1``) on the origin's block-device node
    with 0 and 1 snapshot, each job on a fresh volume (its writes are first writes), and again
    (``<job> rewrite``) on a fresh volume written all over first, untimed (its writes are
    rewrites of chunks every snapshot holds); MiB/s and the ratio to no snapshot."""
    (work / "run").mkdir(exist_ok=True)
    dm = _open_dm(kernel, True, work)
    rows: dict[str, dict[str, float]] = {}
    try:
        for n in (0, 1):
            row = rows[f"{n} snapshots"] = {}
            for job, bs, depth in FIO_JOBS:
                for suffix in ("", REWRITE):
                    st = _Stack(dm, work, size, n, chunk, f"f{n}{job}{len(suffix)}", kernel, True)
                    try:
                        st.ep.close()  # fio opens the node itself
                        st.ep = _Closed()
                        if suffix:
                            fio(st.path, write=True, bs="1m", iodepth=16, size=size)
                        row[job + suffix] = fio(st.path, write=True, bs=bs, iodepth=depth, size=size,
                                                runtime=runtime).bw
                    finally:
                        st.close()
    finally:
        dm.close()
    base = rows["0 snapshots"]
    out: dict[str, object] = {"engine": "kernel" if kernel else "userspace", "size_mib": size >> 20,
                              "runtime_s": runtime, "loadavg": round(loadavg(), 2)}
    for name, row in rows.items():
        out[name] = {k: {"MiB/s": round(v / 2**20, 1), "ratio": round(v / base[k], 3)} for k, v in row.items()}
    return out


def flush_cost(work: Path, rounds: int = 48) -> dict[str, float]:
    """What durability costs on the storage holding ``work`` (medians): microseconds of a 4 KiB
    write + fdatasync over space written before (an exception area's commit) and into fresh space
    of a sparse file (a first write's 4 KiB copy made durable), and MiB/s of 1 MiB writes each
    followed by fdatasync into fresh space (a sequential copy made durable). Measured with nothing
    else dirty (``sync`` first), before the write workloads."""
    os.sync()
    path = work / "flush-cost.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    small, big = os.urandom(4096), os.urandom(1 << 20)

    def timed(data: bytes, offset: int) -> float:
        t = time.perf_counter()
        os.pwrite(fd, data, offset)
        os.fdatasync(fd)
        return time.perf_counter() - t

    try:
        os.ftruncate(fd, 256 << 20)
        timed(small, 0)
        record = [timed(small, 0) for _ in range(rounds)]
        first = [timed(small, (64 << 20) + i * 65536) for i in range(rounds)]
        seq = [timed(big, (128 << 20) + (i << 20)) for i in range(min(rounds, 96))]
    finally:
        os.close(fd)
        path.unlink()
    return {"record_us": round(statistics.median(record) * 1e6, 1),
            "first_4k_us": round(statistics.median(first) * 1e6, 1),
            "durable_1m_mib_s": round(1 / statistics.median(seq), 1)}


def flush_bound(flush: dict[str, float], writes: dict[str, Any]) -> dict[str, float]:
    """Estimates of the ratios the storage alone allows one writer that waits for each write
    (``ours: API``), with CPU and the origin read free: a first write of 4 KiB waits for its copy and then its record to be durable
    (dm-snap-persistent.c: data before the REQ_PREFLUSH|REQ_FUA area write, both before the origin
    write); a sequential 1 MiB first write waits for each snapshot's 1 MiB copy and a record.
    Against the time the same write takes with no snapshot. Flush costs vary from run to run on a
    shared disk: an estimate, not a strict bound."""
    base = writes["0 snapshots"]
    t4k = 4096 / (base["random_4k"]["MiB/s"] * 2**20)
    t1m = 1 / base["seq_first"]["MiB/s"]
    record, first = flush["record_us"] / 1e6, flush["first_4k_us"] / 1e6
    copy_1m = 1 / flush["durable_1m_mib_s"]
    return {"random_4k": round(t4k / (t4k + first + record), 3),
            "1 snapshot seq_first": round(t1m / (t1m + copy_1m + record), 3),
            "4 snapshots seq_first": round(t1m / (t1m + 4 * copy_1m + record), 3)}


#: the system calls ``bench_profile`` counts (``os`` functions the engine's I/O goes through).
PROFILED_CALLS = ("fdatasync", "pwritev", "preadv")


def bench_profile(work: Path, size: int, chunk: int, nrandom: int, top: int = 8) -> dict[str, Any]:
    """Where a random 4 KiB first write and a 1 MiB rewrite spend their time, with no snapshot and
    with one: per write, wall and CPU microseconds, the counted system calls, the share of the
    time in ``fdatasync``, Python function calls (cProfile, a second pass), and the functions
    with the most own time. In-process engine, one writer; random 4 KiB first writes also from 16
    writers at once, where ``fdatasync`` per write shows how many first writes share a commit
    (cProfile sees one thread: no Python calls for that case)."""
    import cProfile
    import pstats
    import threading

    dm = _open_dm(False, False, work)
    real = {name: getattr(os, name) for name in PROFILED_CALLS}
    counts = {name: [0, 0.0] for name in PROFILED_CALLS}
    tally_lock = threading.Lock()

    def counted(name: str) -> Any:
        call, tally = real[name], counts[name]

        def wrapper(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return call(*args)
            finally:
                with tally_lock:
                    tally[0] += 1
                    tally[1] += time.perf_counter() - t
        return wrapper

    def run(ep: Any, buf: bytes, todo: list[int], writers: int) -> None:
        if writers == 1:
            for off in todo:
                ep.write(buf, off)
            return
        threads = [threading.Thread(target=lambda first: deque(map(ep.write, repeat(buf), todo[first::writers]), 0),
                                    args=(i,)) for i in range(writers)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    blocks = random.Random(7).sample(range(size // 4096), min(2 * nrandom, size // 4096))
    cases = {"random_4k first": (os.urandom(4096), [b * 4096 for b in blocks], 1),
             "random_4k first, 16": (os.urandom(4096), [b * 4096 for b in blocks], 16),
             "seq_rewrite 1 MiB": (os.urandom(1 << 20), list(range(0, size, 1 << 20)), 1)}
    out: dict[str, Any] = {"loadavg": round(loadavg(), 2), "cases": []}
    try:
        for case, (buf, offsets, writers) in cases.items():
            for nsnaps in (0, 1):
                row: dict[str, Any] = {"case": case, "snapshots": nsnaps}
                for phase in ("timed", "profiled"):
                    st = _Stack(dm, work, size, nsnaps, chunk, f"p{nsnaps}", False)
                    try:
                        todo = offsets[: len(offsets) // 2] if phase == "timed" else offsets[len(offsets) // 2:]
                        if case.startswith("seq"):
                            todo = offsets
                            for off in todo:  # the first writes: what follows rewrites
                                st.ep.write(buf, off)
                        if phase == "timed":
                            for tally in counts.values():
                                tally[:] = [0, 0.0]
                            for name in PROFILED_CALLS:
                                setattr(os, name, counted(name))
                            try:
                                t0, c0 = time.perf_counter(), time.process_time()
                                run(st.ep, buf, todo, writers)
                                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                            finally:
                                for name, call in real.items():
                                    setattr(os, name, call)
                            n = len(todo)
                            row.update(us_per_write=round(wall / n * 1e6, 1), cpu_us_per_write=round(cpu / n * 1e6, 1),
                                       fdatasync_share=round(counts["fdatasync"][1] / wall, 3))
                            row.update({f"{name}_per_write": round(c / n, 2) for name, (c, _) in counts.items()})
                        elif writers > 1:
                            row["calls_per_write"] = "-"
                        else:
                            prof = cProfile.Profile()
                            prof.enable()
                            for off in todo:
                                st.ep.write(buf, off)
                            prof.disable()
                            stats = pstats.Stats(prof)
                            row["calls_per_write"] = round(stats.total_calls / len(todo), 1)  # type: ignore[attr-defined]
                            own = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])  # type: ignore[attr-defined]
                            total = sum(v[2] for _, v in own) or 1.0
                            row["top"] = [(f"{Path(f).name}:{line}({fn})", round(100 * v[2] / total, 1))
                                          for (f, line, fn), v in own[:top]]
                    finally:
                        st.close()
                out["cases"].append(row)
    finally:
        dm.close()
    return out


def _print_profile(prof: dict[str, Any]) -> None:
    """The table of ``bench_profile`` and each case's functions with the most own time."""
    print(f"profile, in-process engine, one writer unless a case says 16 (load average {prof['loadavg']}):")
    print(f"  {'case':20}{'snaps':>6}{'us/write':>10}{'cpu us':>9}{'fdatasync':>10}{'% in it':>9}"
          f"{'pwritev':>9}{'preadv':>8}{'py calls':>10}")
    for r in prof["cases"]:
        print(f"  {r['case']:20}{r['snapshots']:>6}{r['us_per_write']:>10}{r['cpu_us_per_write']:>9}"
              f"{r['fdatasync_per_write']:>10}{100 * r['fdatasync_share']:>8.0f}%{r['pwritev_per_write']:>9}"
              f"{r['preadv_per_write']:>8}{r['calls_per_write']:>10}")
    for r in prof["cases"]:
        if r["snapshots"] and "top" in r:
            print(f"  own time, {r['case']}, {r['snapshots']} snapshot: "
                  + ", ".join(f"{name} {pct}%" for name, pct in r["top"]))


class _Closed:
    """Stands in for an endpoint already closed."""

    def close(self) -> None:
        """Nothing left to close."""


#: the size of the VM's disk (the VM's runs use a few hundred MiB of it at most).
VM_DISK_BYTES = 768 << 20


def _vm_results(args: argparse.Namespace, work: Path) -> dict[str, Any] | str:
    """The kernel's figures for the same workloads: this script run in the VM (``--in-vm``), on
    its tmpfs and/or on an ext4 image kept in ``work`` on this host (``--vm-storage``)."""
    vm_args = ["--in-vm", "--json", "--size", args.vm_size, "--chunk-size", str(args.chunk_size),
               "--random-writes", str(args.vm_random_writes), "--fio-runtime", str(min(args.fio_runtime, 2.0)),
               "--vm-storage", args.vm_storage]
    if args.no_fio:
        vm_args.append("--no-fio")
    disks = os.environ.get("DMTOOLS_VM_DISKS")
    if args.vm_storage != "tmpfs":
        image = work / "vm-disk.img"
        with open(image, "wb") as f:  # written in full: a guest write never allocates a block here
            zeros = bytes(1 << 20)
            for _ in range(VM_DISK_BYTES >> 20):
                f.write(zeros)
            os.fsync(f.fileno())
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)],
                       check=True, capture_output=True)
        os.environ["DMTOOLS_VM_DISKS"] = str(image)
    try:
        return in_vm(Path(__file__), vm_args, modules=("dm-snapshot",))
    finally:
        if disks is None:
            os.environ.pop("DMTOOLS_VM_DISKS", None)
        else:
            os.environ["DMTOOLS_VM_DISKS"] = disks


def _vm_disk() -> str | None:
    """The disk ``_vm_results`` attached (the VM's first virtio-blk disk: its root is 9p), or None."""
    disks = sorted(Path("/sys/block").glob("vd*"))
    return f"/dev/{disks[0].name}" if disks else None


def _kernel_side(args: argparse.Namespace, size: int, work: Path) -> dict[str, Any]:
    """In the VM: the kernel's write figures, fio and flush costs on tmpfs and/or on the disk image."""
    results: dict[str, Any] = {}
    places: list[tuple[str, Path]] = []
    if args.vm_storage != "disk":
        places.append(("", work))
    mnt = work / "disk"
    mounted = False
    if args.vm_storage != "tmpfs":
        dev = _vm_disk()
        mnt.mkdir()
        res = None if dev is None else subprocess.run(["mount", "-t", "ext4", dev, str(mnt)],
                                                      capture_output=True, text=True, check=False)
        if res is not None and res.returncode == 0:
            mounted = True
            places.append(("_disk", mnt))
        else:
            why = "no disk in the VM" if res is None else res.stderr.strip()
            results["writes_kernel_disk"] = f"not measured: {why}"
    try:
        for suffix, place in places:
            results["flush_kernel" + suffix] = flush_cost(place)
            results["writes_kernel" + suffix] = bench_writes(place, size, args.chunk_size, args.random_writes,
                                                             True, repeat=args.repeat)
            if not args.no_fio:
                results["fio_kernel" + suffix] = bench_fio(place, size, args.chunk_size, True, args.fio_runtime)
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
    return results


def _print_table(results: dict[str, Any]) -> None:
    """Ratios to no snapshot, ours and the kernel's side by side."""
    cols: list[tuple[str, dict[str, Any]]] = [
        (h, results[k]) for h, k in (("ours: API", "writes"), ("ours: node", "writes_node"),
                                     ("kernel: tmpfs", "writes_kernel"), ("kernel: disk", "writes_kernel_disk"))
        if isinstance(results.get(k), dict)]
    rest = next((c["settle_seconds"] for h, c in cols if not h.startswith("kernel")), 0)
    print(f"origin writes, ratio to no snapshot (load average {loadavg():.1f} on {os.cpu_count()} CPUs"
          f"{f'; ours after {rest:g} s of rest each' if rest else ''})")
    print(f"  {'workload':34}" + "".join(f"{h:>14}" for h, _ in cols) + "   goal")
    for n in ("1 snapshots", "4 snapshots"):
        for w in WORKLOADS:
            goal = GOALS.get(n, {}).get(w)
            cells = "".join(f"{c[n][w]['ratio']:>13.3f}x" for _, c in cols)
            print(f"  {n[:-1] + ', ' + w:34}{cells}   {'>= ' + str(goal) + 'x' if goal else ''}")
    print("  MiB/s with no snapshot:")
    for w in WORKLOADS:
        print(f"  {'  ' + w:34}" + "".join(f"{c['0 snapshots'][w]['MiB/s']:>14.1f}" for _, c in cols))
    ours = [(h, c) for h, c in cols if not h.startswith("kernel")]
    if ours:
        print("  CPU seconds per GiB written (the writing process: writers, engine, FUSE), 0 / 1 / 4 snapshots:")
        for w in WORKLOADS:
            print(f"  {'  ' + w:34}" + "".join(
                "  " + " / ".join(f"{c[n][w]['cpu_s_per_gib']:.2f}" for n in ("0 snapshots", "1 snapshots", "4 snapshots"))
                for _, c in ours))
    print("  1 snapshot, seq_rewrite: each pass over the 0-snapshot pass of its round, min / median / max:")
    print(f"  {'':34}" + "".join("  " + " / ".join(f"{x:.2f}" for x in c["seq_rewrite_1_snapshot_pass_ratios"])
                                 if "seq_rewrite_1_snapshot_pass_ratios" in c else "  -" for _, c in cols))
    fcols: list[tuple[str, dict[str, Any]]] = [
        (h, results[k]) for h, k in (("ours: fio", "fio"), ("kernel: fio, tmpfs", "fio_kernel"),
                                     ("kernel: fio, disk", "fio_kernel_disk")) if isinstance(results.get(k), dict)]
    if fcols:
        print("fio --direct=1 on the origin's node, 1 snapshot vs none: ratio (MiB/s with none)")
        print(f"  {'job':34}" + "".join(f"{h:>22}" for h, _ in fcols))
        for job in [j for j, _, _ in FIO_JOBS] + [j + REWRITE for j, _, _ in FIO_JOBS]:
            print(f"  {job:34}" + "".join(
                f"{c['1 snapshots'][job]['ratio']:>11.3f}x ({c['0 snapshots'][job]['MiB/s']:7.1f})"
                if job in c["1 snapshots"] else f"{'-':>22}" for _, c in fcols))
    _print_storage(results)
    for key in ("writes_node", "fio", "writes_kernel", "fio_kernel", "writes_kernel_disk", "fio_kernel_disk"):
        if isinstance(results.get(key), str):
            print(f"  {key}: {results[key]}")
    if "load" in results:
        print(f"load: {json.dumps(results['load'])}")


def _print_storage(results: dict[str, Any]) -> None:
    """Each place's flush costs, and the ceilings they put on one waiting writer's ratios."""
    rows = [(h, results[f], results[w]) for h, f, w in (
        ("here (ours: API)", "flush", "writes"), ("VM tmpfs (kernel)", "flush_kernel", "writes_kernel"),
        ("VM disk on this host (kernel)", "flush_kernel_disk", "writes_kernel_disk"))
        if isinstance(results.get(f), dict) and isinstance(results.get(w), dict)]
    if not rows:
        return
    print("storage: what durability costs, and the ratio it leaves one writer waiting on each write (CPU free)")
    print(f"  {'place':30}{'4K record':>11}{'4K first':>10}{'1M durable':>12}"
          f"{'random_4k':>11}{'1 snap seq':>12}{'4 snap seq':>12}")
    for head, flush, writes in rows:
        bound = flush_bound(flush, writes)
        print(f"  {head:30}{flush['record_us']:>8.0f} us{flush['first_4k_us']:>7.0f} us"
              f"{flush['durable_1m_mib_s']:>7.0f} MiB/s{bound['random_4k']:>10.3f}x"
              f"{bound['1 snapshot seq_first']:>11.3f}x{bound['4 snapshots seq_first']:>11.3f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exceptions", type=int, default=1_000_000)
    p.add_argument("--size", default="32M", help="origin size for the write benchmarks")
    p.add_argument("--chunk-size", type=int, default=8, help="snapshot chunk size in sectors (default 8 = LVM's 4 KiB)")
    p.add_argument("--random-writes", type=int, default=1000, help="random 4 KiB writes per configuration")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure the write configurations this many times, report medians")
    p.add_argument("--fio-runtime", type=float, default=3.0, help="seconds per fio job (at most; at most 2 in the VM)")
    p.add_argument("--vm-size", default="16M", help="origin size in the VM (TCG emulation is slow)")
    p.add_argument("--vm-random-writes", type=int, default=300)
    p.add_argument("--no-kernel", action="store_true", help="do not run the kernel's side in the VM")
    p.add_argument("--vm-storage", choices=("both", "tmpfs", "disk"), default="both",
                   help="where the kernel's volumes live in the VM: its tmpfs (flushes cost nothing), an ext4 "
                        "image on this host's file system (flushes cost what ours do), or both (default)")
    p.add_argument("--no-fio", action="store_true", help="leave out the fio jobs")
    add_settle_option(p, "before each measurement of our rows and after the VM's run", 0.0)
    p.add_argument("--only", choices=("load", "writes", "profile"))
    p.add_argument("--json", action="store_true")
    p.add_argument("--load-child", help=argparse.SUPPRESS)
    p.add_argument("--in-vm", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.load_child:
        _load_child(args.load_child)
        return 0
    results: dict[str, Any] = {}
    size = parse_size(args.size, "b")
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as tmp:
        work = Path(tmp)
        if args.in_vm:  # the kernel's side, printed as JSON for the host
            print(json.dumps(_kernel_side(args, size, work)))
            return 0
        if args.only in (None, "writes"):
            results["flush"] = flush_cost(work)
            results["writes"] = bench_writes(work, size, args.chunk_size, args.random_writes, repeat=args.repeat,
                                             rest=args.settle)
            reason = exposure_possible()
            if reason is None:
                results["writes_node"] = bench_writes(work, size, args.chunk_size, args.random_writes,
                                                      repeat=args.repeat, node=True, rest=args.settle)
                if not args.no_fio:
                    settle(args.settle)
                    results["fio"] = (fio_available()
                                      or bench_fio(work, size, args.chunk_size, False, args.fio_runtime))
            else:
                results["writes_node"] = results["fio"] = f"not measured: {reason}"
            if not args.no_kernel:
                vm = _vm_results(args, work)
                settle(args.settle)  # QEMU's memory, freed: whatever this process or the next runs
                if isinstance(vm, str):
                    results["writes_kernel"] = vm
                else:
                    results.update(vm)
        if args.only in (None, "load"):
            results["load"] = bench_load(args.exceptions, work)
        if args.only == "profile":
            results["profile"] = bench_profile(work, size, args.chunk_size, args.random_writes)
    if args.json:
        print(json.dumps(results, indent=2))
    elif args.only == "load":
        print(f"load: {json.dumps(results['load'])}")
    elif args.only == "profile":
        _print_profile(results["profile"])
    else:
        _print_table(results)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
