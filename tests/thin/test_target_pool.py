"""The userspace thin-pool target: messages, status text, modes, out-of-space, events, reloads."""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

import pytest

from dmtools.errors import DeviceIOError, DMError, InvalidTable
from dmtools.status import PoolMode
from target_rig import BB, PoolRig, pattern, read
from thin.metadata import ThinMetadata
from thin.targets import params


def _errno(fn: Any) -> int | None:
    with pytest.raises(DMError) as err:
        fn()
    return err.value.errno


def test_fresh_pool_status_is_the_kernels(rig: PoolRig) -> None:
    text = rig.status_text()
    # dm-thin.c pool_status: every field followed by one space; 1024 metadata blocks, reserve 102.
    st = rig.status()
    assert text == (f"0 {st.used_metadata}/1024 0/64 - rw discard_passdown queue_if_no_space - 256 ")
    copy = rig.meta.with_name("copy.img")  # the live pool's own is claimed: a copy loads the space maps
    copy.write_bytes(rig.meta.read_bytes())
    with ThinMetadata.open(copy, writable=True) as md:
        allocated = md.nr_metadata_blocks - md.free_metadata_blocks
    assert st.used_metadata == allocated + 102
    assert rig.dm.table_text(rig.name) == f"0 {64 * 128} thin-pool {rig.meta} {rig.data} 128 0 0 "


def test_messages_and_their_errors(rig: PoolRig, thin_tools: Any) -> None:
    rig.message("create_thin 1")
    assert _errno(lambda: rig.message("create_thin 1")) == errno.EEXIST
    assert _errno(lambda: rig.message("create_snap 2 7")) == errno.ENODATA
    rig.message("CREATE_SNAP 2 1")  # verbs are case-insensitive
    assert _errno(lambda: rig.message("create_snap 2 1")) == errno.EEXIST
    assert _errno(lambda: rig.message("delete 9")) == errno.ENODATA
    assert _errno(lambda: rig.message("create_thin 16777216")) == errno.EINVAL
    assert _errno(lambda: rig.message("create_thin")) == errno.EINVAL
    assert _errno(lambda: rig.message("frobnicate 1")) == errno.EINVAL
    rig.message("set_transaction_id 0 5")
    assert _errno(lambda: rig.message("set_transaction_id 0 6")) == errno.EINVAL
    assert rig.status().transaction_id == 5
    t = rig.thin(1, "t1", create=False)
    t.write(pattern(1, BB), 0)
    assert _errno(lambda: rig.message("delete 1")) == errno.EBUSY  # open thin device
    rig.message("delete 2")
    rig.message("reserve_metadata_snap")
    held = rig.status().held_root
    assert held is not None and held > 0
    assert _errno(lambda: rig.message("reserve_metadata_snap")) == errno.EBUSY
    thin_tools.check(rig.meta, "-m")  # messages are committed: the held root is on disk
    rig.message("release_metadata_snap")
    assert rig.status().held_root is None
    assert _errno(lambda: rig.message("release_metadata_snap")) == errno.EINVAL
    dump = thin_tools.dump(rig.meta)
    assert 'transaction="5"' in dump and 'dev_id="2"' not in dump and 'dev_id="1"' in dump


def test_thin_status_and_table(rig: PoolRig) -> None:
    t = rig.thin(1, "t1")
    assert rig.dm.status("t1")[0].params == "0 -"
    t.write(pattern(1, 512), 5 * BB + 7)
    assert rig.dm.status("t1")[0].params == f"{rig.block} {6 * rig.block - 1}"
    assert rig.dm.table_text("t1") == f"0 {32 * 128} thin {rig.ref} 1"


