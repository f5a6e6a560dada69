"""Exception handover between two tables on one COW (dm-snap.c ``snapshot_preresume``,
``snapshot_resume``, ``__handover_exceptions``, ``snapshot_dtr``).

Loading a ``snapshot`` or ``snapshot-merge`` table that names the COW of an active snapshot of the
same origin makes the new table a *handover destination*: it reads no metadata and has chunk size
0 until it is resumed. Resuming it (the source must be suspended by then) moves the exception
table and the store into it and leaves the source invalid (every later I/O to the old table gets
EIO). This is how a snapshot table is reloaded without losing exceptions:

* **refresh** (``lvchange --refresh``, and after growing the COW): load the same ``snapshot`` table
  into the snapshot device's inactive slot, suspend the origin (``snapshot-origin``) device, suspend
  the snapshot device, resume the snapshot device, resume the origin device. After growing the
  COW under a ``NAME-cow`` linear device, also load its longer table, suspend it last and resume
  it first. ``SnapshotManager.refresh(name)`` does all of this on either backend; code below the
  ``snapshot`` package (``dmtools.monitor``) issues the same verbs itself;
* **merge** (``lvconvert --merge``): load ``snapshot-merge <real> <cow> P <chunk>`` into the origin
  device while the snapshot device still holds its table (optionally load ``error`` there), suspend
  the origin and the snapshot devices, resume the origin (the merge starts), then resume or remove
  the snapshot device.

Refusals, with the kernel's texts: a second destination ("Snapshot cow pairing for exception table
handover failed"); a ``snapshot-merge`` destination while the origin already merges ("A snapshot is
already merging."); resuming the destination while the source is active ("Unable to perform
snapshot handover until source is suspended."); resuming the source while a handover is pending
("Unable to resume snapshot source until handover completes."). Destroying the source first
cancels the handover and leaves the destination invalid.
"""

from __future__ import annotations

import errno
import logging

from dmtools.errors import InvalidArgument

from snapshot.targets.core import CopyOnWrite

log = logging.getLogger("snapshot")

RESUME_SOURCE = "Unable to resume snapshot source until handover completes."
SOURCE_ACTIVE = "Unable to perform snapshot handover until source is suspended."


def _suspended(snap: CopyOnWrite) -> bool:
    """``dm_suspended(snap->ti)``: the device holding the table is suspended (a snapshot built
    outside a table counts as suspended)."""
    return snap.owner is None or bool(snap.owner.ctx.suspended)


def preresume(snap: CopyOnWrite) -> None:
    """``snapshot_preresume``: refuse to resume a source, or a destination whose source is live."""
    found = snap.origins.find_sharing_cow(snap)
    if found.src is None or found.dest is None:
        return
    if snap is found.src:
        log.error("%s: %s", snap.name, RESUME_SOURCE)
        raise InvalidArgument(RESUME_SOURCE, errno=errno.EINVAL, operation="resume", device=snap.name)
    if not _suspended(found.src):
        log.error("%s: %s", snap.name, SOURCE_ACTIVE)
        raise InvalidArgument(SOURCE_ACTIVE, errno=errno.EINVAL, operation="resume", device=snap.name)


def _exchange(src: CopyOnWrite, dest: CopyOnWrite) -> None:
    """``__handover_exceptions``: swap stores (with their tables), copy the state, kill the source.

    Both snapshots are quiet: the source's device is suspended and origin writes are held.
    """
    with src.cond:
        src.cond.wait_for(lambda: not src.pending)
        src.fence()
        with dest.cond:
            dest_store = dest.store
            src_store = src.store
            overflow = dest_store.overflow
            # the store keeps an endpoint: rebind it to the handle of the table that now owns it
            src_store.cow = dest.cow
            dest_store.cow = src.cow
            dest.store, src.store = src_store, dest_store
            src_store.overflow = overflow  # "PO" follows the destination's table
            dest.overflow_allowed = overflow
            dest.valid = src.valid
            dest.overflowed = src.overflowed
            src.valid = False  # no header write and no event: the store lives on in dest
            dest.cond.notify_all()
        src.cond.notify_all()
    log.info("%s: exceptions handed over from %s", dest.name, src.name)


def handover_now(src: CopyOnWrite, dest: CopyOnWrite) -> None:
    """Hand ``src``'s exceptions to ``dest`` as ``snapshot_resume`` does.

    A running merge of the origin (other than ``dest``) stops first and restarts afterwards, and
    origin writes are held meanwhile (the kernel's internal suspend of the origin device).
    """
    merging = [
        s for s in dest.origins.snapshots_of_key(dest.origin_key)
        if s.merge_target and s is not dest and s.merge_control is not None
    ]
    restart = [s for s in merging if s.merge_control.stop_merge()]
    try:
        with dest.origins.gate(dest.origin_key).freeze():
            _exchange(src, dest)
    finally:
        for s in restart:
            s.merge_control.start_merge()


def resume(snap: CopyOnWrite) -> None:
    """``snapshot_resume``: complete a pending handover into ``snap``, re-sort it, activate it.

    Origin writes may need copies into it from now on: the C data path's writes that needed none
    are withdrawn first (``OriginRegistry.cow_change``).
    """
    with snap.origins.cow_change(snap.origin_key):
        found = snap.origins.find_sharing_cow(snap)
        if found.src is not None and found.dest is not None:
            handover_now(found.src, found.dest)
        snap.origins.reregister(snap)
        with snap.cond:
            snap.active = True
            snap.cond.notify_all()
    if snap.origins.exposed(snap.origin_key):  # its first writes in C from the first one through the node
        snap.arm()


def before_destroy(snap: CopyOnWrite) -> None:
    """``snapshot_dtr``'s check: a source destroyed before its handover cancels it.

    The engine destroys a reloaded device's old table after resuming the new one, as dm-ioctl.c
    ``do_resume`` does, so a destination on the source's own device has taken over by then.
    """
    found = snap.origins.find_sharing_cow(snap)
    if found.src is not snap or found.dest is None:
        return
    dest = found.dest
    with dest.cond:
        dest.valid = False
        dest.cond.notify_all()
    log.error("%s: Cancelling snapshot handover.", dest.name)
