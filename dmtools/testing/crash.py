"""Crash tests: run a child that prints ``ready`` then ``ack N`` after each operation N, SIGKILL it
at a random moment after a chosen number of acks, and report how many operations it acknowledged."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["kill_after_acks"]

#: the source tree, put on the child's PYTHONPATH.
ROOT = Path(__file__).resolve().parents[2]


def _read_line(proc: "subprocess.Popen[str]", timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError("the child did not answer")
    return proc.stdout.readline().strip()


def kill_after_acks(script: Path, args: list[str], rng: random.Random, max_acks: int) -> int:
    """Run ``python script *args``, wait for ``rng.randrange(max_acks)`` acks (or ``done``), wait
    up to 4 ms more, SIGKILL it; returns the number of operations acknowledged (the highest
    ``ack N`` seen, plus one), counting lines it printed before the kill."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True, env=env)
    acked = -1
    try:
        assert _read_line(proc, 120) == "ready"
        target = rng.randrange(0, max_acks)
        while acked < target:
            line = _read_line(proc, 120)
            if line == "done":
                break
            acked = int(line.split()[1])
        time.sleep(rng.random() * 0.004)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.stdout is not None
        out = proc.stdout.read()  # includes lines already buffered by readline
        proc.stdout.close()
    for word in out.split():
        if word.isdigit():
            acked = max(acked, int(word))
    return acked + 1