def test_thin_refuses_a_missing_device_and_a_non_pool(rig: PoolRig, make_image: Any) -> None:
    with pytest.raises(InvalidTable) as err:
        rig.dm.create("nope", f"0 128 thin {rig.ref} 4")
    assert err.value.errno == errno.ENODATA and "Couldn't open thin internal device" in err.value.message
    rig.dm.create("lin", f"0 128 linear {make_image(1 << 20)} 0")
    try:
        with pytest.raises(InvalidTable, match="Couldn't find pool object"):
            rig.dm.create("nope2", f"0 128 thin {rig.dm.device_ref('lin')} 1")
        with pytest.raises(InvalidTable, match="Couldn't get pool mapped device"):
            rig.dm.create("nope3", f"0 128 thin {make_image(1 << 20, 'x')} 1")
    finally:
        rig.dm.remove("lin")
    assert {e.name for e in rig.dm.list()} == {rig.name}


def test_second_pool_on_the_same_metadata_is_refused(rig: PoolRig, tmp_path: Path) -> None:
    with pytest.raises(InvalidTable, match="metadata device already in use by a pool"):
        rig.dm.create("pool2", rig.table(64))
    assert "pool2" not in {e.name for e in rig.dm.list()}


def test_error_if_no_space_fails_at_once(engine: Any, tmp_path: Path, thin_tools: Any) -> None:
    rig = PoolRig(engine, tmp_path, data_blocks=2, features=("error_if_no_space",))
    t = rig.thin(1, "t1")
    t.write(pattern(1, 2 * BB), 0)
    assert _errno(lambda: t.write(pattern(2, 512), 2 * BB)) == errno.ENOSPC
    st = rig.status()
    assert st.mode is PoolMode.OUT_OF_DATA_SPACE and st.no_space == "error_if_no_space"
    t.write(pattern(3, 512), 0)  # mapped blocks stay writable
    assert read(t, 0, 512) == pattern(3, 512) and read(t, 2 * BB, 512) == bytes(512)
    # Grow the pool: reload with a longer table and resume; writes work again.
    rig.grow(4)
    assert rig.status().mode is PoolMode.WRITE and rig.status().total_data == 4
    t.write(pattern(2, 512), 2 * BB)
    assert read(t, 2 * BB, 512) == pattern(2, 512)
    rig.close()
    thin_tools.check(rig.meta)


def test_queued_write_completes_when_the_pool_grows(engine: Any, tmp_path: Path, thin_tools: Any) -> None:
    rig = PoolRig(engine, tmp_path, data_blocks=1)
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    event_nr = engine.info(rig.name).event_nr
    done: list[BaseException | None] = []
    writer = threading.Thread(target=lambda: _run(done, lambda: t.write(pattern(2, BB), BB)))
    writer.start()
    engine.wait_event(rig.name, event_nr, timeout=10)  # the switch to out-of-data-space
    assert rig.status().mode is PoolMode.OUT_OF_DATA_SPACE
    assert rig.status().no_space == "queue_if_no_space"
    assert writer.is_alive() and not done
    rig.grow(2)
    writer.join(10)
    assert done == [None]
    assert read(t, BB, BB) == pattern(2, BB)
    rig.close()
    thin_tools.check(rig.meta)


def test_queued_write_fails_after_the_no_space_timeout(engine: Any, tmp_path: Path) -> None:
    old = params.set_no_space_timeout(0.3)
    try:
        rig = PoolRig(engine, tmp_path, data_blocks=1)
        t = rig.thin(1, "t1")
        t.write(pattern(1, BB), 0)
        assert _errno(lambda: t.write(pattern(2, 512), BB)) == errno.ENOSPC
        st = rig.status()
        assert st.mode is PoolMode.OUT_OF_DATA_SPACE and st.no_space == "error_if_no_space"
        rig.close()
    finally:
        params.set_no_space_timeout(old)


def test_low_water_mark_raises_one_event_per_resume(engine: Any, tmp_path: Path) -> None:
    rig = PoolRig(engine, tmp_path, data_blocks=8, low_water=4)
    t = rig.thin(1, "t1")
    t.write(pattern(1, 3 * BB), 0)
    before = engine.info(rig.name).event_nr
    t.write(pattern(1, BB), 3 * BB)  # 5 free before this allocation: no event
    assert engine.info(rig.name).event_nr == before
    t.write(pattern(1, BB), 4 * BB)  # 4 free: crosses the mark
    assert engine.info(rig.name).event_nr == before + 1
    t.write(pattern(1, BB), 5 * BB)
    assert engine.info(rig.name).event_nr == before + 1
    rig.close()


