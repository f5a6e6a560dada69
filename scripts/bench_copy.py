#!/usr/bin/env python3
"""Benchmark kcopyd (``dmtools copy``) against dd and nbdcopy, measured in the same run.

    python scripts/bench_copy.py [--size 1G] [--rss-size 4G] [--repeat 3] [--json] [--dir DIR]

(a) file -> file: ``dd bs=1M`` and ``nbdcopy`` against ``python -m kcopyd SRC DST``;
(b) file -> loop device: ``dd bs=1M oflag=direct`` against kcopyd (O_DIRECT on block devices);
(c) one source -> 3 destinations: one kcopyd job against three sequential ``dd bs=1M`` runs, three
    ``dd bs=1M`` runs started together (time until the last ends), and ``tee`` into three files;
(e) file -> file with the source already in the page cache, through the Python API (``kcopyd.Client``
    created and destroyed inside the timing, in a process that imported ``kcopyd`` before), against
    ``dd bs=1M`` and a bare ``os.copy_file_range`` loop on the same files. Every run of every tool
    starts from one state (``settle_for_run``): destination removed, the previous run's dirty pages
    written back (Dirty + Writeback waited down), ``--settle`` seconds of rest (on this VM freed
    memory goes back to the host after 2 s: a tool that ran just after a large free found cheap
    pages, one after a pause faulted them in from the host), the source read and checked resident
    (``cachestat``); the tools' order is reversed every round;
(d) peak RSS of a ``--rss-size`` copy (a loop device over a sparse file, to ``null:``, through the
    page pool) with ``--num-pages`` 64 and 1024, read from ``wait4``'s rusage.

Every tool runs as a fresh process on a fresh destination, after ``sync`` and evicting the data
files' cached pages (``POSIX_FADV_DONTNEED``), so each reads its source from disk while the programs
stay cached (kcopyd's modules compiled to bytecode first, as an installed package's are); times
include process start-up. With ``--flush`` every tool also makes its output
durable (dd ``conv=fdatasync``, nbdcopy ``--flush``, kcopyd ``--flush``). Each case is run ``--repeat`` times, alternating tools, after ``--warmup`` untimed
rounds, and the median is reported. Ratios are peer time / kcopyd time (> 1: kcopyd is faster), end to end and against the
copy's own time from kcopyd's JSON summary (``kcopyd_engine``: without Python's start-up and exit,
which dd and nbdcopy, being C programs, hardly have).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_common import SETTLE, add_settle_option, settle  # noqa: E402
from dmtools.units import format_size, parse_size  # noqa: E402

PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
KCOPYD = [PY, "-m", "kcopyd", "--quiet", "--json"]


def interpreter_start() -> dict[str, Any]:
    """How the timed ``python -m kcopyd`` runs start, which a user's installed copy may not share:
    whether the interpreter runs an editable install (``pip install -e``: ``site`` then imports
    its import finder, with ``pathlib``, on every start) and the median wall milliseconds of
    ``python -c pass`` and ``python -S -c pass`` (no ``site``), 7 runs each, alternating."""
    probe = "import sys; print(any(m.startswith('__editable__') for m in sys.modules))"
    editable = subprocess.run([PY, "-c", probe], env=ENV, capture_output=True, text=True).stdout.strip() == "True"
    runs: dict[str, list[float]] = {"pass": [], "no_site": []}
    for _ in range(7):
        for key, cmd in (("pass", [PY, "-c", "pass"]), ("no_site", [PY, "-S", "-c", "pass"])):
            t0 = time.perf_counter()
            subprocess.run(cmd, env=ENV, check=True)
            runs[key].append((time.perf_counter() - t0) * 1000)
    return {"editable_install": editable, **{k + "_ms": round(statistics.median(v), 1) for k, v in runs.items()}}


def describe_start(s: dict[str, Any]) -> str:
    """One line from :func:`interpreter_start`."""
    how = ("an editable install whose import finder site imports (pip -e's default mode)" if s["editable_install"]
           else "no import finder (an installed package, or an editable install by path)")
    return (f"kcopyd runs with {how}; python -c pass {s['pass_ms']:.1f} ms (the floor of every kcopyd run), "
            f"{s['no_site_ms']:.1f} ms without site (-S)")


def drop_caches() -> bool:
    """``sync`` and drop the whole page cache; False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


