"""Start-up: ``dmtools --help`` and ``dmtools dm ls`` import only what they use.

Each case runs in a fresh interpreter and lists the modules loaded; timing is left to
``scripts/bench startup`` (this machine's load would make a time limit flaky), but what a command
imports is what its start-up costs, and that is checked exactly here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dmtools.testing.probes import NO_HOST_DEVICES

#: Loaded by neither command: the engine and its tables, the monitor, libdevmapper's cffi binding,
#: importlib.metadata (entry points are read by dmtools.plugins) and fractions/decimal.
HEAVY = {
    "importlib.metadata", "fractions", "decimal", "cffi", "_cffi_backend", "dmtools._ffi",
    "dmtools.engine.engine", "dmtools.table", "dmtools.target_values", "dmtools.status",
    "dmtools.kernel", "dmtools.monitor", "dmtools.events.state", "dmtools.events.watcher",
    "dmtools.loop", "dmtools.identity",
}

#: Packages neither command imports at all: ``--help`` reads their commands' summaries from source.
UPPER = ("kcopyd", "snapshot", "mirror", "thin")

HELP = """
import sys
from dmtools.cli.main import main
try:
    main(["--help"])
except SystemExit:
    pass
"""

DM_LS = """
import sys
import dmtools.cli.common as common

class Listing:  # the backend's side is the daemon's client, imported below as dm ls does
    backend = "userspace"
    def list(self):
        return []
    def close(self):
        pass

common.open_backend = lambda args: Listing()
from dmtools.cli.main import main
assert main(["dm", "ls"]) == 0
import dmtools.engine.client  # what dmtools.open("userspace") returns
"""


def _modules(code: str) -> set[str]:
    probe = code + "\nimport json\nprint(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(proc.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize(("command", "code"), [("--help", HELP), ("dm ls", DM_LS)])
def test_start_up_imports_only_what_the_command_uses(command: str, code: str) -> None:
    loaded = _modules(code)
    assert "dmtools.cli.main" in loaded, "the probe ran the command line"
    assert not loaded & HEAVY, f"dmtools {command} imports {sorted(loaded & HEAVY)}"
    upper = sorted(m for m in loaded if m.partition(".")[0] in UPPER)
    assert not upper, f"dmtools {command} imports {upper}"


def test_help_still_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "dmtools.cli.main", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name in ("dm", "loop", "nbd", "daemon", "monitor", "serve", "copy", "mirror", "snapshot", "thin"):
        assert f"\n    {name} " in out, name


def test_kernel_backend_loads_no_table_grammar_and_no_c_parser() -> None:
    """``dm ls`` on the kernel imports ``dmtools.kernel``: it parses no C declarations at start-up
    (the generated cffi module) and loads the table grammar only for verbs that carry tables."""
    loaded = _modules("import sys\nimport dmtools.kernel\n")
    assert "dmtools._ffi" in loaded
    assert not loaded & {"pycparser", "cffi.cparser", "dmtools.table", "dmtools.target_values", "ctypes.util"}


LATE_LOGGER = """
import sys
import dmtools.cli.main as cli

def register(sub):
    def run(args):
        import logging  # first imported here, by the command, as the kernel backend would
        logging.getLogger("dmtools.probe").warning("late %s", "warning")
        logging.getLogger("dmtools.probe").debug("hidden")
        return 0
    sub.add_parser("probe").set_defaults(func=run)

cli.BUILTIN_COMMANDS["probe"] = "probe:register"
cli._load = lambda spec: register
assert "logging" not in sys.modules
assert cli.main(["probe"]) == 0
assert not any(type(f).__name__ == "_ConfigureLoggingOnImport" for f in sys.meta_path)
"""


def test_dm_ls_does_not_load_logging() -> None:
    assert "logging" not in _modules(DM_LS)


def test_logging_first_imported_by_a_command_is_configured() -> None:
    """The CLI's log format and level hold for a module that imports ``logging`` only while the
    command runs, and the one-shot hook is gone afterwards."""
    proc = subprocess.run([sys.executable, "-c", LATE_LOGGER], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "dmtools: WARNING: late warning\n"


COPY = """
import sys
from kcopyd.cli import main
assert main(["--quiet", sys.argv[1], sys.argv[2]]) == 0
"""

#: What a copy between two plain files does not load: logging (nothing is logged), the socket
#: module (the loop index's uevent socket is made from _socket), dmtools.loop (no loop device is
#: bound over them), and, with no table that could map them, identity resolution and the in-use
#: check's machinery; nor the kernel backend or fractions/decimal.
COPY_HEAVY = {
    "logging", "socket", "dmtools.loop", "dmtools.identity", "dmtools.inputs", "dmtools.kernel",
    "dmtools._ffi", "cffi", "fractions", "decimal", "importlib.metadata", "dmtools.engine.client",
}


def test_copy_between_files_imports_only_what_it_uses(tmp_path) -> None:
    """``python -m kcopyd SRC DST`` (and ``dmtools copy``) between plain files, no daemon."""
    import os

    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(os.urandom(1 << 20))
    probe = "import sys" + NO_HOST_DEVICES + COPY + "\nimport json\nprint(json.dumps(sorted(sys.modules)), file=sys.stderr)"
    env = dict(os.environ, DMTOOLS_RUN_DIR=str(tmp_path / "run"))  # no daemon there
    proc = subprocess.run([sys.executable, "-c", probe, str(src), str(dst), str(tmp_path / "no-such-path")],
                          capture_output=True, text=True, env=env, check=True)
    loaded = set(json.loads(proc.stderr.strip().splitlines()[-1]))
    assert "kcopyd.client" in loaded and dst.read_bytes() == src.read_bytes(), "the probe copied"
    assert not loaded & COPY_HEAVY, f"a copy imports {sorted(loaded & COPY_HEAVY)}"
