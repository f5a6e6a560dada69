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
needed: the draws then depend on the code only. Hypothesis's own reading of a module depends on
two more things, which the pool's does not: where the checkout is (it leaves out every file with
a directory named ``test`` or ``tests`` in its absolute path, so a checkout under ``~/tests/``
had an empty pool and drew other cases), and the working directory (it reads a module's
constants from its cache in ``.hypothesis/constants`` there when it has them, a literal that does
not keep every constant: ``inf`` and ``nan`` come back as names). Its test-file rule is applied
to the path inside the checkout, and every file is parsed here. ``tests/test_fixed_constants.py``
shows it.
"""

from __future__ import annotations

import functools
import tomllib
from pathlib import Path

from hypothesis.internal.conjecture import providers
from hypothesis.internal.constants_ast import Constants, _constants_from_source
from hypothesis.internal.floats import float_to_int
from sortedcontainers import SortedSet

ROOT = Path(__file__).resolve().parents[1]
#: source files larger than this give no constants (``constants_from_module``'s limit)
MAX_SOURCE = 512 * 1024


def project_files(root: Path = ROOT) -> list[Path]:
    """Every ``.py`` file of the packages ``pyproject.toml`` installs, in path order."""
    with open(root / "pyproject.toml", "rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = sorted({pattern.split(".")[0].rstrip("*") for pattern in include})
    return sorted(path for top in tops for path in (root / top).rglob("*.py"))


def is_test_file(path: Path, root: Path = ROOT) -> bool:
    """Whether Hypothesis leaves ``path`` out as a test file (``is_local_module_file``'s rule),
    judged by its path inside the checkout ``root``, not by where the checkout is."""
    rel = path.relative_to(root)
    return "test" in rel.parts or "tests" in rel.parts or rel.stem.startswith("test_") or rel.stem.endswith("_test")


def file_constants(path: Path) -> Constants:
    """The constants Hypothesis finds in the module at ``path`` (``constants_from_module``,
    without its cache in the working directory's ``.hypothesis``)."""
    source = path.read_bytes()
    if len(source) > MAX_SOURCE:
        return Constants()
    try:
        return _constants_from_source(source, limit=True)
    except Exception:  # noqa: BLE001 - as Hypothesis: a file it cannot read gives no constants
        return Constants()


def constants_of(root: Path) -> Constants:
    """The constants of the project's local modules in checkout ``root`` (sorted sets, as
    Hypothesis's own pool, so the order it picks from does not depend on hashing)."""
    pool = Constants(integers=SortedSet(), floats=SortedSet(key=float_to_int), bytes=SortedSet(),
                     strings=SortedSet())
    for path in project_files(root):
        if not is_test_file(path, root):
            pool |= file_constants(path)
    return pool


@functools.cache
def project_constants() -> Constants:
    """The constants of this checkout's local modules (:func:`constants_of`), read once."""
    return constants_of(ROOT)


def install() -> None:
    """Make :func:`project_constants` Hypothesis's pool of local constants. Raises
    ``RuntimeError`` when the installed Hypothesis no longer has the function it replaces."""
    if not callable(getattr(providers, "_get_local_constants", None)):
        raise RuntimeError("hypothesis.internal.conjecture.providers._get_local_constants is gone: "
                           "see tests/fixed_constants.py for what it fixed")
    providers._get_local_constants = project_constants