#: Data files whose cached pages are evicted before every timed run (see ``evict``).
DATA_FILES: list[Path] = []


def evict() -> None:
    """``sync``, then drop the cached pages of the data files only (``POSIX_FADV_DONTNEED``).

    Each tool then reads its source from disk, while the programs themselves (dd, nbdcopy, the
    Python interpreter and its modules) stay cached, as they are for a user running them.
    """
    os.sync()
    for path in DATA_FILES:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def compile_programs(workdir: Path) -> None:
    """Cache kcopyd's bytecode (its modules and the standard library's it imports) under ``workdir``.

    As pip does when it installs a package: every timed kcopyd run then loads bytecode instead of
    compiling modules from source, which it would do on every run where ``PYTHONDONTWRITEBYTECODE``
    is set or the checkout is read-only. One small untimed copy, with bytecode writing enabled and
    ``PYTHONPYCACHEPREFIX`` pointing into ``workdir``, imports what a copy imports.
    """
    ENV["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    env = {k: v for k, v in ENV.items() if k != "PYTHONDONTWRITEBYTECODE"}
    tiny = workdir / "tiny.img"
    tiny.write_bytes(os.urandom(1 << 20))
    subprocess.run(KCOPYD + [str(tiny), str(workdir / "tiny-copy.img"), "null:"], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def make_source(path: Path, size: int) -> None:
    """Incompressible, non-zero data (zero detection must not help any tool)."""
    block = bytearray(os.urandom(1 << 20))
    with open(path, "wb") as f:
        for i in range(size // len(block)):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)
        rest = size % len(block)
        if rest:
            f.write(block[:rest])
        f.flush()
        os.fsync(f.fileno())


class Parallel(list):  # type: ignore[type-arg]
    """A case's commands started together: its time is until the last one ends."""


def timed_parallel(cmds: list[list[str]], prepare: Any = None) -> float:
    """Run ``cmds`` at once after ``prepare()`` and a cache drop; wall seconds until all ended."""
    if prepare is not None:
        prepare()
    evict()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.DEVNULL) for c in cmds]
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - t0
    if any(codes):
        raise RuntimeError(f"{cmds} exited with {codes}")
    return wall


def timed(cmd: list[str], prepare: Any = None, drop: bool = True) -> tuple[float, float | None]:
    """Run ``cmd`` after ``prepare()`` and a cache drop; return wall seconds and, for kcopyd, the
    copy's own seconds from its JSON summary (the wall time less interpreter start-up and exit)."""
    if prepare is not None:
        prepare()
    if drop:
        evict()
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, env=ENV, stdout=subprocess.PIPE).stdout
    wall = time.perf_counter() - t0
    engine = json.loads(out)["seconds"] if cmd[: len(KCOPYD)] == KCOPYD else None
    return wall, engine


def fresh(*paths: Path) -> Any:
    """A ``prepare`` step removing destination files."""

    def prepare() -> None:
        for p in paths:
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    return prepare


#: Every timed run's seconds per case, in run order (reported as ``runs`` next to the medians).
RUNS: dict[str, list[float]] = {}
#: Untimed rounds of every case before the timed ones (``--warmup``): the first run after the
#: start-up cache drop would otherwise always be kcopyd's, on a machine in a state no later run sees.
WARMUP = 1
#: Median CPU seconds (user + system) per case of the last ``median_runs``: the timed commands'
#: own, and ``SERVER_CPU``'s (a server the commands talk to, e.g. nbdkit). Unlike wall times they
#: barely move with the machine's load: they show where the CPUs go.
CPU: dict[str, float] = {}
SERVER_CPU: Any = None  # a function giving a server's CPU seconds so far, or None


