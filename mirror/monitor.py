"""Kernel mirrors monitored from creation: one ``dmtools monitor`` process per mirror.

LVM activates a mirror monitored (``lvchange --monitor y``): dmeventd waits for the mirror's
events and, on a failed leg, runs ``lvconvert --repair``, which replaces the leg from free space
or removes it (``mirror_image_fault_policy``). Without that, dm-raid1 with ``handle_errors`` holds
every write after a leg failure until someone reconfigures the mirror. :func:`start` does what
registering with dmeventd does: it starts ``dmtools monitor NAME --mirror-policy remove`` (or
``repair --spare DEV``) for one mirror, in its own session, which:

- waits on the mirror's event number (``wait_event``) and uevents, and polls its status;
- on a failed leg reloads the mirror without it (``mirror.guard.MirrorGuard.check`` as the
  ``mirror-remove`` policy), or puts the spare in its place and falls back to removing the leg
  when the spare cannot be used; held writes then complete on the other legs, or end with EIO
  when the failed leg was the only one holding some regions (never a wait without end);
- journals every event and action in its state directory (:func:`state_root`, read by ``mirror
  status``) and appends them to ``events.jsonl`` there, its log going to ``monitor.log``;
- exits once the mirror has been removed (``--until-removed``).

The userspace engine has its own guard (``mirror.guard``), so ``mirror create`` and ``mirror
monitor`` start a monitor for kernel mirrors only; :func:`start` itself works for either backend.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from urllib.parse import quote

from dmtools.backend import DeviceMapper
from dmtools.errors import DMError
from dmtools.events.store import StateStore, default_root

__all__ = ["start", "state_root", "READY_TIMEOUT"]

#: Seconds a new monitor may take to look at its mirror once (a loaded VM under emulation is slow).
READY_TIMEOUT = 120.0
_RUN = "import sys; from dmtools.cli.main import main; sys.exit(main(sys.argv[1:]))"
#: the monitors this process started (kept so that they are not reaped as garbage while they run)
_children: list[subprocess.Popen] = []  # type: ignore[type-arg]


def state_root(name: str) -> str:
    """The state directory (``--state-dir``) of the monitor :func:`start` runs for mirror ``name``."""
    return os.path.join(default_root(), "mirror", quote(name, safe=""))


def start(dm: DeviceMapper, name: str, *, spare: str | None = None, interval: float = 1.0,
          timeout: float = READY_TIMEOUT) -> int | None:
    """Start the monitor of mirror ``name`` and wait until it has looked at the mirror once, so
    that a failure from then on is judged against the state before it; return its pid, or
    ``None`` when a monitor of ``name`` already runs (it holds the state directory's lock).

    Raises ``DMError`` when the monitor exits first (with the last line of its log) or does not
    get ready within ``timeout`` seconds (it is then stopped).
    """
    root = state_root(name)
    os.makedirs(root, mode=0o700, exist_ok=True)
    try:
        StateStore(dm.backend, root, lock=True).close()
    except DMError as err:
        if err.errno == errno.EBUSY:
            return None
        raise
    args = ["--backend", dm.backend, "monitor", name, "--until-removed", "--state-dir", root,
            "--output", os.path.join(root, "events.jsonl"), "--interval", str(interval)]
    args += ["--mirror-policy", "repair", "--spare", spare] if spare else ["--mirror-policy", "remove"]
    log_path = os.path.join(root, "monitor.log")
    # the run directory's rules: never follow a symlink planted there, nothing world-readable
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen([sys.executable, "-c", _RUN, *args], stdin=subprocess.DEVNULL,
                                stdout=log_fd, stderr=log_fd, start_new_session=True, close_fds=True)
    finally:
        os.close(log_fd)
    _children.append(proc)
    store = StateStore(dm.backend, root)
    info = dm.info(name)
    devno = f"{info.major}:{info.minor}"
    deadline = time.monotonic() + timeout
    delay = 0.01
    while (getattr(store.load(name), "devno", None)) != devno:  # not a state left by an earlier one
        if proc.poll() is not None:
            raise DMError(f"the monitor of {name} exited ({proc.returncode}): {_last_line(log_path)}",
                          operation="monitor", device=name)
        if time.monotonic() > deadline:
            proc.terminate()
            proc.wait()
            raise DMError(f"the monitor of {name} did not start within {timeout:g} s "
                          f"(log: {log_path})", errno=errno.ETIMEDOUT, operation="monitor", device=name)
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    return proc.pid


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"
