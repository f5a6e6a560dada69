#!/usr/bin/env python3
"""Benchmark: exposed userspace devices (loop → FUSE → engine) against their backing file, beside the kernel.

One run measures, side by side:

- **sequential 1 MiB ``O_DIRECT``** writes (ended by ``fsync``) and reads, ``linear`` and
  ``striped`` through ``<run_dir>/mapper/NAME``, and the backing file itself (a file of the same
  size on the same file system), over a few rounds with the sides' order rotated each round and
  caches written back and dropped before each pass: the median MB/s, the median of the rounds'
  ratios with their min and max, the engine's CPU seconds per GiB moved (every thread of this
  process but the main one, which only issues the benchmark's own I/O), and the FUSE requests
  per MiB that reached the engine;
- **fio** (``bench_common.FIO_JOBS``: sequential 1 MiB and random 4 KiB, queue depth 1 and 16,
  ``--direct=1``), reads and writes, on the backing file and the exposed devices, in rounds and
  from the same cache state as above (``--fio-rounds``);
- **the kernel's ratios** from the same code in the VM (``bench_common.in_vm``): kernel ``linear``
  and ``striped`` device-mapper devices over loop devices against the loop device itself
  (``--no-kernel`` skips the VM).

Goals (issue 12): writes ≥ 0.9× and reads ≥ 0.95× the backing file, engine CPU ≤ 0.3 s per GiB.
Needs root, ``/dev/fuse`` and loop devices (and fio, which ``scripts/setup-env`` installs).

``--cycle`` measures instead what a table's devices cost: in-process create/remove cycles of a
``linear`` device over an image file (the reference is identified and claimed, and the loop
devices over the file are looked up: ``dmtools.claims``, ``dmtools.loop_index``) against the same
cycle of a ``zero`` device (no device to claim), alternating, with the number of bound loop
devices on the machine (each one is looked at when the loop index is rebuilt).

The exposure serves ``linear``/``striped`` requests in C (``dmtools.engine.fastpath``); the report
says how many requests took that path. ``--python`` serves them in Python, for comparison.

``--floor`` measures what the architecture allows: the same sequential passes on the backing
file, on the kernel's loop device over a copy of it (direct I/O: the loop hop alone), on loop
devices over a trivial FUSE server (``scripts/fuse_floor.c``, raw ``/dev/fuse`` protocol, as many
threads as the exposure's: one ``O_DIRECT`` pread/pwrite per request, or none at all, which leaves
the hops' own cost, or FUSE passthrough where the kernel has it, which leaves the server out of
the data path) and on the engine's exposed ``linear`` device, in rotated order, with each
server's CPU per GiB, and the fio jobs on each of them (``--no-fio`` skips them).

Usage: scripts/bench engine [--size-mib 256] [--rounds 3] [--fio-runtime 3] [--fio-rounds N] [--no-kernel]
                            [--python] [--json]
       scripts/bench engine --floor [--size-mib 256] [--rounds 3] [--no-fio] [--fio-rounds N] [--json]
       scripts/bench engine --cycle [--cycles 300]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import FIO_JOBS, drop_caches, fio, fio_available, in_vm, loadavg  # noqa: E402

from dmtools.blockdev import aligned_buffer  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
#: Striped devices: two stripes of 64 KiB chunks (LVM's default stripe size).
STRIPES = 2
CHUNK_SECTORS = 128
GOALS = {"write": 0.9, "read": 0.95, "cpu_s_per_gib": 0.3}
KINDS = ("linear", "striped")
#: ``--floor``: the trivial FUSE server's source, and its sides in the report's order.
FLOOR_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuse_floor.c")
FLOOR_SIDES = {"loop": "kernel loop over a copy of the file (no FUSE)",
               "fuse-null": "loop + trivial FUSE server, no disk I/O (the hops alone)",
               "fuse-file": "loop + trivial FUSE server, O_DIRECT to a copy of the file",
               "passthrough": "loop + FUSE passthrough to a copy of the file (the kernel moves the bytes)",
               "linear": "loop + the engine (exposed linear device)"}
#: Per-MiB figures of the sequential passes: result key → (counter for writes, for reads) in
#: what ``_exposed``'s counting function returns.
_COUNTED = {"requests_per_mib": ("writes", "reads"),
            "loop_requests_per_mib": ("loop_writes", "loop_reads"),
            "switches_per_mib": ("switches", "switches")}


def _cpu_others() -> float:
    """CPU seconds of every thread of this process except the calling one (the FUSE workers and
    the engine, not the benchmark's own I/O). Both clocks are the scheduler's own, in nanoseconds:
    ``os.times`` counts 10 ms ticks, too coarse for a pass that uses 0.1 s."""
    return time.process_time() - time.thread_time()


def _switches_others() -> int:
    """Context switches so far of every thread of this process but the calling one: each time a
    FUSE worker went to sleep (waiting for a request, or for its backing I/O) and was woken."""
    me = str(threading.get_native_id())
    total = 0
    for tid in os.listdir("/proc/self/task"):
        if tid == me:
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/self/task/{tid}/status") as f:
                total += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
    return total


def _loop_requests(path: str) -> dict[str, int]:
    """Reads and writes the block device ``path`` (a loop device) has completed: its
    ``/sys/block/NAME/stat`` (Documentation/block/stat.rst: read I/Os, field 1; write I/Os, 5)."""
    with open(f"/sys/block/{os.path.basename(os.path.realpath(path))}/stat") as f:
        fields = f.read().split()
    return {"loop_reads": int(fields[0]), "loop_writes": int(fields[4])}


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


def _images(tmp: str, size: int) -> tuple[str, list[str]]:
    """The backing file (``size`` bytes) and the stripes' files (``size / STRIPES`` each)."""
    backing = os.path.join(tmp, "backing.img")
    stripes = [os.path.join(tmp, f"stripe{i}.img") for i in range(STRIPES)]
    for path, n in [(backing, size)] + [(p, size // STRIPES) for p in stripes]:
        _allocate(path, n)
    return backing, stripes


def _allocate(path: str, size: int) -> None:
    """Create ``path`` with its blocks written (later passes overwrite, as the devices' do)."""
    with open(path, "wb") as f:
        f.truncate(size)
    try:
        _seq(path, size, True)
    except OSError:  # no O_DIRECT here (tmpfs before Linux 6.6, as in the VM): write it buffered
        with open(path, "r+b") as f:
            for off in range(0, size, MiB):
                f.write(bytes(min(MiB, size - off)))


def _tables(size: int, linear_dev: str, stripe_devs: list[str]) -> dict[str, str]:
    sectors = size // 512
    legs = " ".join(f"{d} 0" for d in stripe_devs)
    return {"linear": f"0 {sectors} linear {linear_dev} 0",
            "striped": f"0 {sectors} striped {STRIPES} {CHUNK_SECTORS} {legs}"}


def _order(names: list[str], rnd: int) -> list[str]:
    """The sides in round ``rnd``'s order: rotated every round, so that no side always runs
    first (right after the cache drop) or right after another side's writes are flushed."""
    k = rnd % len(names)
    return names[k:] + names[:k]


def _spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of ``values`` (rounded)."""
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def measure(peer: str, devices: dict[str, str], size: int, rounds: int, fio_size: int, fio_runtime: float,
            with_fio: bool, cpu: Callable[[], float] | None, requests: Callable[[str], dict[str, int]] | None = None,
            fio_rounds: int = 1) -> dict[str, Any]:
    """Sequential passes and fio jobs on ``peer`` and each of ``devices`` (kind → path).

    Every pass and every fio job starts from the same cache state (written back and dropped:
    ``drop_caches``), and the sides run in an order rotated each round. Returns MB/s medians and
    ratios per kind and direction (the ratio is the median of each round's device/peer ratio,
    with their min and max), fio MiB/s and IOPS with ratios likewise, (with ``cpu``) the CPU
    seconds per GiB that ``cpu()`` counts while each device is driven, and (with ``requests``:
    kind → counters of ``dmtools._ffi.fastio.STATS``, of the loop device and of the engine
    threads' context switches) per MiB of the sequential passes: the requests that reached the
    engine, the loop device's requests and the engine's hand-offs.
    """
    sides = {"peer": peer, **devices}
    names = list(sides)
    runs: dict[str, dict[str, list[float]]] = {k: {"write": [], "read": []} for k in sides}
    used: dict[str, dict[str, float]] = {k: {"write": 0.0, "read": 0.0} for k in devices}
    counted: dict[str, dict[str, dict[str, int]]] = {
        k: {"write": dict.fromkeys(_COUNTED, 0), "read": dict.fromkeys(_COUNTED, 0)} for k in devices}
    for rnd in range(rounds):
        for direction in ("write", "read"):
            for name in _order(names, rnd):
                drop_caches()
                before = cpu() if cpu else 0.0
                seen = requests(name) if requests and name in devices else {}
                runs[name][direction].append(_seq(sides[name], size, direction == "write"))
                if cpu and name in used:
                    used[name][direction] += cpu() - before
                if seen:
                    now = requests(name)  # type: ignore[misc]
                    for out_key, (w_key, r_key) in _COUNTED.items():
                        key = w_key if direction == "write" else r_key
                        counted[name][direction][out_key] += now.get(key, 0) - seen.get(key, 0)
    out: dict[str, Any] = {"seq": {}, "fio": {}}
    for kind in devices:
        row = {}
        for direction in ("write", "read"):
            ratios = [o / p for o, p in zip(runs[kind][direction], runs["peer"][direction])]
            row[direction] = {"peer_mbs": round(statistics.median(runs["peer"][direction]), 1),
                              "mbs": round(statistics.median(runs[kind][direction]), 1),
                              "ratio": round(statistics.median(ratios), 3),
                              "ratio_spread": _spread(ratios)}
            if cpu:
                row[direction]["cpu_s_per_gib"] = round(used[kind][direction] / (size * rounds / GiB), 3)
            if requests:
                for out_key, n in counted[kind][direction].items():
                    row[direction][out_key] = round(n / (size * rounds / MiB), 2)
        out["seq"][kind] = row
    out["seq_runs"] = runs
    if not with_fio:
        return out
    for job, bs, depth in FIO_JOBS:
        for direction in ("write", "read"):
            rates: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
            for rnd in range(fio_rounds):
                for name in _order(names, rnd):
                    drop_caches()
                    r = fio(sides[name], write=direction == "write", bs=bs, iodepth=depth,
                            size=fio_size, runtime=fio_runtime)
                    rates[name].append((r.mib_s, r.iops))
            res: dict[str, Any] = {}
            for name in sides:
                res[name] = {"mib_s": round(statistics.median(m for m, _ in rates[name]), 1),
                             "iops": round(statistics.median(i for _, i in rates[name]))}
            for kind in devices:
                ratios = [o[0] / p[0] for o, p in zip(rates[kind], rates["peer"])]
                res[kind]["ratio"] = round(statistics.median(ratios), 3)
                res[kind]["ratio_spread"] = _spread(ratios)
            out["fio"][f"{job}_{direction}"] = res
    return out


@contextlib.contextmanager
def _exposed(tmp: str, backing: str, stripes: list[str], size: int,
             paths: dict[str, dict[str, int]]) -> Iterator[tuple[dict[str, str], Callable[[str], dict[str, int]]]]:
    """The userspace engine's linear (over a copy-sized file) and striped devices, exposed, and a
    function of a kind giving its counters now: the C data path's (``dmtools._ffi.fastio.STATS``),
    its loop device's requests (``_loop_requests``) and the engine threads' context switches
    (``_switches_others``); fills ``paths`` (kind → the C data path's counters) at the end."""
    from dmtools.engine import Engine

    lin = os.path.join(tmp, "linear.img")
    _allocate(lin, size)
    eng = Engine(expose=True, run_dir=os.path.join(tmp, "run"))
    try:
        tables = _tables(size, lin, stripes)
        for kind in KINDS:
            eng.create(f"bench-{kind}-dmtt", tables[kind])
        exposure = eng.exposure
        assert exposure is not None
        devs = {kind: eng.device_path(f"bench-{kind}-dmtt") for kind in KINDS}

        def counters(kind: str) -> dict[str, int]:
            return {**exposure.fast_stats(f"bench-{kind}-dmtt"), **_loop_requests(devs[kind]),
                    "switches": _switches_others()}

        yield devs, counters
        for kind in KINDS:
            paths[kind] = exposure.fast_stats(f"bench-{kind}-dmtt")
            eng.remove(f"bench-{kind}-dmtt")
    finally:
        eng.close()


@contextlib.contextmanager
def _kernel(tmp: str, backing: str, stripes: list[str], size: int) -> Iterator[dict[str, str]]:
    """Kernel device-mapper linear and striped devices over (buffered) loop devices, inside the
    VM; the peer is the loop device of the backing file."""
    import dmtools
    from dmtools import loop

    loops: list[loop.LoopDevice] = []
    dm = dmtools.open("kernel")
    made: list[str] = []
    try:
        lin = os.path.join(tmp, "linear.img")
        _allocate(lin, size)
        for path in [backing, lin, *stripes]:
            # Buffered loop devices: the VM's /tmp (an overlay on tmpfs, Linux 6.1) accepts a
            # direct-I/O loop device and then fails its I/O. The peer is one of them too.
            loops.append(loop.attach(path))
        tables = _tables(size, loops[1].path, [lo.path for lo in loops[2:]])
        for kind in KINDS:
            dm.create(f"bench-{kind}-dmtt", tables[kind])
            made.append(f"bench-{kind}-dmtt")
        yield {"peer": loops[0].path, **{k: f"/dev/mapper/bench-{k}-dmtt" for k in KINDS}}
    finally:
        for name in made:
            with contextlib.suppress(Exception):
                dm.remove(name, retry=True)
        for lo in loops:
            with contextlib.suppress(Exception):
                loop.detach(lo)


def run_kernel(args: argparse.Namespace) -> dict[str, Any]:
    """Inside the VM: the same measurements on the kernel's targets, against the loop device."""
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="dmtt-bench-", dir=args.dir) as tmp:
        backing, stripes = _images(tmp, size)
        with _kernel(tmp, backing, stripes, size) as devs:
            peer = devs.pop("peer")
            res = measure(peer, devs, size, args.rounds, args.fio_size_mib * MiB,
                          args.fio_runtime, not args.no_fio, None, None, args.fio_rounds)
    res["peer"] = "loop device"
    res["loadavg"] = loadavg()
    return res


def run_host(args: argparse.Namespace) -> dict[str, Any]:
    """Here: the engine's exposed devices against the backing file."""
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="dmtt-bench-", dir=args.dir) as tmp:
        backing, stripes = _images(tmp, size)
        paths: dict[str, dict[str, int]] = {}
        with _exposed(tmp, backing, stripes, size, paths) as (devs, stats):
            res = measure(backing, devs, size, args.rounds, args.fio_size_mib * MiB,
                          args.fio_runtime, not args.no_fio, _cpu_others, stats, args.fio_rounds)
    res["data_path"] = paths
    res["peer"] = "backing file"
    res["loadavg"] = loadavg()
    return res


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far, 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _floor_server(exe: str, mnt: str, size: int, backing: str | None, threads: int) -> Iterator[tuple[str, int]]:
    """A trivial FUSE server (``fuse_floor``) at ``mnt`` serving ``size`` bytes (from ``backing``,
    or none), with a direct-I/O loop device over its file: yields the loop device and the pid."""
    from dmtools import loop
    from dmtools.errors import DMError
    from dmtools.linux import libc

    os.makedirs(mnt)
    proc = subprocess.Popen([exe, mnt, str(size), backing or "-", str(threads)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"fuse_floor did not start: {proc.communicate(timeout=10)[1].strip()}")
        try:
            lo = loop.attach(os.path.join(mnt, "f"), direct_io=True)
        except (DMError, OSError) as err:  # the server refused the file, or ended (its stderr says why)
            raise RuntimeError(f"no loop device over fuse_floor's file: {err}") from err
        try:
            yield lo.path, proc.pid
        finally:
            loop.detach(lo)
    finally:
        libc().umount2(os.fsencode(mnt), 0)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_floor(args: argparse.Namespace) -> dict[str, Any]:
    """``--floor``: the backing file against the loop hop alone, loop + a trivial FUSE server with
    and without its disk I/O, and the engine's linear device (see the module's docstring)."""
    from dmtools import loop
    from dmtools.engine.expose import FUSE_THREADS

    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("--floor needs a C compiler")
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="dmtt-bench-", dir=args.dir) as tmp:
        exe = os.path.join(tmp, "fuse_floor")
        subprocess.run([cc, "-O2", "-std=gnu11", "-pthread", "-Wall", "-Werror", "-o", exe, FLOOR_SOURCE],
                       check=True, capture_output=True)
        backing, stripes = _images(tmp, size)
        copies = {k: os.path.join(tmp, f"{k}.img") for k in ("loop", "fuse-file", "passthrough")}
        for path in copies.values():
            _allocate(path, size)
        pids: list[int] = []
        with contextlib.ExitStack() as stack:
            lo = loop.attach(copies["loop"], direct_io=True)
            stack.callback(loop.detach, lo)
            devs = {"loop": lo.path}
            missing: dict[str, str] = {}
            for kind, src in (("fuse-null", None), ("fuse-file", copies["fuse-file"]),
                              ("passthrough", "pt:" + copies["passthrough"])):
                try:
                    devs[kind], pid = stack.enter_context(
                        _floor_server(exe, os.path.join(tmp, kind), size, src, FUSE_THREADS))
                except RuntimeError as err:  # passthrough: Linux before 6.9, or without CONFIG_FUSE_PASSTHROUGH
                    missing[kind] = str(err)
                    continue
                pids.append(pid)
            paths: dict[str, dict[str, int]] = {}
            ours, _ = stack.enter_context(_exposed(tmp, backing, stripes, size, paths))
            devs["linear"] = ours["linear"]

            def cpu() -> float:
                return _cpu_others() + sum(_process_cpu(pid) for pid in pids)

            res = measure(backing, devs, size, args.rounds, args.fio_size_mib * MiB, args.fio_runtime,
                          not args.no_fio, cpu, None, args.fio_rounds)
    res["missing"] = missing
    res["peer"] = "backing file"
    res["loadavg"] = loadavg()
    return res


def report_floor(res: dict[str, Any], args: argparse.Namespace) -> None:
    """Print ``--floor``'s table: ms per MiB and the ratio to the backing file for each side."""
    print(f"engine floor: sequential 1 MiB O_DIRECT, {args.size_mib} MiB per pass, {args.rounds} rounds, sides "
          f"in rotated order, caches dropped before each pass; load average {res['loadavg']:.1f} on "
          f"{os.cpu_count()} CPUs (ms per MiB medians; ratio = median of the rounds' ratios to the backing file "
          "[min-max]; CPU = the serving process's threads)")
    runs = res["seq_runs"]
    for direction in ("write", "read"):
        peer = statistics.median(MiB / 1e3 / x for x in runs["peer"][direction])
        print(f"  {direction}: backing file {peer:.3f} ms/MiB")
        for kind, what in FLOOR_SIDES.items():
            if kind in res["missing"]:
                print(f"    {kind:11} -  ({res['missing'][kind]})")
                continue
            row = res["seq"][kind][direction]
            ms = statistics.median(MiB / 1e3 / x for x in runs[kind][direction])
            # the kernel's threads only (not counted)
            cpu = "    -" if kind in ("loop", "passthrough") else f"{row['cpu_s_per_gib']:5.2f}"
            print(f"    {kind:11} {ms:7.3f} ms/MiB {_fmt_ratio(row['ratio']):>7} {_fmt_spread(row):>13} "
                  f"CPU {cpu} s/GiB  {what}")
    if not res["fio"]:
        return
    sides = [k for k in FLOOR_SIDES if k not in res["missing"]]
    print(f"fio --direct=1 --ioengine=libaio, {args.fio_size_mib} MiB, {args.fio_runtime:g} s per job, "
          f"{args.fio_rounds} rounds in rotated order (backing MiB/s median; ratio = side / backing file [min-max])")
    print(f"  {'job':20} {'backing':>9} " + " ".join(f"{k:>20}" for k in sides))
    for key, row in res["fio"].items():
        cells = " ".join(f"{_fmt_ratio(row[k]['ratio']) + ' ' + _fmt_spread(row[k]):>20}" for k in sides)
        print(f"  {key:20} {row['peer']['mib_s']:9.1f} {cells}")


def _fmt_ratio(value: Any) -> str:
    return f"{value:.2f}x" if isinstance(value, (int, float)) else "-"


def _fmt_spread(row: dict[str, Any]) -> str:
    spread = row.get("ratio_spread")
    return f"[{spread['min']:.2f}-{spread['max']:.2f}]" if spread else "-"


def report(ours: dict[str, Any], kernel: dict[str, Any] | str | None, args: argparse.Namespace) -> None:
    """Print the tables: ours and the kernel's ratio side by side."""
    kern = kernel if isinstance(kernel, dict) else None
    print(f"engine: exposed devices (loop -> FUSE -> engine) vs the backing file; load average "
          f"{ours['loadavg']:.1f} on {os.cpu_count()} CPUs"
          + (f"; kernel in the VM: dm device vs its loop device, load {kern['loadavg']:.1f}" if kern else ""))
    print(f"sequential 1 MiB O_DIRECT, {args.size_mib} MiB per pass, {args.rounds} rounds, sides in "
          "rotated order, caches dropped before each pass (MB/s medians; ratio = median of the "
          "rounds' ratios [min-max]; engine CPU = every thread but the I/O issuer; per MiB: loop = "
          "the loop device's requests, FUSE = those that reached the engine, sw = the engine "
          "threads' context switches, its hand-offs)")
    print(f"  {'':15} {'backing':>9} {'ours':>9} {'ratio':>7} {'[min-max]':>13} {'goal':>5} "
          f"{'CPU s/GiB':>10} {'loop':>5} {'FUSE':>5} {'sw':>5}   {'kernel ratio':>12}")
    for kind in KINDS:
        for direction in ("write", "read"):
            row = ours["seq"][kind][direction]
            kr = kern["seq"][kind][direction]["ratio"] if kern else None
            met = "met" if row["ratio"] >= GOALS[direction] else "NOT"
            print(f"  {kind + ' ' + direction:15} {row['peer_mbs']:9.1f} {row['mbs']:9.1f} "
                  f"{_fmt_ratio(row['ratio']):>7} {_fmt_spread(row):>13} {met:>5} "
                  f"{row['cpu_s_per_gib']:10.2f} {row.get('loop_requests_per_mib', '-'):>5} "
                  f"{row.get('requests_per_mib', '-'):>5} {row.get('switches_per_mib', '-'):>5}   "
                  f"{_fmt_ratio(kr):>12}")
    worst = max(ours["seq"][k][d]["cpu_s_per_gib"] for k in KINDS for d in ("write", "read"))
    print(f"  goals: writes >= {GOALS['write']}x, reads >= {GOALS['read']}x, engine CPU <= "
          f"{GOALS['cpu_s_per_gib']} s/GiB (worst here {worst:.2f}: "
          f"{'met' if worst <= GOALS['cpu_s_per_gib'] else 'NOT met'})")
    if ours["fio"]:
        print(f"fio --direct=1 --ioengine=libaio, {args.fio_size_mib} MiB, {args.fio_runtime:g} s per job, "
              f"{args.fio_rounds} rounds as above (MiB/s medians; ratio = device / backing file "
              "[min-max]; kernel = dm device / loop device)")
        print(f"  {'job':20} {'backing':>9} {'linear':>9} {'ratio':>7} {'[min-max]':>13} {'striped':>9} "
              f"{'ratio':>7} {'[min-max]':>13}   {'kernel linear':>13} {'striped':>8}")
        for key, res in ours["fio"].items():
            kr = kern["fio"].get(key) if kern else None
            print(f"  {key:20} {res['peer']['mib_s']:9.1f} {res['linear']['mib_s']:9.1f} "
                  f"{_fmt_ratio(res['linear']['ratio']):>7} {_fmt_spread(res['linear']):>13} "
                  f"{res['striped']['mib_s']:9.1f} "
                  f"{_fmt_ratio(res['striped']['ratio']):>7} {_fmt_spread(res['striped']):>13}   "
                  f"{_fmt_ratio(kr['linear']['ratio'] if kr else None):>13} "
                  f"{_fmt_ratio(kr['striped']['ratio'] if kr else None):>8}")
    paths = ours.get("data_path") or {}
    if any(paths.values()):
        print("data path: C (dmtools/_ffi/fastio.c): " + "; ".join(
            f"{kind} {st['reads'] + st['writes']} requests in C, {st['fallbacks'] + st['errors']} "
            "to Python" for kind, st in paths.items() if st))
    else:
        from dmtools._ffi import fastio

        print(f"data path: Python ({fastio.unavailable() or 'no C slots'})")
    if isinstance(kernel, str):
        print(f"kernel: {kernel}")


def _bench(args: argparse.Namespace) -> int:
    if args.kernel:  # inside the VM, for the parent's in_vm()
        print(json.dumps(run_kernel(args)))
        return 0
    from dmtools.engine.expose import exposure_possible

    reason = exposure_possible() or (None if args.no_fio else fio_available())
    if reason:
        print(f"bench engine: skipped: {reason}", file=sys.stderr)
        return 2
    if args.floor:
        floor = run_floor(args)
        if args.json:
            print(json.dumps({"benchmark": "engine-floor", "size_mib": args.size_mib, "rounds": args.rounds,
                              "sides": FLOOR_SIDES, "ours": floor}))
        else:
            report_floor(floor, args)
        return 0
    ours = run_host(args)
    kernel: dict[str, Any] | str | None = None
    if not args.no_kernel:
        # Smaller and shorter in the VM (QEMU without KVM): its ratios, not its rates, are wanted.
        vm_args = ["--kernel", "--size-mib", str(args.vm_size_mib), "--rounds", str(args.rounds),
                   "--fio-rounds", str(args.fio_rounds),
                   "--fio-size-mib", str(min(args.fio_size_mib, args.vm_size_mib)),
                   "--fio-runtime", str(min(args.fio_runtime, 2))] + (["--no-fio"] if args.no_fio else [])
        kernel = in_vm(os.path.abspath(__file__), vm_args)
    if args.json:
        print(json.dumps({"benchmark": "engine", "size_mib": args.size_mib, "rounds": args.rounds,
                          "fio_size_mib": args.fio_size_mib, "fio_runtime": args.fio_runtime,
                          "goals": GOALS, "ours": ours, "kernel": kernel}))
        return 0
    report(ours, kernel, args)
    return 0


def _cycles(image: str, rounds: int, cycles: int) -> dict[str, list[float]]:
    """ms per in-process create/remove cycle of a linear device over ``image`` and of a zero one."""
    from dmtools import loop_index
    from dmtools.engine import Engine

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
        return sum(os.path.exists(f"/sys/block/{n}/loop") for n in os.listdir("/sys/block") if n.startswith("loop"))
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
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="bytes per sequential pass (MiB)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--fio-size-mib", type=int, default=256, help="fio file/device span (MiB)")
    parser.add_argument("--fio-runtime", type=float, default=3, help="seconds per fio job")
    parser.add_argument("--fio-rounds", type=int, default=None,
                        help="alternating rounds of the fio jobs (median; default: --rounds)")
    parser.add_argument("--no-fio", action="store_true", help="skip the fio jobs")
    parser.add_argument("--no-kernel", action="store_true", help="skip the VM run of the kernel's targets")
    parser.add_argument("--vm-size-mib", type=int, default=64, help="sequential pass size in the VM (MiB)")
    parser.add_argument("--kernel", action="store_true", help=argparse.SUPPRESS)  # inside the VM
    parser.add_argument("--dir", default=None, help="directory for the backing images")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--python", action="store_true",
                        help="serve the devices in Python only (DMTOOLS_FAST_IO=0), for comparison")
    parser.add_argument("--floor", action="store_true",
                        help="measure the loop and FUSE hops' floor with a trivial FUSE server (see above)")
    parser.add_argument("--cycle", action="store_true",
                        help="measure in-process create/remove cycles instead (see above)")
    parser.add_argument("--cycles", type=int, default=300, help="cycles per round (--cycle)")
    parser.add_argument("--verbose", action="store_true", help="print every round (--cycle)")
    args = parser.parse_args(argv)
    if args.fio_rounds is None:
        args.fio_rounds = args.rounds
    if args.cycle:
        return main_cycle(args)
    if args.python:
        os.environ["DMTOOLS_FAST_IO"] = "0"
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
