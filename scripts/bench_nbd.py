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

The conditions are those of ``scripts/bench copy`` (its helpers are used): fresh processes, the
data files evicted from the page cache before each run, untimed warm-up rounds, medians of
``--repeat`` interleaved runs, times including process start-up, and ratios = nbdcopy's time /
kcopyd's (> 1: kcopyd is faster), also against kcopyd's own copy time from its JSON summary.
Beside the times, each case's median CPU seconds (user + system) of the tool and of nbdkit: a
figure the machine's load barely moves, which shows where the two CPUs go.
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
from bench_copy import KCOPYD, RUNS, fresh, median_runs, ratios  # noqa: E402

import bench_mirror as bm  # noqa: E402
from dmtools.testing.nbdserver import missing_tools, nbdkit  # noqa: E402
from dmtools.units import format_size, parse_size  # noqa: E402


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (proc(5))


def bench_to_export(src: Path, uri: str, repeat: int) -> dict[str, Any]:
    cases: dict[str, Any] = {
        "kcopyd": (KCOPYD + [str(src), uri], None),
        "nbdcopy": (["nbdcopy", "--flush", str(src), uri], None),
    }
    t = median_runs(cases, repeat)
    return {"seconds": t, "runs": dict(RUNS), "cpu_seconds": dict(bc.CPU), "loadavg": bc._loadavg(),
            **ratios(t, "nbdcopy", "ratio_vs_nbdcopy")}


def bench_from_export(d: Path, uri: str, repeat: int) -> dict[str, Any]:
    dst = d / "dst-b.img"
    bc.DATA_FILES.append(dst)
    cases: dict[str, Any] = {
        "kcopyd": (KCOPYD + [uri, str(dst)], fresh(dst)),
        "nbdcopy": (["nbdcopy", uri, str(dst)], fresh(dst)),
    }
    t = median_runs(cases, repeat)
    fresh(dst)()
    return {"seconds": t, "runs": dict(RUNS), "cpu_seconds": dict(bc.CPU), "loadavg": bc._loadavg(),
            **ratios(t, "nbdcopy", "ratio_vs_nbdcopy")}


def bench_one_to_two(d: Path, src: Path, uri: str, repeat: int) -> dict[str, Any]:
    dst = d / "dst-c.img"
    bc.DATA_FILES.append(dst)
    cases: dict[str, Any] = {
        "kcopyd": (KCOPYD + [str(src), str(dst), uri], fresh(dst)),
        "nbdcopy_x2": ([["nbdcopy", str(src), str(dst)], ["nbdcopy", "--flush", str(src), uri]], [fresh(dst), None]),
    }
    t = median_runs(cases, repeat)
    fresh(dst)()
    return {"seconds": t, "runs": dict(RUNS), "cpu_seconds": dict(bc.CPU), "loadavg": bc._loadavg(),
            **ratios(t, "nbdcopy_x2", "ratio_vs_2nbdcopy")}


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
    args = ap.parse_args()
    reason = missing_tools("nbdkit", "nbdcopy")
    if reason:
        print(f"bench nbd: {reason}", file=sys.stderr)
        return 2
    if args.nice:
        os.nice(args.nice)
    bc.WARMUP = max(0, args.warmup)
    size = parse_size(args.size, "b")
    workdir = Path(tempfile.mkdtemp(prefix="dmtt-bench-nbd-", dir=args.dir or "/var/tmp"))
    results: dict[str, Any] = {
        "size_bytes": size, "repeat": args.repeat, "warmup": bc.WARMUP, "nice": args.nice,
        "page_cache_dropped_at_start": bc.drop_caches(), "cpus": os.cpu_count(), "kernel": os.uname().release,
        "nbdkit": subprocess.run(["nbdkit", "--version"], capture_output=True, text=True).stdout.strip(),
        "command": " ".join(["scripts/bench nbd"] + sys.argv[1:]),
    }
    server = None
    try:
        bc.compile_programs(workdir)
        src = workdir / "src.img"
        bc.DATA_FILES.append(src)
        bc.make_source(src, size)
        server = nbdkit(workdir, ["memory", str(size)], name="export")
        uri = server.uri
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
          f"median of {r['repeat']} after {r['warmup']} untimed round(s), {r['cpus']} CPUs, kernel {r['kernel']}")
    for key, title, peer, goal in (
        ("a_file_to_export", "(a) file->export", "ratio_vs_nbdcopy", "nbdcopy --flush (goal >= 1.0x)"),
        ("b_export_to_file", "(b) export->file", "ratio_vs_nbdcopy", "nbdcopy (goal >= 1.0x)"),
        ("c_one_to_two", "(c) 1->2 (file + export)", "ratio_vs_2nbdcopy",
         "two sequential nbdcopy runs (goal >= 1.5x)"),
    ):
        if key in r:
            case = r[key]
            print(f"{title}: {bc.fmt_secs(case['seconds'], size)}")
            print(f"    kcopyd vs {goal}: {bc.fmt_ratio(case, peer)}")
            cpu = case["cpu_seconds"]
            print("    CPU seconds (median; the tool's own + nbdkit's): " + ", ".join(
                f"{k} {cpu[k]:.2f} + {cpu[k + '_server']:.2f}" for k in cpu if not k.endswith("_server")))
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
