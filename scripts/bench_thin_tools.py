#!/usr/bin/env python3
"""Thin metadata tools against thin-provisioning-tools (issue 13): ``dmtools thin dump`` and
``dmtools thin check`` of a pool with 1,000,000 mapped blocks, against ``thin_dump`` and
``thin_check`` on the same metadata, each in a fresh process (wall time, best of --repeat, and peak
RSS). Also ``thin restore`` against ``thin_restore`` building it. Goal: within 3x, <= 128 MiB.

    scripts/bench thin_tools [--mappings 1000000] [--devices 4] [--repeat 3] [--max-run 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(os.environ.get("DMTOOLS_VENV", ROOT / ".venv")) / "bin"


def make_xml(path: Path, mappings: int, devices: int, max_run: int = 64, seed: int = 1) -> int:
    """A dump of ``devices`` thin devices sharing ``mappings`` mapped blocks between them: the last
    device is a snapshot of the first that rewrote a tenth of it; writes come in runs of 1..64
    blocks (``max_run``) scattered over a 4x larger virtual space, as a filesystem's would. Returns
    nr_data_blocks."""
    rng = random.Random(seed)
    per = mappings // devices
    cursor = 0
    lines = ['<superblock uuid="" time="1" transaction="7" flags="0" version="2" data_block_size="128" '
             'nr_data_blocks="{NR}">']
    first: list[tuple[int, int, int]] = []
    for dev in range(devices):
        runs: list[tuple[int, int, int, int]] = []
        if dev == devices - 1 and devices > 1:
            # a snapshot of device 0: its runs, a tenth of them rewritten at time 1
            for vb, db, n in first:
                if rng.random() < 0.1:
                    runs.append((vb, cursor, n, 1))
                    cursor += n
                else:
                    runs.append((vb, db, n, 0))
        else:
            vb, left = 0, per
            while left:
                n = min(left, rng.randint(1, max_run))
                vb += rng.randint(0, 3 * n)
                runs.append((vb, cursor, n, 0))
                if dev == 0:
                    first.append((vb, cursor, n))
                vb += n
                cursor += n + (rng.randint(1, 8) if rng.random() < 0.05 else 0)
                left -= n
        total = sum(r[2] for r in runs)
        lines.append(f'  <device dev_id="{dev + 1}" mapped_blocks="{total}" transaction="0" '
                     f'creation_time="{1 if dev == devices - 1 and devices > 1 else 0}" snap_time="1">')
        for vb, db, n, t in runs:
            if n == 1:
                lines.append(f'    <single_mapping origin_block="{vb}" data_block="{db}" time="{t}"/>')
            else:
                lines.append(f'    <range_mapping origin_begin="{vb}" data_begin="{db}" length="{n}" time="{t}"/>')
        lines.append("  </device>")
    lines.append("</superblock>")
    nr = cursor + 1000
    path.write_text("\n".join(lines).replace("{NR}", str(nr), 1) + "\n")
    return nr


def run(argv: list[str]) -> tuple[float, int, bytes, float]:
    """Wall seconds, peak RSS (KiB), stdout and CPU seconds (user + system) of one fresh process.

    The peak RSS comes from GNU time (``/usr/bin/time -f %M``): a child of this Python process would
    start with this process's RSS as its peak (the kernel keeps the larger across exec).
    """
    exe = shutil.which(argv[0]) or argv[0]
    gnu_time = shutil.which("time") if os.path.exists("/usr/bin/time") else None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as rss:
        cmd = [exe, *argv[1:]]
        if gnu_time:
            cmd = ["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd]
        t0 = time.perf_counter()
        pid = os.posix_spawn(cmd[0], cmd, os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                                                                     (os.POSIX_SPAWN_DUP2, err.fileno(), 2)])
        _pid, status, usage = os.wait4(pid, 0)
        elapsed = time.perf_counter() - t0
        rc = os.waitstatus_to_exitcode(status)
        if rc != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed ({rc}): {err.read().decode(errors='replace')[:500]}")
        peak = int(rss.read().split()[-1]) if gnu_time else usage.ru_maxrss
        out.seek(0)
        return elapsed, peak, out.read(), usage.ru_utime + usage.ru_stime


def best(argv: list[str], repeat: int) -> tuple[float, int, bytes, float]:
    """The best wall and CPU time of ``repeat`` runs, the largest peak RSS, the first run's output."""
    results = [run(argv) for _ in range(repeat)]
    return min(r[0] for r in results), max(r[1] for r in results), results[0][2], min(r[3] for r in results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mappings", type=int, default=1_000_000)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-run", type=int, default=64, help="longest run of consecutive blocks written "
                    "(1: every mapping on its own, thin_dump's worst case)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--make-xml", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_xml:
        make_xml(Path(args.make_xml), args.mappings, args.devices, args.max_run)
        return 0
    dmtools = str(VENV_BIN / "dmtools")
    with tempfile.TemporaryDirectory(prefix="dmtt-bench-thin-") as tmp:
        xml, meta, meta2 = Path(tmp) / "pool.xml", Path(tmp) / "meta.img", Path(tmp) / "meta2.img"
        # in a child: this process stays small, and a child's peak RSS starts from ours at exec
        subprocess.run([sys.executable, __file__, "--make-xml", str(xml), "--mappings", str(args.mappings),
                        "--devices", str(args.devices), "--max-run", str(args.max_run)], check=True)
        for m in (meta, meta2):
            with open(m, "wb") as f:
                f.truncate(1 << 30)  # a 1 GiB metadata device
        res: dict[str, Any] = {"mappings": args.mappings, "devices": args.devices}
        res["thin_restore"] = best(["thin_restore", "-q", "-i", str(xml), "-o", str(meta)], 1)
        res["restore"] = best([dmtools, "thin", "restore", "-q", "-i", str(xml), "-o", str(meta2)], 1)
        res["thin_dump"] = best(["thin_dump", str(meta)], args.repeat)
        res["dump"] = best([dmtools, "thin", "dump", str(meta)], args.repeat)
        if res["dump"][2] != res["thin_dump"][2]:
            raise SystemExit("bench: our dump differs from thin_dump's")
        res["thin_check"] = best(["thin_check", "-q", str(meta)], args.repeat)
        res["check"] = best([dmtools, "thin", "check", "-q", str(meta)], args.repeat)
    report = {"mappings": args.mappings, "devices": args.devices}
    for ours, theirs in (("dump", "thin_dump"), ("check", "thin_check"), ("restore", "thin_restore")):
        t_ours, rss_ours, _out, cpu_ours = res[ours]
        t_theirs, rss_theirs, _out, cpu_theirs = res[theirs]
        report[ours] = {"seconds": round(t_ours, 3), "peer_seconds": round(t_theirs, 3),
                        "time_ratio": round(t_ours / t_theirs, 2), "cpu_seconds": round(cpu_ours, 3),
                        "peer_cpu_seconds": round(cpu_theirs, 3), "cpu_ratio": round(cpu_ours / max(cpu_theirs, 1e-3), 2),
                        "peak_rss_mib": round(rss_ours / 1024, 1), "peer_peak_rss_mib": round(rss_theirs / 1024, 1)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"thin metadata tools, {args.mappings} mapped blocks in {args.devices} devices, 1 GiB metadata:")
    for name in ("dump", "check", "restore"):
        r = report[name]
        print(f"  {name:<8} wall {r['seconds']:6.2f} s vs {r['peer_seconds']:6.2f} s = {r['time_ratio']:.2f}x, "
              f"CPU {r['cpu_seconds']:6.2f} s vs {r['peer_cpu_seconds']:6.2f} s = {r['cpu_ratio']:.2f}x "
              f"(goal <= 3x for dump and check); peak RSS {r['peak_rss_mib']:.1f} MiB "
              f"(C++ {r['peer_peak_rss_mib']:.1f} MiB; goal <= 128 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
