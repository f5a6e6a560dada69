"""``dmtools dm measure``: dmsetup's ``measure`` layout, on the in-process userspace engine."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmtools.engine import Engine
from dmtools.errors import TargetNotSupported


@pytest.fixture
def eng(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """The plugin's in-process engine, which ``open_backend`` hands to the CLI."""
    monkeypatch.setattr("dmtools.cli.common.open_backend", lambda args: engine)
    return engine


def test_one_device_bare_lines(eng: Engine, make_image: Callable[..., Path],
                               run: Callable[..., tuple[int, str, str]]) -> None:
    img = make_image(1 << 20)
    eng.create("a", f"0 8 linear {img} 2\n8 8 zero")
    version = ".".join(map(str, eng.targets()["linear"]))
    rc, out, _ = run("dm", "measure", "a")
    assert rc == 0
    assert out == (f"0 8 linear target_name=linear,target_version={version},"
                   f"device_name={img},start=2;\n"
                   "8 8 zero \n")  # the space after a type that measured nothing, as dmsetup


def test_all_devices_prefixed_and_empty_ones(eng: Engine, run: Callable[..., tuple[int, str, str]]) -> None:
    eng.create("b", "0 8 error")
    eng.create("a")  # no table: "a: " as dmsetup prints it
    rc, out, _ = run("dm", "measure")
    assert (rc, out) == (0, "a: \nb: 0 8 error \n")
    rc, out, _ = run("dm", "measure", "--json")
    assert rc == 0 and json.loads(out) == {"a": "", "b": "0 8 error"}


def test_inactive_and_no_devices(eng: Engine, run: Callable[..., tuple[int, str, str]]) -> None:
    assert run("dm", "measure")[1] == "No devices found\n"
    eng.create("a", "0 8 zero")
    eng.load("a", "0 16 error")
    assert run("dm", "measure", "--inactive", "a")[1] == "0 16 error \n"


def test_backend_that_cannot_measure(monkeypatch: pytest.MonkeyPatch, run: Callable[..., tuple[int, str, str]]) -> None:
    class Old(Engine):
        def measure(self, name: str, *, inactive: bool = False) -> Any:
            raise TargetNotSupported("libdevmapper 1.02.175 has no dm_task_ima_measurement",
                                     operation="measure", device=name)

    old = Old()
    monkeypatch.setattr("dmtools.cli.common.open_backend", lambda args: old)
    try:
        old.create("a", "0 8 zero")
        rc, _out, err = run("dm", "measure", "a", propagate=False)
        assert rc != 0 and "dm_task_ima_measurement" in err
    finally:
        old.close()
