"""``dmtools dm …`` on the userspace backend through its daemon, with real exposed block devices.

The daemon is the one of the test session (its own ``DMTOOLS_RUN_DIR``, stopped at the session's
end: ``tests/session_daemons.py``); every device is named from ``dm_name`` (suffix ``-dmtt``) and
removed by the ``devices`` fixture whatever the test did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import MiB, Devices, devno, read_at, write_synced
from dmtools.cli import main as cli_main
from dmtools.engine.rundir import run_dir
from dmtools.errors import DeviceBusy, DeviceExists, DeviceNotFound, InvalidTable, TargetNotSupported

#: where the session's daemon exposes devices (DMTOOLS_RUN_DIR, set by tests/conftest.py)
MAPPER = os.path.join(run_dir(), "mapper")

pytestmark = pytest.mark.root

TIMEOUT = 120


@pytest.fixture
def devices(dm_name: str, make_loop: Any) -> Iterator[Devices]:
    # make_loop first: the devices go before the loop devices under them are detached
    import dmtools

    with dmtools.open("userspace") as dm:
        devs = Devices(dm_name, dm)
        yield devs
        devs.cleanup()


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., str]:
    """``cli(*argv)`` runs ``dmtools --backend userspace …`` in-process and returns stdout."""

    def run(*argv: str) -> str:
        capsys.readouterr()
        assert cli_main.main(["--backend", "userspace", *argv], propagate=True) == 0
        out, err = capsys.readouterr()
        assert err == ""
        return out

    return run


def console(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The installed ``dmtools`` console script on the userspace backend."""
    exe = Path(sys.executable).with_name("dmtools")
    return subprocess.run([str(exe), "--backend", "userspace", *argv], input=stdin, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)


def listed(cli: Callable[..., str]) -> dict[str, Any]:
    return {e["name"]: e for e in json.loads(cli("dm", "ls", "--json"))}


@pytest.fixture
def two_loops(make_image: Callable[..., Path], make_loop: Callable[..., Any]) -> tuple[Any, Any]:
    return make_loop(make_image(4 * MiB)), make_loop(make_image(4 * MiB))


def test_lifecycle_and_data_through_the_exposed_device(cli: Callable[..., str], devices: Devices,
                                                       two_loops: tuple[Any, Any]) -> None:
    la, lb = two_loops
    name = devices.name()
    table = f"0 2048 linear {la.path} 0\n2048 2048 linear {lb.path} 8"
    assert cli("dm", "create", name, "--table", table.replace("\n", ";")) == ""

    # table: devices as major:minor, exactly as dmsetup prints them
    assert cli("dm", "table", name) == f"0 2048 linear {devno(la.path)} 0\n2048 2048 linear {devno(lb.path)} 8\n"
    assert cli("dm", "status", name) == "0 2048 linear \n2048 2048 linear \n"
    deps = json.loads(cli("dm", "deps", name, "--json"))[name]
    assert sorted(deps) == sorted([devno(la.path), devno(lb.path)])
    assert cli("dm", "deps", name) == "2 dependencies\t:" + "".join(f" ({d.replace(':', ', ')})" for d in deps) + "\n"

    # the exposed block device: RUN_DIR/mapper/NAME, with the number info reports
    path = f"{MAPPER}/{name}"
    info = json.loads(cli("dm", "info", name, "--json"))[0]
    assert devno(path) == f"{info['major']}:{info['minor']}"
    assert listed(cli)[name]["minor"] == info["minor"]
    assert info["live_table"] and not info["suspended"] and info["target_count"] == 2
    text = cli("dm", "info", name).splitlines()
    assert text[0] == f"Name:              {name}" and text[1] == "State:             ACTIVE"
    assert f"Major, minor:      {info['major']}, {info['minor']}" in text
    assert "Tables present:    LIVE" in text and "Number of targets: 2" in text

    data = os.urandom(2 * MiB)
    write_synced(path, (0, data))
    assert read_at(la.path, 0, MiB) == data[:MiB]
    assert read_at(lb.path, 8 * 512, MiB) == data[MiB:]

    # load → inactive slot; suspend; resume swaps it live
    cli("dm", "load", name, "--table", f"0 4096 linear {lb.path} 8")
    assert "Tables present:    LIVE & INACTIVE" in cli("dm", "info", name).splitlines()
    assert cli("dm", "table", "--inactive", name) == f"0 4096 linear {devno(lb.path)} 8\n"
    assert cli("dm", "table", name).count("\n") == 2  # the live table is unchanged
    cli("dm", "suspend", name)
    assert "State:             SUSPENDED" in cli("dm", "info", name).splitlines()
    cli("dm", "resume", name)
    assert cli("dm", "table", name) == f"0 4096 linear {devno(lb.path)} 8\n"
    with open(path, "rb") as f:  # now the device starts where lb's data starts
        assert f.read(MiB) == data[MiB:]

    # rename moves the exposure link
    new = devices.name("r")
    cli("dm", "rename", name, new)
    assert name not in listed(cli) and new in listed(cli)
    assert os.path.exists(f"{MAPPER}/{new}") and not os.path.lexists(path)

    cli("dm", "remove", new)
    assert new not in listed(cli)
    assert not os.path.lexists(f"{MAPPER}/{new}")
    assert devices.cleanup() == []


