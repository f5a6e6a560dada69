"""Thin provisioning: the kernel's dm-thin metadata format, offline tools, and (later) the pool.

``thin.metadata`` reads and writes the persistent-data format of ``drivers/md/dm-thin-metadata.c``
(superblock, btrees, space maps, crc32c); ``thin.offline`` holds the tools that need no
device-mapper (check, dump, restore, ls, export); ``thin.cli`` is the ``dmtools thin`` group.
Like ``snapshot`` and ``mirror`` this package imports ``dmtools`` and ``kcopyd``, never the reverse.
"""
