"""``dmtools dm …`` at the unit tier: parsing, exact backend calls, output shapes, the error path.

The backend is a recording fake installed at the seam, ``dmtools.cli.common.open_backend``.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dmtools import linux
from dmtools.backend import DeviceInfo, StatusLine
from dmtools.cli import dm_cmd
from dmtools.cli import main as cli_main
from dmtools.errors import DeviceBusy, DeviceNotFound, InvalidArgument, InvalidTable

SUBPROCESS_TIMEOUT = 60


# --- parsing -----------------------------------------------------------------------------------

PARSES: list[tuple[list[str], dict[str, Any]]] = [
    (["create", "n", "--table", "0 8 zero"], {"name": "n", "table": "0 8 zero", "table_file": None,
                                             "uuid": None, "readonly": False, "notable": False}),
    (["create", "n", "t.txt", "-u", "U-1", "-r"], {"table_file": "t.txt", "uuid": "U-1", "readonly": True}),
    # options before operands, as dmsetup's getopt allows
    (["create", "n", "-u", "U-2", "t.txt"], {"name": "n", "uuid": "U-2", "table_file": "t.txt"}),
    (["create", "-r", "n", "--uuid", "U", "t.txt"], {"name": "n", "readonly": True, "table_file": "t.txt"}),
    (["load", "n", "--readonly", "f"], {"name": "n", "readonly": True, "table_file": "f"}),
    (["message", "a", "0", "x", "y"], {"name": "a", "sector": 0, "message": ["x", "y"]}),
    (["create", "n", "--notable", "--uuid", "U"], {"notable": True, "uuid": "U", "table": None}),
    (["load", "n", "--table", "0 8 zero", "--readonly"], {"name": "n", "readonly": True, "verb": "load"}),
    (["reload", "n", "f"], {"name": "n", "table_file": "f", "verb": "reload"}),
    (["suspend", "a", "b", "--noflush"], {"names": ["a", "b"], "noflush": True}),
    (["suspend", "a"], {"names": ["a"], "noflush": False}),
    (["resume", "a", "b"], {"names": ["a", "b"]}),
    (["remove", "a", "--retry", "--deferred"], {"names": ["a"], "retry": True, "deferred": True}),
    (["remove", "a", "b"], {"names": ["a", "b"], "retry": False, "deferred": False}),
    (["clear", "a"], {"name": "a"}),
    (["rename", "a", "b"], {"name": "a", "new_name": "b"}),
    (["ls"], {"verb": "ls"}),
    (["table"], {"names": [], "inactive": False}),
    (["table", "a", "b", "--inactive"], {"names": ["a", "b"], "inactive": True}),
    (["status", "a", "--inactive"], {"names": ["a"], "inactive": True}),
    (["info"], {"names": []}),
    (["info", "a", "b"], {"names": ["a", "b"]}),
    (["deps", "a"], {"names": ["a"]}),
    (["targets"], {"verb": "targets"}),
    (["version"], {"verb": "version"}),
    (["message", "a", "0", "set", "x"], {"name": "a", "sector": 0, "message": ["set", "x"]}),
    (["wait", "a"], {"name": "a", "event_nr": 0, "timeout": None}),
    (["wait", "a", "3", "--timeout", "1.5"], {"event_nr": 3, "timeout": 1.5}),
]


@pytest.mark.parametrize(("argv", "expected"), PARSES, ids=[" ".join(a) for a, _ in PARSES])
def test_every_verb_parses(argv: list[str], expected: dict[str, Any]) -> None:
    args = cli_main.build_parser().parse_args(["dm", *argv])
    assert args.command == "dm"
    assert callable(args.func)
    for key, value in expected.items():
        assert getattr(args, key) == value, key


@pytest.mark.parametrize(
    "argv",
    [
        ["dm", "message", "a", "zero", "msg"],  # sector must be a number
        ["dm", "message", "a", "0"],  # a message is required
        ["dm", "suspend"],  # at least one device
        ["dm", "rename", "a"],
        ["dm", "create"],
        ["dm", "frobnicate"],
        ["dm"],
        ["--backend", "nope", "dm", "ls"],
    ],
)
def test_bad_command_lines_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main.main(argv, propagate=True)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["auto", "kernel", "userspace"])
def test_backend_choice_reaches_open_backend(backend: str, fake_dm: Any, run: Any) -> None:
    fake_dm.add("a", "0 8 zero")
    assert run("--backend", backend, "dm", "ls")[0] == 0
    assert run("dm", "ls", f"--backend={backend}")[0] == 0  # hoisted from after the verb
    assert fake_dm.opened_with == [backend, backend]


def test_backend_defaults_to_auto(fake_dm: Any, run: Any) -> None:
    run("dm", "version")
    assert fake_dm.opened_with == ["auto"]


# --- create / load: where the table comes from --------------------------------------------------


def test_create_with_table_option(fake_dm: Any, run: Any) -> None:
    rc, out, _ = run("dm", "create", "n", "--table", "0 8 zero", "--uuid", "U-1")
    assert (rc, out) == (0, "")
    assert fake_dm.calls == [("create", "n", "0 8 zero", "U-1", False)]


def test_create_table_option_semicolons_separate_lines(fake_dm: Any, run: Any) -> None:
    run("dm", "create", "n", "--table", "0 8 zero; 8 8 error", "-r")
    assert fake_dm.calls == [("create", "n", "0 8 zero\n8 8 error", "", True)]


def test_create_from_table_file(fake_dm: Any, run: Any, tmp_path: Path) -> None:
    f = tmp_path / "t.table"
    f.write_text("0 16 linear /dev/loop3 0\n16 8 zero\n")
    run("dm", "create", "n", str(f))
    assert fake_dm.calls == [("create", "n", "0 16 linear /dev/loop3 0\n16 8 zero", "", False)]


def test_create_from_stdin(fake_dm: Any, run: Any, stdin: Any) -> None:
    stdin("0 8 zero\n8 8 error\n")
    run("dm", "create", "n")
    assert fake_dm.calls == [("create", "n", "0 8 zero\n8 8 error", "", False)]


def test_create_with_empty_stdin_creates_without_table(fake_dm: Any, run: Any, stdin: Any) -> None:
    stdin("")
    run("dm", "create", "n")
    assert fake_dm.calls == [("create", "n", None, "", False)]


def test_create_with_stdin_closed_creates_without_table(fake_dm: Any, run: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", None)  # what Python gives a process started with <&-
    run("dm", "create", "n")
    assert fake_dm.calls == [("create", "n", None, "", False)]
    with pytest.raises(InvalidArgument, match="no table given"):
        run("dm", "load", "n")


def test_create_notable_does_not_read_stdin(fake_dm: Any, run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    class Unreadable(io.StringIO):
        def read(self, *a: Any) -> str:
            raise AssertionError("stdin read with --notable")

    monkeypatch.setattr(sys, "stdin", Unreadable())
    run("dm", "create", "n", "--notable", "-u", "U")
    assert fake_dm.calls == [("create", "n", None, "U", False)]


def test_create_json_prints_the_device_info(fake_dm: Any, run: Any) -> None:
    rc, out, _ = run("dm", "create", "n", "--table", "0 8 zero", "--json")
    data = json.loads(out)
    assert data["name"] == "n" and data["live_table"] is True and data["target_count"] == 1
    assert set(data) >= {"uuid", "major", "minor", "read_only", "open_count", "event_nr"}


@pytest.mark.parametrize(
    "extra",
    [["--table", "0 8 zero", "TABLEFILE"], ["--notable", "--table", "0 8 zero"], ["--notable", "TABLEFILE"]],
)
def test_table_sources_exclude_each_other(extra: list[str], fake_dm: Any, run: Any, tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_text("0 8 zero\n")
    argv = [str(f) if a == "TABLEFILE" else a for a in extra]
    with pytest.raises(InvalidArgument, match="exclude each other"):
        run("dm", "create", "n", *argv)
    assert fake_dm.calls == []


def test_create_bad_table_fails_before_the_backend(fake_dm: Any, run: Any) -> None:
    with pytest.raises(InvalidTable):
        run("dm", "create", "n", "--table", "0 8 linear")
    assert fake_dm.calls == [] and fake_dm.opened_with == []


def test_create_missing_table_file(fake_dm: Any, run: Any, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read table file") as exc:
        run("dm", "create", "n", str(tmp_path / "absent"))
    assert exc.value.device == str(tmp_path / "absent")
    assert fake_dm.calls == []


def test_load_and_reload(fake_dm: Any, run: Any, tmp_path: Path, stdin: Any) -> None:
    run("dm", "load", "n", "--table", "0 8 zero", "-r")
    f = tmp_path / "t"
    f.write_text("0 4 error\n")
    run("dm", "reload", "n", str(f))
    stdin("0 2 zero\n")
    run("dm", "load", "n")
    assert fake_dm.calls == [
        ("load", "n", "0 8 zero", True),
        ("load", "n", "0 4 error", False),
        ("load", "n", "0 2 zero", False),
    ]


def test_load_needs_a_table(fake_dm: Any, run: Any, stdin: Any) -> None:
    stdin("  \n")
    with pytest.raises(InvalidArgument, match="no table given"):
        run("dm", "load", "n")
    assert fake_dm.calls == []


# --- the simple verbs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "calls"),
    [
        (["suspend", "a", "b"], [("suspend", "a", False), ("suspend", "b", False)]),
        (["suspend", "--noflush", "a"], [("suspend", "a", True)]),
        (["resume", "a", "b"], [("resume", "a"), ("resume", "b")]),
        (["remove", "a"], [("remove", "a", False, False)]),
        (["remove", "--retry", "a", "b"], [("remove", "a", True, False), ("remove", "b", True, False)]),
        (["remove", "--deferred", "a"], [("remove", "a", False, True)]),
        (["clear", "a"], [("clear", "a")]),
        (["rename", "a", "b"], [("rename", "a", "b")]),
        (["message", "a", "0", "set_region_size", "1024"], [("message", "a", 0, "set_region_size 1024")]),
        (["message", "a", "16", "x"], [("message", "a", 16, "x")]),
        (["wait", "a"], [("wait_event", "a", 0, None)]),
        (["wait", "a", "5", "--timeout", "2"], [("wait_event", "a", 5, 2.0)]),
    ],
)
def test_verbs_make_exact_calls(argv: list[str], calls: list[tuple[Any, ...]], fake_dm: Any, run: Any) -> None:
    rc, _, err = run("dm", *argv)
    assert rc == 0 and err == ""
    assert fake_dm.calls == calls


def test_multi_device_verb_stops_at_the_first_failure(fake_dm: Any, run: Any) -> None:
    fake_dm.fail = DeviceBusy("device is open", operation="remove", device="a")
    with pytest.raises(DeviceBusy):
        run("dm", "remove", "a", "b")
    assert fake_dm.calls == [("remove", "a", False, False)]


@pytest.mark.parametrize(("response", "out"), [(None, ""), ("", ""), ("ok", "ok\n"), ("two\nlines\n", "two\nlines\n")])
def test_message_response_printed_like_dmsetup(response: str | None, out: str, fake_dm: Any, run: Any) -> None:
    fake_dm.response = response
    assert run("dm", "message", "a", "0", "hello")[1] == out


def test_wait_prints_the_event_number(fake_dm: Any, run: Any) -> None:
    assert run("dm", "wait", "a", "4")[1] == "5\n"
    assert json.loads(run("dm", "wait", "a", "4", "--json")[1]) == {"event_nr": 5}


# --- listings: text exactly as dmsetup prints it, and --json -------------------------------------


@pytest.fixture(autouse=True)
def no_sysfs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The fake devices' numbers may exist on this host: read-ahead comes from an empty sysfs."""
    monkeypatch.setattr(linux, "SYS_DEV_BLOCK", str(tmp_path / "nosys"))


