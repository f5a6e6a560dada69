"""dmtools.plugins reads entry points as importlib.metadata does, without importing it."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from dmtools.plugins import EntryPoint, entry_points

GROUPS = ("dmtools.commands", "dmtools.targets", "dmtools.policies", "console_scripts", "pytest11")


@pytest.mark.parametrize("group", GROUPS)
def test_same_entry_points_as_importlib_metadata(group: str) -> None:
    want = sorted((ep.name, ep.value) for ep in importlib.metadata.entry_points(group=group))
    assert want, f"nothing installed declares {group}: the comparison would prove nothing"
    assert sorted((ep.name, ep.value) for ep in entry_points(group)) == want


def test_first_distribution_of_a_name_wins_and_sections_are_kept_apart(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    (first / "Demo_Pkg-1.0.dist-info").mkdir(parents=True)
    (first / "Demo_Pkg-1.0.dist-info" / "entry_points.txt").write_text(
        "# a comment\n[demo.group]\nhello = os.path:join\n  spaced  =  os : path.join \n\n[other]\nx = os:sep\n"
    )
    (second / "demo.pkg-2.0.dist-info").mkdir(parents=True)  # the same name, normalised: shadowed
    (second / "demo.pkg-2.0.dist-info" / "entry_points.txt").write_text("[demo.group]\nshadowed = os:sep\n")
    (second / "lonely-1.0.egg-info").mkdir()
    (second / "lonely-1.0.egg-info" / "entry_points.txt").write_text("[demo.group]\negg = os:getcwd\n")
    monkeypatch.setattr(sys, "path", [str(first), str(tmp_path / "missing"), str(second)])
    found = entry_points("demo.group")
    assert [(ep.name, ep.value) for ep in found] == [
        ("hello", "os.path:join"), ("spaced", "os : path.join"), ("egg", "os:getcwd"),
    ]
    import os

    assert found[0].load() is os.path.join and found[1].load() is os.path.join
    assert found[2].load() is os.getcwd
    assert EntryPoint("x", "os:nope", "g").group == "g"
    with pytest.raises(AttributeError):
        EntryPoint("x", "os:nope", "g").load()
