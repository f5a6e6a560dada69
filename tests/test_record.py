"""``dmtools.record``: the value classes of the copy path behave as the dataclasses they replace."""

from __future__ import annotations

import copy
import pickle

import pytest

from dmtools.record import FrozenInstanceError, record


@record(frozen=True)
class Point:
    x: int
    y: int = 7

    def __post_init__(self) -> None:
        if self.x < 0:
            raise ValueError("negative x")


@record
class Box:
    size: int
    label: str = "box"


def test_fields_by_position_keyword_and_default() -> None:
    assert (Point(1, 2).x, Point(1, 2).y) == (1, 2)
    assert Point(y=3, x=4) == Point(4, 3)
    assert Point(5).y == 7
    assert Point.__match_args__ == ("x", "y")


def test_bad_arguments_raise_type_error() -> None:
    with pytest.raises(TypeError, match="missing required argument 'x'"):
        Point()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        Point(1, z=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values for argument 'x'"):
        Point(1, x=2)  # type: ignore[misc]
    with pytest.raises(TypeError, match="takes 2 arguments but 3"):
        Point(1, 2, 3)  # type: ignore[call-arg]


def test_post_init_runs() -> None:
    with pytest.raises(ValueError, match="negative x"):
        Point(-1)


def test_repr_and_equality() -> None:
    assert repr(Point(1, 2)) == "Point(x=1, y=2)"
    assert repr(Box(3)) == "Box(size=3, label='box')"
    assert Point(1, 2) != Point(1, 3)
    assert Point(1, 2) != (1, 2)  # another class is never equal
    assert Box(1) == Box(1, "box") and Box(1) != Box(2)


def test_frozen_refuses_assignment_and_hashes_by_value() -> None:
    p = Point(1, 2)
    with pytest.raises(FrozenInstanceError):
        p.x = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.y  # type: ignore[misc]
    assert (p.x, p.y) == (1, 2)
    assert hash(p) == hash(Point(1, 2)) and len({p, Point(1, 2), Point(2, 1)}) == 2


def test_mutable_record_assigns_and_is_unhashable() -> None:
    b = Box(1)
    b.size = 5
    assert b.size == 5
    with pytest.raises(TypeError):
        hash(b)


def test_copy_and_pickle_keep_the_fields() -> None:
    p = Point(4, 5)
    assert copy.copy(p) == p and copy.deepcopy(p) == p
    assert pickle.loads(pickle.dumps(p)) == p
    b = pickle.loads(pickle.dumps(Box(2, "x")))
    assert (b.size, b.label) == (2, "x")
