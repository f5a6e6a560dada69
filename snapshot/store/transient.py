"""The transient exception store ``N`` (drivers/md/dm-snap-transient.c): no on-disk metadata."""

from __future__ import annotations

from dmtools.endpoint import Endpoint
from dmtools.errors import InvalidTable, NoSpace
from dmtools.target_values import StoreMode

from snapshot.store.base import CommitCallback, ExceptionStore, Usage
from snapshot.store.format import chunk_size_error


class TransientStore(ExceptionStore):
    """Exceptions live only in memory; data starts at COW chunk 0; ``next_free`` counts sectors."""

    def __init__(self, cow: Endpoint, chunk_size: int) -> None:
        # chunk 0 is accepted here as in dm-exception-store.c; the snapshot target refuses it
        # ("Chunk size not set") unless the table is a handover destination.
        err = chunk_size_error(chunk_size) if chunk_size else None
        if err:
            raise InvalidTable(err, operation="snapshot")
        super().__init__(cow, chunk_size)
        self.next_free = 0  # in sectors, as dm-snap-transient.c keeps it

    @property
    def mode(self) -> StoreMode:
        """Always ``N``."""
        return StoreMode.TRANSIENT

    def read_metadata(self) -> None:
        """Nothing on disk: the table starts empty."""
        self.table = self._new_table()

    def prepare_exception(self) -> int:
        """Take the next chunk; ``NoSpace`` once ``next_free + chunk`` passes the COW size."""
        with self._lock:
            if self.cow_sectors < self.next_free + self.chunk_size:
                raise NoSpace("COW device is full", operation="snapshot")
            new = self.next_free // self.chunk_size
            self.next_free += self.chunk_size
            return new

    def commit_exception(self, old: int, new: int, valid: bool, callback: CommitCallback) -> None:
        """Succeed at once (a failed copy still reports failure)."""
        callback(valid)

    def usage(self) -> Usage:
        """allocated = ``next_free`` sectors, metadata 0."""
        return Usage(self.cow_sectors, self.next_free, 0)
