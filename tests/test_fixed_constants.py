"""A derandomized Hypothesis test draws the same cases whatever modules were imported before it
(``tests/fixed_constants.py``, installed by ``tests/conftest.py``)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

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
