"""Kernel tier (``scripts/vmtest tests/thinpool``): ThinPoolManager and the typed thin values on the
kernel's dm-thin-pool.

* tables read back from the kernel are the typed values' text, byte for byte, and equal ``dmsetup
  table``; statuses come from the real kernel and print back identically;
* a pool whose data space runs out reports ``out_of_data_space``: with ``error_if_no_space`` the
  write fails at once, without it the write waits until the pool is extended and then completes;
* every manager command: create, snapshot (the snapshot keeps the old data after the origin is
  overwritten), remove, list/status (``--json``), extend (data and metadata), deactivate and
  activate from the devices alone (``thin_check`` passes), a transaction interrupted after its
  record was written is completed at activation, and a failed step is undone.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from dmtools.cli.main import main
from dmtools.errors import CorruptMetadata, DeviceBusy, DeviceExists, DMError
from dmtools.status import PoolMode, parse_thin_pool_status, parse_thin_status
from dmtools.table import Table, Thin, ThinPool
from dmtools.testing.blockio import read_uncached, write_synced
from dmtools.thin_messages import CreateThin
from thin.manager import ThinPoolManager
from thin.pool_record import RECORD_SECTORS, read_record, write_record

pytestmark = pytest.mark.kernel

MiB = 1 << 20
CHUNK = 128  # 64 KiB


@pytest.fixture
def tag(kernel_tag: str) -> str:
    """The plugin's unique name prefix: its devices are removed afterwards, stacked ones first."""
    return kernel_tag


@pytest.fixture
def devices(tmp_path: Path, make_loop: Callable[..., Any]) -> Callable[..., tuple[Any, Any]]:
    """``devices(meta_bytes, data_bytes)``: two loop devices over sparse files."""

    def make(meta: int = 8 * MiB, data: int = 64 * MiB) -> tuple[Any, Any]:
        paths = []
        for name, size in (("meta", meta), ("data", data)):
            p = tmp_path / f"dmtt-{name}-{uuid.uuid4().hex[:6]}.img"
            with open(p, "wb") as f:
                f.truncate(size)
            paths.append(p)
        return make_loop(paths[0]), make_loop(paths[1])

    return make


def _dmsetup(*args: str) -> str:
    return subprocess.run(["dmsetup", *args], check=True, capture_output=True, text=True).stdout


def _grow(loop: Any, size: int) -> None:
    from dmtools.loop import set_capacity

    with open(loop.backing_file, "r+b") as f:
        f.truncate(size)
    set_capacity(loop)


def _cli(*argv: str) -> Any:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["--backend", "kernel", "--json", *argv], propagate=True) == 0
    return json.loads(out.getvalue())


@pytest.mark.parametrize(("zero", "error_if_no_space"), [(True, False), (False, True)])
def test_pool_layout_tables_and_status(kernel_dm: Any, devices: Any, tag: str, zero: bool,
                                       error_if_no_space: bool) -> None:
    meta, data = devices()
    mgr = ThinPoolManager(kernel_dm)
    info = mgr.create_pool(tag, meta.path, data.path, zero=zero, error_if_no_space=error_if_no_space)
    features = tuple(f for f, on in (("skip_block_zeroing", not zero), ("error_if_no_space", error_if_no_space)) if on)
    ref = kernel_dm.device_ref
    expected = {
        f"{tag}-tmeta": f"0 {16384 - RECORD_SECTORS} linear {meta.devno} {RECORD_SECTORS}",
        f"{tag}-tdata": f"0 131072 linear {data.devno} 0",
        f"{tag}-tpool": f"0 131072 thin-pool {ref(tag + '-tmeta')} {ref(tag + '-tdata')} 128 0 "
                        f"{len(features)} " + "".join(f + " " for f in features),
        tag: f"0 131072 linear {ref(tag + '-tpool')} 0",
    }
    for name, text in expected.items():
        table = kernel_dm.table(name)
        assert str(table) == text
        assert table.dmsetup_text() == _dmsetup("table", name) == text + "\n"
    pool_value = kernel_dm.table(f"{tag}-tpool").lines[0].target
    assert isinstance(pool_value, ThinPool) and pool_value.features == features
    kernel_status = _dmsetup("status", f"{tag}-tpool")
    params = kernel_status.split(" ", 3)[3].rstrip("\n")
    status = parse_thin_pool_status(params)
    assert status.format() == params  # the kernel's text, trailing space included
    assert status.transaction_id == 0 and status.total_data == 131072 // CHUNK and status.used_data == 0
    assert status.mode is PoolMode.WRITE and status.held_root is None and status.needs_check is False
    assert status.error_if_no_space is error_if_no_space
    assert info.status.total_data == status.total_data and info.transaction_id == 0


