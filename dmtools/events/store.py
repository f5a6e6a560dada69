"""Persisted monitor state: the last state seen of each device and its recent events.

One JSON file per device under ``<root>/<backend>/`` (``/run/dmtools/monitor/kernel/NAME.json`` as
root), replaced atomically (write, fsync, rename). A monitor compares what it finds at start with
these files, so changes that happened while no monitor ran are reported once, and changes it
already reported are not reported again. An exclusive ``flock`` on ``<root>/<backend>/.lock`` keeps
two monitors from reporting the same changes; read-only users (``--once`` while a monitor runs,
``snapshot status``) read without the lock.

A removed device keeps a file with ``"state": null`` so its last events stay readable.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from typing import Any, Iterator
from urllib.parse import quote, unquote

from dmtools.errors import DMError
from dmtools.events.state import DeviceState
from dmtools.events.types import Event

__all__ = ["StateStore", "default_root", "last_events", "RECENT_EVENTS"]

#: Events kept per device for ``last_events``.
RECENT_EVENTS = 32


def default_root() -> str:
    """``/run/dmtools/monitor`` for root, else under ``$XDG_RUNTIME_DIR`` or ``/tmp``."""
    if os.geteuid() == 0:
        return "/run/dmtools/monitor"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "dmtools") if runtime else f"/tmp/dmtools-{os.geteuid()}"
    return os.path.join(base, "monitor")


class StateStore:
    """Device states and recent events of one backend, on disk.

    ``lock=True`` takes the store's exclusive lock (raises ``DMError`` with ``EBUSY`` when another
    monitor holds it); without it the store can only be read.
    """

    def __init__(self, backend: str, root: str | None = None, *, lock: bool = False) -> None:
        if not backend or "/" in backend or backend.startswith("."):
            raise DMError(f"bad backend name for the monitor state: {backend!r}",
                          errno=errno.EINVAL)
        self.directory = os.path.join(root or default_root(), backend)
        self._lock_fd: int | None = None
        if lock:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.directory, ".lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise DMError(f"another monitor is running (it holds {self.directory}/.lock)",
                                  errno=errno.EBUSY, operation="monitor") from err
                raise
            self._lock_fd = fd

    @property
    def locked(self) -> bool:
        """True when this store holds the lock (and may be written)."""
        return self._lock_fd is not None

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, quote(name, safe="") + ".json")

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            with open(self._path(name), encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # a torn or foreign file: treat the device as never seen
        return data if isinstance(data, dict) else None

    def names(self) -> list[str]:
        """Devices with a stored state (tombstones of removed devices excluded)."""
        out = []
        for name in self._files():
            data = self._read(name)
            if data is not None and data.get("state") is not None:
                out.append(name)
        return sorted(out)

    def _files(self) -> Iterator[str]:
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.endswith(".json") and not entry.startswith("."):
                yield unquote(entry[: -len(".json")])

    def load(self, name: str) -> DeviceState | None:
        """The last state stored for ``name`` (``None``: never seen, or removed)."""
        data = self._read(name)
        if data is None or data.get("state") is None:
            return None
        try:
            return DeviceState.from_dict(data["state"])
        except DMError:
            return None

    def recent(self, name: str) -> list[Event]:
        """The events stored for ``name``, oldest first."""
        data = self._read(name)
        out: list[Event] = []
        for item in (data or {}).get("recent", []):
            try:
                out.append(Event.from_dict(item))
            except DMError:
                continue
        return out

    def save(self, name: str, state: DeviceState | None, events: list[Event]) -> None:
        """Store ``state`` (``None``: removed) and append ``events``; atomic per device."""
        if not self.locked:
            raise DMError("the monitor state is read-only here (lock not held)",
                          errno=errno.EROFS, operation="monitor")
        recent = [e.to_dict() for e in self.recent(name)] + [e.to_dict() for e in events]
        data = {"state": state.to_dict() if state is not None else None,
                "recent": recent[-RECENT_EVENTS:]}
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(name))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def rename(self, old: str, new: str) -> None:
        """Move ``old``'s file to ``new`` (a renamed device keeps its history)."""
        if not self.locked:
            raise DMError("the monitor state is read-only here (lock not held)",
                          errno=errno.EROFS, operation="monitor")
        try:
            os.replace(self._path(old), self._path(new))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Release the lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def last_events(name: str, backend: str, count: int = 5, root: str | None = None) -> list[Event]:
    """The last ``count`` events a monitor recorded for device ``name`` (for ``… status``)."""
    return StateStore(backend, root).recent(name)[-count:] if count > 0 else []
