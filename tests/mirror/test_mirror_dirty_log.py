"""Core and disk dirty logs: the kernel's resume rules, mark/clear ordering and resync helpers."""

from __future__ import annotations

import struct

import pytest

from dmtools.errors import DeviceIOError, InvalidTable
from dmtools.testing.memory import MemoryEndpoint
from mirror.format import LogImage, format_log
from dmtools.target_values import CoreLog, DiskLog, OtherLog, SyncMode
from mirror.log import CoreDirtyLog, DiskDirtyLog, open_dirty_log

LEN = 100 * 8  # sectors: 100 regions of 8 sectors


def _disk(ep: MemoryEndpoint, sync: SyncMode = SyncMode.DEFAULT, length: int = LEN) -> DiskDirtyLog:
    lg = DiskDirtyLog(ep, "7:1", length, 8, sync)
    lg.resume()
    return lg


def test_core_log_starts_out_of_sync_unless_nosync() -> None:
    lg = CoreDirtyLog(LEN, 8)
    assert lg.region_count == 100 and lg.get_sync_count() == 0
    assert all(lg.is_clean(r) for r in range(100)) and not lg.in_sync(5)
    ns = CoreDirtyLog(LEN, 8, SyncMode.NOSYNC)
    assert ns.get_sync_count() == 100 and ns.in_sync(99) and ns.in_sync(3)
    assert lg.status_info() == "1 core"


def test_region_count_rounds_up() -> None:
    assert CoreDirtyLog(801, 8).region_count == 101


def test_get_resync_work_and_set_region_sync() -> None:
    lg = CoreDirtyLog(LEN, 8)
    got = [lg.get_resync_work() for _ in range(3)]
    assert got == [0, 1, 2]
    assert lg.recovering.test(1) and not lg.recovering.test(3)
    lg.set_region_sync(1, True)
    lg.set_region_sync(0, False)
    assert lg.in_sync(1) and not lg.in_sync(0) and lg.get_sync_count() == 1
    # the scan goes forward; resume restarts it and skips regions still recovering
    rest = []
    while (r := lg.get_resync_work()) is not None:
        rest.append(r)
    assert rest == list(range(3, 100))
    lg.resume()
    assert lg.get_resync_work() == 0
    assert lg.get_resync_work() is None  # 2..99 still recovering, 1 in sync
    lg.set_region_sync(1, False)
    assert lg.get_sync_count() == 0


def test_disk_resume_of_blank_device_is_all_out_of_sync_and_writes_header() -> None:
    ep = MemoryEndpoint(4096, "log")
    lg = _disk(ep)
    assert lg.get_sync_count() == 0
    assert ep.data[0:16] == struct.pack("<IIQ", 0x4D695272, 2, 100)
    assert ep.data[1024:1040] == bytes(16)
    assert [j[0] for j in ep.journal] == ["write", "flush"]
    assert lg.status_info() == "3 disk 7:1 A"


def test_disk_resume_trusts_clean_bits_and_preserves_reserved_bytes() -> None:
    ep = MemoryEndpoint(4096, "log")
    img = format_log(ep, 100, in_sync=True)
    img.clean.clear(42)
    img.write(ep)
    ep.data[16:1024] = b"\xab" * 1008
    lg = _disk(ep)
    assert lg.get_sync_count() == 99 and not lg.in_sync(42) and lg.in_sync(41)
    assert ep.data[16:1024] == b"\xab" * 1008
    assert lg.get_resync_work() == 42 and lg.get_resync_work() is None


@pytest.mark.parametrize("mode, expect", [(SyncMode.FORCESYNC, 0), (SyncMode.NOSYNC, 100)])
def test_sync_arguments_make_the_log_new(mode: SyncMode, expect: int) -> None:
    ep = MemoryEndpoint(4096, "log")
    img = format_log(ep, 100, in_sync=True)
    img.clean.clear(3)
    img.write(ep)
    lg = _disk(ep, mode)
    assert lg.get_sync_count() == expect


def test_grown_regions_out_of_sync_shrunk_bits_cleared() -> None:
    ep = MemoryEndpoint(4096, "log")
    format_log(ep, 100, in_sync=True)
    lg = _disk(ep, length=LEN + 8 * 20)  # 120 regions
    assert lg.get_sync_count() == 100 and not lg.in_sync(100) and not lg.in_sync(119)
    assert struct.unpack_from("<Q", ep.data, 8)[0] == 120
    lg2 = _disk(ep, length=8 * 70)  # shrink to 70 regions
    assert lg2.get_sync_count() == 70
    assert ep.data[1024 + 8] == 0x3F and ep.data[1024 + 9 : 1024 + 16] == bytes(7)


