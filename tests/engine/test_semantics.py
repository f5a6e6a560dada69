"""Device-mapper semantics, one test for both backends (the kernel case runs in the VM tier)."""

from __future__ import annotations

import subprocess
import threading

import pytest

from dmtools.blockdev import aligned_buffer
from dmtools.errors import DeviceBusy, DeviceExists, DeviceNotFound, InvalidTable

MiB = 1 << 20


def _fill(ep, offset: int, byte: int, n: int = 4096) -> None:
    buf = aligned_buffer(n)
    buf[:] = bytes([byte]) * n
    ep.write(buf, offset)


def _read(ep, offset: int, n: int = 4096) -> bytes:
    buf = aligned_buffer(n)
    got = ep.readinto(buf, offset)
    return bytes(buf[:got])


def test_create_load_resume_swaps(dm, dm_name):
    a, b = dm.backing(MiB), dm.backing(MiB)
    dm.dm.create(dm_name, f"0 2048 linear {a} 0")
    info = dm.dm.info(dm_name)
    assert info.live_table and not info.inactive_table and not info.suspended
    dm.dm.load(dm_name, f"0 1024 linear {b} 8")
    info = dm.dm.info(dm_name)
    assert info.live_table and info.inactive_table
    assert str(dm.dm.table(dm_name)) == f"0 2048 linear {dm.printed(a)} 0"
    assert str(dm.dm.table(dm_name, inactive=True)) == f"0 1024 linear {dm.printed(b)} 8"
    dm.dm.resume(dm_name)
    info = dm.dm.info(dm_name)
    assert info.live_table and not info.inactive_table and not info.suspended
    assert str(dm.dm.table(dm_name)) == f"0 1024 linear {dm.printed(b)} 8"
    dm.dm.remove(dm_name)
    assert not dm.dm.exists(dm_name)


def test_create_empty_then_load(dm, dm_name):
    dm.dm.create(dm_name)
    info = dm.dm.info(dm_name)
    assert not info.live_table and not info.inactive_table
    dm.dm.load(dm_name, "0 100 zero")
    dm.dm.resume(dm_name)
    assert dm.dm.info(dm_name).target_count == 1
    dm.dm.clear(dm_name)  # nothing inactive: still fine
    dm.dm.load(dm_name, "0 50 error")
    dm.dm.clear(dm_name)
    assert not dm.dm.info(dm_name).inactive_table
    assert str(dm.dm.table(dm_name)) == "0 100 zero"
    dm.dm.remove(dm_name)


@pytest.mark.parametrize("noflush", [False, True], ids=["flush", "noflush"])
def test_io_held_while_suspended(dm, dm_name, noflush):
    a = dm.backing(MiB)
    dm.dm.create(dm_name, f"0 2048 linear {a} 0")
    ep = dm.open_direct(dm_name)
    try:
        _fill(ep, 0, 0x5A)
        dm.dm.suspend(dm_name, noflush=noflush)
        assert dm.dm.info(dm_name).suspended
        reads: list[bytes] = []
        ios = [threading.Thread(target=lambda: reads.append(_read(ep, 0)), daemon=True),
               threading.Thread(target=_fill, args=(ep, 4096, 1), daemon=True)]
        for t in ios:
            t.start()
        for t in ios:
            t.join(0.5)
            assert t.is_alive(), "I/O completed on a suspended device"
        dm.dm.resume(dm_name)
        for t in ios:
            t.join(10)
            assert not t.is_alive(), "held I/O not released by resume"
        assert reads == [b"\x5a" * 4096]
        assert _read(ep, 4096) == b"\x01" * 4096
    finally:
        ep.close()
    dm.dm.remove(dm_name)


def test_remove_open_device_refused(dm, dm_name):
    a = dm.backing(MiB)
    dm.dm.create(dm_name, f"0 2048 linear {a} 0")
    ep = dm.dm.open_endpoint(dm_name)
    try:
        assert dm.dm.info(dm_name).open_count >= 1
        with pytest.raises(DeviceBusy):
            dm.dm.remove(dm_name)
        assert dm.dm.exists(dm_name)
    finally:
        ep.close()
    dm.dm.remove(dm_name)
    with pytest.raises(DeviceNotFound):
        dm.dm.info(dm_name)