@pytest.fixture
def three(fake_dm: Any) -> Any:
    fake_dm.add("b-dev", "0 2048 linear 7:0 0\n2048 2048 linear 7:1 8", minor=1)
    fake_dm.add("a-dev", "0 100 zero", minor=0, uuid="UUID-A", read_only=True)
    fake_dm.add("c-empty", "", minor=2)
    fake_dm.inactive["b-dev"] = "0 8 zero"
    fake_dm.statuses.update(
        {
            "a-dev": [StatusLine(0, 100, "zero", "")],
            "b-dev": [StatusLine(0, 2048, "linear", ""), StatusLine(2048, 2048, "linear", "")],
        }
    )
    fake_dm.dependencies["b-dev"] = [(7, 1), (7, 0)]
    return fake_dm


def test_ls_text_and_json(three: Any, run: Any) -> None:
    assert run("dm", "ls")[1] == "a-dev\t(254:0)\nb-dev\t(254:1)\nc-empty\t(254:2)\n"
    data = json.loads(run("dm", "ls", "--json")[1])
    assert [d["name"] for d in data] == ["a-dev", "b-dev", "c-empty"]
    assert data[0] == {"name": "a-dev", "major": 254, "minor": 0, "event_nr": 0, "uuid": "UUID-A"}


@pytest.mark.parametrize(("verb", "empty"), [("ls", []), ("table", {}), ("status", {}), ("info", []), ("deps", {})])
def test_all_devices_without_devices(verb: str, empty: Any, fake_dm: Any, run: Any) -> None:
    assert run("dm", verb)[1] == "No devices found\n"  # dmsetup.c _process_all
    assert json.loads(run("--json", "dm", verb)[1]) == empty


