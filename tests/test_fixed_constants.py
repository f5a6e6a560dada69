"""A derandomized Hypothesis test draws the same cases whatever modules were imported before it,
wherever the checkout is and whatever the working directory (``tests/fixed_constants.py``,
installed by ``tests/conftest.py``)."""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import providers

import fixed_constants

#: constants of a module no test imported before: Hypothesis would add them to its pool
MODULE = '''
WORDS = ("zq-marker-one", "zq-marker-two", "zq-marker-three")
NUMBERS = (987654321987, 123456789123, -55555555555)
'''


def draws() -> list[Any]:
    """What a derandomized test of texts and integers draws."""
    seen: list[Any] = []

    @settings(derandomize=True, database=None, max_examples=300)
    @given(st.text(max_size=16), st.integers())
    def collect(text: str, number: int) -> None:
        seen.append((text, number))

    collect()
    return seen


def test_draws_do_not_depend_on_the_modules_imported(tmp_path: Path, monkeypatch: Any) -> None:
    first = draws()
    (tmp_path / "zq_fresh_constants.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("zq_fresh_constants")
    try:
        assert draws() == first
        pool = providers._get_local_constants()
        assert "zq-marker-one" not in pool and 987654321987 not in pool
    finally:
        sys.modules.pop("zq_fresh_constants", None)


def test_the_pool_is_the_project_code() -> None:
    files = fixed_constants.project_files()
    names = {p.relative_to(fixed_constants.ROOT).parts[0] for p in files}
    assert names == {"dmtools", "kcopyd", "snapshot", "mirror", "thin"}
    pool = providers._get_local_constants()
    assert pool is fixed_constants.project_constants()
    assert "/run/dmtools" in pool  # dmtools/engine/rundir.py's ROOT_RUN_DIR, imported or not


#: prints the pool ``tests/fixed_constants.py`` gives (run where ``PYTHONPATH`` names its ``tests``)
PRINT_POOL = ("import json, fixed_constants; pool = fixed_constants.project_constants(); "
              "kinds = ('integers', 'floats', 'bytes', 'strings'); "
              "print(json.dumps({k: [repr(v) for v in getattr(pool, k)] for k in kinds}))")


def pool_seen(checkout: Path, cwd: Path) -> dict[str, list[str]]:
    """The pool of ``checkout``'s ``tests/fixed_constants.py``, in a fresh interpreter run in ``cwd``."""
    env = {"PYTHONPATH": str(checkout / "tests"), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-c", PRINT_POOL], cwd=cwd, env=env, capture_output=True, text=True,
                         check=True).stdout
    return dict(json.loads(out))


def copy_checkout(to: Path) -> Path:
    """The files the pool is read from (``pyproject.toml``, the packages' modules) and
    ``tests/fixed_constants.py``, copied to ``to``."""
    root = fixed_constants.ROOT
    for path in [root / "pyproject.toml", Path(fixed_constants.__file__), *fixed_constants.project_files()]:
        dest = to / path.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    return to


@pytest.mark.parametrize("where", ["checkout under tests/", "stale cache in the working directory"])
def test_the_pool_does_not_depend_on_where_it_is_read(tmp_path: Path, where: str) -> None:
    """The same pool in a checkout under a directory named ``tests`` (Hypothesis leaves out the
    files of such a path: the pool was empty), and in a working directory whose ``.hypothesis``
    holds a cache of one module's constants that lacks them (Hypothesis reads that cache)."""
    here = pool_seen(fixed_constants.ROOT, tmp_path)
    assert "'/run/dmtools'" in here["strings"]  # dmtools/engine/rundir.py's ROOT_RUN_DIR
    if where == "checkout under tests/":
        assert pool_seen(copy_checkout(tmp_path / "tests" / "dmtools"), tmp_path) == here
    else:
        source = (fixed_constants.ROOT / "dmtools" / "engine" / "rundir.py").read_bytes()
        cache = tmp_path / "cwd" / ".hypothesis" / "constants" / hashlib.sha1(source).hexdigest()[:16]
        cache.parent.mkdir(parents=True)
        cache.write_text("[]")
        assert pool_seen(fixed_constants.ROOT, cache.parents[2]) == here
