"""Root tier: ``dmtools monitor`` processes killed with SIGKILL at random points while a writer fills
a snapshot and devices come and get suspended on the userspace engine's daemon, one after the other
until the snapshot is full. The events in the monitor's ``--output`` file, over all its runs, are the
expected ones, each once, numbered 1..N."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmtools.engine.client import UserspaceClient, start_daemon
from dmtools.testing.daemon import stop_daemon
from snapshot.manager import SnapshotManager


pytestmark = pytest.mark.root

MIN_RUNS = 30  # killed monitors at least (a fast machine kills more while the snapshot fills)
MAX_RUNS = 1000  # against a producer that hangs
CHUNK = 4096
STOP_AT = 97  # percent: the writer stops before the COW fills (an invalid snapshot hides thresholds)
WARN = ",".join(str(t) for t in range(1, 100))


class Producer(threading.Thread):
    """Writes one chunk to the origin every ``pace`` seconds (one more COW chunk used); with every
    third write a new zero device ``zN`` appears and ``zN-1`` is suspended."""

    def __init__(self, run_dir: str, pace: float) -> None:
        super().__init__(daemon=True)
        self.client = UserspaceClient(run_dir)
        self.pace = pace
        self.stop = threading.Event()
        self.devices: list[str] = []
        self.error: BaseException | None = None

    def used(self) -> float:
        used, total = self.client.status("s-dmtt")[0].params.split()[0].split("/")
        return int(used) * 100 / int(total)

    def run(self) -> None:
        try:
            with self.client.open_endpoint("o-dmtt") as ep:
                n = 0
                while not self.stop.wait(self.pace) and self.used() < STOP_AT:
                    ep.write(bytes([n % 251 + 1]) * CHUNK, n * CHUNK)
                    ep.flush()  # past the page cache of an exposed device: into the COW now
                    if n % 3 == 0:
                        name = f"z{len(self.devices):03d}-dmtt"
                        self.client.create(name, "0 8 zero")
                        if self.devices:
                            self.client.suspend(self.devices[-1])
                        self.devices.append(name)
                    n += 1
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err


def monitor(run_dir: str, tmp_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, DMTOOLS_RUN_DIR=run_dir)
    cmd = [sys.executable, "-m", "dmtools.cli.main", "--backend", "userspace", "monitor",
           "--output", str(tmp_path / "events.jsonl"), "--state-dir", str(tmp_path / "state"),
           f"--warn={WARN}", "--interval", "0.05", "--no-uevents", *extra]
    log = open(tmp_path / "monitor.log", "ab")
    try:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    finally:
        log.close()


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def test_sigkill_at_random_points_loses_and_repeats_nothing(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    rng = random.Random(int(os.environ.get("DMTOOLS_TEST_SEED", "7")))
    run_dir = str(tmp_path / "run")
    start_daemon(run_dir)
    client = UserspaceClient(run_dir)
    out = tmp_path / "events.jsonl"
    producer = Producer(run_dir, pace=0.15)
    try:
        client.create("o-dmtt", f"0 {(8 << 20) // 512} linear {make_image(8 << 20, name='origin')} 0")
        SnapshotManager(client).create("o-dmtt", str(make_image(512 << 10, name="cow")), "s-dmtt", chunk_size=CHUNK // 512)
        producer.start()
        grew = runs = live = 0  # live: runs started while the producer still changed devices
        # Until the producer is done: a monitor started after it would have nothing to write.
        while (producer.is_alive() or runs < MIN_RUNS) and runs < MAX_RUNS:
            run, runs = runs, runs + 1
            live += producer.is_alive()
            before = size(out)
            proc = monitor(run_dir, tmp_path)
            if run % 2:  # just after the output grew: in the middle of a batch's events
                # The producer changes a device every 0.15 s, so a monitor always has events to
                # write once it is up; its start-up takes seconds on a loaded machine, so the bound
                # is only against a hang (the growth is asserted through ``grew`` below).
                deadline = time.monotonic() + 60
                while size(out) == before and time.monotonic() < deadline and proc.poll() is None \
                        and producer.is_alive():
                    time.sleep(0.002)
                time.sleep(rng.uniform(0, 0.01))
            else:  # anywhere: starting, catching up, waiting, scanning, writing
                time.sleep(rng.uniform(0, 0.8))
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL, (tmp_path / "monitor.log").read_text()[-2000:]
            grew += size(out) > before
        producer.stop.set()
        producer.join(timeout=30)
        assert producer.error is None, producer.error
        final = monitor(run_dir, tmp_path, "--once")
        assert final.wait(timeout=60) == 0, (tmp_path / "monitor.log").read_text()[-2000:]
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        again = monitor(run_dir, tmp_path, "--once")  # nothing new: nothing written
        assert again.wait(timeout=60) == 0 and len(out.read_text().splitlines()) == len(lines)

        assert [x["seq"] for x in lines] == list(range(1, len(lines) + 1))
        by_device: dict[str, list[Any]] = {}
        for x in lines:
            by_device.setdefault(x["device"], []).append(x)
        used = producer.used()
        expected: dict[str, list[Any]] = {
            "o-dmtt": ["device-added"], "o-dmtt-real": ["device-added"],
            "s-dmtt-cow": ["device-added"],
            "s-dmtt": ["device-added"] + [("snapshot-usage", t) for t in range(1, 100) if t <= used],
        }
        seen = {name: [x["event"] if x["event"] != "snapshot-usage" else (x["event"], x["threshold"])
                       for x in events] for name, events in by_device.items()}
        for name in producer.devices:
            # ``create`` with a table is load + resume, and the resume suspends the device around the
            # swap of its first table (the kernel's do_resume too): a scan in that window sees it
            # suspended, or suspended with no table yet, or (earlier) without a table; the next one
            # sees it resumed. That is a real suspend, seen or not by chance: either is right.
            got = seen.get(name, [])
            activation = next((a for a in (["device-suspended", "device-resumed"], ["device-resumed"])
                               if got[1 : 1 + len(a)] == a), [])
            expected[name] = ["device-added", *activation] + (["device-suspended"] if client.info(name).suspended else [])
        assert seen == expected
        assert len(producer.devices) > 15 and used >= STOP_AT and grew > live // 3
        print(f"{len(lines)} events over {runs} killed runs ({grew} of them wrote some)")
    finally:
        producer.stop.set()
        producer.join(timeout=30)
        producer.client.close()
        stop_daemon(client)