def test_table_all_devices_prefixed_in_name_order(three: Any, run: Any) -> None:
    assert run("dm", "table")[1] == (
        "a-dev: 0 100 zero \n"
        "b-dev: 0 2048 linear 7:0 0\n"
        "b-dev: 2048 2048 linear 7:1 8\n"
        "c-empty: \n"
    )


def test_table_one_device_bare(three: Any, run: Any) -> None:
    assert run("dm", "table", "b-dev")[1] == "0 2048 linear 7:0 0\n2048 2048 linear 7:1 8\n"
    assert run("dm", "table", "a-dev")[1] == "0 100 zero \n"  # dmsetup's "%s %s" with empty params
    assert run("dm", "table", "c-empty")[1] == "\n"  # no table: dmsetup prints an empty line


def test_table_several_named_devices_prefixed(three: Any, run: Any) -> None:
    assert run("dm", "table", "c-empty", "a-dev")[1] == "c-empty: \na-dev: 0 100 zero \n"


def test_table_inactive(three: Any, run: Any) -> None:
    assert run("dm", "table", "--inactive", "b-dev")[1] == "0 8 zero \n"
    assert ("table", "b-dev", True) in three.calls


def test_table_json(three: Any, run: Any) -> None:
    data = json.loads(run("dm", "table", "--json")[1])
    assert data == {"a-dev": "0 100 zero", "b-dev": "0 2048 linear 7:0 0\n2048 2048 linear 7:1 8", "c-empty": ""}


