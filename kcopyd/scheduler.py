"""Which pieces run next, in the shape of drivers/md/dm-kcopyd.c's job lists.

Jobs whose pieces need no pages (zeroing, ``copy_file_range``) run first, at most
``max_free_active`` of their pieces at once. Jobs that need pages get them in submission order:
the first job that cannot get its pages blocks the ones behind it (``pages_jobs``), so a large
job is not starved by small ones. Every method runs under the client's lock.
"""

from __future__ import annotations

from kcopyd.job import Job, Piece
from kcopyd.pagepool import PAGE_SIZE, PagePool

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Callable

__all__ = ["Scheduler"]


class Scheduler:
    """The client's run lists: hands pieces to ``start``, takes them back in :meth:`piece_done`.

    ``resume`` receives a parked WRITE_SEQ piece whose turn to be written has come; ``finish``
    a job whose last piece is done (once per job).
    """

    def __init__(self, pool: PagePool, max_free_active: int, start: Callable[[Piece], None],
                 resume: Callable[[Piece], None], finish: Callable[[Job], None]) -> None:
        self.pool = pool
        self.done_bytes = 0  # bytes written by every job of the client
        self._max_free_active = max_free_active
        self._start, self._resume, self._finish = start, resume, finish
        self._run_pages: list[Job] = []  # jobs handing out pieces that need pages, in order
        self._run_free: list[Job] = []  # zero and copy_file_range jobs (no pages)
        self._free_active = 0

    def add(self, job: Job) -> None:
        """Queue a new job (an empty one finishes at once)."""
        if job.total == 0:
            self.finish(job)
            return
        (self._run_free if job.pageless else self._run_pages).append(job)
        self.pump()

    def finish(self, job: Job) -> None:
        """Hand ``job`` to ``finish`` unless that happened already."""
        if job.claim_completion():
            self._finish(job)

    def pump(self) -> None:
        """Hand out pieces: pageless jobs first (bounded), then page jobs in order until pages run out."""
        free = self._run_free
        i = 0
        while i < len(free) and self._free_active < self._max_free_active:
            job = free[i]
            if not job.pageless:
                del free[i]
                self._to_front(job)
                continue
            while job.wants_piece and self._free_active < self._max_free_active:
                self._free_active += 1
                self._start(job.start_piece())
            if job.has_work:
                i += 1
            else:
                del free[i]
        lst = self._run_pages
        i = 0
        while i < len(lst):
            job = lst[i]
            blocked = False
            while job.wants_piece:
                pages = self.pool.try_alloc(-(-job.next_length() // PAGE_SIZE))
                if pages is None:
                    blocked = True
                    break
                piece = job.start_piece()
                piece.pages = pages
                self._start(piece)
            if not job.has_work:
                del lst[i]
                continue
            if blocked:
                break  # pages are handed out in submission order (dm-kcopyd.c pages_jobs)
            i += 1

    def _to_front(self, job: Job) -> None:
        if job not in self._run_pages:
            self._run_pages.insert(0, job)

    def piece_done(self, piece: Piece, written: bool = True) -> None:
        """A piece is complete: give back its pages, account it, finish its job, hand out more."""
        job = piece.job
        if piece.mapped is not None:  # a cancelled or dropped piece (kcopyd.mapped)
            piece.mapped.release()
            piece.mapped = None
        if piece.pages is not None:
            self.pool.free(piece.pages)
            piece.pages = None
        else:
            self._free_active -= 1
        if written:
            self.done_bytes += piece.length
        dropped, resume = job.piece_done(piece, written)
        for p in dropped:
            self.piece_done(p, written=False)
        if resume is not None:
            self._resume(resume)
        if job.finished:
            self.finish(job)
        self.pump()

    def cancel(self, job: Job) -> bool:
        """Stop handing out ``job``'s pieces; False when it had finished already."""
        parked = job.stop()
        if parked is None:
            return False
        for p in parked:
            self.piece_done(p, written=False)
        if job.finished:
            self.finish(job)
        return True

    def fall_back_to_buffers(self, piece: Piece, piece_size: int) -> None:
        """``copy_file_range`` failed on ``piece``: its job goes on with buffers (kcopyd.offload)."""
        job = piece.job
        job.fall_back_to_buffers(piece, piece_size)
        self._free_active -= 1
        if job in self._run_free:
            self._run_free.remove(job)
        self._to_front(job)
        if job.finished:
            self.finish(job)
        self.pump()
