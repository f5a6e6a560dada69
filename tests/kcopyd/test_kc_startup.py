"""``dmtools copy`` of regular files loads only the copy path: its start-up is what nbdcopy's
is compared against (issue 14), and what it imports is checked exactly here, in a fresh interpreter
(timing is left to the benchmarks: this machine's load would make a time limit flaky)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from dmtools.testing.probes import NO_HOST_DEVICES

#: Neither a copy between two files nor its safety checks need these: the upper targets, the
#: kernel's backend and cffi binding (no kernel table maps a file without a loop over it), udev,
#: libnbd (loaded when a URI is named), the daemon's client (none runs), fractions/decimal,
#: dataclasses and the inspect it imports (dmtools.record instead: a quarter of the start-up), and
#: typing (imported for type checkers only: 12 M instructions, see dmtools.lazy), and queue.py
#: with heapq (the client's queues are its C SimpleQueue: 0.4 ms).
NOT_LOADED = ("snapshot", "mirror", "thin", "cffi", "_cffi_backend", "pyudev", "dmtools._ffi", "nbd",
              "dmtools.kernel", "dmtools.backend", "dmtools.nbd.endpoint", "dmtools.engine.client",
              "fractions", "decimal", "dataclasses", "inspect", "typing", "queue", "heapq")

PROBE = """
import json, sys
""" + NO_HOST_DEVICES + """
from dmtools.cli.main import main
rc = main(["copy", sys.argv[1], sys.argv[2], "--quiet"])
print(json.dumps([rc, sorted(sys.modules)]), file=sys.stderr)
"""


def test_copy_of_two_files_imports_only_the_copy_path(tmp_path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(bytes(range(256)) * 4096)
    env = {"PATH": "/usr/bin:/bin", "DMTOOLS_RUN_DIR": str(tmp_path / "run")}  # no daemon there
    proc = subprocess.run([sys.executable, "-c", PROBE, str(src), str(dst), str(tmp_path / "no-such-path")],
                          capture_output=True, text=True, check=True, env=env)
    rc, loaded = json.loads(proc.stderr.strip().splitlines()[-1])
    assert rc == 0 and dst.read_bytes() == src.read_bytes(), "the probe copied the file"
    assert "kcopyd.client" in loaded and "dmtools.claims" in loaded, "the copy and its checks ran"
    heavy = sorted(m for m in loaded if m in NOT_LOADED + ("shutil", "bz2", "lzma")
                   or m.partition(".")[0] in NOT_LOADED)
    assert not heavy, f"dmtools copy FILE FILE imports {heavy}"


KCOPYD_PROBE = """
import json, sys
""" + NO_HOST_DEVICES + """
from kcopyd.cli import main
rc = main([sys.argv[1], sys.argv[2], "--quiet"])
print(json.dumps([rc, sorted(sys.modules)]), file=sys.stderr)
"""


def test_python_m_kcopyd_does_not_import_shutil(tmp_path) -> None:
    """``python -m kcopyd`` (what ``scripts/bench nbd`` times against nbdcopy) finds the terminal's
    width for argparse itself: argparse's own way imports shutil, bz2 and lzma."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(bytes(range(256)) * 16)
    env = {"PATH": "/usr/bin:/bin", "DMTOOLS_RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.run([sys.executable, "-c", KCOPYD_PROBE, str(src), str(dst), str(tmp_path / "no-such-path")],
                          capture_output=True, text=True, check=True, env=env)
    rc, loaded = json.loads(proc.stderr.strip().splitlines()[-1])
    assert rc == 0 and dst.read_bytes() == src.read_bytes(), "the probe copied the file"
    heavy = sorted(m for m in loaded if m in NOT_LOADED + ("shutil", "bz2", "lzma"))
    assert not heavy, f"python -m kcopyd FILE FILE imports {heavy}"


def test_help_width_follows_columns(monkeypatch) -> None:
    """The width is found as ``shutil.get_terminal_size`` finds it: ``$COLUMNS`` first."""
    from dmtools.cli.lean import terminal_columns
    from kcopyd.cli import HelpFormatter

    monkeypatch.setenv("COLUMNS", "61")
    assert terminal_columns() == 61
    assert HelpFormatter("prog")._width == 61 - 2  # argparse keeps 2 columns of margin
    assert HelpFormatter("prog")._width == argparse.RawDescriptionHelpFormatter("prog")._width
    monkeypatch.setenv("COLUMNS", "junk")
    assert terminal_columns() > 0


def _run_module(tmp_path, stdout) -> subprocess.CompletedProcess[str]:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(bytes(range(256)) * 64)
    env = {"PATH": "/usr/bin:/bin", "DMTOOLS_RUN_DIR": str(tmp_path / "run")}  # block-buffered stdout
    proc = subprocess.run([sys.executable, "-m", "kcopyd", "--json", str(src), str(dst)], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, env=env)
    assert dst.read_bytes() == src.read_bytes(), "the copy ran"
    return proc


