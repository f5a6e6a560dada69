"""Shared pieces of the benchmarks: fio as an external load generator, runs in the VM, the load,
the rest before a timed run (``settle``).

fio (Debian's package) is the peer every data-path benchmark runs beside dd: the same jobs go
against the userspace engine's exposed devices here and against the kernel's targets in the VM, so
the two ratios can be printed side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: The fio jobs of the issue: sequential 1 MiB and random 4 KiB, queue depth 1 and 16, direct I/O.
FIO_JOBS: tuple[tuple[str, str, int], ...] = (
    ("seq1m_qd1", "1M", 1),
    ("seq1m_qd16", "1M", 16),
    ("rand4k_qd1", "4k", 1),
    ("rand4k_qd16", "4k", 16),
)


@dataclass(frozen=True)
class FioResult:
    """One fio job's outcome: bytes per second and I/O operations per second."""

    bw: float
    iops: float

    @property
    def mib_s(self) -> float:
        """Throughput in MiB/s."""
        return self.bw / 2**20


def fio_available() -> str | None:
    """``None`` when fio can run here, else why not (it is installed by ``scripts/setup-env``)."""
    return None if shutil.which("fio") else "fio is not installed (apt-get install fio)"


def fio(path: str | os.PathLike[str], *, write: bool, bs: str, iodepth: int, size: int, random: bool | None = None,
        runtime: float | None = None, engine: str = "libaio", seed: int = 7) -> FioResult:
    """Run one fio job on ``path`` (a block device or an existing file) and return its rate.

    ``random`` defaults to random offsets for blocks under 1 MiB. With ``runtime`` the job is time
    based (and stops early when ``size`` has been covered once for sequential jobs); random jobs
    use a fixed seed and ``norandommap`` off, so every block is written once at most: first writes
    stay first writes. Writes end with an ``fsync``, so the rate includes making them durable.
    """
    rnd = (bs.lower() != "1m") if random is None else random
    cmd = [
        "fio", "--name=job", f"--filename={os.fspath(path)}", f"--rw={'rand' if rnd else ''}{'write' if write else 'read'}",
        f"--bs={bs}", f"--iodepth={iodepth}", f"--ioengine={engine}", "--direct=1", f"--size={size}",
        "--output-format=json", f"--randseed={seed}", "--invalidate=1", "--group_reporting=1",
    ]
    if write:
        cmd.append("--end_fsync=1")
    if runtime is not None:
        cmd.append(f"--runtime={runtime}")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"fio failed on {path}: {(res.stderr or res.stdout).strip()[-400:]}")
    out = json.loads(res.stdout[res.stdout.find("{"):])
    side = out["jobs"][0]["write" if write else "read"]
    return FioResult(bw=float(side["bw_bytes"]), iops=float(side["iops"]))


def in_vm(script: str | os.PathLike[str], args: list[str], modules: tuple[str, ...] = (),
          scratch: int = 0) -> dict[str, Any] | str:
    """Run ``script args`` with the project's interpreter in the VM (``scripts/vmtest --exec``).

    The script prints one JSON object; it is returned, or a sentence saying why the run failed.
    ``scratch`` (bytes): the VM's ``/tmp`` is a tmpfs of half its memory (1.5 GiB), too small for
    big backing files, so the run gets a disk of that size for its temporary files instead: a
    sparse file here (only what the run writes takes room), attached as the VM's virtio disk,
    formatted ext4 there and mounted as ``TMPDIR``; removed afterwards.
    """
    mods = "".join(f"modprobe {m} && " for m in modules)
    quoted = " ".join(shlex.quote(a) for a in [sys.executable, os.fspath(script), *args])
    env = dict(os.environ)
    disk = None
    if scratch:
        fd, disk = tempfile.mkstemp(prefix="dmtools-vm-scratch-", suffix=".img")
        os.ftruncate(fd, scratch)
        os.close(fd)
        env["DMTOOLS_VM_DISKS"] = disk
        mnt = "/tmp/dmtools-scratch"
        mods = (f"mkfs.ext4 -q -F /dev/vda && mkdir -p {mnt} && mount /dev/vda {mnt} && export TMPDIR={mnt} && "
                + mods)
    try:
        res = subprocess.run([str(ROOT / "scripts" / "vmtest"), "--exec", mods + quoted],
                             capture_output=True, text=True, check=False, env=env)
    finally:
        if disk is not None:
            os.unlink(disk)
    text = res.stdout
    start = text.find("{")
    if res.returncode != 0 or start < 0:
        last = (res.stderr or text).strip().splitlines()[-1:]
        return f"the VM run failed ({res.returncode}): {last}"
    value, _ = json.JSONDecoder().raw_decode(text[start:])
    return dict(value)


def loadavg() -> float:
    """The one-minute load average (print it with every result: busy CPUs lower the ratios)."""
    return os.getloadavg()[0]


def drop_caches() -> None:
    """Write back and drop the page cache (root only; silently nothing otherwise)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


#: Seconds of rest before a timed run, after whatever freed memory just before it (a cache
#: eviction, the previous run's files removed, a VM's QEMU exiting): longer than the 2 s after
#: which virtio-balloon free page reporting hands freed memory back to the host
#: (mm/page_reporting.c ``PAGE_REPORTING_DELAY``). Memory freed less than that ago is cheap to
#: fault in again and memory already reported is not, so without the rest a run's cost depends
#: on what ran just before it: nbdcopy's system time was 0.57 s right after an eviction and
#: 1.0-1.55 s after 4 s of rest (``scripts/bench nbd``). This machine's page reporting
#: (``/sys/module/page_reporting/parameters/reported_kib``) reported most of a 3 GiB VM's memory
#: 2-6 s after its QEMU exited (786, 348 and 102 MiB in successive 2 s samples).
SETTLE = 3.0


def settle(seconds: float = SETTLE) -> None:
    """Rest ``seconds`` (``--settle``, default :data:`SETTLE`) so that the memory freed before
    the next timed run has been handed back to the host, as for every other run."""
    if seconds > 0:
        time.sleep(seconds)


def add_settle_option(parser: argparse.ArgumentParser, when: str, default: float = SETTLE) -> None:
    """``--settle SECONDS``: the rest of :func:`settle`, taken ``when`` (words for the help)."""
    parser.add_argument("--settle", type=float, default=default,
                        help=f"seconds of rest {when} (default {default:g}; free page reporting hands "
                             "freed memory back to the host after 2 s)")
