"""Fixtures for the snapshot tests: the plugin's ``engine`` knows the snapshot targets through the
``dmtools.targets`` entry points."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def python_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Offsets of the origin writes that ran the Python callback (``SnapshotOriginTarget.write``)."""
    from snapshot.targets.origin import SnapshotOriginTarget

    seen: list[int] = []
    real = SnapshotOriginTarget.write

    def write(self: SnapshotOriginTarget, buf: memoryview, offset: int) -> None:
        seen.append(offset)
        real(self, buf, offset)

    monkeypatch.setattr(SnapshotOriginTarget, "write", write)
    return seen
