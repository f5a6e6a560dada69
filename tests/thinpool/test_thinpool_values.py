"""Typed ``thin-pool``/``thin`` tables, their statuses and the pool messages (thin.md §1-§3).

Every literal below is the kernel's text as thin.md gives it (or its template filled in); each one
must come back byte for byte, and every bad argument must give the kernel's constructor reason.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmtools.errors import DMError, InvalidArgument, InvalidStatus, InvalidTable
from dmtools.status import PoolMode, ThinPoolStatus, ThinStatus, parse_status, parse_thin_pool_status, parse_thin_status
from dmtools.table import THIN_POOL_FEATURES, Table, Target, Thin, ThinPool
from dmtools.thin_messages import (CreateSnap, CreateThin, Delete, ReleaseMetadataSnap, ReserveMetadataSnap,
                                   SetTransactionId, parse_pool_message)

# thin.md §1.1 "Example: `253:0 253:1 128 0 0 `, or `253:0 253:1 128 0 1 skip_block_zeroing `" and the
# template `<meta> <data> <block size> <low water mark> <count> [skip_block_zeroing ][ignore_discard ]
# [no_discard_passdown ][read_only ][error_if_no_space ]`; §1.2 `<pool maj:min> <dev_id>[ <origin>]`.
KERNEL_TABLES = [
    "0 2097152 thin-pool 253:0 253:1 128 0 0 ",
    "0 2097152 thin-pool 253:0 253:1 128 0 1 skip_block_zeroing ",
    "0 2097152 thin-pool 253:0 253:1 128 0 1 ignore_discard ",
    "0 2097152 thin-pool 253:0 253:1 128 0 1 no_discard_passdown ",
    "0 2097152 thin-pool 253:0 253:1 128 0 1 read_only ",
    "0 2097152 thin-pool 253:0 253:1 128 0 1 error_if_no_space ",
    "0 2097152 thin-pool 253:0 253:1 1024 3277 2 skip_block_zeroing error_if_no_space ",
    "0 2097152 thin-pool 253:0 253:1 2097152 18446744073709551615 4 skip_block_zeroing ignore_discard "
    "read_only error_if_no_space ",
    "0 2097152 thin-pool 253:0 253:1 384 0 3 skip_block_zeroing no_discard_passdown read_only ",
    "0 2097152 thin 253:2 0",
    "0 2097152 thin 253:2 1",
    "0 4194304 thin 253:2 16777215",
    "0 2097152 thin 253:2 7 7:0",
]


@pytest.mark.parametrize("text", KERNEL_TABLES)
def test_kernel_table_text_round_trips(text: str) -> None:
    table = Table.parse(text)
    assert str(table) == text
    assert table.dmsetup_text() == text + "\n"
    assert Table.parse(str(table)) == table


@pytest.mark.parametrize(
    ("written", "kernel"),
    [
        # LVM's emit order and spacing (thin.md §1.1): no trailing space, error_if_no_space before
        # read_only; the kernel prints its own order with a space after every word.
        ("0 8192 thin-pool 253:0 253:1 128 0", "0 8192 thin-pool 253:0 253:1 128 0 0 "),
        ("0 8192 thin-pool 253:0 253:1 128 0 2 error_if_no_space read_only",
         "0 8192 thin-pool 253:0 253:1 128 0 2 read_only error_if_no_space "),
        ("0 8192 thin-pool 253:0 253:1 128 0 2 SKIP_BLOCK_ZEROING Ignore_Discard",
         "0 8192 thin-pool 253:0 253:1 128 0 2 skip_block_zeroing ignore_discard "),
        # duplicates set one flag; the kernel counts flags when it prints
        ("0 8192 thin-pool 253:0 253:1 128 0 2 skip_block_zeroing skip_block_zeroing",
         "0 8192 thin-pool 253:0 253:1 128 0 1 skip_block_zeroing "),
        ("0 8192 thin-pool /dev/loop0 /dev/loop1 00128 010 0", "0 8192 thin-pool /dev/loop0 /dev/loop1 128 10 0 "),
        ("0 8192 thin /dev/mapper/pool-tpool 0001", "0 8192 thin /dev/mapper/pool-tpool 1"),
        # pool_ctr never looks past the feature group: what follows is dropped, as the kernel does
        ("0 8192 thin-pool 253:0 253:1 128 0 1 read_only extra words",
         "0 8192 thin-pool 253:0 253:1 128 0 1 read_only "),
    ],
)
def test_other_spellings_print_as_the_kernel_does(written: str, kernel: str) -> None:
    assert str(Table.parse(written)) == kernel


def test_typed_fields_and_feature_flags() -> None:
    pool = Table.parse(KERNEL_TABLES[6]).lines[0].target
    assert isinstance(pool, ThinPool)
    assert (pool.metadata, pool.data, pool.block_size, pool.low_water_mark) == ("253:0", "253:1", 1024, 3277)
    assert not pool.zero_new_blocks and pool.error_if_no_space
    assert pool.discard_enabled and pool.discard_passdown and not pool.read_only
    assert pool.devices == ("253:0", "253:1")
    assert pool.data_blocks(2097152) == 2048
    thin = Table.parse("0 8 thin 253:2 7 7:0").lines[0].target
    assert thin == Thin("253:2", 7, "7:0")
    assert thin.devices == ("253:2", "7:0")
    assert thin.map_devices(lambda d: f"/x/{d}") == Thin("/x/253:2", 7, "/x/7:0")
    assert ThinPool("a", "b").map_devices(str.upper) == ThinPool("A", "B")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # dm-thin.c pool_ctr ti->error strings (thin.md §1.1)
        ("0 8 thin-pool 253:0 253:1 128", "Invalid argument count"),
        ("0 8 thin-pool 253:0 253:0 128 0", "Error setting metadata or data device"),
        ("0 8 thin-pool 253:0 253:1 0 0", "Invalid block size"),
        ("0 8 thin-pool 253:0 253:1 64 0", "Invalid block size"),
        ("0 8 thin-pool 253:0 253:1 129 0", "Invalid block size"),
        ("0 8 thin-pool 253:0 253:1 2097280 0", "Invalid block size"),
        ("0 8 thin-pool 253:0 253:1 12x 0", "Invalid block size"),
        ("0 8 thin-pool 253:0 253:1 128 -1", "Invalid low water mark"),
        ("0 8 thin-pool 253:0 253:1 128 18446744073709551616", "Invalid low water mark"),
        ("0 8 thin-pool 253:0 253:1 128 0 5 skip_block_zeroing ignore_discard no_discard_passdown "
         "read_only error_if_no_space", "Invalid number of pool feature arguments"),
        ("0 8 thin-pool 253:0 253:1 128 0 2 read_only", "Invalid number of pool feature arguments"),
        ("0 8 thin-pool 253:0 253:1 128 0 x", "Invalid number of pool feature arguments"),
        ("0 8 thin-pool 253:0 253:1 128 0 1 discard", "Unrecognised pool feature requested"),
        # dm-thin.c thin_ctr (thin.md §1.2)
        ("0 8 thin 253:2", "Invalid argument count"),
        ("0 8 thin 253:2 1 7:0 7:1", "Invalid argument count"),
        ("0 8 thin 253:2 16777216", "Invalid device id"),
        ("0 8 thin 253:2 one", "Invalid device id"),
        ("0 8 thin 253:2 1 253:2", "Error setting origin device"),
    ],
)
def test_kernel_constructor_errors(text: str, reason: str) -> None:
    with pytest.raises(InvalidTable, match=reason):
        Table.parse(text)


def test_values_built_in_code_are_checked_like_text() -> None:
    with pytest.raises(InvalidTable, match="Invalid block size"):
        ThinPool("a", "b", 100)
    with pytest.raises(InvalidTable, match="Unrecognised pool feature"):
        ThinPool("a", "b", features=("zero",))
    with pytest.raises(InvalidTable, match="Invalid number of pool feature arguments"):
        ThinPool("a", "b", features=THIN_POOL_FEATURES)
    with pytest.raises(InvalidTable, match="Invalid device id"):
        Thin("p", -1)
    with pytest.raises(InvalidTable, match="Invalid device id"):
        Thin("p", True)  # type: ignore[arg-type]
    assert Thin("a pool", 1).params == "a\\ pool 1"  # escaped as dm_split_args reads it
    with pytest.raises(InvalidTable, match="white space"):
        Thin("a pool ", 1)


@given(st.text(alphabet="0123456789 abcdefghijklmnopqrstuvwxyz_:-/", max_size=60))
def test_fuzzed_parameters_only_raise_invalid_table(params: str) -> None:
    for target_type in ("thin-pool", "thin"):
        try:
            target = Target.parse(target_type, params)
        except InvalidTable:
            continue
        assert Target.parse(target_type, target.params) == target


@given(st.integers(1, MAX := 2097152 // 128).map(lambda n: n * 128), st.integers(0, 2**64 - 1),
       st.sets(st.sampled_from(THIN_POOL_FEATURES), max_size=4))
def test_every_pool_value_round_trips(block: int, lwm: int, features: set[str]) -> None:
    pool = ThinPool("253:0", "253:1", block, lwm, tuple(features))
    text = f"0 {block} thin-pool {pool.params}"
    assert text.endswith(" ")
    assert str(Table.parse(text)) == text
    assert Table.parse(text).lines[0].target == pool


# -- status ----------------------------------------------------------------------------------

# thin.md §3.1 (current) and §3.2 (older shapes 1-4, oldest first), §3.3 thin.
POOL_STATUSES = [
    "Fail",
    "Error",
    "0 9/1024 0/16 -",
    "0 9/1024 0/16 - rw discard_passdown",
    "0 9/1024 0/16 - ro ignore_discard",
    "3 120/4096 10/2048 - rw no_discard_passdown queue_if_no_space ",
    "3 120/4096 10/2048 - out_of_data_space discard_passdown error_if_no_space ",
    "3 120/4096 10/2048 - rw discard_passdown queue_if_no_space - ",
    "3 120/4096 10/2048 - ro discard_passdown queue_if_no_space needs_check ",
    "0 110/1024 0/16 - rw discard_passdown queue_if_no_space - 256 ",
    "7 200/1024 16/16 - out_of_data_space discard_passdown queue_if_no_space - 256 ",
    "7 200/1024 16/16 - out_of_data_space discard_passdown error_if_no_space - 256 ",
    "18446744073709551615 300/1024 4/16 412 ro ignore_discard error_if_no_space needs_check 1024 ",
]


@pytest.mark.parametrize("text", POOL_STATUSES)
def test_pool_status_round_trips(text: str) -> None:
    status = parse_thin_pool_status(text)
    assert status.format() == text
    assert parse_status("thin-pool", text) == status


def test_pool_status_fields() -> None:
    s = parse_thin_pool_status(POOL_STATUSES[-1])
    assert s.transaction_id == 2**64 - 1
    assert (s.used_metadata, s.total_metadata, s.used_data, s.total_data) == (300, 1024, 4, 16)
    assert s.held_root == 412 and s.read_only and s.needs_check and s.error_if_no_space
    assert s.discard == "ignore_discard" and s.metadata_low_watermark == 1024
    assert s.data_percent == 25.0 and s.free_data == 12 and not s.healthy
    full = parse_thin_pool_status(POOL_STATUSES[10])
    assert full.out_of_data_space and not full.error_if_no_space and full.held_root is None
    assert full.mode is PoolMode.OUT_OF_DATA_SPACE and full.needs_check is False
    fresh = parse_thin_pool_status(POOL_STATUSES[9])
    assert fresh.healthy and fresh.data_percent == 0.0
    assert parse_thin_pool_status("Fail").fail and not parse_thin_pool_status("Fail").healthy
    assert parse_thin_pool_status("Error").error
    old = parse_thin_pool_status(POOL_STATUSES[2])
    assert old.mode is None and old.needs_check is None and old.healthy


def test_vendor_words_are_kept() -> None:
    text = "0 9/1024 0/16 - rw discard_passdown queue_if_no_space - 256 fast_block_clone sb_backup "
    status = parse_thin_pool_status(text)
    assert status.extra == ("fast_block_clone", "sb_backup")
    assert status.format() == text


@pytest.mark.parametrize(
    "text",
    ["", "Fail Error", "0 9/1024 0/16", "x 9/1024 0/16 -", "0 9-1024 0/16 -", "0 9/1024 0/16 x",
     "0 9/1024 0/16 - rw", "0 9/1024 0/16 - rw discard", "0 9/1024 0/16 - full discard_passdown",
     "0 9/1024 0/16 - rw discard_passdown needs_check", "0 9/1024 0/16 - rw discard_passdown rw"],
)
def test_bad_pool_status(text: str) -> None:
    with pytest.raises(InvalidStatus):
        parse_thin_pool_status(text)


@pytest.mark.parametrize("text", ["0 -", "128 127", "4096 1048575", "Fail", "Error", "-"])
def test_thin_status_round_trips(text: str) -> None:
    status = parse_thin_status(text)
    assert status.format() == text
    assert parse_status("thin", text) == status


def test_thin_status_fields() -> None:
    assert parse_thin_status("0 -") == ThinStatus(0, None)
    assert parse_thin_status("4096 1048575") == ThinStatus(4096, 1048575)
    assert parse_thin_status("Fail").fail and parse_thin_status("-").unopened
    for bad in ("", "1", "1 2 3", "a -", "- -"):
        with pytest.raises(InvalidStatus):
            parse_thin_status(bad)
    with pytest.raises(InvalidStatus):
        ThinStatus(1, 2, fail=True)
    with pytest.raises(InvalidStatus):
        ThinPoolStatus(fail=True, error=True)


@given(st.text(max_size=80))
def test_fuzzed_statuses_only_raise_invalid_status(text: str) -> None:
    for parse in (parse_thin_pool_status, parse_thin_status):
        try:
            status = parse(text)
        except InvalidStatus:
            continue
        assert parse(status.format()) == status


# -- messages -----------------------------------------------------------------------------------

MESSAGES = [
    ("create_thin 0", CreateThin(0)),
    ("create_thin 16777215", CreateThin(16777215)),
    ("create_snap 2 1", CreateSnap(2, 1)),
    ("delete 3", Delete(3)),
    ("set_transaction_id 0 1", SetTransactionId(0, 1)),
    ("set_transaction_id 41 42", SetTransactionId(41, 42)),
    ("reserve_metadata_snap", ReserveMetadataSnap()),
    ("release_metadata_snap", ReleaseMetadataSnap()),
]


@pytest.mark.parametrize(("text", "value"), MESSAGES)
def test_messages_format_and_parse(text: str, value: object) -> None:
    assert str(value) == text
    assert parse_pool_message(text) == value
    assert parse_pool_message(text.upper()) == value  # verbs are matched case-insensitively


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("create_thin", "Message received with 1 arguments instead of 2."),
        ("create_snap 1", "Message received with 2 arguments instead of 3."),
        ("reserve_metadata_snap now", "Message received with 2 arguments instead of 1."),
        ("create_thin 16777216", "invalid device id"),
        ("delete -1", "invalid device id"),
        ("set_transaction_id 0 x", "invalid transaction id"),
        ("trim 1", "Unrecognised thin pool target message"),
        ("", "empty message"),
    ],
)
def test_bad_messages(text: str, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        parse_pool_message(text)


def test_message_values_check_ids() -> None:
    with pytest.raises(InvalidArgument):
        CreateThin(1 << 24)
    with pytest.raises(InvalidArgument):
        CreateSnap(1, -1)
    with pytest.raises(InvalidArgument):
        SetTransactionId(0, 1 << 64)
    with pytest.raises(DMError):
        Delete("1")  # type: ignore[arg-type]


class _RecordingPool:
    """The ``DeviceMapper.message`` seam: records texts, fails with a chosen errno."""

    def __init__(self, fail_errno: int | None = None) -> None:
        self.sent: list[tuple[str, int, str]] = []
        self.fail_errno = fail_errno

    def message(self, name: str, sector: int, message: str) -> None:
        self.sent.append((name, sector, message))
        if self.fail_errno is not None:
            raise DMError("device-mapper: message ioctl failed", errno=self.fail_errno, operation="message")


def test_calls_send_the_exact_text_to_sector_0() -> None:
    from dmtools import thin_messages as tm

    dm = _RecordingPool()
    tm.create_thin(dm, "p-tpool", 1)  # type: ignore[arg-type]
    tm.create_snap(dm, "p-tpool", 2, 1)  # type: ignore[arg-type]
    tm.delete(dm, "p-tpool", 2)  # type: ignore[arg-type]
    tm.set_transaction_id(dm, "p-tpool", 0, 1)  # type: ignore[arg-type]
    tm.reserve_metadata_snap(dm, "p-tpool")  # type: ignore[arg-type]
    tm.release_metadata_snap(dm, "p-tpool")  # type: ignore[arg-type]
    assert dm.sent == [("p-tpool", 0, t) for t in (
        "create_thin 1", "create_snap 2 1", "delete 2", "set_transaction_id 0 1",
        "reserve_metadata_snap", "release_metadata_snap")]


@pytest.mark.parametrize(
    ("code", "call", "error", "words"),
    [
        (17, lambda tm, dm: tm.create_thin(dm, "p", 1), "DeviceExists", "already has a thin device"),
        (61, lambda tm, dm: tm.create_snap(dm, "p", 2, 9), "DeviceNotFound", "no thin device 9"),
        (61, lambda tm, dm: tm.delete(dm, "p", 4), "DeviceNotFound", "no thin device 4"),
        (16, lambda tm, dm: tm.delete(dm, "p", 4), "DeviceBusy", "active"),
        (16, lambda tm, dm: tm.reserve_metadata_snap(dm, "p"), "DeviceBusy", "already held"),
        (22, lambda tm, dm: tm.set_transaction_id(dm, "p", 3, 4), "InvalidArgument", "is not 3"),
        (22, lambda tm, dm: tm.release_metadata_snap(dm, "p"), "InvalidArgument", "no metadata snapshot"),
        (95, lambda tm, dm: tm.create_thin(dm, "p", 1), "PoolNotWritable", "read-only"),
    ],
)
def test_errno_becomes_a_named_error(code: int, call: object, error: str, words: str) -> None:
    from dmtools import errors
    from dmtools import thin_messages as tm

    dm = _RecordingPool(code)
    with pytest.raises(getattr(errors, error), match=words) as info:
        call(tm, dm)  # type: ignore[operator]
    assert info.value.errno == code and info.value.device == "p"
    assert isinstance(info.value.__cause__, DMError)
