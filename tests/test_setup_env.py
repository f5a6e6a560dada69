"""The environment ``scripts/setup-env`` makes: an editable install of dmtools that ``site`` finds
through a path in a ``.pth`` file, not through an import hook (setuptools' default editable mode
installs a finder module that ``site`` imports in every process, with pathlib, urllib.parse and
re: 10 ms of every command's start-up, ``python -m kcopyd`` included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = "import sys, json; print(json.dumps([sorted(sys.modules), sys.path]))"


def _editable() -> bool:
    """True when the interpreter's dmtools is an editable install (PEP 610 ``direct_url.json``)."""
    for dist in metadata.distributions(name="dmtools"):  # an egg-info in the checkout has none
        text = dist.read_text("direct_url.json")
        if text:
            return bool(json.loads(text).get("dir_info", {}).get("editable"))
    return False


@pytest.mark.skipif(not _editable(), reason="dmtools is not an editable install here")
def test_editable_install_is_a_path_not_an_import_hook(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          env=env, cwd=tmp_path)  # cwd: not the checkout, which '' would name
    loaded, path = json.loads(proc.stdout)
    hooks = [m for m in loaded if m.startswith("__editable__")]
    assert not hooks, f"site imported the editable install's hook {hooks}: run scripts/setup-env"
    assert "pathlib" not in loaded, "the bare interpreter imports pathlib"
    assert str(ROOT) in path, "the checkout is on sys.path"
    # and the packages come from this checkout
    where = subprocess.run([sys.executable, "-c", "import kcopyd, thin; print(kcopyd.__file__, thin.__file__)"],
                           capture_output=True, text=True, check=True, env=env, cwd=tmp_path).stdout.split()
    assert all(Path(p).is_relative_to(ROOT) for p in where), where
