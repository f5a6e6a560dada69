"""Start-up cost of the command line, against dmsetup measured in the same run.

Run: ``scripts/bench startup [--runs N] [--json]``. Times ``dmtools --help`` and ``dmtools dm ls``
(the backend ``auto`` picks: the kernel where ``/dev/mapper/control`` works, else the userspace
engine's daemon, started once before timing), ``dmsetup ls``, and the bare interpreter
(``python -c pass``, the floor no Python command goes below; ``python -S -c pass`` beside it shows
what ``site`` adds, most of it pip's editable-install finder in a development environment). The
package's bytecode is compiled first, as an installed package has it (with
``PYTHONDONTWRITEBYTECODE`` set every run would compile the sources again). The commands run in
turns, so a machine busy with other work slows all of them alike. For each it prints the median and fastest
wall time, the median CPU time (user + system: what the command costs when the machine is idle),
the modules it imports, and the ratio to ``dmsetup ls``; the budget is 0.12 s per command.

Without ``/dev/mapper/control`` (a container, this project's CI host) ``dmsetup ls`` fails at once
("Failure to communicate with kernel device-mapper driver"); it is still timed, and the output says
so. Inside the VM (``scripts/vmtest --exec 'scripts/bench startup'``) both sides talk to the kernel.
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
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BUDGET = 0.12
#: The distribution's packages, compiled to bytecode before timing.
PACKAGES = ("dmtools", "kcopyd", "snapshot", "mirror", "thin")


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """``(wall s, cpu s, exit status, first line of stderr)`` of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode, (proc.stderr.strip().splitlines() or [""])[0]


def _modules(cmd: list[str], env: dict[str, str]) -> int:
    """How many modules ``cmd`` (a Python program) imports, from ``-X importtime``'s report."""
    proc = subprocess.run(cmd, env=dict(env, PYTHONPROFILEIMPORTTIME="1"), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    return sum(1 for line in proc.stderr.splitlines() if line.startswith("import time:")) - 1


@dataclass
class Timing:
    """One command's runs."""

    exit: int
    stderr: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    modules: int | None = None

    def summary(self) -> dict[str, object]:
        return {"exit": self.exit, "stderr": self.stderr, "modules": self.modules,
                "wall_median": statistics.median(self.wall), "wall_min": min(self.wall),
                "cpu_median": statistics.median(self.cpu)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=21, help="timed runs of each command (default 21)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    dmtools = str(BIN / "dmtools")
    dmsetup = shutil.which("dmsetup")
    env = dict(os.environ)
    subprocess.run([sys.executable, "-m", "compileall", "-q", *(str(REPO / p) for p in PACKAGES)],
                   env=env, stdout=subprocess.DEVNULL, check=True)
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -S -c pass": [sys.executable, "-S", "-c", "pass"],
        "dmtools --help": [dmtools, "--help"],
        "dmtools dm ls": [dmtools, "dm", "ls"],
    }
    if dmsetup:
        commands["dmsetup ls"] = [dmsetup, "ls"]
    # libdevmapper makes /dev/mapper/control when it is missing (as root); on a host without
    # device-mapper that node would then make the host look as if it had one: remove it after.
    control = "/dev/mapper/control"
    had_control = os.path.exists(control)
    # On the userspace engine dm ls talks to the daemon: start it before timing, stop it after.
    started_daemon = subprocess.run([dmtools, "daemon", "status"], env=env, stdout=subprocess.DEVNULL).returncode != 0
    timings: dict[str, Timing] = {}
    try:
        for name, cmd in commands.items():  # warm-up (caches, the daemon), not timed
            _wall, _cpu, rc, err = _run(cmd, env)
            timings[name] = Timing(rc, err)
        for _ in range(args.runs):
            for name, cmd in commands.items():
                wall, cpu, _rc, _err = _run(cmd, env)
                timings[name].wall.append(wall)
                timings[name].cpu.append(cpu)
        for name, cmd in commands.items():
            if name != "dmsetup ls":
                timings[name].modules = _modules(cmd, env)
    finally:
        if started_daemon:
            subprocess.run([dmtools, "daemon", "stop", "--force"], env=env, stdout=subprocess.DEVNULL)
        if not had_control and os.path.exists(control):
            os.unlink(control)
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"results": {n: t.summary() for n, t in timings.items()}, "budget": BUDGET,
                          "runs": args.runs, "load": load, "cpus": os.cpu_count()}, indent=2))
        return 0
    peer = timings.get("dmsetup ls")
    print(f"start-up, {args.runs} runs each in turns (load average {load:.1f} on {os.cpu_count()} CPUs)")
    print(f"{'command':16} {'wall median':>12} {'wall min':>9} {'cpu median':>11} {'modules':>8}  vs dmsetup ls")
    for name, t in timings.items():
        wall, cpu = statistics.median(t.wall), statistics.median(t.cpu)
        ratio = ""
        if peer is not None and t is not peer:
            ratio = (f"{wall / statistics.median(peer.wall):.0f}x wall, "
                     f"{cpu / max(statistics.median(peer.cpu), 1e-4):.0f}x cpu")
        modules = "-" if t.modules is None else str(t.modules)
        print(f"{name:16} {wall * 1000:10.1f}ms {min(t.wall) * 1000:7.1f}ms {cpu * 1000:9.1f}ms "
              f"{modules:>8}  {ratio}")
    for name in ("dmtools --help", "dmtools dm ls"):
        t = timings[name]
        cpu = statistics.median(t.cpu)
        verdict = "within" if cpu <= BUDGET else "over"
        print(f"{name}: {cpu * 1000:.0f} ms CPU, {verdict} the {BUDGET:.2f} s budget (exit {t.exit})")
    if peer is not None and peer.exit != 0:
        print(f"dmsetup ls exited {peer.exit} ({peer.stderr}): no kernel device-mapper here, so it fails "
              "fast; for a like-for-like peer run it in the VM: scripts/vmtest --exec 'scripts/bench startup'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