def test_volumes_snapshot_keeps_old_data(kernel_dm: Any, devices: Any, tag: str) -> None:
    meta, data = devices()
    mgr = ThinPoolManager(kernel_dm)
    mgr.create_pool(tag, meta.path, data.path)
    v = mgr.create(tag, f"{tag}v", 32 * MiB // 512)
    assert (v.dev_id, v.active, v.status and v.status.format()) == (1, True, "0 -")
    assert str(kernel_dm.table(f"{tag}v")) == f"0 65536 thin {kernel_dm.device_ref(tag + '-tpool')} 1"
    rng = random.Random(5)
    old = rng.randbytes(3 * MiB)
    path = kernel_dm.device_path(f"{tag}v")
    write_synced(path, old, MiB)
    s = mgr.snapshot(tag, f"{tag}v", f"{tag}s")
    assert (s.dev_id, s.origin, s.size) == (2, f"{tag}v", v.size)
    new = rng.randbytes(2 * MiB)
    write_synced(path, new, 2 * MiB)  # overwrites the last 2 of the 3 MiB written before the snapshot
    assert read_uncached(path, 4 * MiB, MiB) == old[:MiB] + new + bytes(MiB)
    assert read_uncached(kernel_dm.device_path(f"{tag}s"), 4 * MiB, MiB) == old + bytes(MiB)
    vstat = parse_thin_status(kernel_dm.status(f"{tag}v")[0].params)
    sstat = parse_thin_status(kernel_dm.status(f"{tag}s")[0].params)
    for stat in (vstat, sstat):  # both map sectors 1 MiB..4 MiB
        assert (stat.mapped_sectors, stat.highest_mapped) == (3 * MiB // 512, 4 * MiB // 512 - 1)
    pool = mgr.pool_status(tag)
    # the snapshot shares the 16 blocks the origin did not overwrite: 48 + 32 blocks, not 96
    assert pool.status.used_data == (3 * MiB + 2 * MiB) // (CHUNK * 512)
    assert pool.transaction_id == 2 == pool.status.transaction_id
    listed = _cli("thin", "list", tag)
    assert [(x["name"], x["dev_id"], x["origin"], x["active"]) for x in listed] == [
        (f"{tag}s", 2, f"{tag}v", True), (f"{tag}v", 1, None, True)]
    assert _cli("thin", "status", tag)["transaction_id"] == 2
    mgr.remove(tag, f"{tag}s")
    assert not kernel_dm.exists(f"{tag}s")
    assert mgr.pool_status(tag).status.used_data == 3 * MiB // (CHUNK * 512)  # its 32 own blocks freed
    # LVM's ids: one above the highest in use, so 2 again
    assert mgr.create(tag, f"{tag}w", 2048).dev_id == 2
    assert mgr.pool_status(tag).status.transaction_id == 4


def test_error_if_no_space_fails_at_once(kernel_dm: Any, devices: Any, tag: str) -> None:
    meta, data = devices(data=2 * MiB)  # 32 blocks
    mgr = ThinPoolManager(kernel_dm)
    mgr.create_pool(tag, meta.path, data.path, error_if_no_space=True)
    mgr.create(tag, f"{tag}v", 8 * MiB // 512)
    with pytest.raises(OSError):
        write_synced(kernel_dm.device_path(f"{tag}v"), random.Random(1).randbytes(4 * MiB))
    status = mgr.pool_status(tag).status
    assert status.out_of_data_space and status.error_if_no_space
    assert status.used_data == status.total_data == 32
    assert _dmsetup("status", f"{tag}-tpool").split(" ", 3)[3].rstrip("\n") == status.format()


def test_queue_if_no_space_waits_for_extend(kernel_dm: Any, devices: Any, tag: str) -> None:
    meta, data = devices(data=2 * MiB)
    mgr = ThinPoolManager(kernel_dm)
    mgr.create_pool(tag, meta.path, data.path)
    mgr.create(tag, f"{tag}v", 8 * MiB // 512)
    payload = random.Random(2).randbytes(4 * MiB)
    result: list[BaseException | None] = []
    writer = threading.Thread(target=lambda: result.append(_safe_write(kernel_dm.device_path(f"{tag}v"), payload)),
                              daemon=True)
    writer.start()
    event = kernel_dm.info(f"{tag}-tpool").event_nr
    while True:  # the pool raises an event when it changes mode (dm-thin.c set_pool_mode)
        status = mgr.pool_status(tag).status
        if status.out_of_data_space:
            break
        assert writer.is_alive(), f"the write ended before the pool filled: {result}"
        event = kernel_dm.wait_event(f"{tag}-tpool", event, timeout=30)
    assert status.no_space == "queue_if_no_space" and writer.is_alive()
    _grow(data, 8 * MiB)
    info = mgr.extend(tag)
    writer.join(60)
    assert not writer.is_alive() and result == [None]
    assert info.status.total_data == 128 and info.data_sectors == 8 * MiB // 512
    assert mgr.pool_status(tag).status.mode is PoolMode.WRITE
    assert read_uncached(kernel_dm.device_path(f"{tag}v"), 4 * MiB) == payload
    assert str(kernel_dm.table(f"{tag}-tpool")).startswith(f"0 {8 * MiB // 512} thin-pool ")
    assert kernel_dm.table(tag).size == 8 * MiB // 512


def _safe_write(path: str, data: bytes) -> BaseException | None:
    try:
        write_synced(path, data)
    except OSError as err:
        return err
    return None


def test_extend_metadata(kernel_dm: Any, devices: Any, tag: str) -> None:
    meta, data = devices(meta=4 * MiB)
    mgr = ThinPoolManager(kernel_dm)
    before = mgr.create_pool(tag, meta.path, data.path).status.total_metadata
    assert before == (4 * MiB - RECORD_SECTORS * 512) // 4096
    _grow(meta, 12 * MiB)
    after = mgr.extend(tag)
    assert after.status.total_metadata == (12 * MiB - RECORD_SECTORS * 512) // 4096
    assert after.metadata_sectors == 12 * MiB // 512 - RECORD_SECTORS
    with pytest.raises(DMError, match="neither"):
        mgr.extend(tag)


def test_activate_after_removing_every_device(kernel_dm: Any, devices: Any, tag: str) -> None:
    meta, data = devices()
    mgr = ThinPoolManager(kernel_dm)
    mgr.create_pool(tag, meta.path, data.path, zero=False)
    contents = {}
    for i, name in enumerate((f"{tag}a", f"{tag}b")):
        mgr.create(tag, name, 16 * MiB // 512)
        contents[name] = random.Random(i).randbytes(MiB)
        write_synced(kernel_dm.device_path(name), contents[name])
    mgr.snapshot(tag, f"{tag}a", f"{tag}c")
    contents[f"{tag}c"] = contents[f"{tag}a"]
    write_synced(kernel_dm.device_path(f"{tag}a"), bytes(4096))
    contents[f"{tag}a"] = bytes(4096) + contents[f"{tag}a"][4096:]
    with open(kernel_dm.device_path(f"{tag}b"), "rb"):
        with pytest.raises(DeviceBusy):
            mgr.deactivate(tag)
    assert kernel_dm.exists(f"{tag}a")  # refused before anything went
    _cli("thin", "deactivate", tag)
    assert not [e.name for e in kernel_dm.list() if e.name.startswith(tag)]
    assert subprocess.run(["thin_check", "-q", meta.path], capture_output=True).returncode != 0  # the record
    info = _cli("thin", "activate", "--metadata", meta.path, "--data", data.path)
    assert info["name"] == tag and info["transaction_id"] == 3 and info["volumes"] == 3
    for name, want in contents.items():
        assert read_uncached(kernel_dm.device_path(name), MiB) == want
    mgr.deactivate(tag)
    # the kernel's metadata after the record is sound: thin_check on the pool's own view of it
    kernel_dm.create(f"{tag}-m", Table.single(16384 - RECORD_SECTORS, _linear(meta.path)))
    check = subprocess.run(["thin_check", kernel_dm.device_path(f"{tag}-m")], capture_output=True, text=True)
    kernel_dm.remove(f"{tag}-m", retry=True)
    assert check.returncode == 0, check.stderr


def _linear(dev: str) -> Any:
    from dmtools.table import Linear

    return Linear(dev, RECORD_SECTORS)


def test_interrupted_change_completes_and_mismatch_stops(kernel_dm: Any, devices: Any, tag: str) -> None:
    meta, data = devices()
    mgr = ThinPoolManager(kernel_dm)
    mgr.create_pool(tag, meta.path, data.path)
    mgr.create(tag, f"{tag}a", 2048)
    mgr.deactivate(tag)
    # a crash after the record took transaction 2 and its message, before the pool heard of it
    rec = read_record(meta.path)
    from thin.pool_record import ThinVolume

    write_record(meta.path, rec.with_changes(transaction_id=2, pending=(str(CreateThin(2)),),
                                             volumes={**rec.volumes, f"{tag}b": ThinVolume(2, 4096)}))
    info = mgr.activate(meta.path, data.path)
    assert info.status.transaction_id == 2 and kernel_dm.exists(f"{tag}b")
    assert kernel_dm.table(f"{tag}b").lines[0].target == Thin(kernel_dm.device_ref(f"{tag}-tpool"), 2)
    mgr.deactivate(tag)
    rec = read_record(meta.path)
    write_record(meta.path, rec.with_changes(transaction_id=5))
    with pytest.raises(CorruptMetadata, match="transaction_id is 2, while expected 5"):
        mgr.activate(meta.path, data.path)
    assert not [e.name for e in kernel_dm.list() if e.name.startswith(tag)]


class _FailingCreate:
    """The kernel backend, except that ``create`` of one name fails (a seam for rollback)."""

    def __init__(self, dm: Any, name: str) -> None:
        self._dm, self._name = dm, name

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if name == self._name:
            raise DMError("injected failure", operation="create", device=name)
        return self._dm.create(name, *args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._dm, attr)


def test_failed_steps_are_undone(kernel_dm: Any, devices: Any, tag: str) -> None:
    meta, data = devices()
    mgr = ThinPoolManager(kernel_dm)
    mgr.create_pool(tag, meta.path, data.path)
    mgr.create(tag, f"{tag}a", 2048)
    failing = ThinPoolManager(_FailingCreate(kernel_dm, f"{tag}b"))  # type: ignore[arg-type]
    with pytest.raises(DMError, match="injected"):
        failing.create(tag, f"{tag}b", 2048)
    # the id was deleted again and the record moved on past it: the pool and record agree
    status = mgr.pool_status(tag)
    assert status.transaction_id == status.status.transaction_id == 3 and status.volumes == 1
    assert mgr.create(tag, f"{tag}b", 2048).dev_id == 2  # create_thin 2 would fail had 2 survived
    with pytest.raises(DeviceExists):
        mgr.create(tag, f"{tag}b", 2048)
    meta2, data2 = devices()
    with pytest.raises(DMError, match="injected"):
        ThinPoolManager(_FailingCreate(kernel_dm, f"{tag}x-tpool")).create_pool(  # type: ignore[arg-type]
            f"{tag}x", meta2.path, data2.path)
    assert not [e.name for e in kernel_dm.list() if e.name.startswith(f"{tag}x")]
    with pytest.raises(CorruptMetadata, match="no dmtools thin-pool record"):
        read_record(meta2.path)  # the record went with the devices: the create can simply be repeated
    assert ThinPoolManager(kernel_dm).create_pool(f"{tag}x", meta2.path, data2.path).transaction_id == 0


def test_messages_on_the_kernel(kernel_dm: Any, devices: Any, tag: str) -> None:
    """Each typed call against the real pool, and each errno turned into its named error."""
    from dmtools import thin_messages as tm
    from dmtools.errors import DeviceNotFound, InvalidArgument

    meta, data = devices()
    ThinPoolManager(kernel_dm).create_pool(tag, meta.path, data.path)
    pool = f"{tag}-tpool"

    def status() -> Any:
        return parse_thin_pool_status(kernel_dm.status(pool)[0].params)

    tm.create_thin(kernel_dm, pool, 10)
    with pytest.raises(DeviceExists):
        tm.create_thin(kernel_dm, pool, 10)
    tm.create_snap(kernel_dm, pool, 11, 10)
    with pytest.raises(DeviceNotFound, match="no thin device 99"):
        tm.create_snap(kernel_dm, pool, 12, 99)
    tm.delete(kernel_dm, pool, 11)
    with pytest.raises(DeviceNotFound, match="no thin device 11"):
        tm.delete(kernel_dm, pool, 11)
    kernel_dm.create(f"{tag}t", Table.single(2048, Thin(kernel_dm.device_ref(pool), 10)))
    with pytest.raises(DeviceBusy, match="active"):
        tm.delete(kernel_dm, pool, 10)
    kernel_dm.remove(f"{tag}t", retry=True)
    tm.set_transaction_id(kernel_dm, pool, 0, 7)
    with pytest.raises(InvalidArgument, match="transaction id is not 0"):
        tm.set_transaction_id(kernel_dm, pool, 0, 8)
    assert status().transaction_id == 7
    tm.reserve_metadata_snap(kernel_dm, pool)
    held = status().held_root
    assert isinstance(held, int) and held > 0
    with pytest.raises(DeviceBusy, match="already held"):
        tm.reserve_metadata_snap(kernel_dm, pool)
    tm.release_metadata_snap(kernel_dm, pool)
    assert status().held_root is None
    with pytest.raises(InvalidArgument, match="no metadata snapshot"):
        tm.release_metadata_snap(kernel_dm, pool)
    assert status().format() == _dmsetup("status", pool).split(" ", 3)[3].rstrip("\n")


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ("{m} {d} 100 0", "Invalid block size"),
        ("{m} {d} 129 0", "Invalid block size"),
        ("{m} {d} 128 x", "Invalid low water mark"),
        ("{m} {d} 128 0 1 zero_blocks", "Unrecognised pool feature requested"),
        ("{m} {d} 128 0 5 read_only read_only read_only read_only read_only",
         "Invalid number of pool feature arguments"),
        ("{m} {d} 128", "Invalid argument count"),
    ],
)
def test_bad_pool_tables_give_the_kernels_words(kernel_dm: Any, devices: Any, tag: str, params: str,
                                                reason: str) -> None:
    """The kernel refuses the same text with the same words our typed value uses."""
    meta, data = devices()
    text = params.format(m=meta.path, d=data.path)
    with pytest.raises(DMError, match=reason):
        Table.parse(f"0 131072 thin-pool {text}")
    done = subprocess.run(["dmsetup", "create", f"{tag}b", "--table", f"0 131072 thin-pool {text}"],
                          capture_output=True, text=True)
    assert done.returncode != 0
    kmsg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
    assert any(f"thin-pool: {reason}" in line for line in kmsg[-20:]), kmsg[-5:]


@pytest.mark.parametrize("pool_first", [True, False])
def test_thin_pool_beside_another_target_is_refused_in_the_kernels_words(
        kernel_dm: Any, devices: Any, tag: str, pool_first: bool) -> None:
    """dm-table.c: a singleton type (thin-pool) must be alone in its table. The kernel's log
    says why in words that depend on the order; the engine, the kernel backend and our value
    refuse with the same words, and no device is left behind."""
    from dmtools.engine import Engine
    from dmtools.errors import InvalidTable

    meta, data = devices()
    pool = f"thin-pool {meta.path} {data.path} 128 0"
    if pool_first:
        text, words = f"0 131072 {pool}\n131072 8 zero", "target type thin-pool must appear alone in table"
    else:
        text, words = f"0 8 zero\n8 131072 {pool}", "thin-pool: singleton target type must appear alone in table"
    done = subprocess.run(["dmsetup", "create", f"{tag}raw"], input=text, capture_output=True, text=True)
    subprocess.run(["dmsetup", "remove", f"{tag}raw"], capture_output=True)  # dmsetup may leave it empty
    assert done.returncode != 0
    kmsg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
    assert any(words in line for line in kmsg[-20:]), kmsg[-5:]
    with pytest.raises(InvalidTable, match=words):
        Table.parse(text)
    with Engine() as eng, pytest.raises(InvalidTable, match=words):
        eng.create(f"{tag}eng", text)
    with pytest.raises(InvalidTable, match=words):
        kernel_dm.create(f"{tag}k", text)
    assert not [e for e in kernel_dm.list() if e.name.startswith(tag)]


_LVM_CONFIG = ("devices { use_devicesfile=0 scan_lvs=0 } "
               "activation { udev_sync=0 udev_rules=0 monitoring=0 }")


def _lvm(*argv: str) -> None:
    done = subprocess.run([argv[0], "--config", _LVM_CONFIG, *argv[1:]], capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"


def test_lvm_thin_devices_read_as_typed_values(kernel_dm: Any, tmp_path: Path, make_loop: Callable[..., Any],
                                              tag: str) -> None:
    """LVM's own thin pool, volume and snapshot: every table and status the kernel prints for them
    parses to a typed value and prints back byte for byte (LVM writes its pool table in its own
    feature order; the kernel's text is what comes back)."""
    if shutil.which("lvcreate") is None:
        pytest.skip("lvm2 is not installed (apt-get install lvm2)")
    pv_file = tmp_path / "dmtt-pv.img"
    with open(pv_file, "wb") as f:
        f.truncate(96 * MiB)
    pv = make_loop(pv_file)
    vg = f"{tag}vg"
    _lvm("pvcreate", "-y", pv.path)
    try:
        _lvm("vgcreate", vg, pv.path)
        _lvm("lvcreate", "-y", "--type", "thin-pool", "-L", "32M", "-n", "pool", vg, "-Zn")
        _lvm("lvchange", "--errorwhenfull", "y", f"{vg}/pool")  # a reload of the active pool
        _lvm("lvcreate", "-y", "-V", "16M", "-T", f"{vg}/pool", "-n", "thin")
        write_synced(f"/dev/mapper/{vg}-thin", random.Random(9).randbytes(MiB))
        _lvm("lvcreate", "-y", "-s", f"{vg}/thin", "-n", "snap")
        _lvm("lvchange", "-ay", "-K", f"{vg}/snap")
        seen = set()
        for entry in kernel_dm.list():
            if not entry.name.startswith(vg):
                continue
            text = _dmsetup("table", entry.name)
            table = kernel_dm.table(entry.name)
            assert table.dmsetup_text() == text
            assert str(Table.parse(text)) == text.rstrip("\n")
            for line, status in zip(table, kernel_dm.status(entry.name)):
                seen.add(line.target_type)
                if line.target_type in ("thin-pool", "thin"):
                    parsed = parse_thin_pool_status(status.params) if line.target_type == "thin-pool" \
                        else parse_thin_status(status.params)
                    assert parsed.format() == status.params
        assert {"thin-pool", "thin"} <= seen
        pools = [kernel_dm.table(e.name).lines[0].target for e in kernel_dm.list() if e.name.startswith(vg)
                 and kernel_dm.table(e.name).target_types == ("thin-pool",)]
        assert [p.features for p in pools] == [("skip_block_zeroing", "error_if_no_space")]
        snap = parse_thin_status(kernel_dm.status(f"{vg}-snap")[0].params)
        assert snap.mapped_sectors == MiB // 512
        assert read_uncached(f"/dev/mapper/{vg}-snap", MiB) == random.Random(9).randbytes(MiB)
    finally:
        subprocess.run(["vgchange", "--config", _LVM_CONFIG, "-an", vg], capture_output=True)
        subprocess.run(["vgremove", "--config", _LVM_CONFIG, "-f", vg], capture_output=True)
        subprocess.run(["pvremove", "--config", _LVM_CONFIG, "-y", pv.path], capture_output=True)
