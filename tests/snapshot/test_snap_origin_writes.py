"""The snapshot origin's set of writes that need no copy (``dmtools.engine.passthrough``), kept
by ``OriginRegistry``: granules marked only with a ticket no change has outdated, grown to the
snapshots' chunks, emptied by a change, refused while one is under way."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from dmtools._ffi import fastio
from dmtools.engine.passthrough import GRANULE, WriteThrough
from snapshot.targets.origins import OriginRegistry

MiB = 1 << 20


@pytest.fixture
def writes() -> Iterator[WriteThrough]:
    made = WriteThrough.create(8 * MiB)
    if made is None:
        pytest.skip(f"the C fast path cannot be built here: {fastio.unavailable()} "
                    "(scripts/setup-env installs gcc)")
    yield made
    made.close()


def _snap(chunk_sectors: int) -> SimpleNamespace:
    return SimpleNamespace(origin_key="o", cow_key=object(), active=True, merge_target=False,
                           chunk_size=chunk_sectors, can_merge=True, wake_throttled=lambda: None)


def test_marks_hold_whole_granules_only(writes):
    writes.mark(100, GRANULE)  # touches two granules, covers neither
    assert writes.count() == 0
    writes.mark(GRANULE, 3 * GRANULE + 1)
    assert writes.count() == 3
    odd = WriteThrough.create(MiB + 512)
    assert odd is not None
    odd.mark(MiB, 512)  # the last granule ends at the device's end
    assert odd.count() == 1
    odd.close()
    writes.clear()
    assert writes.count() == 0
    writes.close()
    writes.mark(0, MiB)  # closed: nothing
    assert writes.count() == 0


def test_a_mark_grows_to_every_snapshots_chunks(writes):
    reg: OriginRegistry = OriginRegistry()
    reg.register(_snap(64))  # 32 KiB chunks
    reg.register(_snap(16))  # 8 KiB
    reg.attach_writes("o", writes)
    ticket = reg.ticket("o")
    assert ticket is not None
    reg.mark("o", ticket, writes, 40 << 10, 4096)  # in 32 KiB chunk 1 and 8 KiB chunk 5
    assert writes.count() == (8 << 10) // GRANULE  # [40K, 48K): the intersection


def test_without_snapshots_one_mark_holds_the_origin(writes):
    reg: OriginRegistry = OriginRegistry()
    ticket = reg.ticket("o")
    assert ticket is not None
    reg.mark("o", ticket, writes, 0, 4096)
    assert writes.count() == 8 * MiB // GRANULE


def test_a_change_empties_the_set_and_outdates_tickets(writes):
    reg: OriginRegistry = OriginRegistry()
    reg.register(_snap(8))
    reg.attach_writes("o", writes)
    old = reg.ticket("o")
    assert old is not None
    reg.mark("o", old, writes, 0, MiB)
    assert writes.count() == MiB // GRANULE
    with reg.cow_change("o"):
        assert writes.count() == 0
        assert reg.ticket("o") is None  # no write begun now may mark
        reg.mark("o", old, writes, 0, MiB)
        assert writes.count() == 0
    reg.mark("o", old, writes, 0, MiB)  # begun before the change: it does not count
    assert writes.count() == 0
    new = reg.ticket("o")
    assert new is not None and new != old
    reg.mark("o", new, writes, 0, MiB)
    assert writes.count() == MiB // GRANULE
    reg.detach_writes("o", writes)
    with reg.cow_change("o"):
        pass
    assert writes.count() == MiB // GRANULE  # detached: another table's set is not touched