BAD_TABLES = [
    "0 2048 linear {a} 0\n4096 10 zero",  # gap
    "0 0 zero",  # zero length
    "0 2048 linear {a}",  # argument count
    "0 2048 linear {a} x",  # bad sector
    "0 2048 striped 2 3 {a} 0 {a} 0",  # length not divisible by chunk
    "0 2048 striped 2 128 {a} 0",  # missing destination
    "0 100 zero 1",  # zero takes no arguments
    "0 100 no-such-target-type",
]


@pytest.mark.parametrize("bad", BAD_TABLES)
def test_bad_table_rejected_without_state_change(dm, dm_name, bad):
    a = dm.backing(MiB)
    good = f"0 1024 linear {a} 0"
    dm.dm.create(dm_name, good)
    before = dm.dm.info(dm_name)
    with pytest.raises(InvalidTable):
        dm.dm.load(dm_name, bad.format(a=a))
    after = dm.dm.info(dm_name)
    assert not after.inactive_table
    assert (after.live_table, after.suspended, after.event_nr) == (before.live_table, before.suspended, before.event_nr)
    assert str(dm.dm.table(dm_name)) == f"0 1024 linear {dm.printed(a)} 0"
    dm.dm.remove(dm_name)


def test_table_past_device_end_fails_at_resume(dm, dm_name):
    """The kernel checks device areas when the table goes live (dm_calculate_queue_limits)."""
    a = dm.backing(MiB)
    dm.dm.create(dm_name, f"0 1024 linear {a} 0")
    dm.dm.load(dm_name, f"0 4096 linear {a} 0")  # past the end of the 1 MiB device
    assert dm.dm.info(dm_name).inactive_table
    with pytest.raises(InvalidTable):
        dm.dm.resume(dm_name)
    info = dm.dm.info(dm_name)
    assert info.suspended and info.live_table and not info.inactive_table
    assert str(dm.dm.table(dm_name)) == f"0 1024 linear {dm.printed(a)} 0"
    dm.dm.resume(dm_name)
    assert not dm.dm.info(dm_name).suspended
    dm.dm.remove(dm_name)
    with pytest.raises(InvalidTable):
        dm.dm.create(dm_name, f"0 4096 linear {a} 0")
    assert not dm.dm.exists(dm_name)


def test_create_with_bad_table_leaves_nothing(dm, dm_name):
    with pytest.raises(InvalidTable):
        dm.dm.create(dm_name, "0 100 zero extra")
    assert not dm.dm.exists(dm_name)


def test_duplicate_name_refused(dm, dm_name):
    dm.dm.create(dm_name, "0 8 zero")
    with pytest.raises(DeviceExists):
        dm.dm.create(dm_name, "0 8 zero")
    dm.dm.remove(dm_name)


def test_table_and_status_text(dm, dm_name):
    a, b = dm.backing(2 * MiB), dm.backing(MiB)
    pa, pb = dm.printed(a), dm.printed(b)
    table = (
        f"0 1024 linear {a} 16\n"
        f"1024 2048 striped 2 64 {a} 1040 {b} 0\n"
        "3072 100 zero\n"
        "3172 28 error"
    )
    dm.dm.create(dm_name, table)
    assert str(dm.dm.table(dm_name)) == (
        f"0 1024 linear {pa} 16\n"
        f"1024 2048 striped 2 64 {pa} 1040 {pb} 0\n"
        "3072 100 zero\n"
        "3172 28 error"
    )
    assert [str(s) for s in dm.dm.status(dm_name)] == [
        "0 1024 linear",
        f"1024 2048 striped 2 {pa} {pb} 1 AA",
        "3072 100 zero",
        "3172 28 error",
    ]
    dm.dm.remove(dm_name)


def test_striped_data_layout(dm, dm_name):
    a, b = dm.backing(MiB), dm.backing(MiB)
    dm.dm.create(dm_name, f"0 256 striped 2 8 {a} 0 {b} 0")
    ep = dm.open_direct(dm_name)
    try:
        for chunk in range(4):
            _fill(ep, chunk * 4096, 0x10 + chunk)
    finally:
        ep.close()
    dm.dm.remove(dm_name)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        da, db = fa.read(8192), fb.read(8192)
    assert da == bytes([0x10]) * 4096 + bytes([0x12]) * 4096
    assert db == bytes([0x11]) * 4096 + bytes([0x13]) * 4096


