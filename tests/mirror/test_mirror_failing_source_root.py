"""Root tier: ``dmtools mirror repair`` run as a command against the daemon, on loop devices, while
the source leg's table is replaced by ``error`` at a seeded moment. The exit status tells the truth
(0 only with every region copied; 1 with a one-line error and the regions in ``--json``), and
every read of the exposed mirror (O_DIRECT, a real block device) returns the data or EIO."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from dmtools.blockdev import BlockDevice, aligned_buffer
from dmtools.errors import DeviceIOError

pytestmark = pytest.mark.root

SIZE = 4 << 20
SECTORS = SIZE // 512
RB = 64 << 10  # --region-size 64K
NR = SIZE // RB
RUNS = 4


def dmt(run_dir: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DMTOOLS_RUN_DIR=run_dir)
    return subprocess.run([sys.executable, "-m", "dmtools.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def ok(run_dir: str, *args: str) -> str:
    res = dmt(run_dir, *args)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _reads(path: str) -> list[bytes | None]:
    out: list[bytes | None] = []
    with BlockDevice(path, direct=True) as dev:
        for r in range(NR):
            buf = aligned_buffer(RB)
            try:
                dev.readinto(buf, r * RB)
            except DeviceIOError as err:
                assert err.errno == errno.EIO, err
                out.append(None)
                continue
            out.append(bytes(buf))
    return out


def test_repair_command_with_a_source_failing_at_random_moments(
        tmp_path: Path, make_image: Callable[..., Path], make_loop: Callable[..., Any]) -> None:
    run_dir = str(tmp_path / "run")
    os.mkdir(run_dir, 0o700)
    outcomes = []
    try:
        for seed in range(RUNS):
            rng = random.Random(seed)
            data = rng.randbytes(SIZE)
            a = make_image(SIZE, name=f"a{seed}")
            a.write_bytes(data)
            b = make_image(SIZE, name=f"b{seed}")
            b.write_bytes(data)
            c = make_image(SIZE, name=f"c{seed}")
            la, lb, lc = (make_loop(p).path for p in (a, b, c))
            src, m = f"src{seed}-dmtt", f"m{seed}-dmtt"
            ok(run_dir, "dm", "create", src, "--table", f"0 {SECTORS} linear {la} 0")
            ok(run_dir, "mirror", "create", m, f"{run_dir}/mapper/{src}", lb, "--nosync", "--region-size", "64K")
            repair = subprocess.Popen(
                [sys.executable, "-m", "dmtools.cli.main", "--json", "mirror", "repair", m, "1", lc,
                 "--rate", "4M", "-q"],
                env=dict(os.environ, DMTOOLS_RUN_DIR=run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
            time.sleep(rng.uniform(0.0, 1.6))  # the moment the source fails
            ok(run_dir, "dm", "load", src, "--table", f"0 {SECTORS} error")
            ok(run_dir, "dm", "suspend", src)
            ok(run_dir, "dm", "resume", src)
            out, err = repair.communicate(timeout=120)
            status = json.loads(ok(run_dir, "--json", "mirror", "status", m))[0]
            reads = _reads(f"{run_dir}/mapper/{m}")
            for r, got in enumerate(reads):
                assert got is None or got == data[r * RB:(r + 1) * RB], f"seed {seed} region {r}"
            if repair.returncode == 0:
                assert status["in_sync_regions"] == NR and None not in reads
                with open(lc, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    assert f.read() == data
            else:
                assert repair.returncode == 1, err
                assert err.count("\n") == 1 and "repair failed: could not read source leg 0" in err, err
                report = json.loads(out)
                assert report["failed_legs"] == [0] and report["failed_regions"]
                assert status["legs"][0]["health"] == "S"
                assert status["in_sync_regions"] == NR - len(report["failed_regions"])
            outcomes.append(repair.returncode)
            ok(run_dir, "mirror", "remove", m)
            ok(run_dir, "dm", "remove", src)
    finally:
        dmt(run_dir, "daemon", "stop", "--force")
    assert set(outcomes) <= {0, 1} and 1 in outcomes, outcomes
