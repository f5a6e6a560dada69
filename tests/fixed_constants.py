"""Hypothesis's pool of "local constants" fixed to the project's code, whatever the session imported.

Hypothesis (6.131 on) now and then (5% of its draws) returns a constant found in the source of
the "local" modules in ``sys.modules`` (neither the standard library nor site-packages nor test
files), and adds to that pool whenever ``sys.modules`` grows. So what a test draws, derandomized
or under one ``--hypothesis-seed``, depends on what was imported before: the tests selected and
run first, the plugins loaded, the modules earlier commands imported lazily. The CLI fuzz
(``tests/adversarial/test_cli_fuzz.py``, derandomized) drew 26 of its 488 command lines
differently when ``tests/thin/test_target_pool.py`` ran before it.

:func:`install` (from ``tests/conftest.py``) makes the pool the constants of every module of the
project's packages (those ``pyproject.toml`` installs), read from their files once, when first
needed: the draws then depend on the code only. ``tests/test_fixed_constants.py`` shows it.
"""

from __future__ import annotations

import functools
import tomllib
import types
from pathlib import Path

from hypothesis.internal.conjecture import providers
from hypothesis.internal.constants_ast import Constants, constants_from_module, is_local_module_file
from hypothesis.internal.floats import float_to_int
from sortedcontainers import SortedSet

ROOT = Path(__file__).resolve().parents[1]


def project_files(root: Path = ROOT) -> list[Path]:
    """Every ``.py`` file of the packages ``pyproject.toml`` installs, in path order."""
    with open(root / "pyproject.toml", "rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = sorted({pattern.split(".")[0].rstrip("*") for pattern in include})
    return sorted(path for top in tops for path in (root / top).rglob("*.py"))


@functools.cache
def project_constants() -> Constants:
    """The constants Hypothesis finds in the project's local modules (sorted sets, as its own
    pool, so the order it picks from does not depend on hashing)."""
    pool = Constants(integers=SortedSet(), floats=SortedSet(key=float_to_int), bytes=SortedSet(),
                     strings=SortedSet())
    for path in project_files():
        if is_local_module_file(str(path)):
            module = types.ModuleType(path.stem)
            module.__file__ = str(path)
            pool |= constants_from_module(module)
    return pool


def install() -> None:
    """Make :func:`project_constants` Hypothesis's pool of local constants. Raises
    ``RuntimeError`` when the installed Hypothesis no longer has the function it replaces."""
    if not callable(getattr(providers, "_get_local_constants", None)):
        raise RuntimeError("hypothesis.internal.conjecture.providers._get_local_constants is gone: "
                           "see tests/fixed_constants.py for what it fixed")
    providers._get_local_constants = project_constants