def _cpu_now() -> tuple[float, float]:
    """CPU seconds of the waited-for children, and of the server (0 without one)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime, SERVER_CPU() if SERVER_CPU is not None else 0.0


def median_runs(cases: dict[str, tuple[list[str] | list[list[str]], Any]], repeat: int) -> dict[str, float]:
    """Run each case ``repeat`` times, interleaved; a case may be a list of commands run in sequence.

    Returns the median wall seconds per case, plus ``<case>_engine`` for kcopyd cases; every run's
    seconds are kept in ``RUNS``.
    """
    RUNS.clear()
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for round_ in range(WARMUP + repeat):
        if round_ == WARMUP:
            times.clear()  # the warm-up rounds are not counted
            cpu.clear()
        for name, (cmd, prep) in cases.items():
            before = _cpu_now()
            _time_case(times, name, cmd, prep)
            after = _cpu_now()
            cpu.setdefault(name, []).append(after[0] - before[0])
            if SERVER_CPU is not None:
                cpu.setdefault(name + "_server", []).append(after[1] - before[1])
    RUNS.update({name: [round(t, 3) for t in ts] for name, ts in times.items()})
    CPU.clear()
    CPU.update({name: round(statistics.median(ts), 3) for name, ts in cpu.items()})
    return {name: statistics.median(ts) for name, ts in times.items()}


def _time_case(times: dict[str, list[float]], name: str, cmd: Any, prep: Any) -> None:
    """One run of a case (see ``median_runs``), its seconds appended to ``times``."""
    if isinstance(cmd, Parallel):
        times.setdefault(name, []).append(timed_parallel(cmd, prep))
    elif cmd and isinstance(cmd[0], list):
        total = 0.0
        # a sequence starts cold; later commands find what earlier ones cached, as they would
        for i, c in enumerate(cmd):
            total += timed(c, prep[i] if isinstance(prep, list) else prep, drop=i == 0)[0]  # type: ignore[arg-type]
        times.setdefault(name, []).append(total)
    else:
        wall, engine = timed(cmd, prep)  # type: ignore[arg-type]
        times.setdefault(name, []).append(wall)
        if engine is not None:
            times.setdefault(name + "_engine", []).append(engine)


def ratios(t: dict[str, float], peer: str, key: str) -> dict[str, float]:
    """``peer`` time over kcopyd's, end to end and for the copy itself (``engine``)."""
    return {key: t[peer] / t["kcopyd"], key + "_engine": t[peer] / t["kcopyd_engine"]}


def bench_file_to_file(d: Path, src: Path, repeat: int, flush: bool) -> dict[str, Any]:
    dst = d / "dst-a.img"
    dd = ["dd", f"if={src}", f"of={dst}", "bs=1M", "status=none"] + (["conv=fdatasync"] if flush else [])
    cases: dict[str, Any] = {
        "kcopyd": (KCOPYD + [str(src), str(dst)] + (["--flush"] if flush else []), fresh(dst)),
        "dd": (dd, fresh(dst)),
    }
    if shutil.which("nbdcopy"):
        cases["nbdcopy"] = (["nbdcopy"] + (["--flush"] if flush else []) + [str(src), str(dst)], fresh(dst))
    t = median_runs(cases, repeat)
    fresh(dst)()
    return {"seconds": t, "runs": dict(RUNS), "loadavg": _loadavg(), **ratios(t, "dd", "ratio_vs_dd"),
            **(ratios(t, "nbdcopy", "ratio_vs_nbdcopy") if "nbdcopy" in t else {})}