def test_bad_magic_counts_as_new_log_version_1_is_accepted_and_an_unknown_one_fails() -> None:
    ep = MemoryEndpoint(4096, "log")
    format_log(ep, 100, in_sync=True)
    ep.data[4:8] = struct.pack("<I", 1)
    assert _disk(ep).get_sync_count() == 100
    ep.data[4:8] = struct.pack("<I", 3)  # a version this code does not know: the log fails
    lg = _disk(ep)
    assert lg.get_sync_count() == 0 and lg.status_info() == "3 disk 7:1 D"
    format_log(ep, 100, in_sync=True)
    ep.data[0:4] = b"XXXX"
    assert _disk(ep).get_sync_count() == 0
    assert ep.data[0:4] == bytes([0x72, 0x52, 0x69, 0x4D])


def test_unreadable_log_counts_everything_out_of_sync_and_reports_d() -> None:
    ep = MemoryEndpoint(4096, "log")
    format_log(ep, 100, in_sync=True)
    ep.fail_reads = True
    lg = _disk(ep)
    assert lg.get_sync_count() == 0 and lg.status_info() == "3 disk 7:1 D"


def _recorded(journal: list[tuple[str, str, int, int]]) -> list[str]:
    return [f"{op} {dev}" for op, dev, _o, _n in journal]


def _journaled(nlegs: int = 2) -> tuple[list[tuple[str, str, int, int]], MemoryEndpoint, DiskDirtyLog]:
    """A NOSYNC disk log whose own I/O and its legs' flushes are recorded in one journal."""
    journal: list[tuple[str, str, int, int]] = []
    ep = MemoryEndpoint(4096, "log", journal)
    legs = [MemoryEndpoint(LEN * 512, f"leg{i}", journal) for i in range(nlegs)]
    lg = _disk(ep, SyncMode.NOSYNC)
    lg.flush_legs = lambda: [leg.flush() for leg in legs] and None
    return journal, ep, lg


def test_dirty_mark_is_durable_before_returning() -> None:
    journal, ep, lg = _journaled()
    journal.clear()
    lg.mark_region(7)
    lg.flush()
    assert _recorded(journal) == ["write log", "flush log"]
    assert ep.data[1024] == 0x7F  # region 7 dirty, written before the flush
    journal.clear()
    lg.flush()  # nothing touched: no I/O
    assert journal == []


def test_clean_mark_written_only_after_legs_flushed() -> None:
    journal, ep, lg = _journaled()
    lg.mark_region(7)
    lg.flush()
    journal.clear()
    lg.clear_region(7)
    lg.flush()
    assert _recorded(journal) == ["flush leg0", "flush leg1", "write log"]
    assert ep.data[1024] == 0xFF


def test_mixed_clean_and_dirty_flush_order() -> None:
    journal, _ep, lg = _journaled(1)
    lg.mark_region(1)
    lg.flush()
    journal.clear()
    lg.clear_region(1)
    lg.mark_region(2)
    lg.flush()
    assert _recorded(journal) == ["flush leg0", "write log", "flush log"]


def test_failed_leg_flush_marks_every_region_dirty_and_ignores_clears() -> None:
    ep = MemoryEndpoint(4096, "log")
    lg = _disk(ep, SyncMode.NOSYNC)

    def bad_flush() -> None:
        raise DeviceIOError("leg flush failed")

    lg.flush_legs = bad_flush
    lg.mark_region(5)
    lg.flush()
    lg.clear_region(5)
    lg.flush()
    assert ep.data[1024 : 1024 + 13] == bytes(13)
    assert LogImage.read(ep).out_of_sync() == list(range(100))
    lg.clear_region(6)
    assert not lg.is_clean(6)


def test_log_write_failure_marks_log_failed() -> None:
    ep = MemoryEndpoint(4096, "log")
    lg = _disk(ep, SyncMode.NOSYNC)
    ep.fail_writes = True
    lg.mark_region(1)
    with pytest.raises(DeviceIOError):
        lg.flush()
    assert lg.status_info().endswith(" D")
    ep.fail_writes = False
    ep.fail_flush = True
    lg.mark_region(2)
    with pytest.raises(DeviceIOError):
        lg.flush()
    assert lg.status_info().endswith(" F")


def test_open_dirty_log_from_the_table_value() -> None:
    core = open_dirty_log(CoreLog(8, "nosync"), LEN, lambda ref: pytest.fail(f"opened {ref}"))
    assert type(core) is CoreDirtyLog and core.get_sync_count() == 100
    opened: list[str] = []

    def opener(ref: str) -> MemoryEndpoint:
        opened.append(ref)
        return MemoryEndpoint(4096 if ref == "7:1" else 1024, ref)

    disk = open_dirty_log(DiskLog("7:1", 8, "sync"), LEN, opener)
    assert isinstance(disk, DiskDirtyLog) and disk.sync is SyncMode.FORCESYNC and opened == ["7:1"]
    with pytest.raises(InvalidTable, match='^Error creating mirror dirty log: Module for logging type "userspace"'):
        open_dirty_log(OtherLog("userspace", ("uuid", "7:2")), LEN, opener)
    with pytest.raises(InvalidTable, match="^Error creating mirror dirty log: log device 7:2 too small: need 1536"):
        open_dirty_log(DiskLog("7:2", 8), LEN, opener)
    assert opened == ["7:1", "7:2"]
