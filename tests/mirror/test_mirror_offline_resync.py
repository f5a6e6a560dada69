"""Offline resync from a disk log: plans, ordering, bad input and crashes at random moments."""

from __future__ import annotations

import os
import random

import pytest

from dmtools.errors import CorruptMetadata, InvalidArgument
from dmtools.testing.memory import MemoryEndpoint
from mirror.format import LogImage, format_log
from mirror.resync import OfflineResync
from mirror_memdev import CrashEndpoint, PowerCut

REGION = 8  # 4 KiB regions


def _legs(n: int, size: int, seed: int = 1) -> list[MemoryEndpoint]:
    rnd = random.Random(seed)
    legs = [MemoryEndpoint(size, f"leg{i}") for i in range(n)]
    legs[0].data[:] = rnd.randbytes(size)
    return legs


def test_copies_only_out_of_sync_regions_and_marks_them_clean() -> None:
    legs = _legs(3, 64 * 4096)
    log = MemoryEndpoint(8192, "log")
    img = format_log(log, 64, in_sync=True)
    for r in (1, 2, 40):
        img.clean.clear(r)
    img.write(log)
    rs = OfflineResync(legs, log, region_size=REGION)
    assert rs.plan.regions == [1, 2, 40]
    res = rs.run()
    assert res.ok and res.regions_copied == 3 and res.bytes_copied == 3 * 4096
    for leg in legs[1:]:
        for r in range(64):
            same = leg.data[r * 4096 : (r + 1) * 4096] == legs[0].data[r * 4096 : (r + 1) * 4096]
            assert same == (r in (1, 2, 40))
    assert LogImage.read(log).out_of_sync() == []


def test_clean_log_means_nothing_written() -> None:
    legs = _legs(2, 16 * 4096)
    log = MemoryEndpoint(8192, "log")
    format_log(log, 16, in_sync=True)
    journal_before = [len(e.journal) for e in (*legs, log)]
    res = OfflineResync(legs, log, region_size=REGION).run()
    assert res.ok and res.regions_copied == 0
    assert [len(e.journal) for e in (*legs, log)] == journal_before


def test_rebuild_copies_every_region_to_one_leg_only() -> None:
    legs = _legs(3, 16 * 4096)
    legs[1].data[:] = legs[0].data
    log = MemoryEndpoint(8192, "log")
    img = format_log(log, 16, in_sync=True)
    img.clean.clear(5)
    img.write(log)
    res = OfflineResync(legs, log, region_size=REGION, rebuild=2).run()
    assert res.ok and res.regions_copied == 16
    assert legs[2].data == legs[0].data == legs[1].data
    assert [j for j in legs[1].journal if j[0] == "write"] == [("write", "leg1", 5 * 4096, 4096)]


def test_progress_reports_bytes() -> None:
    legs = _legs(2, 32 * 4096)
    seen: list[tuple[int, int]] = []
    res = OfflineResync(legs, None, region_size=REGION).run(progress=lambda d, t: seen.append((d, t)))
    assert res.ok and seen[-1] == (32 * 4096, 32 * 4096)
    assert legs[1].data == legs[0].data


def test_failed_copy_leaves_region_out_of_sync() -> None:
    legs = _legs(2, 16 * 4096)
    log = MemoryEndpoint(8192, "log")
    format_log(log, 16, in_sync=False)
    legs[1].fail_writes = True
    res = OfflineResync(legs, log, region_size=REGION).run()
    assert not res.ok and res.failed_legs == {1} and len(res.failed_regions) == 16
    assert LogImage.read(log).out_of_sync() == list(range(16))