def bench_file_to_loop(d: Path, src: Path, size: int, repeat: int, flush: bool) -> dict[str, Any]:
    from dmtools import loop

    backing = d / "loop-backing.img"
    with open(backing, "wb") as f:
        f.truncate(size)
    DATA_FILES.append(backing)
    dev = loop.attach(backing)
    try:
        dd = ["dd", f"if={src}", f"of={dev.path}", "bs=1M", "oflag=direct", "status=none"]
        # Untimed warm-up: the first write allocates the backing file's blocks; every timed run
        # then overwrites allocated blocks.
        subprocess.run(dd, check=True)
        if flush:
            dd.append("conv=fdatasync")
        cases: dict[str, Any] = {
            "kcopyd": (KCOPYD + [str(src), dev.path] + (["--flush"] if flush else []), None),
            "dd_direct": (dd, None),
        }
        t = median_runs(cases, repeat)
    finally:
        loop.detach(dev)
        backing.unlink()
    return {"seconds": t, "runs": dict(RUNS), "loadavg": _loadavg(), **ratios(t, "dd_direct", "ratio_vs_dd_direct")}


def bench_three_dests(d: Path, src: Path, repeat: int, flush: bool, overwrite: bool = False) -> dict[str, Any]:
    dsts = [d / f"dst-c{i}.img" for i in range(3)]
    conv = ["conv=fdatasync"] if flush else []
    if overwrite:
        # Destinations written once, untimed; every run then overwrites them in place (dd with
        # conv=notrunc), so no run pays for freeing and re-allocating (and discarding) blocks.
        conv = ["conv=notrunc" + (",fdatasync" if flush else "")]
        for p in dsts:
            shutil.copyfile(src, p)
    dd_cmds = [["dd", f"if={src}", f"of={p}", "bs=1M", "status=none"] + conv for p in dsts]
    prep = None if overwrite else fresh(*dsts)
    # tee into three files (truncating, as tee does; with --flush each file is then fdatasync'ed)
    tee = ["sh", "-c", 'tee "$@" < "$0" > /dev/null' + (' && sync -d "$@"' if flush else ""), str(src), *map(str, dsts)]
    cases: dict[str, Any] = {
        "kcopyd": (KCOPYD + [str(src)] + [str(p) for p in dsts] + (["--flush"] if flush else []), prep),
        "dd_x3": (dd_cmds, [prep, None, None]),
        "dd_x3_parallel": (Parallel(dd_cmds), prep),
        "tee": (tee, prep),
    }
    t = median_runs(cases, repeat)
    fresh(*dsts)()
    return {"seconds": t, "runs": dict(RUNS), "loadavg": _loadavg(), "overwrite": overwrite,
            **ratios(t, "dd_x3", "ratio_vs_3dd"), **ratios(t, "dd_x3_parallel", "ratio_vs_3dd_parallel"),
            **ratios(t, "tee", "ratio_vs_tee")}


#: What ``--api-run`` runs: a kcopyd job through the Python API, or the bare ``copy_file_range`` loop.
API_RUN = "--api-run"


