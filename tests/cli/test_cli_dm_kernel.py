"""``dmtools --backend kernel dm …`` against the real ``dmsetup`` on the same devices (kernel tier, VM).

Our output is produced in-process (``main(argv, propagate=True)``, the code the console script
runs; one test also runs the console script itself). Every listing is compared byte for byte with
what ``dmsetup`` prints for the same devices.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import MiB, Devices, devno, read_at, write_synced
from dmtools.cli import main as cli_main
from dmtools.errors import DeviceBusy, InvalidTable

pytestmark = pytest.mark.kernel

TIMEOUT = 120


def dmsetup(*argv: str, check: bool = True) -> str:
    """``dmsetup ARGV``'s stdout."""
    exe = shutil.which("dmsetup") or "/sbin/dmsetup"
    proc = subprocess.run([exe, *argv], capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"dmsetup {' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


@pytest.fixture
def ours(capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    """``ours(*argv)``: stdout of ``dmtools --backend kernel dm ARGV`` run in-process."""

    def run(*argv: str) -> str:
        capsys.readouterr()
        assert cli_main.main(["--backend", "kernel", "dm", *argv], propagate=True) == 0
        return capsys.readouterr().out

    return run


@pytest.fixture
def names(dm_name: str, kernel_dm: Any, make_loop: Any) -> Iterator[Devices]:
    # make_loop is set up first so the devices go before their loop devices are detached
    devs = Devices(dm_name, kernel_dm)
    yield devs
    devs.cleanup()


@pytest.fixture
def loops(make_image: Callable[..., Path], make_loop: Callable[..., Any]) -> tuple[Any, Any]:
    return make_loop(make_image(8 * MiB)), make_loop(make_image(8 * MiB))


def test_all_device_listings_equal_dmsetup_before_the_zoo(ours: Callable[..., str]) -> None:
    """First in the module, before its devices exist: in a clean VM this is the no-device case
    (dmsetup prints "No devices found" for every verb); otherwise whatever is there, the same."""
    for verb in ("ls", "table", "status", "info", "deps"):
        assert ours(verb) == dmsetup(verb), verb


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Devices in every state the listings print, made half by dmsetup and half by us.

    Built once for the module (the listing tests only read them). Names are created out of name
    order, so the all-devices listings also prove the order.
    """
    import uuid

    from dmtools.kernel import KernelBackend
    from dmtools.testing.loops import LoopTracker
    from dmtools.testing.plugin import IMAGE_PREFIX, TEST_SUFFIX

    def ours_quiet(*argv: str) -> None:  # create and load print nothing
        assert cli_main.main(["--backend", "kernel", "dm", *argv], propagate=True) == 0

    images = tmp_path_factory.mktemp("zoo")
    base = f"z{uuid.uuid4().hex[:8]}{TEST_SUFFIX}"
    with LoopTracker() as tracker, KernelBackend() as dm:
        la, lb = (tracker.attach(_image(images / f"{IMAGE_PREFIX}{i}.img", 8 * MiB)) for i in (1, 2))
        devs = Devices(base, dm)
        try:
            z = {k: devs.name(k) for k in ("zlin", "astr", "mnot", "bro", "ysus", "cinact")}
            dmsetup("create", z["zlin"], "--table", f"0 2048 linear {la.path} 0\n2048 2048 linear {lb.path} 8")
            ours_quiet("create", z["astr"], "--uuid", f"CLI-{z['astr']}", "--table",
                       f"0 4096 striped 2 8 {la.path} 4096 {lb.path} 4096")
            dmsetup("create", z["mnot"], "--notable")
            ours_quiet("create", z["bro"], "-r", "--table", "0 100 zero")
            dmsetup("create", z["ysus"], "--table", "0 100 error")
            dmsetup("suspend", z["ysus"])
            ours_quiet("create", z["cinact"], "--table", f"0 512 linear {lb.path} 9000")
            ours_quiet("load", z["cinact"], "--table", "0 64 zero;64 64 error")
            yield z
        finally:
            devs.cleanup()


def _image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.mark.parametrize("verb", ["table", "status", "info", "deps"])
def test_listings_equal_dmsetup_byte_for_byte(verb: str, zoo: dict[str, str], ours: Callable[..., str]) -> None:
    for name in zoo.values():
        assert ours(verb, name) == dmsetup(verb, name), f"{verb} {name}"
    # several named devices, in the order given
    pair = [zoo["zlin"], zoo["astr"]]
    assert ours(verb, *pair) == dmsetup(verb, *pair)
    # all devices (the kernel's list, which may hold devices of other tests: the same for both)
    assert ours(verb) == dmsetup(verb)


def test_inactive_listings_equal_dmsetup(zoo: dict[str, str], ours: Callable[..., str]) -> None:
    for verb in ("table", "status"):
        for name in (zoo["cinact"], zoo["zlin"]):
            assert ours(verb, "--inactive", name) == dmsetup(verb, "--inactive", name), f"{verb} {name}"


def test_ls_targets_version_equal_dmsetup(zoo: dict[str, str], ours: Callable[..., str]) -> None:
    assert ours("ls") == dmsetup("ls")
    assert all(f"{name}\t(" in ours("ls") for name in zoo.values())
    assert ours("targets") == dmsetup("targets")
    # dmsetup version: "Library version:   X\nDriver version:    Y\n"; ours is that for the kernel
    assert ours("version") == dmsetup("version")


def test_info_read_ahead_comes_from_the_device(zoo: dict[str, str], ours: Callable[..., str]) -> None:
    """The ``Read Ahead`` line is the one field our backend does not carry: the CLI reads it
    from sysfs as libdm does, and prints none for a device without a table (no disk yet)."""
    lines = ours("info", zoo["zlin"]).splitlines()
    assert lines[2].startswith("Read Ahead:        ")
    assert not any(line.startswith("Read Ahead:") for line in ours("info", zoo["mnot"]).splitlines())
    with open(f"/sys/dev/block/{devno('/dev/mapper/' + zoo['zlin'])}/bdi/read_ahead_kb") as f:
        assert lines[2] == f"Read Ahead:        {int(f.read()) * 2}"


def test_created_by_us_seen_by_dmsetup_and_the_reverse(names: Devices, loops: tuple[Any, Any],
                                                       ours: Callable[..., str]) -> None:
    la, _ = loops
    mine, theirs = names.name("ours"), names.name("theirs")
    ours("create", mine, "--table", f"0 1024 linear {la.path} 0")
    dmsetup("create", theirs, "--table", f"0 1024 linear {la.path} 1024")
    assert f"{mine}\t(" in dmsetup("ls") and f"{theirs}\t(" in ours("ls")
    assert dmsetup("table", mine) == f"0 1024 linear {devno(la.path)} 0\n"
    assert ours("table", theirs) == f"0 1024 linear {devno(la.path)} 1024\n"
    # each removes the other's device
    ours("remove", theirs)
    dmsetup("remove", mine)
    listing = ours("ls")
    assert mine not in listing and theirs not in listing
    assert mine not in dmsetup("ls") and theirs not in dmsetup("ls")
    assert names.cleanup() == []


def test_lifecycle_with_data_through_dev_mapper(names: Devices, loops: tuple[Any, Any], ours: Callable[..., str],
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    la, lb = loops
    name = names.name("life")
    f = tmp_path / "t.table"
    f.write_text(f"0 2048 linear {la.path} 0\n2048 2048 linear {lb.path} 8\n")
    ours("create", name, str(f))
    data = os.urandom(2 * MiB)
    write_synced(f"/dev/mapper/{name}", (0, data))
    assert read_at(la.path, 0, MiB) == data[:MiB]
    assert read_at(lb.path, 8 * 512, MiB) == data[MiB:]

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"0 2048 linear {lb.path} 8\n"))
    ours("reload", name)
    assert "Tables present:    LIVE & INACTIVE" in dmsetup("info", name)
    ours("suspend", "--noflush", name)
    assert "State:             SUSPENDED" in dmsetup("info", name)
    ours("resume", name)
    assert dmsetup("table", name) == f"0 2048 linear {devno(lb.path)} 8\n"
    new = names.name("renamed")
    ours("rename", name, new)
    assert dmsetup("ls").count(new) == 1 and name + "\t" not in dmsetup("ls")
    with open(f"/dev/mapper/{new}", "rb") as dev:
        assert dev.read(MiB) == data[MiB:]
    ours("remove", new)
    assert names.cleanup() == []


def test_kernel_errors_have_their_types(names: Devices, loops: tuple[Any, Any], ours: Callable[..., str]) -> None:
    la, _ = loops
    name = names.name("err")
    with pytest.raises(InvalidTable) as exc:  # the kernel's reason is carried
        ours("create", name, "--table", f"0 8 striped 3 8 {la.path} 0")
    assert str(exc.value)
    assert name not in ours("ls")
    ours("create", name, "--table", f"0 64 linear {la.path} 0")
    fd = os.open(f"/dev/mapper/{name}", os.O_RDONLY)
    try:
        with pytest.raises(DeviceBusy):
            ours("remove", name)
    finally:
        os.close(fd)
    ours("remove", name)
    assert names.cleanup() == []


def test_console_script_matches_dmsetup(zoo: dict[str, str]) -> None:
    exe = Path(sys.executable).with_name("dmtools")
    proc = subprocess.run([str(exe), "--backend", "kernel", "dm", "info", zoo["zlin"], zoo["mnot"]],
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == dmsetup("info", zoo["zlin"], zoo["mnot"])
    missing = subprocess.run([str(exe), "--backend", "kernel", "dm", "table", "nonexistent-dmtt"],
                             capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert missing.returncode == 1 and missing.stdout == "" and missing.stderr.count("\n") == 1
