"""Cells held as a range (``Prison.take_range``, what an I/O over several blocks takes): every
other I/O to a block of the range waits for it, as if each of its cells were held (a block's
write or read, a discard's or a break of sharing's cell, another range over it); I/O to other
blocks, or to the same blocks of another device, does not; a range waits for any of its cells
held alone or in another range."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dmtools.testing.threads import Worker
from dmtools.testing.wait import wait_until
from thin.targets.cells import HELD, Prison


def _waits(prison: Prison, take: Callable[[], object], give: Callable[[], None]) -> None:
    """``take()`` waits in the prison until ``give()``, then returns."""
    got: list[object] = []
    worker = Worker(lambda: got.append(take()))
    wait_until(lambda: prison._waiting == 1 or got, "the taker to wait")
    assert not got, "it did not wait"
    give()
    worker.result()
    assert len(got) == 1


def test_a_block_in_a_held_range_waits_for_it() -> None:
    prison = Prison()
    cells = prison.take_range(1, 16, 32)
    assert prison.held() == 16
    for v in (16, 20, 31):
        assert prison.enter_unless_held((1, v), None, True) is HELD
    prison.mapped[(1, 20)] = 7
    assert prison.enter_mapped((1, 20), True) is None  # looked up the pool's way, which waits
    _waits(prison, lambda: prison.acquire((1, 20)), lambda: prison.give_range(cells))
    prison.release((1, 20))
    assert prison.held() == 0


@pytest.mark.parametrize("other", [(1, 15), (1, 32), (2, 20)])
def test_blocks_outside_a_held_range_do_not_wait(other: tuple[int, int]) -> None:
    prison = Prison()
    cells = prison.take_range(1, 16, 32)
    prison.acquire(other)
    assert prison.enter_unless_held(other, None, True) is HELD  # held by the acquire, not the range
    prison.release(other)
    assert prison.enter_unless_held(other, None, True) is not HELD
    prison.release(other)
    prison.mapped[other] = 9
    assert prison.enter_mapped(other, False) == (9, None)
    prison.leave(9)
    prison.give_range(cells)
    assert prison.held() == 0 and not prison._count


@pytest.mark.parametrize("first", [(1, 0, 20), (1, 31, 40), (1, 20, 24), (1, 0, 100)])
def test_overlapping_ranges_exclude_each_other(first: tuple[int, int, int]) -> None:
    prison = Prison()
    cells = prison.take_range(*first)
    _waits(prison, lambda: prison.take_range(1, 16, 32), lambda: prison.give_range(cells))
    assert prison.held() == 16


@pytest.mark.parametrize("many", [False, True])
def test_a_range_waits_for_a_cell_held_alone(many: bool) -> None:
    """Both ways of looking: over the held cells (fewer than the range's blocks) and over the
    range's blocks (fewer than the held cells)."""
    prison = Prison()
    if many:
        for v in range(100, 200):
            prison.acquire((1, v))
    prison.acquire((1, 20))
    _waits(prison, lambda: prison.take_range(1, 16, 32), lambda: prison.release((1, 20)))
    assert prison.held() == 16 + (100 if many else 0)


def test_ranges_apart_or_on_other_devices_are_held_together() -> None:
    prison = Prison()
    prison.acquire((1, 40))
    a = prison.take_range(1, 0, 16)
    b = prison.take_range(1, 16, 32)  # adjacent: no block in common
    c = prison.take_range(2, 0, 16)
    d = prison.take_range(1, 41, 50)
    assert prison.held() == 1 + 16 + 16 + 16 + 9
    for cells in (a, b, c, d):
        prison.give_range(cells)
    prison.release((1, 40))
    assert prison.held() == 0