def api_run(mode: str, src: str, dst: str, size: int) -> float:
    """One timed file -> file copy in this process (``kcopyd.Client`` imported first): ``kcopyd`` with
    the client created and destroyed inside the timing, or ``cfr``, a bare ``os.copy_file_range``
    loop of 8 MiB calls. The destination is created inside the timing in both."""
    from kcopyd import Client, Region  # as a program imports them when it starts

    t0 = time.perf_counter()
    if mode == "kcopyd":
        with open(dst, "wb") as f:
            f.truncate(size)
        with Client() as kc:
            kc.copy(Region(src, 0, size // 512), [Region(dst, 0, size // 512)]).wait()
    else:
        sfd = os.open(src, os.O_RDONLY)
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            off = 0
            while off < size:
                n = os.copy_file_range(sfd, dfd, min(8 << 20, size - off), off, off)
                if n <= 0:
                    raise OSError(f"copy_file_range returned {n} at {off}")
                off += n
        finally:
            os.close(sfd)
            os.close(dfd)
    return time.perf_counter() - t0


def warm(path: Path) -> None:
    """Read ``path`` once so that it is in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while f.readinto(buf):
            pass


def _meminfo_mib(*keys: str) -> dict[str, int]:
    """``/proc/meminfo`` fields ``keys``, in MiB."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0]) >> 10
    return out


#: Dirty + Writeback (MiB) below which the previous run's writeback counts as done.
E_DIRTY_DONE_MIB = 16


def settle_for_run(src: Path, dst: Path, size: int, seconds: float) -> dict[str, Any]:
    """The state every timed run of case (e) starts from, whichever tool it is: the destination
    removed, the previous run's dirty pages written back (``sync``, then Dirty + Writeback waited
    down below ``E_DIRTY_DONE_MIB``), the source read into the page cache and checked resident
    (``cachestat``; read again if the rest evicted any of it), after ``seconds`` of rest
    (``bench_common.settle``).
    Returns what was found: the source's resident MiB and Dirty/Writeback/MemFree just before."""
    fresh(dst)()
    os.sync()
    deadline = time.monotonic() + 60
    while sum(_meminfo_mib("Dirty", "Writeback").values()) >= E_DIRTY_DONE_MIB and time.monotonic() < deadline:
        time.sleep(0.1)  # a poll, not a guess: the loop ends when the counters say so
    settle(seconds)
    from kcopyd.fastpath import cached_bytes

    resident = None
    for _ in range(3):
        warm(src)
        fd = os.open(src, os.O_RDONLY)
        try:
            resident = cached_bytes(fd, 0, size)
        finally:
            os.close(fd)
        if resident is None or resident >= size:
            break
    return {"source_resident_mib": None if resident is None else resident >> 20,
            **{k.lower() + "_mib": v for k, v in _meminfo_mib("Dirty", "Writeback", "MemFree").items()}}


def bench_cached_api(d: Path, src: Path, size: int, repeat: int, rest: float = SETTLE) -> dict[str, Any]:
    """(e): the source in the page cache; kcopyd through its Python API, dd and a bare loop, each
    run from the same state (:func:`settle_for_run`), the tools' order reversed every round.
    dd's system CPU seconds are kept beside its times (where its time goes)."""
    dst = d / "dst-e.img"
    here = [PY, str(Path(__file__).resolve()), API_RUN]
    times: dict[str, list[float]] = {}
    sys_cpu: dict[str, list[float]] = {}
    states: list[dict[str, Any]] = []
    names = ["kcopyd", "cfr", "dd"]
    for round_ in range(WARMUP + repeat):
        for name in names if round_ % 2 == 0 else names[::-1]:
            state = settle_for_run(src, dst, size, rest)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            if name == "dd":
                t0 = time.perf_counter()
                subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=1M", "status=none"], check=True, env=ENV)
                secs = time.perf_counter() - t0
            else:
                out = subprocess.run(here + [name, str(src), str(dst), str(size)], check=True, env=ENV,
                                     stdout=subprocess.PIPE, text=True).stdout
                secs = float(out.strip().splitlines()[-1])
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if round_ >= WARMUP:
                times.setdefault(name, []).append(secs)
                sys_cpu.setdefault(name, []).append(after.ru_stime - before.ru_stime)
                states.append({"tool": name, **state})
    fresh(dst)()
    t = {k: statistics.median(v) for k, v in times.items()}
    resident = [s["source_resident_mib"] for s in states]
    return {"seconds": t, "runs": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "system_cpu_seconds": {k: round(statistics.median(v), 3) for k, v in sys_cpu.items()},
            "settle_seconds": rest, "source_resident_mib_min": min((r for r in resident if r is not None), default=None),
            "dirty_writeback_mib_max": max(s.get("dirty_mib", 0) + s.get("writeback_mib", 0) for s in states),
            "loadavg": _loadavg(), "ratio_vs_dd": t["dd"] / t["kcopyd"], "cfr_vs_dd": t["dd"] / t["cfr"]}


def _loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages now (others' load on a shared machine skews timings)."""
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """Run ``cmd``; return (peak RSS in bytes, seconds) from ``wait4``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd} exited with {proc.returncode}")
    return usage.ru_maxrss * 1024, time.perf_counter() - t0


def bench_rss(d: Path, size: int) -> dict[str, Any]:
    from dmtools import loop

    backing = d / "rss-backing.img"
    with open(backing, "wb") as f:
        f.truncate(size)
    dev = loop.attach(backing, read_only=True)
    out: dict[str, Any] = {}
    try:
        base, _ = peak_rss([PY, "-c", "import kcopyd, dmtools.blockdev, kcopyd.cli"])
        out["python_baseline_bytes"] = base
        for pages in (64, 1024):
            rss, secs = peak_rss(KCOPYD + ["--num-pages", str(pages), dev.path, "null:"])
            budget = 40 * 2**20 + pages * 4096
            out[str(pages)] = {"peak_rss_bytes": rss, "pages_bytes": pages * 4096, "budget_bytes": budget,
                               "within_budget": rss <= budget, "seconds": secs}
    finally:
        loop.detach(dev)
        backing.unlink()
    return out


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == API_RUN:  # one timed run of case (e), in a fresh process
        print(f"{api_run(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])):.6f}")
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="copy size for (a)-(c) (default 1G)")
    ap.add_argument("--rss-size", default="4G", help="copy size for (d) (default 4G)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool, median reported (default 3)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed rounds of every case before the timed ones (default 1)")
    ap.add_argument("--flush", action="store_true", help="include making the output durable")
    ap.add_argument("--dir", help="work directory (default: a temporary one under /var/tmp)")
    ap.add_argument("--only", default="abcde", help="which cases to run (default abcde)")
    add_settle_option(ap, "before every timed run of case (e)")
    ap.add_argument("--overwrite", action="store_true",
                    help="(c): overwrite existing destination files instead of fresh ones")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--nice", type=int, default=0,
                    help="scheduling priority change for the benchmark and every tool it runs "
                         "(negative needs root; use on a shared machine so others' load disturbs less)")
    args = ap.parse_args()
    if args.nice:
        os.nice(args.nice)
    global WARMUP
    WARMUP = max(0, args.warmup)
    size = parse_size(args.size, "b")
    rss_size = parse_size(args.rss_size, "b")
    root = os.geteuid() == 0
    workdir = Path(tempfile.mkdtemp(prefix="dmtt-bench-", dir=args.dir or "/var/tmp"))
    results: dict[str, Any] = {
        "size_bytes": size, "repeat": args.repeat, "warmup": WARMUP, "flush": args.flush, "nice": args.nice, "page_cache_dropped_at_start": drop_caches(),
        "cpus": os.cpu_count(), "kernel": os.uname().release,
        "command": " ".join(["python", "scripts/bench_copy.py"] + sys.argv[1:]),
    }
    try:
        compile_programs(workdir)
        src = workdir / "src.img"
        DATA_FILES.append(src)
        if set(args.only) & set("abce"):
            make_source(src, size)
        if "a" in args.only:
            results["a_file_to_file"] = bench_file_to_file(workdir, src, args.repeat, args.flush)
        if "b" in args.only:
            results["b_file_to_loop_direct"] = (
                bench_file_to_loop(workdir, src, size, args.repeat, args.flush) if root
                else {"skipped": "needs root for a loop device"})
        if "c" in args.only:
            results["c_one_to_three"] = bench_three_dests(workdir, src, args.repeat, args.flush, args.overwrite)
        if "e" in args.only:
            results["e_cached_api"] = bench_cached_api(workdir, src, size, args.repeat, args.settle)
        if "d" in args.only:
            results["d_peak_rss"] = (bench_rss(workdir, rss_size) if root
                                     else {"skipped": "needs root for a loop device"})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_report(results, size, rss_size)
    return 0


def fmt_ratio(case: dict[str, Any], key: str) -> str:
    """A case's ratio, end to end and without the interpreter's start-up."""
    return f"{case[key]:.2f}x end to end, {case[key + '_engine']:.2f}x without interpreter start-up"


def fmt_secs(t: dict[str, float], size: int) -> str:
    """Each tool's median seconds and throughput."""
    return ", ".join(f"{k} {v:.3f} s ({format_size(int(size / v))}/s)" for k, v in t.items())


def print_runs(case: dict[str, Any]) -> None:
    """Every run's seconds and the load average after them."""
    every = "; ".join(f"{k} {' '.join(f'{x:.2f}' for x in v)}" for k, v in case["runs"].items())
    print(f"    runs: {every}; load average after: {' '.join(map(str, case['loadavg']))}")


def print_report(r: dict[str, Any], size: int, rss_size: int) -> None:
    def secs(t: dict[str, float]) -> str:
        return fmt_secs(t, size)

    ratio, runs = fmt_ratio, print_runs
    print(f"kcopyd benchmark: {format_size(size)}, median of {r['repeat']} after {r['warmup']} untimed round(s), flush={r['flush']}, "
          f"data files evicted from the page cache before each run, {r['cpus']} CPUs, kernel {r['kernel']}")
    if "a_file_to_file" in r:
        a = r["a_file_to_file"]
        print(f"(a) file->file: {secs(a['seconds'])}")
        print(f"    kcopyd vs dd bs=1M: {ratio(a, 'ratio_vs_dd')}"
              + (f"; vs nbdcopy: {ratio(a, 'ratio_vs_nbdcopy')}" if "ratio_vs_nbdcopy" in a else ""))
        runs(a)
    if "b_file_to_loop_direct" in r:
        b = r["b_file_to_loop_direct"]
        if "skipped" in b:
            print(f"(b) skipped: {b['skipped']}")
        else:
            print(f"(b) file->loop: {secs(b['seconds'])}")
            print(f"    kcopyd vs dd oflag=direct: {ratio(b, 'ratio_vs_dd_direct')}")
            runs(b)
    if "c_one_to_three" in r:
        c = r["c_one_to_three"]
        print(f"(c) 1->3{' (overwriting)' if c.get('overwrite') else ''}: {secs(c['seconds'])}")
        print(f"    kcopyd vs three sequential dd: {ratio(c, 'ratio_vs_3dd')}")
        print(f"    kcopyd vs three parallel dd: {ratio(c, 'ratio_vs_3dd_parallel')}")
        print(f"    kcopyd vs tee into three files: {ratio(c, 'ratio_vs_tee')}")
        runs(c)
    if "e_cached_api" in r:
        e = r["e_cached_api"]
        print(f"(e) file->file, source in the page cache, Python API (client created and destroyed inside "
              f"the timing): {secs(e['seconds'])}")
        print(f"    kcopyd vs dd bs=1M: {e['ratio_vs_dd']:.2f}x (goal >= 1.0x); bare copy_file_range loop vs dd: "
              f"{e['cfr_vs_dd']:.2f}x")
        print(f"    every run from one state: destination removed, sync, Dirty+Writeback <= "
              f"{e['dirty_writeback_mib_max']} MiB, {e['settle_seconds']:g} s of rest"
              f"{' (freed memory reported to the host)' if e['settle_seconds'] > 2 else ''}, source resident (min {e['source_resident_mib_min']} MiB of "
              f"{format_size(size)}), tools' order reversed every round")
        print(f"    median system CPU s: " + ", ".join(f"{k} {v:.2f}" for k, v in e["system_cpu_seconds"].items()))
        runs(e)
    if "d_peak_rss" in r:
        d = r["d_peak_rss"]
        if "skipped" in d:
            print(f"(d) skipped: {d['skipped']}")
        else:
            print(f"(d) peak RSS, {format_size(rss_size)} copy (python baseline "
                  f"{format_size(d['python_baseline_bytes'])}):")
            for pages in ("64", "1024"):
                e = d[pages]
                print(f"    num_pages {pages}: {format_size(e['peak_rss_bytes'])} "
                      f"(budget {format_size(e['budget_bytes'])}: {'ok' if e['within_budget'] else 'OVER'}, "
                      f"{e['seconds']:.2f} s)")


if __name__ == "__main__":
    sys.exit(main())
