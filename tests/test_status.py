"""Status parsers: every form the kernel prints parses and formats back exactly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmtools.errors import DMError, InvalidStatus
from dmtools.status import (EmptyStatus, GenericStatus, LegHealth, LogHealth, MirrorStatus, SnapshotState,
                            SnapshotStatus, StripedStatus, parse_mirror_status, parse_snapshot_status, parse_status,
                            parse_striped_status)

# Status lines from /work/shared/reference/kernel.md §2.3 and §3.2, literally where it gives a
# literal and with its placeholders filled in where it gives a template.
KERNEL_MD_SNAPSHOT_STATUS = [
    "Invalid",
    "Merge failed",
    "Overflow",
    "Unknown",
    # `<sectors_allocated>/<total_sectors> <metadata_sectors>`; a fresh store with chunk 8 is
    # `16/… 16` (`2c/total 2c`)
    "16/2097152 16",
    "16/16 16",
    # legacy two-field form accepted by libdm
    "16/2097152",
    # transient store: allocated = next_free in sectors, metadata 0
    "0/2097152 0",
    "4096/2097152 0",
]

KERNEL_MD_MIRROR_STATUS = [
    # §3.2 "Example: `2 253:1 253:2 2048/2048 1 AA 1 core`"
    "2 253:1 253:2 2048/2048 1 AA 1 core",
    # `3 disk <logdev> <c>`, c = F, D or A
    "2 253:1 253:2 16/16 1 AA 3 disk 253:3 A",
    "2 253:1 253:2 0/16 1 AA 3 disk 253:3 D",
    "2 253:1 253:2 3/16 1 AD 3 disk 253:3 F",
    # health letters A F D S R U, one per leg
    "3 253:1 253:2 253:4 7/2048 1 ASR 1 core",
    "2 253:1 253:2 7/2048 1 FU 1 core",
    "9 7:0 7:1 7:2 7:3 7:4 7:5 7:6 7:7 7:8 1/1 1 AAAAAAAAA 1 core",
]


@pytest.mark.parametrize("text", KERNEL_MD_SNAPSHOT_STATUS)
def test_snapshot_status_round_trip(text: str) -> None:
    status = parse_snapshot_status(text)
    assert status.format() == text
    assert str(status) == text
    assert parse_status("snapshot", text) == status
    assert parse_status("snapshot-merge", text) == status


@pytest.mark.parametrize("text", KERNEL_MD_MIRROR_STATUS)
def test_mirror_status_round_trip(text: str) -> None:
    status = parse_mirror_status(text)
    assert status.format() == text
    assert str(status) == text
    assert parse_status("mirror", text) == status


def test_snapshot_status_fields() -> None:
    fresh = parse_snapshot_status("16/2097152 16")
    assert fresh.state is SnapshotState.ACTIVE and fresh.valid
    assert (fresh.allocated, fresh.total, fresh.metadata) == (16, 2097152, 16)
    assert fresh.percent == pytest.approx(100 * 16 / 2097152)
    # allocated == metadata: nothing left to merge
    assert fresh.merge_done
    busy = parse_snapshot_status("4112/2097152 24")
    assert not busy.merge_done
    legacy = parse_snapshot_status("16/2097152")
    assert legacy.metadata is None and not legacy.merge_done
    assert parse_snapshot_status("Invalid").state is SnapshotState.INVALID
    assert not parse_snapshot_status("Invalid").valid
    assert parse_snapshot_status("Merge failed").state is SnapshotState.MERGE_FAILED
    assert parse_snapshot_status("Overflow").state is SnapshotState.OVERFLOW
    assert parse_snapshot_status("Unknown").percent is None
    assert not parse_snapshot_status("Overflow").merge_done
    assert SnapshotStatus.usage(0, 0, 0).percent is None


def test_snapshot_status_tolerates_surrounding_whitespace() -> None:
    assert parse_snapshot_status("  Merge   failed\n").state is SnapshotState.MERGE_FAILED
    assert parse_snapshot_status(" 16/32 16 ").format() == "16/32 16"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "expected"),
        ("invalid", "is not <allocated>/<total>"),
        ("16/ 16", "is not <allocated>/<total>"),
        ("16/32 x", "metadata 'x' is not a number"),
        ("-16/32 16", "is not <allocated>/<total>"),
        ("16/32 16 1", "expected"),
        ("Merge", "is not <allocated>/<total>"),
    ],
)
def test_snapshot_status_rejects(text: str, fragment: str) -> None:
    with pytest.raises(InvalidStatus, match=fragment):
        parse_snapshot_status(text)


def test_snapshot_status_construction_checks() -> None:
    with pytest.raises(InvalidStatus, match="no usage"):
        SnapshotStatus(SnapshotState.INVALID, 1, 2, 3)
    with pytest.raises(InvalidStatus, match="non-negative"):
        SnapshotStatus.usage(-1, 2, 3)
    with pytest.raises(InvalidStatus, match="metadata"):
        SnapshotStatus.usage(1, 2, -3)
    with pytest.raises(InvalidStatus, match="SnapshotState"):
        SnapshotStatus("Invalid")  # type: ignore[arg-type]
    assert SnapshotStatus(SnapshotState.OVERFLOW).format() == "Overflow"


def test_mirror_status_fields() -> None:
    core = parse_mirror_status("2 253:1 253:2 2048/2048 1 AA 1 core")
    assert core.legs == 2
    assert core.devices == ("253:1", "253:2")
    assert (core.in_sync, core.regions) == (2048, 2048)
    assert core.in_sync_complete and core.sync_percent == 100.0
    assert core.leg_health == (LegHealth.ALIVE, LegHealth.ALIVE)
    assert core.log_type == "core" and core.log_device is None and core.log_health is None
    assert core.healthy
    disk = parse_mirror_status("2 253:1 253:2 3/16 1 AD 3 disk 253:3 F")
    assert disk.log_type == "disk" and disk.log_device == "253:3"
    assert disk.log_health is LogHealth.FLUSH_FAILED
    assert disk.leg_health[1] is LegHealth.DEAD
    assert disk.sync_percent == pytest.approx(18.75)
    assert not disk.in_sync_complete and not disk.healthy
    assert MirrorStatus(("7:0", "7:1"), 0, 0, "AA").sync_percent == 100.0


def test_health_letter_meanings() -> None:
    assert {h.value for h in LegHealth} == set("AFDSRU")
    assert LegHealth("D").meaning.startswith("write failed")
    assert LegHealth("R").meaning == "read failed (data unaffected)"
    assert {h.value for h in LogHealth} == set("AFD")


def test_mirror_status_built_by_a_userspace_target_prints_like_the_kernel() -> None:
    status = MirrorStatus(("253:1", "253:2"), 16, 16, "AA", ("disk", "253:3", "A"))
    assert status.format() == "2 253:1 253:2 16/16 1 AA 3 disk 253:3 A"
    assert MirrorStatus(("253:1", "253:2"), 2048, 2048, "AA").format() == "2 253:1 253:2 2048/2048 1 AA 1 core"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("x 253:1 253:2 1/2 1 AA 1 core", "leg count 'x'"),
        ("0 1/2 1 1 core", "too short"),
        ("2 253:1 253:2 1/2 1 AA", "too short"),
        ("2 253:1 253:2 1-2 1 AA 1 core", "is not <in_sync>/<regions>"),
        ("2 253:1 253:2 1/2 2 AA 1 core", "expected 1 status argument"),
        ("2 253:1 253:2 1/2 1 A 1 core", "2 health letters"),
        ("2 253:1 253:2 1/2 1 AX 1 core", "unknown leg health letter 'X'"),
        ("2 253:1 253:2 1/2 1 AA 2 core", "reports 2 arguments but 1 follow"),
        ("2 253:1 253:2 1/2 1 AA 3 disk 253:3 Q", "unknown log health letter"),
        ("2 253:1 253:2 1/2 1 AA 2 disk 253:3", "disk log reports 3 words"),
        ("2 253:1 253:2 1/2 1 AA 2 core extra", "core log reports 1 word"),
        ("2 253:1 253:2 1/2 1 AA 0", "log status is missing"),
    ],
)
def test_mirror_status_rejects(text: str, fragment: str) -> None:
    with pytest.raises(InvalidStatus, match=fragment):
        parse_mirror_status(text)


def test_mirror_status_other_log_types_kept() -> None:
    text = "2 253:1 253:2 5/8 1 AA 2 userspace LVM-abc"
    status = parse_mirror_status(text)
    assert status.log_type == "userspace" and status.log_health is None
    assert status.format() == text


def test_striped_status() -> None:
    text = "2 7:0 7:1 1 AD"
    status = parse_striped_status(text)
    assert status == StripedStatus(("7:0", "7:1"), "AD")
    assert status.format() == text and not status.healthy
    assert parse_striped_status("1 7:0 1 A").healthy
    assert parse_status("striped", "1 7:0 1 A") == StripedStatus(("7:0",), "A")
    for bad in ("", "2 7:0 1 AA", "2 7:0 7:1 2 AA", "2 7:0 7:1 1 AX", "2 7:0 7:1 1 A"):
        with pytest.raises(InvalidStatus):
            parse_striped_status(bad)


def test_dispatcher() -> None:
    for target_type in ("linear", "zero", "error", "snapshot-origin"):
        status = parse_status(target_type, "")
        assert status == EmptyStatus(target_type) and status.format() == "" and str(status) == ""
    with pytest.raises(InvalidStatus, match="reports no status"):
        parse_status("linear", "junk")
    generic = parse_status("era", "1 2 - ")
    assert isinstance(generic, GenericStatus) and generic.format() == "1 2 - "
    with pytest.raises(InvalidStatus, match="string"):
        parse_status("mirror", None)  # type: ignore[arg-type]


_devs = st.builds(lambda a, b: f"{a}:{b}", st.integers(0, 4095), st.integers(0, 1 << 20))


@settings(max_examples=100, deadline=None)
@given(st.lists(_devs, min_size=1, max_size=9), st.integers(0, 1 << 40), st.integers(0, 1 << 40), st.data())
def test_mirror_status_format_parse_identity(devs: list[str], in_sync: int, regions: int, data: st.DataObject) -> None:
    health = "".join(data.draw(st.lists(st.sampled_from("AFDSRU"), min_size=len(devs), max_size=len(devs))))
    log = data.draw(st.one_of(st.just(("core",)), st.tuples(st.just("disk"), _devs, st.sampled_from("ADF"))))
    status = MirrorStatus(tuple(devs), in_sync, regions, health, log)
    assert parse_mirror_status(status.format()) == status


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 1 << 60), st.integers(0, 1 << 60), st.one_of(st.none(), st.integers(0, 1 << 60)))
def test_snapshot_status_format_parse_identity(alloc: int, total: int, meta: int | None) -> None:
    status = SnapshotStatus.usage(alloc, total, meta)
    assert parse_snapshot_status(status.format()) == status


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["snapshot", "snapshot-merge", "mirror", "striped", "linear", "thin",
                        "thin-pool", "era"]), st.text(max_size=80))
def test_fuzz_status_raises_only_dm_errors(target_type: str, text: str) -> None:
    try:
        status = parse_status(target_type, text)
    except DMError:
        return
    assert parse_status(target_type, status.format()) == status


def test_device_paths_with_white_space_are_escaped_as_in_tables() -> None:
    """The userspace engine names a regular file by its path: status text escapes it as table text
    does (``dm_split_args``), so the words split back to the same devices."""
    striped = StripedStatus(("/srv/my disk", "/srv/back\\slash"), "AD")
    assert str(striped) == "2 /srv/my\\ disk /srv/back\\\\slash 1 AD"
    assert parse_status("striped", str(striped)) == striped
    mirror = MirrorStatus(("/srv/a b", "253:2"), 3, 8, "AA", ("disk", "/srv/log\tfile", "A"))
    assert str(mirror) == "2 /srv/a\\ b 253:2 3/8 1 AA 3 disk /srv/log\\\tfile A"
    assert parse_mirror_status(str(mirror)) == mirror


def test_engine_striped_status_over_paths_with_spaces_parses(tmp_path) -> None:
    from dmtools.engine import Engine
    from dmtools.target_values import format_args

    files = [tmp_path / "a disk", tmp_path / "b disk"]
    for f in files:
        f.write_bytes(bytes(1 << 20))
    with Engine() as eng:
        legs = " ".join(f"{format_args([str(f)])} 0" for f in files)
        eng.create("s", f"0 2048 striped 2 8 {legs}")
        params = eng.status("s")[0].params
    assert parse_status("striped", params).devices == tuple(str(f) for f in files)