def test_create_from_a_table_file_and_from_stdin(cli: Callable[..., str], devices: Devices, two_loops: tuple[Any, Any],
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    la, lb = two_loops
    f = tmp_path / "striped.table"
    f.write_text(f"0 4096 striped 2 8 {la.path} 0 {lb.path} 0\n")
    by_file = devices.name("f")
    cli("dm", "create", by_file, str(f), "--uuid", f"CLI-{by_file}")
    monkeypatch.setattr(sys, "stdin", io.StringIO("0 100 zero\n100 28 error\n"))
    by_stdin = devices.name("s")
    cli("dm", "create", "-r", by_stdin)

    assert cli("dm", "table", by_file) == f"0 4096 striped 2 8 {devno(la.path)} 0 {devno(lb.path)} 0\n"
    assert cli("dm", "status", by_file) == f"0 4096 striped 2 {devno(la.path)} {devno(lb.path)} 1 AA\n"
    assert cli("dm", "table", by_stdin) == "0 100 zero \n100 28 error \n"
    info = cli("dm", "info", by_file).splitlines()
    assert info[-2:] == [f"UUID: CLI-{by_file}", ""]
    assert "State:             ACTIVE (READ-ONLY)" in cli("dm", "info", by_stdin).splitlines()

    # striping: chunk 0 on la, chunk 1 on lb (8 sectors each)
    data = os.urandom(16 * 512)
    write_synced(f"{MAPPER}/{by_file}", (0, data))
    assert read_at(la.path, 0, 4096) == data[:4096] and read_at(lb.path, 0, 4096) == data[4096:]

    # both listed with prefixes in name order in the all-devices forms
    table_all = cli("dm", "table").splitlines()
    ours = [line for line in table_all if line.split(":")[0] in (by_file, by_stdin)]
    assert ours == sorted(ours, key=lambda line: line.split(": ")[0]) and len(ours) == 3

    cli("dm", "remove", by_file, by_stdin)
    assert not set(listed(cli)) & {by_file, by_stdin}
    assert devices.cleanup() == []


def test_console_script_end_to_end(devices: Devices, two_loops: tuple[Any, Any], tmp_path: Path) -> None:
    la, _ = two_loops
    name = devices.name()
    proc = console("dm", "create", name, stdin=f"0 2048 linear {la.path} 0\n")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    proc = console("dm", "table", name)
    assert proc.stdout == f"0 2048 linear {devno(la.path)} 0\n"
    proc = console("dm", "ls", "--json")
    assert name in {e["name"] for e in json.loads(proc.stdout)}
    proc = console("--json", "dm", "info", name)
    assert json.loads(proc.stdout)[0]["name"] == name
    f = tmp_path / "t"
    f.write_text("0 2048 zero\n")
    assert console("dm", "reload", name, str(f)).returncode == 0
    assert console("dm", "resume", name).returncode == 0
    assert console("dm", "table", name).stdout == "0 2048 zero \n"
    with open(f"{MAPPER}/{name}", "rb") as dev:
        assert dev.read(4096) == bytes(4096)

    # the error path: exit 1, one line naming the condition
    dup = console("dm", "create", name, "--table", "0 8 zero")
    assert dup.returncode == 1 and dup.stdout == "" and dup.stderr.count("\n") == 1
    assert dup.stderr.startswith("dmtools: ") and name in dup.stderr

    # --retry as scripts use it with dmsetup: udev may still be probing after the reload
    removed = console("dm", "remove", "--retry", name)
    assert (removed.returncode, removed.stderr) == (0, "")
    gone = console("dm", "info", name)
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1 and name in gone.stderr
    assert devices.cleanup() == []


def test_errors_carry_their_type(cli: Callable[..., str], devices: Devices, two_loops: tuple[Any, Any]) -> None:
    la, _ = two_loops
    name = devices.name()
    cli("dm", "create", name, "--table", f"0 1024 linear {la.path} 0")
    with pytest.raises(DeviceExists):
        cli("dm", "create", name, "--table", "0 8 zero")
    live = cli("dm", "table", name)
    with pytest.raises(TargetNotSupported):  # refused at load: nothing changed
        cli("dm", "load", name, "--table", "0 8 no-such-target")
    assert "Tables present:    LIVE" in cli("dm", "info", name).splitlines()
    # beyond the end of the loop device: as the kernel (dm_calculate_queue_limits on resume),
    # the load is taken and the resume refuses it, leaving the live table in place
    cli("dm", "load", name, "--table", f"0 999999 linear {la.path} 0")
    with pytest.raises(InvalidTable, match="too small"):
        cli("dm", "resume", name)
    assert cli("dm", "table", name) == live
    with pytest.raises(DeviceNotFound):
        cli("dm", "info", devices.name("missing"))
    fd = os.open(f"{MAPPER}/{name}", os.O_RDONLY)
    try:
        with pytest.raises(DeviceBusy):
            cli("dm", "remove", name)
    finally:
        os.close(fd)
    assert name in listed(cli)
    cli("dm", "remove", "--retry", name)
    assert devices.cleanup() == []


def test_notable_clear_message_wait(cli: Callable[..., str], devices: Devices) -> None:
    name = devices.name()
    cli("dm", "create", name, "--notable")
    info = cli("dm", "info", name).splitlines()
    assert "Tables present:    None" in info and "Number of targets: 0" in info
    assert cli("dm", "table", name) == "\n"  # no table: an empty line, like dmsetup
    cli("dm", "load", name, "--table", "0 64 zero")
    assert "Tables present:    INACTIVE" in cli("dm", "info", name).splitlines()
    cli("dm", "clear", name)
    assert "Tables present:    None" in cli("dm", "info", name).splitlines()
    cli("dm", "load", name, "--table", "0 64 zero")
    cli("dm", "resume", name)
    event = json.loads(cli("dm", "info", name, "--json"))[0]["event_nr"]
    # nothing happens: the bounded wait returns the unchanged number
    assert cli("dm", "wait", name, str(event), "--timeout", "0.2") == f"{event}\n"
    with pytest.raises(Exception) as exc:  # zero has no messages; the engine says so
        cli("dm", "message", name, "0", "hello")
    assert type(exc.value).__module__ == "dmtools.errors"
    cli("dm", "remove", name)
    assert devices.cleanup() == []


def test_targets_and_version(cli: Callable[..., str]) -> None:
    targets = json.loads(cli("dm", "targets", "--json"))
    assert {"linear", "striped", "zero", "error"} <= set(targets)
    lines = cli("dm", "targets").splitlines()
    assert f"{'linear':<16} v{targets['linear']}" in lines
    version = cli("dm", "version").splitlines()
    assert version[0].startswith("Library version:   ") and version[1].startswith("Driver version:    ")
    assert json.loads(cli("dm", "version", "--json"))["backend"] == "userspace"


def test_in_process_runs_leave_no_descriptors(cli: Callable[..., str], devices: Devices) -> None:
    name = devices.name()
    cli("dm", "ls")  # warm up: imports, the daemon started if it was not

    def fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    before = fds()
    for _ in range(10):
        cli("dm", "create", name, "--table", "0 64 zero")
        cli("dm", "info", name)
        cli("dm", "wait", name, "99", "--timeout", "0.01")
        cli("dm", "remove", name)
    assert fds() == before  # every backend the CLI opened was closed
    assert devices.cleanup() == []
