"""kcopyd: an asynchronous copy engine with the shape and semantics of the kernel's dm-kcopyd.

::

    import kcopyd
    with kcopyd.Client(num_pages=256) as kc:
        job = kc.copy(kcopyd.Region("/dev/sdb", 0, 2048), [kcopyd.Region("copy.img", 0, 2048)],
                      notify=lambda read_err, write_err, ctx: print(read_err, write_err))
        job.wait()

A client owns a page budget, worker threads and one callback thread; jobs are split into sub-jobs
(512 KiB, 8 in flight per job), one read serving up to 8 destinations. See ``kcopyd.client`` for the
semantics (errors, ``IGNORE_ERROR``, ``WRITE_SEQ``), ``kcopyd.fastpath`` and ``kcopyd.offload`` for
the I/O paths.
"""

from __future__ import annotations

from dmtools import lazy

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)

if TYPE_CHECKING:  # pragma: no cover - loaded on first use, see __getattr__
    from kcopyd.client import DEST_ZEROED, IGNORE_ERROR, MAX_SUB_JOB_SIZE, SPLIT_COUNT, SUB_JOB_SIZE, WRITE_SEQ, Client
    from kcopyd.job import Job, NotifyFn, Progress
    from kcopyd.pagepool import PAGE_SIZE, PagePool
    from kcopyd.region import MAX_REGIONS, Region
    from kcopyd.throttle import Throttle


__getattr__, __all__ = lazy.package(__name__, {
    "kcopyd.client": "DEST_ZEROED IGNORE_ERROR MAX_SUB_JOB_SIZE SPLIT_COUNT SUB_JOB_SIZE WRITE_SEQ Client",
    "kcopyd.job": "Job NotifyFn Progress",
    "kcopyd.pagepool": "PAGE_SIZE PagePool",
    "kcopyd.region": "MAX_REGIONS Region",
    "kcopyd.throttle": "Throttle",
})
