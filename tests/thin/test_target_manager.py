"""ThinPoolManager on the userspace engine's thin-pool/thin targets: LVM's layout end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from target_rig import pattern, read

from dmtools.testing.threads import HeldAt, take_turns
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


def test_create_and_activate_pool_refuse_devices_that_alias_or_are_in_use(engine: Any, make_image: Any, tmp_path: Path) -> None:
    """The metadata and data devices go through the check every multi-device command runs
    (``dmtools.inputs``): the same bytes under two spellings (a hard link, which no path
    comparison sees) are refused, and so is a device a live table maps (a file under a userspace
    table, which no ``st_rdev`` lookup sees); nothing is created or written either way."""
    import pytest

    from dmtools.errors import DeviceBusy, DeviceConflict

    meta, data = make_image(8 << 20, "meta", fill=b"\x5a"), make_image(64 << 20, "data")
    (tmp_path / "meta-link.img").hardlink_to(meta)
    mgr = ThinPoolManager(engine)
    with pytest.raises(DeviceConflict, match="--metadata"):
        mgr.create_pool("p", str(meta), str(tmp_path / "meta-link.img"))
    engine.create("user", f"0 {(64 << 20) // 512} linear {data} 0")
    with pytest.raises(DeviceBusy, match="in use by device user"):
        mgr.create_pool("p", str(meta), str(data))
    assert [e.name for e in engine.list()] == ["user"] and meta.read_bytes() == b"\x5a" * (8 << 20)
    engine.remove("user")
    mgr.create_pool("p", str(meta), str(data))  # and activating it again checks the same
    mgr.deactivate("p")
    with pytest.raises(DeviceConflict, match="--metadata"):
        mgr.activate(str(meta), str(tmp_path / "meta-link.img"))
    engine.create("user", f"0 {(64 << 20) // 512} linear {data} 0")
    with pytest.raises(DeviceBusy, match="in use by device user"):
        mgr.activate(str(meta), str(data))
    assert [e.name for e in engine.list()] == ["user"]
    engine.remove("user")


def test_a_volume_the_pool_does_not_record_is_not_found(engine: Any, make_image: Any) -> None:
    import pytest

    from dmtools.errors import DeviceNotFound

    mgr = ThinPoolManager(engine)
    mgr.create_pool("p", str(make_image(8 << 20, "meta")), str(make_image(64 << 20, "data")))
    calls = {"status": lambda: mgr.status("p", "v"), "snapshot": lambda: mgr.snapshot("p", "v", "s"),
             "remove": lambda: mgr.remove("p", "v")}
    for operation, call in calls.items():
        with pytest.raises(DeviceNotFound, match="pool p has no thin volume of this name") as info:
            call()
        assert info.value.operation == operation and info.value.device == "v"
    assert mgr.pool_status("p").transaction_id == 0 and mgr.list("p") == []
    mgr.deactivate("p")


def test_two_managers_of_one_pool_take_turns(engine: Any, make_image: Any) -> None:
    """Two managers change one pool at once (two 'dmtools thin create' runs, as LVM commands
    serialized by the volume group's lock): while the first is stopped inside its change (record
    written, create_thin not yet sent), the second waits for the pool's record lock, then makes its
    own volume with the next id; both succeed and the record, the pool and the devices agree."""
    meta = make_image(8 << 20, "meta")
    ThinPoolManager(engine).create_pool("p", str(meta), str(make_image(64 << 20, "data")))
    held = HeldAt(engine, "message")
    take_turns(lambda: ThinPoolManager(held).create("p", "a", 1 << 20),  # type: ignore[arg-type]
               lambda: ThinPoolManager(engine).create("p", "b", 1 << 20), held, lambda: [meta])
    mgr = ThinPoolManager(engine)
    assert {v.name: v.dev_id for v in mgr.list("p")} == {"a": 1, "b": 2}
    assert mgr.pool_status("p").transaction_id == 2 and mgr.pool_status("p").status.transaction_id == 2
    for tag in ("a", "b"):
        with engine.open_endpoint(tag) as ep:
            ep.write(pattern(ord(tag), 4096), 0)
            ep.flush()
    for tag in ("a", "b"):
        with engine.open_endpoint(tag) as ep:
            assert read(ep, 0, 4096) == pattern(ord(tag), 4096)
    mgr.deactivate("p")


def test_a_metadata_device_held_by_another_tool_is_not_wiped(engine: Any, make_image: Any) -> None:
    """``create_pool`` zeroes the start of the metadata device before its tables claim it: a device
    another tool, an engine or a mount holds (``dmtools.claims``; the root tier mounts one) is
    refused with DeviceBusy before that write, and its bytes stay as they were."""
    import pytest

    from dmtools import claims
    from dmtools.errors import DeviceBusy

    meta, data = make_image(8 << 20, "meta", fill=b"\x5a"), make_image(64 << 20, "data")
    with claims.claim(meta, holder="another tool"):
        with pytest.raises(DeviceBusy, match="claimed"):
            ThinPoolManager(engine).create_pool("p", str(meta), str(data))
        assert meta.read_bytes() == b"\x5a" * (8 << 20) and engine.list() == []
    ThinPoolManager(engine).create_pool("p", str(meta), str(data))  # released: it goes through
    ThinPoolManager(engine).deactivate("p")


@pytest.mark.root
def test_autoextend_grows_a_data_loop_device_with_an_offset(engine: Any, make_image: Any, tmp_path: Path,
                                                            make_loop: Any) -> None:
    """``autoextend`` of a pool whose data device is a loop device starting 1 MiB into its file
    grows the file to that offset plus the new size, and the pool takes the new blocks."""
    img = tmp_path / "shared.img"
    img.write_bytes(b"\x77" * (1 << 20) + bytes(16 << 20))
    lo = make_loop(img, offset=1 << 20)
    mgr = ThinPoolManager(engine)
    mgr.create_pool("p", str(make_image(8 << 20, "meta")), lo.path)
    assert mgr.pool_status("p").status.total_data == 256
    assert mgr.autoextend("p", 50).status.total_data == 384
    assert img.stat().st_size == (1 << 20) + (24 << 20)
    mgr.deactivate("p")
    assert img.read_bytes()[:1 << 20] == b"\x77" * (1 << 20)
