"""`dmtools nbd` refusals that need no kernel: one line, exit 1, nothing attached."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _dmtools(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmtools.cli.main", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, why",
    [
        (("nbd", "attach", "nbds://127.0.0.1/x"), "cannot use TLS"),
        (("nbd", "attach", "nbd+unix:///x"), "socket=PATH"),
        (("nbd", "attach", "/dev/sda"), "not an NBD URI"),
        (("nbd", "attach", "nbd+unix:///?socket=/nonexistent/s"), "cannot connect"),
        (("nbd", "attach", "nbd+unix:///?socket=/s", "--device", "/dev/null"), "not an nbd device"),
        (("nbd", "attach", "nbd+unix:///?socket=/s", "--connections", "0"), "connections must be"),
        (("nbd", "detach", "/dev/null"), "not an nbd device"),
    ],
)
def test_refused_one_line(args: tuple[str, ...], why: str, tmp_path: Path) -> None:
    res = _dmtools(*args)
    assert res.returncode != 0
    assert why in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
