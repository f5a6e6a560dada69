"""Write lanes: a destination written through a page cache takes one write at a time.

Buffered writers of one file serialise on its inode lock (``i_rwsem``, taken exclusively by
ext4_buffered_write_iter and generic_file_write_iter), so parallel writes to it only wait, or spin
on the lock's owner. Such a destination gets a lane: its pieces wait in the order their reads
finished, and pieces that continue one another leave together in one vectored write
(``Endpoint.writev``). Direct (O_DIRECT), block-device, null and memory destinations get no lane:
several writes in flight fill their queues.
"""

from __future__ import annotations

from collections import deque

from dmtools.endpoint import Endpoint
from kcopyd.writebehind import WriteBehind

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:  # pragma: no cover
    from typing import Iterable
    from kcopyd.job import Piece
    from kcopyd.region import OpenRegion

__all__ = ["WriteLanes", "one_writer"]


def one_writer(ep: Endpoint) -> bool:
    """True for a destination written through a regular file's page cache (it gets a lane)."""
    try:
        return bool(ep.is_regular_file) and not ep.direct
    except Exception:  # noqa: BLE001 - unknown kind: parallel writes are always correct
        return False


def _continues(prev: Piece, nxt: Piece) -> bool:
    """True when ``nxt`` starts where ``prev`` ends and both are all data (one vectored write)."""
    return (
        nxt.offset == prev.offset + prev.length
        and prev.segments == [(0, prev.length, True)]
        and nxt.segments == [(0, nxt.length, True)]
    )


class WriteLanes(list["deque[Piece] | None"]):
    """One entry per destination: the queue of pieces waiting for its lane, or ``None`` (no lane).

    The methods run under the client's lock.
    """

    def __init__(self, lanes: Iterable[bool]) -> None:
        super().__init__(deque() if lane else None for lane in lanes)
        self.busy = [False] * len(self)  # a write to destination i is running
        #: destination i's write-behind (kcopyd.writebehind), used by the lane's one writer
        self.behind: list[WriteBehind | None] = [None] * len(self)
        #: True when some destination has a lane
        self.used = any(lane is not None for lane in self)

    @classmethod
    def for_regions(cls, dests: Iterable[OpenRegion]) -> WriteLanes:
        """Lanes for the destinations that are written through a page cache."""
        return cls(one_writer(d.endpoint) for d in dests)

    def start_write_behind(self, dests: list[OpenRegion]) -> None:
        """Give the lane destinations whose range is not cached a write-behind."""
        for i, d in enumerate(dests):
            if self[i] is not None:
                self.behind[i] = WriteBehind.for_destination(d.endpoint, d.offset, d.region.nbytes)

    def claim(self, piece: Piece) -> list[int]:
        """The destinations ``piece`` may be written to now; it waits in the busy lanes."""
        ready = []
        for i, lane in enumerate(self):
            if lane is None:
                ready.append(i)
            elif self.busy[i]:
                lane.append(piece)  # written when the lane's current write is done
            else:
                self.busy[i] = True
                ready.append(i)
        return ready

    def next_batch(self, i: int) -> list[Piece]:
        """After a write to destination ``i``: the waiting pieces to write next, those that
        continue the first joined to it; ``[]`` when there is no lane or it is now idle."""
        lane = self[i]
        if lane is None:
            return []
        if not lane:
            self.busy[i] = False
            return []
        batch = [lane.popleft()]
        while lane and _continues(batch[-1], lane[0]):
            batch.append(lane.popleft())
        return batch