def test_deps_and_device_ref_stacking(dm, dm_name):
    a = dm.backing(MiB)
    lower, upper = dm_name, "up" + dm_name
    dm.dm.create(lower, f"0 2048 linear {a} 0")
    ref = dm.dm.device_ref(lower)
    dm.dm.create(upper, f"0 1024 linear {ref} 512")
    info = dm.dm.info(lower)
    assert dm.dm.deps(upper) == [(info.major, info.minor)]
    assert str(dm.dm.table(upper)) == f"0 1024 linear {info.major}:{info.minor} 512"
    with pytest.raises(DeviceBusy):
        dm.dm.remove(lower)  # held by the upper table
    ep = dm.open_direct(upper)
    try:
        _fill(ep, 0, 0x77)
    finally:
        ep.close()
    dm.dm.remove(upper)
    dm.dm.remove(lower)
    with open(a, "rb") as f:
        f.seek(512 * 512)
        assert f.read(4096) == b"\x77" * 4096


#: The basic targets' versions in Linux 6.16, which the userspace engine follows
#: (dm-linear.c, dm-stripe.c, dm-zero.c, dm-target.c).
ENGINE_VERSIONS = {"linear": (1, 5, 0), "striped": (1, 7, 0), "zero": (1, 2, 0), "error": (1, 7, 0)}


def test_targets_and_versions(dm):
    targets = dm.dm.targets()
    if dm.kind == "kernel":  # what dmsetup reads from the same kernel: "linear           v1.4.0"
        out = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True, check=True).stdout
        listed = {}
        for line in out.splitlines():
            name, version = line.split()
            listed[name] = tuple(int(part) for part in version.lstrip("v").split("."))
        assert targets == listed
        assert set(ENGINE_VERSIONS) <= set(targets)
    else:
        assert {name: targets[name] for name in ENGINE_VERSIONS} == ENGINE_VERSIONS


def test_rename_bumps_event(dm, dm_name):
    dm.dm.create(dm_name, "0 8 zero")
    before = dm.dm.info(dm_name).event_nr
    new = "rn" + dm_name
    dm.dm.rename(dm_name, new)
    assert not dm.dm.exists(dm_name)
    assert dm.dm.info(new).event_nr == before + 1
    assert dm.dm.wait_event(new, before, timeout=5) == before + 1
    dm.dm.remove(new)


def test_message_to_linear_refused(dm, dm_name):
    from dmtools.errors import DMError

    dm.dm.create(dm_name, "0 8 zero")
    with pytest.raises(DMError):
        dm.dm.message(dm_name, 0, "hello")
    dm.dm.remove(dm_name)


@pytest.mark.kernel
def test_engine_and_kernel_print_the_same_text(kernel_dm, make_image, make_loop, dm_name):
    """The same table over the same loop devices: identical table and status text on both."""
    from dmtools.engine import Engine

    a = make_loop(make_image(2 * MiB)).path
    b = make_loop(make_image(2 * MiB)).path
    table = (
        f"0 1024 linear {a} 16\n"
        f"1024 2048 striped 2 64 {a} 1040 {b} 0\n"
        f"3072 100 zero\n"
        f"3172 28 error"
    )
    # One engine at a time: each claims the loop devices its table uses (the kernel's bd_claim, and
    # the userspace engine's claims), so the two cannot hold them at once.
    eng = Engine()
    try:
        eng.create(dm_name, table)
        e = eng.info(dm_name)
        seen = (str(eng.table(dm_name)), [str(s) for s in eng.status(dm_name)],
                (e.live_table, e.inactive_table, e.suspended, e.target_count), sorted(eng.deps(dm_name)))
        assert set(eng.targets()) >= {"linear", "striped", "zero", "error"}
        eng.remove(dm_name)
    finally:
        eng.close()
    kernel_dm.create(dm_name, table)
    try:
        k = kernel_dm.info(dm_name)
        assert seen == (str(kernel_dm.table(dm_name)), [str(s) for s in kernel_dm.status(dm_name)],
                        (k.live_table, k.inactive_table, k.suspended, k.target_count), sorted(kernel_dm.deps(dm_name)))
    finally:
        kernel_dm.remove(dm_name)
