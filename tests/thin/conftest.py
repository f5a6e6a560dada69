"""Fixtures for the thin tests: thin-provisioning-tools as the oracle, metadata images."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TOOLS = ("thin_check", "thin_dump", "thin_restore", "thin_ls")


class ThinTools:
    """Debian's thin-provisioning-tools (0.9.0 in bookworm), run as a user would."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths

    def run(self, tool: str, *args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.paths[tool], *map(str, args)], capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(map(str, args))} failed ({proc.returncode}): "
                                 f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def check(self, meta: Path, *args: str) -> None:
        """thin_check passes (exit 0) on ``meta``."""
        self.run("thin_check", *args, meta)

    def dump(self, meta: Path, *args: str) -> str:
        return self.run("thin_dump", *args, meta).stdout

    def restore(self, xml: Path, meta: Path) -> None:
        self.run("thin_restore", "-i", xml, "-o", meta)

    def ls(self, meta: Path, *args: str) -> str:
        return self.run("thin_ls", *args, meta).stdout


@pytest.fixture(scope="session")
def thin_tools() -> ThinTools:
    """The thin tools, or a skip naming the package (a failure under DMTOOLS_NO_SKIP=1)."""
    paths = {t: shutil.which(t) or (f"/usr/sbin/{t}" if os.path.exists(f"/usr/sbin/{t}") else "") for t in TOOLS}
    missing = [t for t, p in paths.items() if not p]
    if missing:
        reason = f"needs {', '.join(missing)} (apt-get install thin-provisioning-tools; scripts/setup-env does it)"
        if os.environ.get("DMTOOLS_NO_SKIP") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return ThinTools(paths)


@pytest.fixture
def meta_image(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``meta_image(size=4 MiB, name=None)`` makes a zeroed (sparse) metadata file."""
    counter = [0]

    def make(size: int = 4 << 20, name: str | None = None) -> Path:
        counter[0] += 1
        path = tmp_path / f"dmtt-{name or f'meta{counter[0]}'}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    return make


@pytest.fixture
def rig(engine: Any, tmp_path: Path, thin_tools: ThinTools) -> Iterator[Any]:
    """A thin pool on the in-process engine (``target_rig.PoolRig``); ``thin_check`` passes on its
    metadata once the pool is removed."""
    from target_rig import PoolRig

    r = PoolRig(engine, tmp_path)
    yield r
    r.close()
    thin_tools.check(r.meta)
