"""``dmtools.testing.leftovers.remove_devices``: what teardown removes, in what order, and what it leaves."""

from __future__ import annotations

from typing import Any

from dmtools.testing.leftovers import remove_devices


class Recording:
    """The engine, with the names it was asked to remove, in order."""

    def __init__(self, dm: Any) -> None:
        self.dm = dm
        self.removed: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dm, name)

    def remove(self, name: str, **kwargs: Any) -> None:
        self.removed.append(name)
        self.dm.remove(name, **kwargs)


def stack(eng: Any, names: list[str]) -> None:
    """``names[0]`` a zero device, each next one a linear device over the one before it."""
    eng.create(names[0], "0 8 zero")
    for low, up in zip(names, names[1:]):
        eng.create(up, f"0 8 linear {eng.device_ref(low)} 0")


def test_stacked_devices_go_top_first_in_one_round(engine: Any) -> None:
    # names sort against the stack's order, so only the tables can give it
    stack(engine, ["a-t", "b-t", "c-t"])
    engine.create("keep", "0 8 zero")
    engine.suspend("b-t")  # a suspended device is resumed, then removed
    rec = Recording(engine)
    assert remove_devices(rec, lambda name: name.endswith("-t")) == []
    assert rec.removed == ["c-t", "b-t", "a-t"]  # each attempt succeeded: no retries
    assert [e.name for e in engine.list()] == ["keep"]


def test_two_stacks_over_one_device(engine: Any) -> None:
    stack(engine, ["z-t", "m-t", "a-t"])
    engine.create("b-t", f"0 8 linear {engine.device_ref('z-t')} 0")
    rec = Recording(engine)
    assert remove_devices(rec, lambda name: name.endswith("-t")) == []
    assert rec.removed.index("z-t") == 3 and rec.removed.index("m-t") < 3
    assert engine.list() == []


def test_a_device_held_from_outside_the_pick_is_left_and_named(engine: Any) -> None:
    stack(engine, ["low-t", "mid-t"])
    engine.create("user", f"0 8 linear {engine.device_ref('low-t')} 0")
    assert remove_devices(engine, lambda name: name.endswith("-t"), retry=False) == ["low-t"]
    assert [e.name for e in engine.list()] == ["low-t", "user"]
    engine.remove("user")
    assert remove_devices(engine, lambda name: name.endswith("-t")) == []
    assert engine.list() == []
