"""The in-process userspace engine with the snapshot and mirror targets, and image files."""

from __future__ import annotations

from pathlib import Path

from dmtools.engine import Engine


def engine_with_targets() -> Engine:
    """An ``Engine`` that knows ``snapshot``, ``snapshot-origin``, ``snapshot-merge`` and ``mirror``."""
    import snapshot.targets
    from mirror.target import MirrorTarget

    e = Engine()
    for name, cls in snapshot.targets.TARGETS.items():
        e.register_target(cls, name)
    e.register_target(MirrorTarget, "mirror")
    return e


def image(tmp_path: Path, name: str, size: int) -> str:
    """A sparse file of ``size`` bytes named for the test sweep (``dmtt-``)."""
    path = tmp_path / f"dmtt-{name}.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)
