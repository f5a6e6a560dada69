"""Bad input found by hand (issue 15): one-line errors and documented exit codes, never a traceback.

Device names that start with ``-`` are given after ``--``, as with dmsetup's getopt.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from dmtools.cli import main as cli_main
from dmtools.errors import InvalidArgument


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["create", "--table", "0 8 zero", "--", "-x"], {"name": "-x", "table": "0 8 zero"}),
        (["create", "-u", "U", "--", "-x", "-file"], {"name": "-x", "table_file": "-file", "uuid": "U"}),
        (["create", "n", "--", "-file"], {"name": "n", "table_file": "-file"}),
        (["remove", "--retry", "--", "-a", "--b"], {"names": ["-a", "--b"], "retry": True}),
        (["info", "--", "-a"], {"names": ["-a"]}),
        (["message", "--", "-a", "0", "-m", "--n"], {"name": "-a", "sector": 0, "message": ["-m", "--n"]}),
        (["rename", "--", "-a", "-b"], {"name": "-a", "new_name": "-b"}),
        # after "--" an option spelling is an operand, as getopt has it
        (["create", "--", "-x", "--notable"], {"name": "-x", "table_file": "--notable", "notable": False}),
    ],
)
def test_names_starting_with_dash_follow_double_dash(argv: list[str], expected: dict[str, Any]) -> None:
    args = cli_main.build_parser().parse_args(cli_main.hoist_globals(["dm", *argv]))
    for key, value in expected.items():
        assert getattr(args, key) == value, key


def test_dash_name_reaches_the_backend(fake_dm: Any, run: Any) -> None:
    assert run("dm", "create", "--table", "0 8 zero", "--", "-x")[0] == 0
    assert run("dm", "remove", "--", "-x", "--json")[0] == 0  # --json after "--" is a name
    assert fake_dm.calls == [("create", "-x", "0 8 zero", "", False), ("remove", "-x", False, False),
                             ("remove", "--json", False, False)]


def test_without_double_dash_a_dash_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["dm", "remove", "-x"])
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_table_file_that_is_not_utf8(fake_dm: Any, run: Any, tmp_path: Path) -> None:
    f = tmp_path / "t.table"
    f.write_bytes(b"0 8 linear /dev/\xff\xfe 0\n")
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        run("dm", "create", "n", str(f))
    rc, out, err = run("dm", "load", "n", str(f), propagate=False)
    assert (rc, out) == (1, "")
    assert err.count("\n") == 1 and "not UTF-8" in err and str(f) in err
    assert fake_dm.calls == []


def test_table_on_stdin_that_is_not_utf8(fake_dm: Any, run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"0 8 zero\xff\n"), encoding="utf-8"))
    rc, _, err = run("dm", "create", "n", propagate=False)
    assert rc == 1 and "not UTF-8" in err and err.count("\n") == 1
    assert fake_dm.calls == []


@pytest.mark.parametrize(
    ("option", "value"),
    [("--threads", "100000"), ("--threads", "0"), ("--num-pages", "99999999999"), ("--throttle", "0"),
     ("--throttle", "101"), ("--threads", "x")],
)
def test_copy_numbers_out_of_range_are_usage_errors(option: str, value: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"a" * 4096)
    with pytest.raises(SystemExit) as exc:
        cli_main.main(["copy", str(src), str(tmp_path / "dst"), option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["dm", "wait", "d", "--timeout", "nan"],  # waited forever
        ["dm", "wait", "d", "--timeout", "inf"],
        ["dm", "wait", "d", "--timeout", "-1"],
        ["snapshot", "merge", "s", "--timeout", "nan"],  # no timeout at all
        ["mirror", "resync", "m", "--timeout=-inf"],
        ["monitor", "--once", "--interval", "nan"],
        ["monitor", "--timeout", "x"],
    ],
)
def test_times_must_be_finite_seconds(argv: list[str], fake_dm: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "seconds" in err and "Traceback" not in err
    assert fake_dm.calls == []


def test_a_finite_timeout_reaches_the_backend(fake_dm: Any, run: Any) -> None:
    assert run("dm", "wait", "d", "2", "--timeout", "0.5")[0] == 0
    assert fake_dm.calls == [("wait_event", "d", 2, 0.5)]


def test_every_progress_option_is_read_by_one_reporter_for(tmp_path: Path, run: Any) -> None:
    """``--progress[=FD]`` of copy, mirror resync-offline, snapshot export and thin export is read
    by ``kcopyd.progress.reporter_for``: the same refusal in the same words, before any output."""
    from kcopyd.progress import ProgressReporter, reporter_for

    files = {n: tmp_path / f"{n}.img" for n in ("a", "b", "meta", "data")}
    for f in files.values():
        f.write_bytes(bytes(64 * 1024))
    out = tmp_path / "out.img"
    commands = [["copy", str(files["a"]), str(out)],
                ["mirror", "resync-offline", str(files["a"]), str(files["b"]), "--log", "core"],
                ["snapshot", "export", "--origin", str(files["a"]), "--cow", str(files["b"]), str(out)],
                ["thin", "export", "--metadata", str(files["meta"]), "--data", str(files["data"]), "--id", "1",
                 str(out)]]
    for argv in commands:
        with pytest.raises(InvalidArgument, match="--progress takes a file descriptor number, not 'x'"):
            run(*argv, "--progress=x")
        assert not out.exists(), argv
    assert reporter_for("bar").bar is True and reporter_for(None).bar is False  # stderr is not a terminal here
    quiet = reporter_for(None, quiet=True)
    assert isinstance(quiet, ProgressReporter) and not quiet.bar and quiet.fd is None
    r, w = os.pipe()
    try:
        by_fd = reporter_for(str(w), label="x")
        assert by_fd.fd == w and not by_fd.bar
    finally:
        os.close(r)
        os.close(w)
