"""Root tier: the open count reads every loop device's backing file name from sysfs, and a name
that is not UTF-8 (a file name is bytes) is read as ``os.fsdecode`` reads it, not refused."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

from dmtools.engine import openers

pytestmark = pytest.mark.root


def test_a_loop_over_a_file_whose_name_is_not_utf8_is_counted(tmp_path: Path, make_loop: Callable[..., Any]) -> None:
    named = os.fsdecode(os.fsencode(str(tmp_path)) + b"/not-utf8-\xff.img")
    other = tmp_path / "other.img"
    for path in (named, other):
        with open(path, "wb") as f:
            f.truncate(1 << 20)
    over_named = make_loop(named)
    dev = make_loop(other)
    assert openers.count(dev.path, dev.major, dev.minor) == 0  # a name that is not UTF-8 is read
    st = os.stat(named)
    assert openers._loops_over(named, st.st_rdev) == 1 and over_named.backing_file == named