def test_status_text_and_json(three: Any, run: Any) -> None:
    assert run("dm", "status")[1] == "a-dev: 0 100 zero \nb-dev: 0 2048 linear \nb-dev: 2048 2048 linear \nc-empty: \n"
    assert run("dm", "status", "a-dev")[1] == "0 100 zero \n"
    run("dm", "status", "--inactive", "b-dev")
    assert ("status", "b-dev", True) in three.calls
    assert json.loads(run("dm", "status", "a-dev", "--json")[1]) == {"a-dev": "0 100 zero"}


def test_info_layout_matches_dmsetup(three: Any, run: Any) -> None:
    assert run("dm", "info", "a-dev")[1] == (
        "Name:              a-dev\n"
        "State:             ACTIVE (READ-ONLY)\n"
        "Tables present:    LIVE\n"
        "Open count:        0\n"
        "Event number:      0\n"
        "Major, minor:      254, 0\n"
        "Number of targets: 1\n"
        "UUID: UUID-A\n"
        "\n"
    )


def test_info_all_devices_each_followed_by_an_empty_line(three: Any, run: Any) -> None:
    out = run("dm", "info")[1]
    blocks = out.split("\n\n")
    assert blocks[-1] == "" and len(blocks) == 4
    assert [b.splitlines()[0] for b in blocks[:3]] == [
        "Name:              a-dev", "Name:              b-dev", "Name:              c-empty",
    ]
    assert "Tables present:    None\n" in blocks[2] + "\n"
    assert "Number of targets: 0" in blocks[2]


def test_format_info_states() -> None:
    info = DeviceInfo(name="x", suspended=True, live_table=True, inactive_table=True, deferred_remove=True,
                      open_count=2, event_nr=9, major=254, minor=3, target_count=2)
    assert dm_cmd.format_info(info, 256).splitlines() == [
        "Name:              x",
        "State:             SUSPENDED (DEFERRED REMOVE)",
        "Read Ahead:        256",
        "Tables present:    LIVE & INACTIVE",
        "Open count:        2",
        "Event number:      9",
        "Major, minor:      254, 3",
        "Number of targets: 2",
    ]
    only_inactive = DeviceInfo(name="y", inactive_table=True)
    assert "Tables present:    INACTIVE" in dm_cmd.format_info(only_inactive).splitlines()


