"""Root tier: ``dmtools thin …`` on the userspace backend, through a daemon of its own that exposes
every device as a block device (FUSE + loop): a pool, a volume written through its block device,
a snapshot that keeps the old bytes when the origin is overwritten, deactivation, ``thin_check``
on the metadata, and activation after the daemon restarted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmtools.testing.blockio import read_uncached, write_synced
from thin.pool_record import RECORD_SECTORS

pytestmark = pytest.mark.root

MiB = 1 << 20
TIMEOUT = 120


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Any]:
    """``cli(*argv)``: the installed console script on the userspace backend with a run directory
    of its own (its daemon starts on demand and is stopped at the end)."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    exe = str(Path(sys.executable).with_name("dmtools"))
    env = dict(os.environ, DMTOOLS_RUN_DIR=str(run))

    def call(*argv: str) -> str:
        done = subprocess.run([exe, "--backend", "userspace", *argv], capture_output=True, text=True,
                              timeout=TIMEOUT, env=env, check=False)
        if done.returncode:
            log = run / "daemon.log"
            tail = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
            pytest.fail(f"dmtools {' '.join(argv)} exited {done.returncode}\nstderr: {done.stderr.strip()}\n"
                        f"stdout: {done.stdout.strip()}\n{log} (last lines):\n" + "\n".join(tail), pytrace=False)
        return done.stdout

    call.mapper = run / "mapper"  # type: ignore[attr-defined]
    try:
        yield call
    finally:
        subprocess.run([exe, "daemon", "stop", "--force"], capture_output=True, timeout=TIMEOUT, env=env, check=False)


def test_pool_volume_snapshot_through_block_devices(cli: Any, make_image: Any, tmp_path: Path, thin_tools: Any) -> None:
    meta, data = make_image(8 * MiB, "meta"), make_image(64 * MiB, "data")
    assert "created pool tp" in cli("thin", "pool", "create", "tp", "--metadata", str(meta), "--data", str(data))
    cli("thin", "create", "tp", "v1", "--size", "16M")
    v1 = str(cli.mapper / "v1")
    old = os.urandom(3 * MiB + 4096)
    write_synced(v1, old, 4096)
    cli("thin", "snapshot", "tp", "v1", "s1")
    write_synced(v1, b"\x77" * MiB, MiB)
    assert read_uncached(str(cli.mapper / "s1"), len(old), 4096) == old
    assert read_uncached(v1, MiB, MiB) == b"\x77" * MiB
    cli("thin", "remove", "tp", "v1")
    cli("thin", "deactivate", "tp")
    kmeta = tmp_path / "kmeta.img"  # the kernel's metadata, after the pool record
    kmeta.write_bytes(meta.read_bytes()[RECORD_SECTORS * 512:])
    thin_tools.check(kmeta)
    cli("daemon", "stop", "--force")
    assert "activated pool tp" in cli("thin", "activate", "--metadata", str(meta), "--data", str(data))
    assert read_uncached(str(cli.mapper / "s1"), len(old), 4096) == old
    assert [v["name"] for v in json.loads(cli("--json", "thin", "list", "tp"))] == ["s1"]
    cli("thin", "deactivate", "tp")