@pytest.mark.parametrize(
    "setup, exc, text",
    [
        ("differ", InvalidArgument, "differ in size"),
        ("region", InvalidArgument, "power of two"),
        ("small", InvalidArgument, "too small"),
        ("corrupt", CorruptMetadata, "magic"),
        ("one-leg", InvalidArgument, "2 to 9 legs"),
        ("regions", InvalidArgument, "log holds 4 regions"),  # made with another region size
    ],
)
def test_bad_input_writes_nothing(setup: str, exc: type, text: str) -> None:
    legs = _legs(2, 16 * 4096)
    log = MemoryEndpoint(8192, "log")
    format_log(log, 16, in_sync=False)
    region = REGION
    if setup == "differ":
        legs[1] = MemoryEndpoint(15 * 4096, "leg1")
    elif setup == "region":
        region = 12
    elif setup == "small":
        log = MemoryEndpoint(1024, "log")
    elif setup == "corrupt":
        log.data[0:4] = b"junk"
    elif setup == "one-leg":
        legs = legs[:1]
    elif setup == "regions":
        format_log(log, 4, in_sync=False)
    snap = [bytes(e.data) for e in (*legs, log)]
    journals = [len(e.journal) for e in (*legs, log)]
    with pytest.raises(exc, match=text):
        OfflineResync(legs, log, region_size=region).run()
    assert [bytes(e.data) for e in (*legs, log)] == snap
    assert [len(e.journal) for e in (*legs, log)] == journals


def _regions_identical(legs: list[MemoryEndpoint], r: int, size: int) -> bool:
    a = legs[0].data[r * size : (r + 1) * size]
    return all(leg.data[r * size : (r + 1) * size] == a for leg in legs[1:])


@pytest.mark.parametrize("seed", range(120))
def test_crash_at_a_random_moment_then_resume(seed: int) -> None:
    """Power cut after a random number of I/O operations during a resync, then resume.

    After the crash no region may be marked clean unless every leg holds the same data in it
    (the 2006 dm-mirror silent corruption: a region marked in sync before its copy finished);
    after resuming from the log the legs are identical.
    """
    rng = random.Random(seed)
    nreg, size = 16, 4096
    power = PowerCut(rng.randrange(0, 60), rng)
    legs = [CrashEndpoint(nreg * size, f"leg{i}", power) for i in range(rng.choice((2, 3)))]
    log = CrashEndpoint(8192, "log", power)
    base = rng.randbytes(nreg * size)
    for leg in legs:
        leg.data[:] = leg.flushed[:] = base
    img = LogImage.new(nreg, in_sync=True)
    for r in rng.sample(range(nreg), rng.randrange(1, nreg + 1)):
        img.clean.clear(r)
        for leg in legs[1:]:  # out of sync: the other legs hold something else there
            leg.data[r * size : (r + 1) * size] = leg.flushed[r * size : (r + 1) * size] = rng.randbytes(size)
    log.data[: img.io_bytes] = img.pack()
    log.flushed[:] = log.data
    OfflineResync(legs, log, region_size=REGION, in_flight=rng.choice((1, 2, 4)), commit_interval=0.0,
                  job_bytes=rng.choice((4096, 8192, 1 << 20))).run()
    after = [leg.after_crash() for leg in legs]
    alog = log.after_crash()
    crashed = LogImage.read(alog)
    for r in range(nreg):
        if crashed.clean.test(r):
            assert _regions_identical(after, r, size), f"region {r} marked clean but legs differ"
    res = OfflineResync(after, alog, region_size=REGION).run()
    assert res.ok
    assert all(leg.data == after[0].data for leg in after[1:])
    assert LogImage.read(alog).out_of_sync() == []
    assert after[0].data == legs[0].flushed  # the source leg is never written


def test_random_seed_space_covers_cuts_inside_copies() -> None:
    # The crash test must hit cuts before, during and after the copies: check the op count range.
    legs = [MemoryEndpoint(16 * 4096, f"leg{i}") for i in range(2)]
    legs[0].data[:] = os.urandom(16 * 4096)
    log = MemoryEndpoint(8192, "log")
    format_log(log, 16, in_sync=False)
    log.journal.clear()
    OfflineResync(legs, log, region_size=REGION, commit_interval=0.0, job_bytes=4096).run()
    ops = len(legs[1].journal) + len(legs[0].journal) + len(log.journal)
    assert 16 < ops < 60


