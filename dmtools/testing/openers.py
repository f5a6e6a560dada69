"""Another process holding a device open: a user who keeps it, or a passing probe (udev's blkid).

``Opener(path, hold=None)`` starts a Python child that opens ``path`` read-only and says so; the
constructor returns once the device is open. With ``hold`` seconds the child closes it by itself
after that long (a transient opener); without, it holds it until :meth:`close`.
"""

from __future__ import annotations

import select
import subprocess
import sys

_CHILD = (
    "import os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
    "print('open', flush=True)\n"
    "hold = float(sys.argv[2])\n"
    "time.sleep(hold) if hold >= 0 else sys.stdin.read()\n"
    "os.close(fd)\n"
)

#: How long the child may take to start and open the device.
START_LIMIT = 30.0


class Opener:
    """A child process holding ``path`` open (``hold`` seconds, or until :meth:`close`)."""

    def __init__(self, path: str, hold: float | None = None) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, path, str(-1.0 if hold is None else hold)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_LIMIT)
        line = self.proc.stdout.readline() if ready else b""
        if line != b"open\n":
            self.close()
            raise RuntimeError(f"the opener of {path} did not open it: {line!r}")

    def close(self) -> int:
        """Let go of the device (if still held) and return the child's exit status."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=START_LIMIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()

    def __enter__(self) -> "Opener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