def test_python_m_kcopyd_leaves_with_its_output_written(tmp_path) -> None:
    """``python -m kcopyd`` skips the interpreter's teardown: its buffered summary is written first."""
    out = tmp_path / "out.json"
    with open(out, "w") as f:
        proc = _run_module(tmp_path, f)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["ok"] is True


def test_python_m_kcopyd_exits_120_when_its_output_cannot_be_written(tmp_path) -> None:
    """As the ordinary exit does when flushing standard output fails (here: a full device)."""
    with open("/dev/full", "w") as f:
        proc = _run_module(tmp_path, f)
    assert proc.returncode == 120
    assert "No space left" in proc.stderr


#: ``dmtools copy`` as its console script runs it (``sys.exit(main())``), with an object whose
#: finaliser says when the interpreter's teardown collects it.
DMTOOLS_PROBE = """
import os, sys
class Finalised:
    def __del__(self):
        os.write(2, b"torn down\\n")
witness = Finalised()
sys.argv = ["dmtools", "copy", "--json"] + sys.argv[1:]
from dmtools.cli.main import main
sys.exit(main())
"""


def _run_dmtools_copy(tmp_path, stdout) -> subprocess.CompletedProcess[str]:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(bytes(range(256)) * 64)
    env = {"PATH": "/usr/bin:/bin", "DMTOOLS_RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.run([sys.executable, "-c", DMTOOLS_PROBE, str(src), str(dst)], stdout=stdout,
                          stderr=subprocess.PIPE, text=True, env=env)
    assert dst.read_bytes() == src.read_bytes(), "the copy ran"
    return proc


def test_dmtools_copy_leaves_without_teardown_with_its_output_written(tmp_path) -> None:
    """``dmtools copy`` run as the process's command skips the interpreter's teardown (nothing is
    finalised), as ``python -m kcopyd`` does; its buffered summary is written first."""
    out = tmp_path / "out.json"
    with open(out, "w") as f:
        proc = _run_dmtools_copy(tmp_path, f)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["ok"] is True
    assert "torn down" not in proc.stderr


def test_dmtools_copy_exits_120_when_its_output_cannot_be_written(tmp_path) -> None:
    with open("/dev/full", "w") as f:
        proc = _run_dmtools_copy(tmp_path, f)
    assert proc.returncode == 120
    assert "dmtools: cannot write the output" in proc.stderr


def test_dmtools_main_called_with_arguments_returns(tmp_path) -> None:
    """``main(argv)`` (a caller's list, as tests and other programs give) returns its status."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    from dmtools.cli.main import main

    src.write_bytes(bytes(4096))
    assert main(["copy", str(src), str(dst), "--quiet"]) == 0
    assert dst.read_bytes() == src.read_bytes()


FORWARD_REF_PROBE = """
import typing
made = []
init = typing.ForwardRef.__init__
def counting(self, arg, *a, **k):
    made.append(arg)
    init(self, arg, *a, **k)
typing.ForwardRef.__init__ = counting
import kcopyd.cli, kcopyd.client, kcopyd.progress, dmtools.claims, dmtools.loop_index, dmtools.nbd.endpoint
print(made)
"""


def test_copy_path_makes_no_forward_refs_at_import() -> None:
    """A string in a runtime ``Union[...]`` (or a ``TypeVar`` bound) becomes a ``typing.ForwardRef``,
    which compiles it: 10 M instructions for the first, a twentieth of a small copy's run."""
    proc = subprocess.run([sys.executable, "-c", FORWARD_REF_PROBE], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]", f"forward references made at import: {proc.stdout.strip()}"


def test_loop_status_reader_imports_no_dataclasses() -> None:
    """On a host with bound loop devices the copy's in-use check reads their status through
    ``dmtools.loop`` (the probes above hide the host's devices), so it too stays off ``dataclasses``."""
    code = "import sys, dmtools.loop; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert "dmtools.loop" in loaded and not loaded & {"dataclasses", "inspect"}


#: ``python -m kcopyd`` without site-packages (as an installed package's interpreter would have no
#: editable-install hook importing urllib.parse), summary printed without json.
BARE_PROBE = """
import sys
""" + NO_HOST_DEVICES + """
from kcopyd.cli import main
rc = main(sys.argv[1:] + ["--quiet"])
print(repr([rc, sorted(sys.modules)]), file=sys.stderr)
"""