def test_regions_marked_dirty_on_the_log_before_any_copy() -> None:
    journal: list[tuple[str, str, int, int]] = []
    legs = [MemoryEndpoint(16 * 4096, f"leg{i}", journal) for i in range(3)]
    log = MemoryEndpoint(8192, "log", journal)
    format_log(log, 16, in_sync=True)
    journal.clear()
    OfflineResync(legs, log, region_size=REGION, rebuild=2, commit_interval=0.0).run()
    ops = [f"{op} {dev}" for op, dev, _o, _n in journal]
    assert ops[:2] == ["write log", "flush log"]
    first_leg_write = ops.index("write leg2")
    assert LogImage.read(log).out_of_sync() == []
    # every clean-bit write is preceded by a flush of the legs since the last leg write
    for i, op in enumerate(ops):
        if op == "write log" and i > 0:
            last_write = max((j for j in range(i) if ops[j].startswith("write leg")), default=-1)
            if last_write > first_leg_write:
                assert "flush leg2" in ops[last_write:i]


def test_adjacent_regions_are_copied_in_one_job() -> None:
    legs = _legs(2, 64 * 4096)
    log = MemoryEndpoint(8192, "log")
    img = format_log(log, 64, in_sync=True)
    for r in (1, 2, 3, 10, 11, 40):
        img.clean.clear(r)
    img.write(log)
    rs = OfflineResync(legs, log, region_size=REGION, job_bytes=8192)
    assert rs._runs() == [(1, 2, (1,)), (3, 1, (1,)), (10, 2, (1,)), (40, 1, (1,))]
    assert rs.run().ok and legs[1].data[4096 : 4 * 4096] == legs[0].data[4096 : 4 * 4096]


@pytest.mark.parametrize("delay", [0.15, 0.3, 0.5])
def test_cli_resync_killed_then_rerun_resumes_from_the_log(tmp_path, delay: float) -> None:  # type: ignore[no-untyped-def]
    """A real process kill (SIGKILL) in the middle of ``dmtools mirror resync-offline``: the rerun
    copies only what the log still has out of sync, and the legs end identical."""
    import signal
    import subprocess
    import sys
    import time as _time
    from pathlib import Path

    size, nreg = 4 << 20, 64  # 64 regions of 64 KiB, at 1 MiB/s: about 4 s if not killed
    a, b, lg = tmp_path / "a", tmp_path / "b", tmp_path / "log"
    a.write_bytes(os.urandom(size))
    b.write_bytes(bytes(size))
    ep = MemoryEndpoint(64 * 1024, "log")
    format_log(ep, nreg, in_sync=False)
    lg.write_bytes(bytes(ep.data))
    cmd = [sys.executable, "-m", "dmtools.cli.main", "mirror", "resync-offline", str(a), str(b),
           "--log", str(lg), "--region-size", "64K", "--rate", "1M", "-q"]
    def out_of_sync() -> list[int]:
        with open(lg, "rb") as f:
            return LogImage.read(MemoryEndpoint(f.read(), "file")).out_of_sync()

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = _time.monotonic() + 20
    while len(out_of_sync()) == nreg and _time.monotonic() < deadline:  # until the first commit
        _time.sleep(0.01)
    _time.sleep(delay / 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    left = out_of_sync()
    assert 0 < len(left) < nreg  # killed in the middle of the copy
    for r in range(nreg):
        if r not in left:  # marked in sync: the copy finished and reached the leg
            assert b.read_bytes()[r * 65536 : (r + 1) * 65536] == a.read_bytes()[r * 65536 : (r + 1) * 65536]
    done = subprocess.run(cmd[:-3] + ["--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    import json

    assert json.loads(done.stdout)["regions_copied"] == len(left)
    assert Path(a).read_bytes() == Path(b).read_bytes()
