#!/usr/bin/env python3
"""Benchmark kcopyd's NBD endpoints (``dmtools copy``) against nbdcopy, measured in the same run.

    python scripts/bench_nbd.py [--size 1G] [--repeat 3] [--json] [--dir DIR]

One nbdkit ``memory`` export on a Unix socket serves every case:
(a) file -> export: ``nbdcopy --flush SRC URI`` against ``python -m kcopyd SRC URI`` (kcopyd flushes
    an export it wrote when the copy ends, so nbdcopy is asked to flush too);
(b) export -> file: ``nbdcopy URI DST`` against ``python -m kcopyd URI DST``;
(c) one source -> a local file and the export: two sequential nbdcopy runs (``SRC DST`` then
    ``--flush SRC URI``) against one kcopyd job with both destinations;
(d) mirror writes with one remote leg against one local leg: sequential 1 MiB writes, flushed at
    the end, to an in-sync userspace ``mirror`` (disk log on a local file) whose legs are a local
    file and the export, against the same writes to the local file alone (a ``linear`` device),
    in-process on one engine (``--mirror-size``, default 256M); also the same mirror with two
    local legs, for reference. Ratio = one leg's time / the mirror's (1.0: the remote leg is free).

Every tool runs as a fresh process (times include process start-up) on a fresh destination,
after ``sync`` and evicting the data files from the page cache, as in ``scripts/bench copy``
(its helpers are used), and then after ``--settle`` seconds of rest: on a VM whose free memory
goes back to the host (virtio-balloon free page reporting, which reports freed memory after 2 s,
mm/page_reporting.c ``PAGE_REPORTING_DELAY``), the memory the previous run and the eviction just
freed would otherwise be cheap for the next tool and expensive once reported, which made the
first tool after a large free up to twice as fast (measured: nbdcopy file -> export 0.57 s of
system time right after an eviction, 1.0-1.55 s after 4 s of rest). The tools' order alternates
from round to round (ABBA), after ``--warmup`` untimed rounds. Reported: medians of ``--repeat``
rounds with every run's time (min-max), and ratios = nbdcopy's time / kcopyd's (> 1: kcopyd is
faster) of the medians and, round by round, their min-max; also against kcopyd's own copy time
from its JSON summary. Beside the times, each case's median CPU seconds (user + system) of the
tool and of nbdkit: figures the machine's load moves less, which show where the two CPUs go.
The report also says whether kcopyd runs with an editable install's import finder (``site`` then
imports it on every start; an installed package, or an editable install by path, has none) and what ``python -c pass`` and
``python -S -c pass`` take here (``bench_copy.interpreter_start``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_copy as bc  # noqa: E402
from bench_copy import KCOPYD, fresh, ratios  # noqa: E402

import bench_mirror as bm  # noqa: E402
from bench_common import SETTLE, add_settle_option, settle  # noqa: E402
from dmtools.testing.nbdserver import missing_tools, nbdkit  # noqa: E402
from dmtools.units import format_size, parse_size  # noqa: E402


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (proc(5))


def rounds(cases: dict[str, tuple[Any, Any]], repeat: int, peer: str, key: str) -> dict[str, Any]:
    """Run every case ``repeat`` times (after ``bench_copy.WARMUP`` untimed rounds), the order
    reversed every other round; a case may be a list of commands run in sequence (the first
    one evicted and settled). Returns the case's result: medians, runs, CPU seconds, ratios of
    the medians and the min-max of the ratios of each round."""
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    names = list(cases)
    evict = bc.evict

    def evict_and_settle() -> None:
        """``sync`` and evict the data files, then rest ``SETTLE`` seconds: the memory just
        freed is then in the same state (returned to the host) for every tool."""
        evict()
        settle(SETTLE)

    bc.evict = evict_and_settle  # bench_copy.timed evicts before a run: settle after it too
    try:
        for round_ in range(bc.WARMUP + repeat):
            timed_round = round_ >= bc.WARMUP
            order = names if (round_ - bc.WARMUP) % 2 == 0 else names[::-1]
            for name in order:
                cmd, prep = cases[name]
                before = bc._cpu_now()
                got: dict[str, list[float]] = {}
                bc._time_case(got, name, cmd, prep)
                after = bc._cpu_now()
                if timed_round:
                    for k, v in got.items():
                        times.setdefault(k, []).extend(v)
                    cpu.setdefault(name, []).append(after[0] - before[0])
                    cpu.setdefault(name + "_server", []).append(after[1] - before[1])
    finally:
        bc.evict = evict
    t = {name: statistics.median(ts) for name, ts in times.items()}
    paired = [p / k for p, k in zip(times[peer], times["kcopyd"])]
    return {"seconds": t, "runs": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "cpu_seconds": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
            "loadavg": bc._loadavg(), "settle_seconds": SETTLE, **ratios(t, peer, key),
            key + "_rounds_min": min(paired), key + "_rounds_max": max(paired)}


def compile_nbd_programs(uri: str) -> None:
    """Cache the bytecode of what an NBD copy imports beyond a file copy (the NBD endpoint, libnbd's
    ``nbd`` module: ``bench_copy.compile_programs`` copies files only), as an installed package
    has it: one untimed read of the export while it is still empty (all holes, so quick)."""
    env = {k: v for k, v in bc.ENV.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(KCOPYD + [uri, "null:"], env=env, check=True, stdout=subprocess.DEVNULL)


def bench_to_export(src: Path, uri: str, repeat: int) -> dict[str, Any]:
    cases: dict[str, Any] = {
        "kcopyd": (KCOPYD + [str(src), uri], None),
        "nbdcopy": (["nbdcopy", "--flush", str(src), uri], None),
    }
    return rounds(cases, repeat, "nbdcopy", "ratio_vs_nbdcopy")


def bench_from_export(d: Path, uri: str, repeat: int) -> dict[str, Any]:
    dst = d / "dst-b.img"
    bc.DATA_FILES.append(dst)
    cases: dict[str, Any] = {
        "kcopyd": (KCOPYD + [uri, str(dst)], fresh(dst)),
        "nbdcopy": (["nbdcopy", uri, str(dst)], fresh(dst)),
    }
    out = rounds(cases, repeat, "nbdcopy", "ratio_vs_nbdcopy")
    fresh(dst)()
    return out


def bench_one_to_two(d: Path, src: Path, uri: str, repeat: int) -> dict[str, Any]:
    dst = d / "dst-c.img"
    bc.DATA_FILES.append(dst)
    cases: dict[str, Any] = {
        "kcopyd": (KCOPYD + [str(src), str(dst), uri], fresh(dst)),
        "nbdcopy_x2": ([["nbdcopy", str(src), str(dst)], ["nbdcopy", "--flush", str(src), uri]], [fresh(dst), None]),
    }
    out = rounds(cases, repeat, "nbdcopy_x2", "ratio_vs_2nbdcopy")
    fresh(dst)()
    return out


def bench_mirror_remote_leg(d: Path, uri: str, size: int, repeat: int) -> dict[str, Any]:
    """(d): the userspace mirror with a remote leg, a local mirror and one local leg, interleaved."""
    from mirror.format import region_count

    region = (512 << 10) // 512  # bench_mirror's default region size
    nr = region_count(size // 512, region)
    local, local2, log = d / "leg-local.img", d / "leg-local2.img", d / "mirror.log"
    tables = {
        "one_local_leg": f"0 {size // 512} linear {local} 0",
        "mirror_local_remote": f"0 {size // 512} mirror disk 2 {log} {region} 2 {local} 0 {uri} 0",
        "mirror_local_local": f"0 {size // 512} mirror disk 2 {log} {region} 2 {local} 0 {local2} 0",
    }
    times: dict[str, list[float]] = {name: [] for name in tables}
    eng = bm.engine()
    try:
        for _ in range(bc.WARMUP + repeat):
            for name, table in tables.items():
                for p in (local, local2):
                    bm.blank(p, size)
                bm.write_log(log, nr, [])  # in sync: every write goes to both legs
                eng.create("bench-nbd-leg", table)
                try:
                    times[name].append(bm.seq_write(eng, "bench-nbd-leg", size))
                finally:
                    eng.remove("bench-nbd-leg")
    finally:
        eng.close()
    t = {name: statistics.median(ts[bc.WARMUP:]) for name, ts in times.items()}
    return {"seconds": t, "runs": {k: [round(x, 3) for x in v[bc.WARMUP:]] for k, v in times.items()},
            "mirror_size_bytes": size, "loadavg": bc._loadavg(),
            "ratio_remote_vs_one_leg": t["one_local_leg"] / t["mirror_local_remote"],
            "ratio_remote_vs_local_mirror": t["mirror_local_local"] / t["mirror_local_remote"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="copy size (default 1G)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool, median reported (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds of every case first (default 1)")
    ap.add_argument("--dir", help="work directory (default: a temporary one under /var/tmp)")
    ap.add_argument("--only", default="abcd", help="which cases to run (default abcd)")
    ap.add_argument("--mirror-size", default="256M", help="bytes written in case (d) (default 256M)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--nice", type=int, default=0, help="scheduling priority change for everything run")
    add_settle_option(ap, "after each run's cache eviction")
    args = ap.parse_args()
    reason = missing_tools("nbdkit", "nbdcopy")
    if reason:
        print(f"bench nbd: {reason}", file=sys.stderr)
        return 2
    if args.nice:
        os.nice(args.nice)
    bc.WARMUP = max(0, args.warmup)
    globals()["SETTLE"] = max(0.0, args.settle)
    size = parse_size(args.size, "b")
    workdir = Path(tempfile.mkdtemp(prefix="dmtt-bench-nbd-", dir=args.dir or "/var/tmp"))
    results: dict[str, Any] = {
        "size_bytes": size, "repeat": args.repeat, "warmup": bc.WARMUP, "nice": args.nice, "settle": args.settle,
        "page_cache_dropped_at_start": bc.drop_caches(), "cpus": os.cpu_count(), "kernel": os.uname().release,
        "nbdkit": subprocess.run(["nbdkit", "--version"], capture_output=True, text=True).stdout.strip(),
        "command": " ".join(["scripts/bench nbd"] + sys.argv[1:]), "interpreter": bc.interpreter_start(),
    }
    server = None
    try:
        bc.compile_programs(workdir)
        src = workdir / "src.img"
        bc.DATA_FILES.append(src)
        bc.make_source(src, size)
        server = nbdkit(workdir, ["memory", str(size)], name="export")
        uri = server.uri
        compile_nbd_programs(uri)
        bc.SERVER_CPU = lambda: _process_cpu(server.pid)
        if "a" in args.only:
            results["a_file_to_export"] = bench_to_export(src, uri, args.repeat)
        if "b" in args.only:
            subprocess.run(["nbdcopy", str(src), uri], check=True)  # the export holds the data
            results["b_export_to_file"] = bench_from_export(workdir, uri, args.repeat)
        if "c" in args.only:
            results["c_one_to_two"] = bench_one_to_two(workdir, src, uri, args.repeat)
        if "d" in args.only:
            msize = min(size, parse_size(args.mirror_size, "b")) >> 20 << 20
            results["d_mirror_remote_leg"] = bench_mirror_remote_leg(workdir, uri, msize, args.repeat)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_report(results, size)
    return 0


def print_report(r: dict[str, Any], size: int) -> None:
    print(f"kcopyd NBD benchmark: {format_size(size)}, nbdkit memory export on a Unix socket ({r['nbdkit']}), "
          f"median of {r['repeat']} after {r['warmup']} untimed round(s), tools alternating, {r['settle']:g} s "
          f"of rest after each eviction, {r['cpus']} CPUs, kernel {r['kernel']}")
    print(bc.describe_start(r["interpreter"]))
    for key, title, peer, goal in (
        ("a_file_to_export", "(a) file->export", "ratio_vs_nbdcopy", "nbdcopy --flush (goal >= 1.0x)"),
        ("b_export_to_file", "(b) export->file", "ratio_vs_nbdcopy", "nbdcopy (goal >= 1.0x)"),
        ("c_one_to_two", "(c) 1->2 (file + export)", "ratio_vs_2nbdcopy",
         "two sequential nbdcopy runs (goal >= 1.5x)"),
    ):
        if key in r:
            case = r[key]
            print(f"{title}: {bc.fmt_secs(case['seconds'], size)}")
            print(f"    kcopyd vs {goal}: {bc.fmt_ratio(case, peer)}; round by round "
                  f"{case[peer + '_rounds_min']:.2f}-{case[peer + '_rounds_max']:.2f}x")
            cpu = case["cpu_seconds"]
            print("    CPU seconds (median; the tool's own + nbdkit's): " + ", ".join(
                f"{k} {cpu[k]:.2f} + {cpu[k + '_server']:.2f}" for k in cpu if not k.endswith("_server")))
            print("    min-max: " + ", ".join(f"{k} {min(v):.3f}-{max(v):.3f} s" for k, v in case["runs"].items()))
            bc.print_runs(case)
    if "d_mirror_remote_leg" in r:
        case = r["d_mirror_remote_leg"]
        msize = case["mirror_size_bytes"]
        print(f"(d) mirror writes, {format_size(msize)} in 1 MiB writes: {bc.fmt_secs(case['seconds'], msize)}")
        print(f"    mirror (local + remote leg) vs one local leg: {case['ratio_remote_vs_one_leg']:.2f}x; "
              f"vs a mirror of two local legs: {case['ratio_remote_vs_local_mirror']:.2f}x")
        bc.print_runs(case)


if __name__ == "__main__":
    sys.exit(main())
