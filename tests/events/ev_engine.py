"""Helpers for the events tests on the in-process userspace engine: image files, a recording backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def image(tmp_path: Path, name: str, size: int) -> str:
    """A sparse file of ``size`` bytes named for the test sweep (``dmtt-``)."""
    path = tmp_path / f"dmtt-{name}.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


class Recorder:
    """A backend that notes every ``load``, ``suspend`` and ``resume`` (verb, device) in order."""

    def __init__(self, dm: Any) -> None:
        self._dm = dm
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dm, name)

    def load(self, name: str, table: Any, **kw: Any) -> Any:
        self.calls.append(("load", name))
        return self._dm.load(name, table, **kw)

    def suspend(self, name: str, **kw: Any) -> Any:
        self.calls.append(("suspend", name))
        return self._dm.suspend(name, **kw)

    def resume(self, name: str) -> Any:
        self.calls.append(("resume", name))
        return self._dm.resume(name)

    def handovers(self, origin: str, snap: str) -> int:
        """How many times the snapshot stack was refreshed in libdm's order: the snapshot and its
        ``-cow`` loaded, suspended top-down (origin first), resumed bottom-up (origin last)."""
        cow = f"{snap}-cow"
        sequence = [("load", snap), ("load", cow), ("suspend", origin), ("suspend", snap),
                    ("suspend", cow), ("resume", cow), ("resume", snap), ("resume", origin)]
        n = len(sequence)
        return sum(self.calls[i:i + n] == sequence for i in range(len(self.calls) - n + 1))


def policies(name: str) -> Any:
    """The upper layers' policy implementations (what the ``dmtools.policies`` entry points name)."""
    from mirror.guard import MirrorGuard
    from mirror.manager import MirrorManager
    from snapshot.manager import SnapshotManager
    from thin.manager import ThinPoolManager

    return {"snapshot-extend": SnapshotManager, "mirror-repair": MirrorManager,
            "mirror-remove": MirrorGuard, "thin-extend": ThinPoolManager}[name]
