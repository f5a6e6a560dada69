"""dm-thin metadata in the kernel's on-disk format: read, write, check, dump and restore.

``ThinMetadata`` is the pool's view (drivers/md/dm-thin-metadata.c)::

    md = ThinMetadata.format(path, data_block_size=128, nr_data_blocks=n)   # or .open(path, writable=True)
    md.create_thin(1); md.create_snap(2, 1); md.delete(2)
    b = md.alloc_data_block(); md.insert(1, vblock, b); md.lookup(1, vblock)   # -> Lookup(block, time, shared)
    md.remove(1, vblock); md.remove_range(1, begin, end)                         # discards
    md.set_transaction_id(cur, new); md.reserve_metadata_snap(); md.release_metadata_snap()
    md.resize_data(n); md.resize_metadata()
    md.commit(pre_commit=flush_data_device)   # kernel order: everything, flush, superblock, flush
    md.abort()                                # back to the last commit

Changes stay in memory until ``commit``. One ``ThinMetadata`` is not thread-safe: the pool
serializes calls, as the kernel's pool holds ``pmd->root_lock``. A ``NoSpace`` from a metadata
allocation leaves the transaction half-done: ``abort`` it (the kernel aborts the transaction too).
``check`` (thin_check's rules), ``dump_xml``/``dump_json`` (thin_dump's XML) and ``restore``
(thin_restore) work on files or block devices without device-mapper.
"""

from .check import CheckReport, check
from .dump import device_runs, dump_json, dump_xml
from .ondisk import DeviceDetails, Superblock
from .pool import Lookup, ThinMetadata
from .restore import parse_xml, restore

__all__ = ["CheckReport", "DeviceDetails", "Lookup", "Superblock", "ThinMetadata", "check", "device_runs",
           "dump_json", "dump_xml", "parse_xml", "restore"]