def test_read_ahead_from_sysfs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, three: Any, run: Any) -> None:
    bdi = tmp_path / "dev" / "block" / "254:1" / "bdi"
    bdi.mkdir(parents=True)
    (bdi / "read_ahead_kb").write_text("128\n")
    monkeypatch.setattr(linux, "SYS_DEV_BLOCK", str(tmp_path / "dev" / "block"))
    assert dm_cmd.read_ahead(three.devices["b-dev"]) == 256
    assert dm_cmd.read_ahead(three.devices["a-dev"]) is None  # no disk registered: no line
    assert dm_cmd.read_ahead(DeviceInfo(name="u")) is None  # major 0: not a block device
    lines = run("dm", "info", "b-dev")[1].splitlines()
    assert lines[2] == "Read Ahead:        256"
    data = json.loads(run("dm", "info", "--json")[1])
    assert [(d["name"], d["read_ahead"]) for d in data] == [("a-dev", None), ("b-dev", 256), ("c-empty", None)]


def test_info_json_shape(three: Any, run: Any) -> None:
    data = json.loads(run("dm", "info", "a-dev", "--json")[1])
    assert isinstance(data, list) and len(data) == 1
    assert data[0]["name"] == "a-dev" and data[0]["uuid"] == "UUID-A" and data[0]["read_only"] is True
    assert set(data[0]) == {f for f in DeviceInfo.__dataclass_fields__} | {"read_ahead"}


def test_deps_text_and_json(three: Any, run: Any) -> None:
    assert run("dm", "deps", "b-dev")[1] == "2 dependencies\t: (7, 1) (7, 0)\n"
    assert run("dm", "deps", "a-dev")[1] == "0 dependencies\t:\n"
    assert run("dm", "deps")[1] == (
        "a-dev: 0 dependencies\t:\nb-dev: 2 dependencies\t: (7, 1) (7, 0)\nc-empty: 0 dependencies\t:\n"
    )
    assert json.loads(run("dm", "deps", "--json", "b-dev")[1]) == {"b-dev": ["7:1", "7:0"]}


def test_targets_text_and_json(fake_dm: Any, run: Any) -> None:
    # dmsetup: "%-16s v%d.%d.%d"
    assert run("dm", "targets")[1] == "striped          v1.7.0\nlinear           v1.5.0\nsnapshot-origin  v1.9.0\n"
    assert json.loads(run("dm", "targets", "--json")[1]) == {
        "striped": "1.7.0", "linear": "1.5.0", "snapshot-origin": "1.9.0",
    }