def test_needs_check_keeps_the_pool_read_only(engine: Any, tmp_path: Path, thin_tools: Any) -> None:
    rig = PoolRig(engine, tmp_path)
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    rig.close()
    with ThinMetadata.open(rig.meta, writable=True) as md:
        md.mark_needs_check()
    engine.create(rig.name, rig.table(64))
    st = rig.status()
    assert st.needs_check and st.read_only
    assert _errno(lambda: rig.message("create_thin 2")) == errno.EOPNOTSUPP
    rig.close()


def test_metadata_failure_aborts_sets_needs_check_and_goes_read_only(
        engine: Any, tmp_path: Path, thin_tools: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = PoolRig(engine, tmp_path)
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    t.flush()
    t.write(pattern(2, BB), BB)  # not committed yet
    dev = rig.in_core().md.dev
    real = dev.write
    failed: list[int] = []

    def fail_once(blocknr: int, data: bytes) -> None:  # the metadata device fails one write
        if not failed:
            failed.append(blocknr)
            raise DeviceIOError("injected metadata write error", errno=errno.EIO)
        real(blocknr, data)

    monkeypatch.setattr(dev, "write", fail_once)
    with pytest.raises(DMError):
        t.flush()
    assert failed
    st = rig.status()
    assert st.read_only and st.needs_check
    assert _errno(t.flush) == errno.EIO  # its changes were lost by the abort
    assert read(t, 0, BB) == pattern(1, BB)  # the committed block is still there
    assert read(t, BB, 512) == bytes(512)
    rig.close()
    with ThinMetadata.open(rig.meta) as md:
        assert md.needs_check
    thin_tools.check(rig.meta)


def test_reload_keeps_the_pool_and_grows_it(rig: PoolRig, thin_tools: Any) -> None:
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    pool = rig.in_core()
    rig.grow(128)
    assert rig.in_core() is pool
    assert rig.status().total_data == 128
    t.write(pattern(2, BB), BB)
    assert read(t, 0, 2 * BB) == pattern(1, BB) + pattern(2, BB)
    with pytest.raises(DMError, match="too small"):
        rig.dm.load(rig.name, rig.table(64))
        rig.dm.resume(rig.name)


def _run(out: list[BaseException | None], fn: Any) -> None:
    try:
        fn()
        out.append(None)
    except BaseException as err:  # noqa: BLE001 - handed to the test
        out.append(err)


def test_full_metadata_goes_read_only_and_loses_nothing(engine: Any, tmp_path: Path, thin_tools: Any) -> None:
    import random

    rig = PoolRig(engine, tmp_path, data_blocks=65536, meta_bytes=64 * 4096, features=("skip_block_zeroing",))
    t = rig.thin(1, "t1", blocks=65536)
    rng = random.Random(3)
    written: dict[int, bytes] = {}
    with pytest.raises(DMError) as err:
        for i in range(20000):  # random blocks: many half-full leaves
            v = rng.randrange(65536)
            written[v] = i.to_bytes(4, "little") * 128
            t.write(written[v], v * BB)
            if i % 50 == 49:
                t.flush()
    assert err.value.errno == errno.EIO
    failed = v
    del written[failed]  # the write that found no metadata space
    st = rig.status()
    assert st.read_only and not st.needs_check  # out of metadata space, reported as ro
    assert _errno(lambda: rig.message("create_thin 2")) == errno.EOPNOTSUPP
    t.flush()  # nothing uncommitted is left to lose
    for k, data in written.items():
        assert read(t, k * BB, 512) == data
    rig.close()
    thin_tools.check(rig.meta)
    with open(rig.meta, "r+b") as f:  # grow the metadata device: the pool takes writes again
        f.truncate(128 * 4096)
    engine.create(rig.name, rig.table(65536))
    rig.thins, rig.endpoints = [], []
    t = rig.thin(1, "t1", blocks=65536, create=False)
    t.write(pattern(5, 512), failed * BB)
    st = rig.status()
    assert st.mode is PoolMode.WRITE and st.total_metadata == 128
    assert all(read(t, k * BB, 512) == d for k, d in written.items())
    assert read(t, failed * BB, 512) == pattern(5, 512)
    rig.close()
    thin_tools.check(rig.meta)


def test_noflush_suspend_hands_a_queued_write_back(engine: Any, tmp_path: Path, thin_tools: Any) -> None:
    """A write waiting for data space is handed back to its device by a noflush suspend (dm-thin.c
    ``do_noflush_start``/``requeue_io``): the suspend completes, the write neither fails nor is
    lost, and it runs again on the table live after the resume, once the pool has grown."""
    rig = PoolRig(engine, tmp_path, data_blocks=1)
    t = rig.thin(1, "t1")
    t.write(pattern(1, BB), 0)
    event_nr = engine.info(rig.name).event_nr
    done: list[BaseException | None] = []
    writer = threading.Thread(target=lambda: _run(done, lambda: t.write(pattern(2, 512), BB)))
    writer.start()
    engine.wait_event(rig.name, event_nr, timeout=10)
    assert rig.status().mode is PoolMode.OUT_OF_DATA_SPACE
    engine.suspend("t1", noflush=True)  # returns only once the waiting write left the target
    assert engine.info("t1").suspended and writer.is_alive() and not done
    engine.load("t1", engine.table("t1"))  # a reload while suspended, as lvconvert does
    rig.grow(2)
    assert writer.is_alive() and not done  # still held by the suspended device
    engine.resume("t1")
    writer.join(10)
    assert done == [None]
    assert read(t, BB, 512) == pattern(2, 512) and read(t, 0, BB) == pattern(1, BB)
    rig.close()
    thin_tools.check(rig.meta)


def test_fua_write_commits_before_it_completes(engine: Any, tmp_path: Path, thin_tools: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A write with REQ_FUA to a device that changed in the transaction completes after the
    commit (dm-thin.c ``bio_triggers_commit``); a plain write's mapping waits for a flush."""
    monkeypatch.setattr(params, "COMMIT_PERIOD", 3600.0)  # no periodic commit during the test
    rig = PoolRig(engine, tmp_path)
    t = rig.thin(1, "t1")

    def on_disk() -> int:
        with ThinMetadata.open(rig.meta) as md:
            return md.details(1).mapped_blocks

    t.write(pattern(1, 512), 0)
    assert on_disk() == 0  # mapped in core only
    t.write_durable(pattern(2, 512), BB)
    assert on_disk() == 2  # the FUA write committed both mappings
    t.write(pattern(3, 512), 2 * BB)
    assert on_disk() == 2
    t.write_durable(pattern(4, 512), 512)  # a mapped block, but the device changed: commit again
    assert on_disk() == 3
    assert read(t, 0, 1024) == pattern(1, 512) + pattern(4, 512)
    rig.close()
    thin_tools.check(rig.meta)


def test_thin_pool_must_be_the_only_target(engine: Any, tmp_path: Path) -> None:
    """dm-table.c refuses a thin-pool beside other targets, whichever comes first, in the kernel's
    words, and nothing is created."""
    rig = PoolRig(engine, tmp_path)
    size = 64 * rig.block
    pool = f"thin-pool {rig.table(64).split(' ', 3)[3]}"
    cases = {f"0 {size} {pool}\n{size} 8 zero": "line 2: target type thin-pool must appear alone in table",
             f"0 8 zero\n8 {size} {pool}": "line 2: thin-pool: singleton target type must appear alone in table"}
    for text, words in cases.items():
        with pytest.raises(InvalidTable, match=words):
            engine.create("lonely", text)
        assert "lonely" not in {e.name for e in engine.list()}
    rig.close()
