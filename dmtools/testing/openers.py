"""Another process holding a device open: a user who keeps it, or a passing probe (udev's blkid).

``Opener(path)`` starts a Python child that opens ``path`` read-only and says so; the constructor
returns once the device is open, and the child holds it until :meth:`close` (a test makes a
passing probe by calling ``close`` from a timer once the operation under test has started).
"""

from __future__ import annotations

import select
import subprocess
import sys

_CHILD = (
    "import os, sys\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
    "print('open', flush=True)\n"
    "sys.stdin.read()\n"
    "os.close(fd)\n"
)

#: How long the child may take to start and open the device (a loaded VM under TCG is slow).
START_LIMIT = 120.0


class Opener:
    """A child process holding ``path`` open until :meth:`close`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stderr = ""
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_LIMIT)
        line = self.proc.stdout.readline() if ready else b""
        if line != b"open\n":
            if not ready:
                self.proc.kill()
            status = self.close()
            raise RuntimeError(f"the opener of {path} did not open it (exit status {status}, "
                               f"{'no answer' if not ready else line!r}): {self._stderr.strip()!r}")

    def close(self) -> int:
        """Let go of the device and return the child's exit status (0: it held and closed it)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=START_LIMIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            if self.proc.stderr is not None and not self.proc.stderr.closed:
                self._stderr = self.proc.stderr.read().decode(errors="replace")[-500:]
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()

    def __enter__(self) -> "Opener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
