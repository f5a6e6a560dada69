"""`thin ls` of a live pool's exposed ``-tmeta`` device sees each commit (root tier).

The pool writes its metadata below the ``-tmeta`` exposure, so pages cached from an earlier read of
that block device are stale; the tools must read what is on the device now (thin_ls reads with
O_DIRECT), or a second `thin ls` shows the pool as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.root

MiB = 1 << 20


def _shared(meta: str) -> dict[str, tuple[int, int]]:
    out = subprocess.run([sys.executable, "-m", "dmtools.cli.main", "thin", "ls", "--no-headers", "-o",
                          "DEV,EXCLUSIVE_BLOCKS,SHARED_BLOCKS", meta], capture_output=True, text=True, check=True)
    return {f[0]: (int(f[1]), int(f[2])) for f in (line.split() for line in out.stdout.splitlines()) if f}


def test_second_ls_sees_broken_sharing(private_daemon: Any, tmp_path: Path) -> None:
    daemon = private_daemon
    meta, data = tmp_path / "meta.img", tmp_path / "data.img"
    for path, size in ((meta, 16 * MiB), (data, 64 * MiB)):
        with open(path, "wb") as f:
            f.truncate(size)
    daemon.create("lsmeta-dmtt", f"0 {16 * MiB // 512} linear {meta} 0")
    daemon.create("lspool-dmtt", f"0 {64 * MiB // 512} thin-pool {daemon.device_ref('lsmeta-dmtt')} {data} 128 0")
    daemon.message("lspool-dmtt", 0, "create_thin 1")
    daemon.create("lsthin-dmtt", f"0 {8 * MiB // 512} thin {daemon.device_ref('lspool-dmtt')} 1")
    exposed_meta = daemon.device_path("lsmeta-dmtt")
    try:
        with daemon.open_endpoint("lsthin-dmtt") as ep:
            ep.write(os.urandom(4 * MiB), 0)
            ep.flush()
        daemon.suspend("lsthin-dmtt")
        daemon.message("lspool-dmtt", 0, "create_snap 2 1")
        daemon.resume("lsthin-dmtt")
        assert _shared(exposed_meta) == {"1": (0, 64), "2": (0, 64)}  # reads (and caches) the device
        with daemon.open_endpoint("lsthin-dmtt") as ep:
            ep.write(os.urandom(MiB), 0)  # 16 blocks of 64 KiB stop being shared
            ep.flush()  # commits the pool's transaction
        assert _shared(exposed_meta) == {"1": (16, 48), "2": (16, 48)}
    finally:
        for name in ("lsthin-dmtt", "lspool-dmtt", "lsmeta-dmtt"):
            daemon.remove(name)
