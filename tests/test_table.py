"""Tables and typed targets: exact round trips of the kernel's and dmsetup's text, validation."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmtools.errors import DMError, InvalidTable
from dmtools.table import (TARGET_TYPES, CoreLog, DiskLog, Error, GenericTarget, Leg, Linear, Mirror, OtherLog,
                           Snapshot, SnapshotMerge, SnapshotOrigin, Striped, SyncMode, Table, TableLine, Target, Zero,
                           format_line, parse_devno, split_args)
from dmtools.units import MAX_SECTORS

# Tables from /work/shared/reference/kernel.md (§2.1, §2.3, §2.11, §3.1, §3.2), literally where the
# reference gives a literal and with its placeholders filled in where it gives a template.
KERNEL_MD_TABLES = [
    # §3.2 "Example: `core 1 1024 2 253:1 0 253:2 0`" (the mirror TABLE params)
    "0 2048 mirror core 1 1024 2 253:1 0 253:2 0",
    # §3.2 TABLE with a sync word and features: `core <1|2> <region_size> [nosync |sync ]`,
    # `disk <2|3> <logdev> <region_size> [nosync |sync ]`, `[<n> handle_errors keep_log]`
    "0 2048 mirror core 2 1024 nosync 2 253:1 0 253:2 0",
    "0 2048 mirror core 2 1024 sync 2 253:1 0 253:2 0",
    "0 2048 mirror disk 2 253:3 1024 2 253:1 0 253:2 0",
    "0 2048 mirror disk 3 253:3 1024 nosync 2 253:1 0 253:2 0",
    "0 2048 mirror disk 3 253:3 1024 sync 3 253:1 0 253:2 0 253:4 0 1 handle_errors",
    "0 2048 mirror disk 2 253:3 1024 2 253:1 0 253:2 0 2 handle_errors keep_log",
    # §3.1 "libdm emits ` 1 handle_errors` at the end of the table"
    "0 1048576 mirror core 1 2048 2 /dev/loop0 0 /dev/loop1 0 1 handle_errors",
    # §3.1 `#mirrors` is 2..9
    "0 4096 mirror core 1 1024 9 7:0 0 7:1 0 7:2 0 7:3 0 7:4 0 7:5 0 7:6 0 7:7 0 7:8 0",
    # §2.3 TABLE: snapshot `<origin maj:min> <cow maj:min> P|PO|N <chunk>`
    # [+ ` <n> discard_zeroes_cow [discard_passdown_origin]`]
    "0 2097152 snapshot 253:0 253:1 P 8",
    "0 2097152 snapshot 253:0 253:1 PO 8",
    "0 2097152 snapshot 253:0 253:1 N 16",
    "0 2097152 snapshot 253:0 253:1 P 8 1 discard_zeroes_cow",
    "0 2097152 snapshot 253:0 253:1 P 8 2 discard_zeroes_cow discard_passdown_origin",
    # §2.3 snapshot-origin TABLE is `<dev maj:min>`; §2.11 `snapshot-origin <real maj:min>`
    "0 2097152 snapshot-origin 253:0",
    # §2.11 `snapshot <real maj:min> <cow maj:min> P <chunk>` and the merge table
    # `snapshot-merge <real> <cow> P <chunk>`
    "0 2097152 snapshot 253:4 253:5 P 8",
    "0 2097152 snapshot-merge 253:4 253:5 P 8",
    # §2.11 "Our manual libdevmapper sequence": `snapshot-origin X-real`, snapshot over X-real/S-cow
    "0 2097152 snapshot-origin /dev/mapper/X-real",
    "0 2097152 snapshot /dev/mapper/X-real /dev/mapper/S-cow P 8",
    # §2.2 chunk 0 means "take it from the on-disk header"
    "0 2097152 snapshot 253:0 253:1 P 0",
    # §2.11 lvconvert --merge loads an active snapshot LV with the `error` target
    "0 2097152 error",
]

OTHER_TABLES = [
    "0 2048 linear /dev/loop0 0",
    "0 2048 linear 7:0 2048",
    "0 100 zero",
    "0 1024 striped 2 8 7:0 0 7:1 16",
    "0 1536 striped 3 512 /dev/sda 0 /dev/sdb 0 /dev/sdc 0",
    "0 2048 linear 7:0 0\n2048 2048 zero\n4096 8 error",
    "0 2048 error 7:0 0",
    "0 2048 mirror userspace 4 LVM-xyz clustered-disk 253:3 1024 2 253:1 0 253:2 0",
    "0 10 thin-pool 253:0 253:1 128 0 1 skip_block_zeroing ",
    "0 10 flakey 7:0 0 5 5",
    "0 10 crypt aes-xts-plain64 0000 0 7:0 0",
]


@pytest.mark.parametrize("text", KERNEL_MD_TABLES + OTHER_TABLES)
def test_round_trip_is_exact(text: str) -> None:
    table = Table.parse(text)
    assert str(table) == text
    assert Table.parse(str(table)) == table
    assert table.dmsetup_text() == "".join(format_line(ln.start, ln.length, ln.target_type, ln.params) for ln in table)


@pytest.mark.parametrize("text", KERNEL_MD_TABLES + OTHER_TABLES)
def test_target_parse_matches_table_line(text: str) -> None:
    for line in Table.parse(text):
        assert Target.parse(line.target_type, line.params) == line.target


def test_mirror_example_fields() -> None:
    table = Table.parse("0 2048 mirror core 1 1024 2 253:1 0 253:2 0")
    target = table[0].target
    assert isinstance(target, Mirror)
    assert target.log == CoreLog(1024)
    assert target.legs == (Leg("253:1", 0), Leg("253:2", 0))
    assert target.region_size == 1024
    assert target.region_count(2048) == 2 and target.region_count(2049) == 3
    assert not target.handle_errors and not target.keep_log
    assert target.devices == ("253:1", "253:2")
    disk = Target.parse("mirror", "disk 3 253:3 1024 nosync 2 253:1 0 253:2 0 1 handle_errors")
    assert isinstance(disk, Mirror)
    assert disk.log == DiskLog("253:3", 1024, SyncMode.NOSYNC) == DiskLog("253:3", 1024, "nosync")  # type: ignore[arg-type]
    assert disk.log.sync is SyncMode.NOSYNC and target.log.sync is SyncMode.DEFAULT and str(target.log) == "core 1 1024"
    assert disk.devices == ("253:3", "253:1", "253:2")
    assert disk.handle_errors


def test_snapshot_fields() -> None:
    snap = Target.parse("snapshot", "253:0 253:1 PO 16 1 discard_zeroes_cow")
    assert snap == Snapshot("253:0", "253:1", "PO", 16, ("discard_zeroes_cow",))
    assert isinstance(snap, Snapshot)
    assert snap.persistent and snap.overflow
    assert snap.devices == ("253:0", "253:1")
    merge = Target.parse("snapshot-merge", "253:0 253:1 P 8")
    assert isinstance(merge, SnapshotMerge) and merge != Snapshot("253:0", "253:1", "P", 8)
    assert Target.parse("snapshot-origin", "253:0") == SnapshotOrigin("253:0")


def test_dmsetup_text_is_byte_exact() -> None:
    table = Table.parse("0 2048 linear 7:0 0\n2048 100 zero\n2148 8 error")
    # dmsetup prints "%llu %llu %s %s\n": targets without parameters keep a trailing space.
    assert table.dmsetup_text() == "0 2048 linear 7:0 0\n2048 100 zero \n2148 8 error \n"
    assert str(table) == "0 2048 linear 7:0 0\n2048 100 zero\n2148 8 error"


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        # dmsetup: comments, blank lines, surrounding whitespace; the kernel splits on whitespace
        ("# a comment\n\n  0 10 zero  \n", "0 10 zero"),
        ("0 10 linear 7:0 0 # the first disk\n10 10 zero", "0 10 linear 7:0 0\n10 10 zero"),
        ("0\t10\tlinear\t7:0\t\t0", "0 10 linear 7:0 0"),
        ("0 10 linear 7:0 0\r\n", "0 10 linear 7:0 0"),
        # the kernel prints numbers canonically
        ("0 10 linear 7:0 0007", "0 10 linear 7:0 7"),
        ("00 010 zero", "0 10 zero"),
        # store type and snapshot features are case-insensitive; printed as the kernel does
        ("0 8 snapshot 253:0 253:1 p 8", "0 8 snapshot 253:0 253:1 P 8"),
        ("0 8 snapshot 253:0 253:1 po 8", "0 8 snapshot 253:0 253:1 PO 8"),
        # the stores read only the first option letter (dm-snap-persistent.c) or none (-transient.c)
        ("0 8 snapshot 253:0 253:1 pox 8", "0 8 snapshot 253:0 253:1 PO 8"),
        ("0 8 snapshot 253:0 253:1 Nx 8", "0 8 snapshot 253:0 253:1 N 8"),
        (
            "0 8 snapshot 253:0 253:1 P 8 2 DISCARD_PASSDOWN_ORIGIN Discard_Zeroes_Cow",
            "0 8 snapshot 253:0 253:1 P 8 2 discard_zeroes_cow discard_passdown_origin",
        ),
        ("0 8 snapshot 253:0 253:1 P 8 0", "0 8 snapshot 253:0 253:1 P 8"),
        # mirror: features in the kernel's order, duplicates folded, a zero count dropped
        (
            "0 2048 mirror core 1 1024 2 7:1 0 7:2 0 2 keep_log handle_errors",
            "0 2048 mirror core 1 1024 2 7:1 0 7:2 0 2 handle_errors keep_log",
        ),
        (
            "0 2048 mirror core 1 1024 2 7:1 0 7:2 0 2 handle_errors handle_errors",
            "0 2048 mirror core 1 1024 2 7:1 0 7:2 0 1 handle_errors",
        ),
        ("0 2048 mirror core 1 1024 2 7:1 0 7:2 0 0", "0 2048 mirror core 1 1024 2 7:1 0 7:2 0"),
        # unknown targets keep their parameters verbatim (inner spacing included)
        ("0 10 era   253:0  253:1  128  ", "0 10 era 253:0  253:1  128"),
        ("", ""),
        ("\n# only comments\n", ""),
    ],
)
def test_parse_normalises_like_the_kernel(text: str, canonical: str) -> None:
    table = Table.parse(text)
    assert str(table) == canonical
    assert Table.parse(canonical) == table


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0 10", "line 1: invalid format"),
        ("zero 10 zero", "line 1: start 'zero' is not a decimal"),
        ("0 -10 zero", "length '-10' is not a decimal"),
        ("0 0 zero", "zero-length target"),
        ("5 10 zero", "Gap in table"),
        ("0 10 zero\n11 10 zero", "line 2: zero: Gap in table"),
        ("0 10 zero\n5 10 zero", "Gap in table"),
        (f"0 {MAX_SECTORS + 1} zero", "length [0-9]*: too large device"),
        (f"0 {MAX_SECTORS} zero\n{MAX_SECTORS} 1 zero", "too large device"),
        ("0 10 zero x", "zero: No arguments required"),
        ("0 9 striped 2 8 7:0 0", "Target length not divisible by number of stripes"),
        ("0 8 striped 2 8 7:0 0", "Target length not divisible by chunk size"),
        ("0 10 linear 7:0", "linear: Invalid argument count"),
        ("0 10 linear 7:0 x", "linear: Invalid device sector 'x'"),
        ("0 10 linear 7:0 -1", "Invalid device sector"),
        ("0 10 linear 7:0 +1", "Invalid device sector"),
        ("0 10 linear 7:0 99999999999999999999999", "too large"),
        ("0 10 striped 2", "Not enough arguments"),
        ("0 10 striped 0 8", "Invalid stripe count 0"),
        ("0 16 striped 2 0 7:0 0 7:1 0", "Invalid chunk_size"),
        ("0 16 striped 2 8 7:0 0", "Not enough destinations"),
        ("0 15 striped 2 8 7:0 0 7:1 0", "not divisible by number of stripes"),
        ("0 20 striped 2 8 7:0 0 7:1 0", "not divisible by chunk size"),
        ("0 8 snapshot 253:0 253:1 P", "requires 4 or more arguments"),
        ("0 8 snapshot 253:0 253:1 X 8", "Exception store type is not P or N"),
        ("0 8 snapshot 253:0 253:1 PX 8", "Exception store type constructor failed"),
        ("0 8 snapshot 253:0 253:1 P 12", "Chunk size is not a power of 2"),
        ("0 8 snapshot 253:0 253:1 P 8388608", "Chunk size is too high"),
        ("0 8 snapshot 253:0 253:1 N 0", "Chunk size not set"),
        ("0 8 snapshot 253:0 253:0 P 8", "COW device cannot be the same as origin"),
        ("0 8 snapshot 253:0 253:1 P 8 3 a b c", "Invalid number of feature arguments"),
        ("0 8 snapshot 253:0 253:1 P 8 2 discard_zeroes_cow", "Invalid number of feature arguments"),
        ("0 8 snapshot 253:0 253:1 P x", "Couldn't create exception store: Invalid chunk size"),
        ("0 8 snapshot 253:0 253:1 P 8 1 discard_zeroes_cow x", "Too many arguments"),
        ("0 8 snapshot 253:0 253:1 P 8 1 bogus", "Unrecognised feature requested"),
        ("0 8 snapshot 253:0 253:1 P 8 1 discard_passdown_origin", "depends on discard_zeroes_cow"),
        ("0 8 snapshot-merge 253:0 253:1 N 8", "does not support snapshot-merge"),
        ("0 8 snapshot-origin", "origin: incorrect number of arguments"),
        ("0 8 snapshot-origin a b", "origin: incorrect number of arguments"),
        ("0 2048 mirror core", "Insufficient mirror log arguments"),
        ("0 2048 mirror core x 1024", "Invalid mirror log argument count"),
        ("0 2048 mirror core 9 1024 sync 2 7:1 0 7:2 0", "Insufficient mirror log arguments"),
        ("0 2048 mirror core 3 1024 sync x 2 7:1 0 7:2 0", "dirty log: wrong number of arguments to dirty region log"),
        ("0 2048 mirror disk 1 1024 2 7:1 0 7:2 0", "wrong number of arguments to disk"),
        ("0 2048 mirror core 2 1024 block_on_error 2 7:1 0 7:2 0", "block_on_error"),
        ("0 2048 mirror core 2 1024 maybe 2 7:1 0 7:2 0", "unrecognised sync argument"),
        ("0 2048 mirror core 1 1000 2 7:1 0 7:2 0", "invalid region size 1000"),
        ("0 2048 mirror core 1 1 2 7:1 0 7:2 0", "invalid region size 1"),
        ("0 512 mirror core 1 1024 2 7:1 0 7:2 0", "larger than the target"),
        ("0 2048 mirror core 1 1024", "Invalid number of mirrors"),
        ("0 2048 mirror core 1 1024 1 7:1 0", "Invalid number of mirrors 1"),
        ("0 2048 mirror core 1 1024 10 " + "7:1 0 " * 10, "Invalid number of mirrors 10"),
        ("0 2048 mirror core 1 1024 2 7:1 0", "Too few mirror arguments"),
        ("0 2048 mirror core 1 1024 2 7:1 0 7:2 x", "Invalid offset"),
        ("0 2048 mirror core 1 1024 2 7:1 0 7:2 0 1", "Not enough arguments to support feature"),
        ("0 2048 mirror core 1 1024 2 7:1 0 7:2 0 1 keep_log", "keep_log feature requires"),
        ("0 2048 mirror core 1 1024 2 7:1 0 7:2 0 1 nonsense", "Unrecognised feature"),
        ("0 2048 mirror core 1 1024 2 7:1 0 7:2 0 1 handle_errors x", "Too many mirror arguments"),
        ("0 10 averyveryverylongtype", "longer than 15"),
        ("0 10 thin a\x00b", "NUL"),
        ("0 10 ze\x01ro", "single word"),
    ],
)
def test_invalid_tables_say_why(text: str, fragment: str) -> None:
    with pytest.raises(InvalidTable, match=fragment):
        Table.parse(text)


def test_invalid_table_error_carries_errno() -> None:
    with pytest.raises(InvalidTable) as info:
        Table.parse("0 10 zero\n\n5 10 zero")
    assert info.value.errno == 22
    assert "line 3" in str(info.value)


def test_constructors_and_queries() -> None:
    table = Table.from_targets(
        [(2048, Linear("/dev/loop0", 0)), (1024, Striped(8, (Leg("7:0", 0), Leg("7:1", 0)))), (8, Zero())]
    )
    assert table.size == 2048 + 1024 + 8
    assert len(table) == 3
    assert table.target_types == ("linear", "striped", "zero")
    assert table.devices() == ("/dev/loop0", "7:0", "7:1")
    assert table.line_at(0).target_type == "linear"
    assert table.line_at(2047).target_type == "linear"
    assert table.line_at(2048).target_type == "striped"
    assert table.line_at(3079).target_type == "zero"
    with pytest.raises(InvalidTable):
        table.line_at(3080)
    assert Table.single(100, Zero()) == Table.parse("0 100 zero")
    assert Table([(0, 100, Zero())]) == Table.parse("0 100 zero")
    assert Table().size == 0 and not Table() and str(Table()) == ""
    assert table[1:] == table.lines[1:]


def test_map_devices() -> None:
    table = Table.parse("0 2048 mirror disk 2 /dev/log 1024 2 /dev/a 0 /dev/b 0\n2048 8 snapshot /dev/a /dev/c P 8")
    numbers = {"/dev/log": "253:3", "/dev/a": "253:1", "/dev/b": "253:2", "/dev/c": "253:4"}
    mapped = table.map_devices(numbers.__getitem__)
    assert str(mapped) == "0 2048 mirror disk 2 253:3 1024 2 253:1 0 253:2 0\n2048 8 snapshot 253:1 253:4 P 8"
    assert mapped.devices() == ("253:3", "253:1", "253:2", "253:4")


def test_table_construction_errors() -> None:
    with pytest.raises(InvalidTable, match="Table.parse"):
        Table("0 10 zero")  # type: ignore[arg-type]
    with pytest.raises(InvalidTable, match="start at sector 0"):
        Table([(1, 10, Zero())])
    with pytest.raises(InvalidTable, match="Gap in table"):
        Table([(0, 10, Zero()), (11, 10, Zero())])
    with pytest.raises(InvalidTable, match="TableLine or"):
        Table([Zero()])  # type: ignore[list-item]
    with pytest.raises(InvalidTable, match="non-negative"):
        TableLine(-1, 10, Zero())
    with pytest.raises(InvalidTable, match="Target"):
        TableLine(0, 10, "zero")  # type: ignore[arg-type]


def test_target_construction_validates() -> None:
    with pytest.raises(InvalidTable, match="non-empty string"):
        Linear("", 0)
    assert Linear("/dev/a b\\c", 0).params == "/dev/a\\ b\\\\c 0"
    with pytest.raises(InvalidTable, match="'#'"):
        Linear("/dev/a#b", 0)
    with pytest.raises(InvalidTable, match="line end"):
        Linear("/dev/a\nb", 0)
    with pytest.raises(InvalidTable, match="ends in white space"):
        Linear("/dev/a ", 0)
    with pytest.raises(InvalidTable, match="0xA0"):
        Linear("/dev/\u00e0", 0)
    with pytest.raises(InvalidTable, match="out of range"):
        Linear("7:0", -1)
    with pytest.raises(InvalidTable, match="integer"):
        Linear("7:0", "0")  # type: ignore[arg-type]
    with pytest.raises(InvalidTable, match="Invalid stripe count 0"):
        Striped(8, ())
    with pytest.raises(InvalidTable, match="pair"):
        Striped(8, ((1, 2, 3),))  # type: ignore[arg-type]
    with pytest.raises(InvalidTable, match="Invalid number of mirrors 1"):
        Mirror(CoreLog(1024), (Leg("7:0", 0),))
    with pytest.raises(InvalidTable, match="log must be"):
        Mirror("core", (("7:0", 0), ("7:1", 0)))  # type: ignore[arg-type]
    with pytest.raises(InvalidTable, match="sequence"):
        Mirror(CoreLog(1024), (("7:0", 0), ("7:1", 0)), "handle_errors")  # type: ignore[arg-type]
    with pytest.raises(InvalidTable, match="power of 2"):
        DiskLog("7:2", 3)
    with pytest.raises(InvalidTable, match="invalid log type"):
        OtherLog("", ())
    with pytest.raises(InvalidTable, match="offset needs a device"):
        Error(None, 5)
    with pytest.raises(InvalidTable, match="comment"):
        GenericTarget("thin", "a # b")
    with pytest.raises(InvalidTable, match="one line"):
        GenericTarget("thin", "a\nb")
    with pytest.raises(InvalidTable, match="single word"):
        GenericTarget("th in", "")
    # A bare string leg means offset 0.
    assert Striped(8, ("7:0", "7:1")).stripes == (Leg("7:0", 0), Leg("7:1", 0))  # type: ignore[arg-type]


def test_values_are_immutable_and_hashable() -> None:
    target = Linear("7:0", 0)
    with pytest.raises(AttributeError):
        target.offset = 5  # type: ignore[misc]
    table = Table.single(8, target)
    with pytest.raises(AttributeError):
        table.lines = ()  # type: ignore[misc]
    assert hash(table) == hash(Table.parse("0 8 linear 7:0 0"))
    assert {Snapshot("a", "b"), Snapshot("a", "b", "p")} == {Snapshot("a", "b")}


def test_generic_target_for_unknown_types() -> None:
    target = Target.parse("era", "253:0 253:1 128")
    assert isinstance(target, GenericTarget)
    assert target.target_type == "era"
    assert target.args() == ["253:0", "253:1", "128"]
    assert target.devices == ()
    assert set(TARGET_TYPES) == {
        "linear", "striped", "zero", "error", "snapshot", "snapshot-merge", "snapshot-origin",
        "mirror", "thin-pool", "thin",
    }


def test_helpers() -> None:
    assert parse_devno("253:1") == (253, 1)
    assert parse_devno("/dev/loop0") is None
    assert parse_devno("253:1:2") is None
    assert split_args("  a \t b\n") == ["a", "b"]
    assert split_args("") == []
    assert format_line(0, 10, "zero", "") == "0 10 zero \n"


# -- property tests -------------------------------------------------------------------------------

_devices = st.one_of(st.builds(lambda a, b: f"{a}:{b}", st.integers(0, 4095), st.integers(0, 1 << 20)),
                     st.from_regex(r"/dev/[a-z][a-z0-9/_.:-]{0,20}", fullmatch=True))
_offsets = st.integers(0, MAX_SECTORS)
_legs = st.tuples(_devices, _offsets).map(lambda t: Leg(*t))


@st.composite
def _lines(draw: st.DrawFn) -> tuple[int, Target]:
    kind = draw(st.sampled_from(["linear", "striped", "zero", "error", "snapshot", "merge", "origin", "mirror", "generic"]))
    length = draw(st.integers(1, 1 << 30))
    if kind == "linear":
        return length, Linear(draw(_devices), draw(_offsets))
    if kind == "striped":
        count = draw(st.integers(1, 8))
        chunk = draw(st.integers(1, 4096))
        return count * chunk * draw(st.integers(1, 64)), Striped(
            chunk, tuple(draw(st.lists(_legs, min_size=count, max_size=count)))
        )
    if kind == "zero":
        return length, Zero()
    if kind == "error":
        return length, draw(st.one_of(st.just(Error()), st.builds(Error, _devices, _offsets)))
    if kind in ("snapshot", "merge"):
        origin, cow = draw(st.lists(_devices, min_size=2, max_size=2, unique=True))
        store = draw(st.sampled_from(["P", "PO"] if kind == "merge" else ["P", "PO", "N"]))
        chunk = 1 << draw(st.integers(0, 21))
        feats = draw(st.sampled_from([(), ("discard_zeroes_cow",), ("discard_zeroes_cow", "discard_passdown_origin")]))
        cls = SnapshotMerge if kind == "merge" else Snapshot
        return length, cls(origin, cow, store, chunk, feats)
    if kind == "origin":
        return length, SnapshotOrigin(draw(_devices))
    if kind == "mirror":
        region = 1 << draw(st.integers(1, 20))
        length = max(length, region)
        sync = draw(st.sampled_from(SyncMode))
        log = draw(st.sampled_from(["core", "disk", "other"]))
        mlog = (
            CoreLog(region, sync) if log == "core"
            else DiskLog(draw(_devices), region, sync) if log == "disk"
            else OtherLog("userspace", tuple(draw(st.lists(_devices, max_size=4))))
        )
        legs = tuple(draw(st.lists(_legs, min_size=2, max_size=9)))
        feats = draw(st.sampled_from([(), ("handle_errors",), ("handle_errors", "keep_log")]))
        return length, Mirror(mlog, legs, feats)
    words = draw(st.lists(st.from_regex(r"[A-Za-z0-9:/_.=,-]{1,12}", fullmatch=True), max_size=6))
    name = draw(st.from_regex(r"[a-z][a-z0-9-]{0,14}", fullmatch=True))
    if name in TARGET_TYPES:
        name = "x-" + name[:12]
    return length, GenericTarget(name, " ".join(words))


_tables = st.lists(_lines(), max_size=6).map(Table.from_targets)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_tables)
def test_parse_of_str_is_identity(table: Table) -> None:
    assert Table.parse(str(table)) == table
    assert Table.parse(table.dmsetup_text()) == table
    assert str(Table.parse(str(table))) == str(table)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_random_text_raises_only_dm_errors(text: str) -> None:
    _parses_back_or_refuses(text)


def _parses_back_or_refuses(text: str) -> None:
    """``text`` is refused with a ``DMError``, or parses to a table that its own text gives back."""
    try:
        table = Table.parse(text)
    except DMError:
        return
    assert Table.parse(str(table)) == table


_TOKENS = st.sampled_from(
    ["0", "1", "2", "3", "8", "-1", "x", "#", "P", "PO", "N", "core", "disk", "sync", "nosync",
     "handle_errors", "keep_log", "discard_zeroes_cow", "7:0", "/dev/a", "", "\n", "\t",
     "99999999999999999999999", "linear", "mirror", "snapshot", "\x00", "\ud800", "é", "\\",
     "/a\\ b", "\\\\", "\xa0"]
)


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from(KERNEL_MD_TABLES + OTHER_TABLES))
    words = base.split(" ")
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete", "char"]))
        pos = draw(st.integers(0, max(len(words) - 1, 0)))
        if op == "replace" and words:
            words[pos] = draw(_TOKENS)
        elif op == "insert":
            words.insert(pos, draw(_TOKENS))
        elif op == "delete" and words:
            del words[pos]
        elif words:
            word = words[pos]
            at = draw(st.integers(0, len(word)))
            words[pos] = word[:at] + draw(st.characters()) + word[at + 1 :]
    return " ".join(words)


@settings(max_examples=300, deadline=None)
@given(_mutated())
def test_fuzz_mutated_tables_raise_only_dm_errors(text: str) -> None:
    _parses_back_or_refuses(text)
