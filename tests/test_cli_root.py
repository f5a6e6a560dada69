"""The root CLI: option hoisting, one error path, sub-command discovery."""

from __future__ import annotations

import argparse

import pytest

from dmtools.cli import main as cli
from dmtools.errors import InvalidArgument


def test_global_flags_are_hoisted_from_anywhere() -> None:
    argv = ["dm", "ls", "--json", "--backend", "userspace", "--debug"]
    assert cli.hoist_globals(argv) == ["--json", "--backend", "userspace", "--debug", "dm", "ls"]
    assert cli.hoist_globals(["--backend=kernel", "dm", "--", "--json"]) == ["--backend=kernel", "dm", "--", "--json"]


def test_parser_has_dm_verbs() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["dm", "create", "x", "--table", "0 8 zero", "--uuid", "U"])
    assert args.name == "x" and args.table == "0 8 zero" and args.uuid == "U"
    args = parser.parse_args(["dm", "suspend", "a", "b", "--noflush"])
    assert args.names == ["a", "b"] and args.noflush


def test_error_path_one_line_and_exit_code(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    missing = tmp_path / "no-such-table"
    rc = cli.main(["--backend", "userspace", "dm", "load", "x", str(missing)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("dmtools: ") and "no-such-table" in err


def test_propagate_raises_the_exception_type(tmp_path) -> None:
    with pytest.raises(InvalidArgument):
        cli.main(["dm", "load", "x", str(tmp_path / "absent")], propagate=True)


def test_unknown_backend_rejected_by_parser() -> None:
    with pytest.raises(SystemExit):
        cli.main(["--backend", "nope", "dm", "ls"])


def test_global_json_survives_a_subcommand_that_declares_json(monkeypatch) -> None:
    seen: dict[str, bool] = {}
    real_load = cli._load

    def register(sub) -> None:
        p = sub.add_parser("probe")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=lambda args: seen.update(json=args.json))

    monkeypatch.setitem(cli.BUILTIN_COMMANDS, "probe", "fake:register")
    monkeypatch.setattr(cli, "_load", lambda spec: register if spec == "fake:register" else real_load(spec))
    assert cli.main(["probe", "--json"]) == 0
    assert seen == {"json": True}
    assert cli.main(["--json", "probe"]) == 0
    assert seen == {"json": True}


def test_only_the_named_subcommand_is_loaded() -> None:
    assert cli._command_named(["--backend", "kernel", "dm", "ls"]) == "dm"
    assert cli._command_named(["--json", "snapshot", "list"]) == "snapshot"
    assert cli._command_named(["--help"]) is None
    assert cli._command_named(["no-such-command"]) is None
    parser = cli.build_parser("dm")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"dm"}
    full = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"dm", "loop", "daemon", "monitor", "copy", "snapshot", "mirror"} <= set(full.choices)


def test_unknown_subcommand_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])
    err = capsys.readouterr().err
    assert "invalid choice" in err and "snapshot" in err and "mirror" in err


def test_help_summaries_read_from_source_are_the_modules_own() -> None:
    """``--help`` reads each command's ``SUMMARY`` line without importing its module: the text it
    finds is the one the module's ``register`` uses, for every command."""
    import importlib

    for name, where in cli._commands().items():
        spec = where if isinstance(where, str) else where.value
        module = spec.partition(":")[0]
        assert cli._source_of(module) is not None, name
        assert cli._summary(spec) == importlib.import_module(module).SUMMARY, name


def test_help_summary_of_a_module_without_the_line_is_imported(tmp_path, monkeypatch) -> None:
    """A third-party command module whose ``SUMMARY`` is not a plain one-line string is imported
    and asked; one with no ``SUMMARY`` gets ``None`` (and is registered in full)."""
    (tmp_path / "plugin_built.py").write_text('SUMMARY = "built " + "at import"\n')
    (tmp_path / "plugin_bare.py").write_text("def register(sub):\n    sub.add_parser('bare')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli._summary("plugin_built:register") == "built at import"
    assert cli._summary("plugin_bare:register") is None


def test_a_plugin_command_reads_the_entry_points_once(monkeypatch, tmp_path) -> None:
    """``dmtools copy`` (kcopyd's entry point) finds its command and builds its parser from one
    reading of the installed entry points, not one for each."""
    calls: list[str] = []
    real = cli.entry_points

    def counting(group: str):
        calls.append(group)
        return real(group)

    monkeypatch.setattr(cli, "entry_points", counting)
    src = tmp_path / "src.img"
    src.write_bytes(b"\x5a" * 4096)
    dst = tmp_path / "dst.img"
    assert cli.main(["copy", "--quiet", str(src), str(dst)]) == 0
    assert dst.read_bytes() == src.read_bytes()
    assert calls == ["dmtools.commands"]
