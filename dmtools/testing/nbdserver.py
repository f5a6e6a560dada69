"""NBD servers for tests: nbdkit (with its filters) and qemu-nbd on private Unix sockets.

A server is started in the background and is ready when its call returns: nbdkit and qemu-nbd
fork once they listen (the parent waits for that), and the PID file they then write is how
:meth:`NbdServer.stop` kills them. Sockets live in a directory of the caller's (a test's
``tmp_path``), so nothing listens on TCP unless a test asks for it on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["NbdServer", "nbdkit", "qemu_nbd", "missing_tools", "serve_command"]

#: Seconds a server may take to start listening or to exit.
START_LIMIT = 20.0


def missing_tools(*tools: str) -> str | None:
    """A skip reason naming what is missing (libnbd's bindings, a server binary), or ``None``."""
    from dmtools.nbd import is_supported

    if not is_supported():
        return "needs libnbd's Python bindings (Debian python3-libnbd; run scripts/setup-env)"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"needs {tool} (installed by scripts/setup-env)"
    return None


class NbdServer:
    """A running server: ``uri`` to connect, ``pid``, ``stop()`` (idempotent) and ``kill()``."""

    def __init__(self, argv: list[str], socket: Path, pidfile: Path, export: str = "") -> None:
        self.argv = argv
        self.socket = socket
        self.pidfile = pidfile
        self.export = export
        self.uri = f"nbd+unix:///{export}?socket={socket}"
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=START_LIMIT, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed to start ({res.returncode}): {res.stderr.strip()}")
        deadline = time.monotonic() + START_LIMIT
        while True:
            try:
                text = pidfile.read_text().strip()
                if text:
                    self.pid = int(text)
                    break
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} wrote no PID file {pidfile}")
            time.sleep(0.01)
        self._stopped = False

    def alive(self) -> bool:
        """True while the server process exists."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        return state not in ("Z", "X")  # a zombie waits for whoever adopted it to reap it

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL: a server that dies) and wait until the process is gone."""
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + START_LIMIT
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the server and remove its socket (nbdkit leaves named sockets behind)."""
        if self._stopped:
            return
        self._stopped = True
        # SIGKILL: nbdkit takes a second or two to leave after SIGTERM, and the data of a test
        # server is either in its memory (thrown away) or already written to its file.
        self.kill(signal.SIGKILL)
        for path in (self.socket, self.pidfile):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "NbdServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def nbdkit(directory: Path, plugin_args: Sequence[str], *, filters: Sequence[str] = (),
           options: Sequence[str] = (), name: str = "nbdkit") -> NbdServer:
    """Start ``nbdkit [--filter=F …] [OPTIONS] PLUGIN ARGS…`` on ``directory/NAME.sock``."""
    sock = directory / f"{name}.sock"
    pidfile = directory / f"{name}.pid"
    argv = ["nbdkit", "-U", str(sock), "-P", str(pidfile)]
    argv += [f"--filter={f}" for f in filters]
    argv += list(options) + list(plugin_args)
    return NbdServer(argv, sock, pidfile)


def qemu_nbd(directory: Path, image: Path, *, options: Sequence[str] = (), fmt: str = "raw",
             name: str = "qemu-nbd") -> NbdServer:
    """Start ``qemu-nbd`` serving ``image`` on ``directory/NAME.sock`` (``--fork`` returns when ready)."""
    sock = directory / f"{name}.sock"
    pidfile = directory / f"{name}.pid"
    argv = ["qemu-nbd", "--fork", "--persistent", "-k", str(sock), "--pid-file", str(pidfile), "-f", fmt,
            *options, str(image)]
    return NbdServer(argv, sock, pidfile)


@contextlib.contextmanager
def serve_command(*args: str) -> Iterator[tuple["subprocess.Popen[str]", dict[str, Any]]]:
    """Run ``dmtools --backend userspace --json serve ARGS…`` (the run directory from the
    environment); yield the process and the JSON object it announces once it serves. The process
    is killed on the way out if it still runs."""
    proc = subprocess.Popen([sys.executable, "-m", "dmtools.cli.main", "--backend", "userspace", "--json",
                             "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        head = ""
        while not head.rstrip().endswith("}"):  # the JSON object ends the announcement
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"dmtools serve ended: {proc.stderr.read() if proc.stderr else ''}")
            head += line
        yield proc, json.loads(head)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