def test_version_text_and_json(fake_dm: Any, run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run("dm", "version")[1] == "Library version:   1.02.196\nDriver version:    4.48.0\n"
    # the kernel backend prints dmsetup's two lines; another backend names itself on a third
    from dmtools.backend import Versions

    monkeypatch.setattr(fake_dm, "version", lambda: Versions("1.02.196", "4.48.0", "kernel"))
    assert run("dm", "version")[1] == "Library version:   1.02.196\nDriver version:    4.48.0\n"
    monkeypatch.setattr(fake_dm, "version", lambda: Versions("0.1.0", "4.50.0", "userspace"))
    assert run("dm", "version")[1].splitlines()[2] == "Backend:           userspace"
    assert json.loads(run("dm", "version", "--json")[1]) == {
        "library": "0.1.0", "driver": "4.50.0", "backend": "userspace",
    }


def test_listing_of_a_missing_device_raises(three: Any, run: Any) -> None:
    three.fail = DeviceNotFound("no such device", operation="info", device="zz")
    with pytest.raises(DeviceNotFound):
        run("dm", "info", "zz")


# --- the error path -----------------------------------------------------------------------------


def test_error_is_one_line_and_exit_1(fake_dm: Any, run: Any) -> None:
    fake_dm.fail = DeviceBusy("device-mapper: remove ioctl failed: Device or resource busy\n"
                              "Command failed.", operation="remove", device="a")
    rc, out, err = run("dm", "remove", "a", propagate=False)
    assert (rc, out) == (1, "")
    assert err == "dmtools: remove a: device-mapper: remove ioctl failed: Device or resource busy; Command failed.\n"


def test_oserror_takes_the_same_path(fake_dm: Any, run: Any) -> None:
    fake_dm.fail = PermissionError(13, "Permission denied", "/dev/mapper/control")
    rc, _, err = run("dm", "ls", propagate=False)
    assert rc == 1 and err.count("\n") == 1 and err.startswith("dmtools: ") and "Permission denied" in err
    with pytest.raises(PermissionError):
        run("dm", "ls")


def test_propagate_raises_the_exception_type(fake_dm: Any, run: Any) -> None:
    fake_dm.fail = DeviceNotFound("gone", operation="resume", device="a")
    with pytest.raises(DeviceNotFound) as exc:
        run("dm", "resume", "a")
    assert exc.value.device == "a" and exc.value.operation == "resume"


def test_interrupt_exits_130(fake_dm: Any, run: Any) -> None:
    fake_dm.fail = KeyboardInterrupt()
    rc, _, err = run("dm", "wait", "a", propagate=False)
    assert (rc, err) == (130, "dmtools: interrupted\n")


def _console(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("dmtools")
    return subprocess.run([str(exe), *argv], input=stdin if stdin is not None else "", capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT, check=False)


def test_console_script_error_one_line_and_debug_traceback(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-table")
    plain = _console("dm", "load", "x", missing)
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr == f"dmtools: {missing}: cannot read table file: No such file or directory\n"
    debug = _console("dm", "load", "x", missing, "--debug")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "dmtools.errors.InvalidArgument" in debug.stderr
    assert debug.stderr.endswith(plain.stderr)


def test_console_script_usage_error_exit_2() -> None:
    proc = _console("dm", "rename", "only-one")
    assert proc.returncode == 2 and "usage:" in proc.stderr


# --- backends are closed; sub-commands are discovered -------------------------------------------


def test_main_closes_the_backend_it_opened(opened_by_dmtools_open: Any, run: Any) -> None:
    dm, opened = opened_by_dmtools_open
    run("--backend", "userspace", "dm", "ls")
    assert opened == ["userspace"] and dm.closed == 1
    dm.fail = DeviceNotFound("gone", operation="info", device="a")
    with pytest.raises(DeviceNotFound):
        run("dm", "info", "a")
    assert dm.closed == 2  # closed on the error path too


def test_a_replaced_open_backend_is_not_closed(fake_dm: Any, run: Any) -> None:
    run("dm", "ls")
    assert fake_dm.closed == 0  # the seam's owner (a test fixture) keeps its backend open


EXPECTED_COMMANDS = {"dm", "loop", "daemon", "copy", "snapshot", "mirror"}


def _subcommands(parser: Any) -> dict[str, Any]:
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)


def test_subcommands_discovered() -> None:
    from importlib.metadata import entry_points

    declared = {ep.name for ep in entry_points(group="dmtools.commands")}
    assert declared >= {"copy", "snapshot", "mirror"}
    assert set(_subcommands(cli_main.build_parser())) >= EXPECTED_COMMANDS


def test_help_lists_the_subcommands() -> None:
    proc = _console("--help")
    assert proc.returncode == 0
    for name in EXPECTED_COMMANDS:
        assert f"\n    {name} " in proc.stdout, name


def test_broken_plugin_command_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    class EP:
        def __init__(self, name: str, target: Any) -> None:
            self.name, self._target = name, target

        def load(self) -> Any:
            if isinstance(self._target, Exception):
                raise self._target
            return self._target

    def register(sub: Any) -> None:
        sub.add_parser("hello").set_defaults(func=lambda args: 7)

    eps = [EP("broken", ImportError("no module named nowhere")), EP("hello", register), EP("dm", register)]
    monkeypatch.setattr(cli_main, "entry_points", lambda group: eps if group == "dmtools.commands" else [])
    commands = _subcommands(cli_main.build_parser())
    assert "broken" not in commands and "hello" in commands
    assert commands["dm"].prog.endswith(" dm")  # the built-in dm is not replaced by a plugin of that name
    assert cli_main.main(["hello"]) == 7


@pytest.mark.parametrize(("kernel_works", "expected"), [(True, "kernel"), (False, "userspace")])
def test_auto_picks_the_kernel_where_it_works(kernel_works: bool, expected: str, monkeypatch: pytest.MonkeyPatch,
                                              run: Any) -> None:
    """Through the real seam and ``dmtools.open``: only the two backends' constructors are faked."""
    import dmtools.backends
    import dmtools.engine.client
    import dmtools.kernel
    from dmtools.backend import Versions

    made: list[str] = []

    class Made:
        def __init__(self, kind: str) -> None:
            made.append(kind)
            self.kind = kind

        def version(self) -> Versions:
            return Versions("L", "D", self.kind)

        def close(self) -> None:
            made.append(f"closed {self.kind}")

    monkeypatch.setattr(dmtools.backends, "kernel_available", lambda: kernel_works)
    monkeypatch.setattr(dmtools.kernel, "KernelBackend", lambda: Made("kernel"))
    monkeypatch.setattr(dmtools.engine.client, "open_userspace", lambda: Made("userspace"))
    out = json.loads(run("dm", "version", "--json")[1])
    assert out["backend"] == expected
    assert made == [expected, f"closed {expected}"]
