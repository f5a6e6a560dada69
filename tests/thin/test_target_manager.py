"""ThinPoolManager on the userspace engine's thin-pool/thin targets: LVM's layout end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from target_rig import pattern, read
from thin.manager import ThinPoolManager
from thin.pool_record import RECORD_SECTORS


def _kernel_metadata(meta: Path, out: Path) -> Path:
    """The pool's kernel metadata (after the pool record) as a file thin_check can read."""
    out.write_bytes(meta.read_bytes()[RECORD_SECTORS * 512:])
    return out


def test_pool_volumes_snapshot_and_reactivation(engine: Any, make_image: Any, tmp_path: Path, thin_tools: Any) -> None:
    meta, data = make_image(8 << 20, "meta"), make_image(64 << 20, "data")
    mgr = ThinPoolManager(engine)
    pool = mgr.create_pool("p", str(meta), str(data))
    assert pool.status.total_data == 1024 and {"p", "p-tpool", "p-tmeta", "p-tdata"} <= {e.name for e in engine.list()}
    mgr.create("p", "v1", 16 << 20)
    with engine.open_endpoint("v1") as ep:
        ep.write(pattern(1, 1 << 20), 0)
        ep.flush()
    snap = mgr.snapshot("p", "v1", "s1")
    assert snap.origin == "v1" and snap.status.mapped_sectors == 2048
    with engine.open_endpoint("v1") as ep:
        ep.write(pattern(2, 4096), 0)  # breaks sharing of one block
        ep.flush()
    with engine.open_endpoint("s1") as ep:
        assert read(ep, 0, 8192) == pattern(1, 8192)
    assert mgr.pool_status("p").status.used_data == 17
    mgr.remove("p", "v1")
    mgr.deactivate("p")
    assert engine.list() == []
    thin_tools.check(_kernel_metadata(meta, tmp_path / "kmeta"))
    again = mgr.activate(str(meta), str(data))
    assert again.transaction_id == 3 and [v.name for v in mgr.list("p")] == ["s1"]
    with engine.open_endpoint("s1") as ep:
        assert read(ep, 0, 1 << 20) == pattern(1, 1 << 20)
    mgr.deactivate("p")
    dump = thin_tools.dump(_kernel_metadata(meta, tmp_path / "kmeta"))
    assert 'dev_id="2"' in dump and 'dev_id="1"' not in dump