def test_copy_without_json_loads_neither_json_nor_urllib(tmp_path) -> None:
    """json is loaded for ``--json`` only, urllib.parse when a URI is parsed (a new destination
    file, then an existing one)."""
    import ast
    import os

    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(bytes(range(256)) * 16)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {"PATH": "/usr/bin:/bin", "DMTOOLS_RUN_DIR": str(tmp_path / "run"), "PYTHONPATH": root}
    loaded = {}
    for case in ("new", "existing"):
        proc = subprocess.run([sys.executable, "-S", "-c", BARE_PROBE, str(src), str(dst), str(tmp_path / "no-such-path")],
                              capture_output=True, text=True, check=True, env=env)
        rc, loaded[case] = ast.literal_eval(proc.stderr.strip().splitlines()[-1])
        assert rc == 0 and dst.read_bytes() == src.read_bytes(), "the probe copied the file"
    for case in loaded:
        assert "json" not in loaded[case] and "urllib.parse" not in loaded[case], case


def test_python_m_kcopyd_turns_the_collector_back_on_once_the_copy_runs(tmp_path) -> None:
    """``kcopyd.__main__`` turns the cyclic collector off for the start-up; ``main`` turns it on
    again (the start-up's objects frozen) once the copy has started, and only when asked."""
    import gc

    src = tmp_path / "src.img"
    src.write_bytes(bytes(range(256)) * 64)
    was = gc.isenabled()
    gc.disable()
    try:
        from kcopyd.cli import main

        assert main([str(src), str(tmp_path / "a.img"), "--quiet"]) == 0
        assert not gc.isenabled(), "without start_up_gc_off the caller's setting is kept"
        assert gc.get_freeze_count() == 0
        assert main([str(src), str(tmp_path / "b.img"), "--quiet"], start_up_gc_off=True) == 0
        assert gc.isenabled() and gc.get_freeze_count() > 0
        assert (tmp_path / "b.img").read_bytes() == src.read_bytes()
    finally:
        gc.unfreeze()
        (gc.enable if was else gc.disable)()


def test_dmtools_copy_of_its_own_command_line_turns_the_collector_back_on(tmp_path, monkeypatch) -> None:
    """``dmtools copy`` run as the process's command line turns the collector off for the copy's
    start-up and on again once it runs; ``main(argv)`` (a caller's list) leaves it alone."""
    import gc

    import dmtools.cli.main as cli_main

    src = tmp_path / "src.img"
    src.write_bytes(bytes(range(256)) * 64)
    left: list[int] = []
    monkeypatch.setattr(cli_main, "leave", lambda code, prog: left.append(code))
    was = gc.isenabled()
    try:
        gc.disable()
        assert cli_main.main(["copy", str(src), str(tmp_path / "a.img"), "--quiet"]) == 0
        assert not gc.isenabled() and gc.get_freeze_count() == 0
        gc.enable()
        monkeypatch.setattr(sys, "argv", ["dmtools", "copy", str(src), str(tmp_path / "b.img"), "--quiet"])
        seen: list[bool] = []
        monkeypatch.setattr(gc, "disable", lambda real=gc.disable: (seen.append(True), real())[1])
        assert cli_main.main() == 0
        assert seen == [True], "the start-up ran with the collector off"
        assert gc.isenabled() and gc.get_freeze_count() > 0 and left == [0]
        assert (tmp_path / "b.img").read_bytes() == src.read_bytes()
    finally:
        gc.unfreeze()
        (gc.enable if was else gc.disable)()


#: ``python -m kcopyd --json``: whether json is loaded when the copy has started (``follow`` waits
#: for it) and whether it was loaded before.
JSON_PROBE = """
import sys
""" + NO_HOST_DEVICES + """
import kcopyd.progress as progress
from kcopyd.cli import main

seen = []
follow = progress.follow
def spy(*args, **kwargs):
    seen.append("json" in sys.modules)
    return follow(*args, **kwargs)
progress.follow = spy
before = "json" in sys.modules
rc = main(sys.argv[1:] + ["--quiet", "--json"])
print(repr([rc, before, seen]), file=sys.stderr)
"""


def test_json_summary_encoder_is_loaded_while_the_copy_runs(tmp_path) -> None:
    """With ``--json`` the encoder is imported once the copy has started, not after it ends
    (its import is then off the command's wall time); without it, never (see above)."""
    import ast

    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(bytes(range(256)) * 16)
    env = {"PATH": "/usr/bin:/bin", "DMTOOLS_RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.run([sys.executable, "-c", JSON_PROBE, str(src), str(dst), str(tmp_path / "no-such-path")],
                          capture_output=True, text=True, check=True, env=env)
    summary = json.loads(proc.stdout)
    rc, before, seen = ast.literal_eval(proc.stderr.strip().splitlines()[-1])
    assert rc == 0 and summary["ok"] and dst.read_bytes() == src.read_bytes()
    assert before is False and seen == [True]
