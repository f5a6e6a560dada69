"""``RefCounts.alloc_many`` gives exactly the blocks, counts and bookkeeping that as many calls of
``alloc`` give, whatever is allocated, freed in the transaction or wrapped around before it."""

from __future__ import annotations

import copy
import random

import pytest

from dmtools.errors import NoSpace
from thin.metadata.ondisk import ENTRIES_PER_BITMAP
from thin.metadata.space_map import RefCounts


def _state(sm: RefCounts) -> tuple[object, ...]:
    return (bytes(sm.counts), sm.nr_allocated, sm.cursor, sorted(sm.freed), sorted(sm.new),
            sorted(sm.dirty_bitmaps), sm.allocated_this_transaction)


def _assert_alloc_many_is_alloc_repeated(sm: RefCounts, n: int) -> None:
    one_by_one = copy.deepcopy(sm)
    expected = []
    for _ in range(n):
        try:
            expected.append(one_by_one.alloc())
        except NoSpace:
            break
    assert list(sm.alloc_many(n)) == expected
    assert _state(sm) == _state(one_by_one)


@pytest.mark.parametrize("seed", range(40))
def test_alloc_many_is_alloc_repeated(seed: int) -> None:
    rng = random.Random(seed)
    nr = rng.choice([50, 300, ENTRIES_PER_BITMAP + 200])
    sm = RefCounts(nr, "data")
    for b in rng.sample(range(nr), rng.randrange(nr // 2)):
        sm.inc(b)
    sm.end_transaction()
    for b in rng.sample([b for b in range(nr) if sm.counts[b]], rng.randrange(1 + sm.nr_allocated // 3)):
        sm.dec(b)  # freed in this transaction: not reusable before the commit
    sm.cursor = rng.randrange(nr)
    n = rng.randrange(1, min(nr, 1500))
    _assert_alloc_many_is_alloc_repeated(sm, n)


@pytest.mark.parametrize("seed", range(20))
def test_alloc_many_with_nothing_freed_is_alloc_repeated(seed: int) -> None:
    """The case a sequential writer meets (nothing freed in the transaction): a run of free blocks
    from the cursor, or a used block inside it, or the device's end before it."""
    rng = random.Random(seed)
    nr = rng.choice([64, 3 * ENTRIES_PER_BITMAP])
    sm = RefCounts(nr, "data")
    for b in rng.sample(range(nr), rng.choice([0, 0, 3, nr // 4])):
        sm.inc(b)
    sm.cursor = rng.randrange(nr)
    n = rng.choice([1, 16, 16, ENTRIES_PER_BITMAP + 7, nr])
    _assert_alloc_many_is_alloc_repeated(sm, n)
