"""Dirty-region logs: ``core`` and ``disk`` (drivers/md/dm-log.c, include/linux/dm-dirty-log.h).

Three bitmaps per log, one bit per region:

- ``clean``: the on-disk bitmap of a disk log (1 = no write in flight, region consistent);
- ``sync``: in memory only, 1 = the legs hold the same data;
- ``recovering``: in memory only, 1 = handed out by ``get_resync_work``.

The ordering that makes a disk log safe lives in ``DiskDirtyLog.flush``: when any bit went clean, every
mirror leg is flushed first (the ``flush_legs`` callback); then header and bitmap are written in one
I/O; when any bit went dirty, the log device is flushed before ``flush`` returns. A caller marks a
region, flushes the log and only then writes data; it clears a region only after the data writes
completed, and the clean bit reaches the disk only after the legs were flushed.

Logs are not thread-safe: the mirror serialises every call under its own lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from dmtools.endpoint import Endpoint
from dmtools.errors import DMError, InvalidArgument, InvalidTable
from dmtools.target_values import CoreLog, DiskLog, MirrorLog, SyncMode

from mirror.bitmap import Bitmap
from mirror.format import (
    BITMAP_OFFSET, MIRROR_DISK_VERSION, MIRROR_MAGIC, SECTOR, LogHeader, LogImage, log_io_bytes, region_count,
)

log = logging.getLogger(__name__)

__all__ = ["CoreDirtyLog", "DiskDirtyLog", "LogWrite", "open_dirty_log"]


@dataclass(frozen=True)
class LogWrite:
    """One log flush taken under the mirror's lock, to be written without it (``write_image``)."""

    image: bytes
    #: a bit went dirty: the log device is flushed after the write (marks durable before data)
    dirtied: bool
    #: a bit went clean (the legs were flushed before the image was taken)
    cleaned: bool
    #: the regions whose dirty marks this write makes durable
    marked: frozenset[int] = frozenset()


class CoreDirtyLog:
    """The ``core`` log (and what the ``disk`` log builds on): clean bits start all 1 and live only
    in memory.

    Without ``nosync`` every region starts out of sync, so a core log resyncs everything on each
    activation (dm-log.c ``create_log_context``). The region size was checked by the table value.
    """

    def __init__(self, target_len: int, region_size: int, sync: SyncMode = SyncMode.DEFAULT) -> None:
        self.region_size = region_size
        self.region_count = region_count(target_len, region_size)
        self.sync = sync
        self.clean = Bitmap(self.region_count, fill=True)
        nosync = sync is SyncMode.NOSYNC
        self.sync_bits = Bitmap(self.region_count, fill=nosync)
        self.sync_count = self.region_count if nosync else 0
        self.recovering = Bitmap(self.region_count)
        self.sync_search = 0
        self.touched_dirtied = False
        self.touched_cleaned = False
        #: regions whose dirty mark is set in memory but not yet taken into a log write
        self.unflushed: set[int] = set()
        self.flush_failed = False
        #: flushes every mirror leg; raises on failure (the mirror's ``mirror_flush``).
        self.flush_legs: Callable[[], None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def resume(self) -> None:
        """Restart the resync scan from region 0 (``core_resume``)."""
        self.sync_search = 0

    def postsuspend(self) -> None:
        """Make pending log changes durable (a no-op for the core log)."""
        self.flush()

    # -- queries -----------------------------------------------------------------------------------
    def is_clean(self, region: int) -> bool:
        """Clean bit of ``region``."""
        return self.clean.test(region)

    def in_sync(self, region: int) -> bool:
        """Sync bit of ``region`` (never blocks)."""
        return self.sync_bits.test(region)

    def get_sync_count(self) -> int:
        """Regions in sync."""
        return self.sync_count

    #: clean marks reach stable storage (so the legs must be flushed before them)
    persistent = False

    def leg_flush_failed(self) -> None:
        """The caller's leg flush failed: mark every region dirty, ignore clears from now on."""
        self.flush_failed = True
        for r in range(self.region_count):
            self.mark_region(r)

    # -- updates -----------------------------------------------------------------------------------
    @property
    def changes_pending(self) -> bool:
        """Marks or clears not yet taken into a log write."""
        return self.touched_dirtied or self.touched_cleaned

    def mark_region(self, region: int) -> None:
        """Clear the clean bit: a write is about to go to ``region``."""
        if self.clean.test(region):
            self.clean.clear(region)
            self.touched_dirtied = True
            self.unflushed.add(region)

    def clear_region(self, region: int) -> None:
        """Set the clean bit (ignored after a failed leg flush: dm-log.c ``core_clear_region``)."""
        if not self.flush_failed and not self.clean.test(region):
            self.clean.set(region)
            self.touched_cleaned = True

    def flush(self, legs_flushed: bool = False) -> None:
        """Make mark/clear changes durable (a no-op for the core log)."""
        self.touched_dirtied = self.touched_cleaned = False
        self.unflushed.clear()

    def take_image(self, legs_flushed: bool = False) -> LogWrite | None:
        """The first half of ``flush``, under the caller's lock: what to write (``None``: nothing)."""
        self.flush(legs_flushed)
        return None

    def write_image(self, pending: LogWrite) -> None:
        """The second half of ``flush``, without the caller's lock (see ``DiskDirtyLog``)."""

    def restore(self, pending: LogWrite) -> None:
        """``write_image(pending)`` failed: its changes count as not flushed again (caller's lock)."""
        self.touched_dirtied |= pending.dirtied
        self.touched_cleaned |= pending.cleaned
        self.unflushed |= pending.marked

    def get_resync_work(self) -> int | None:
        """Next region out of sync and not yet recovering, marked recovering; ``None`` when done."""
        if self.sync_search >= self.region_count:
            return None
        while True:
            region = self.sync_bits.find_next_zero(self.sync_search)
            self.sync_search = region + 1
            if region >= self.region_count:
                return None
            if not self.recovering.test(region):
                self.recovering.set(region)
                return region

    def set_region_sync(self, region: int, in_sync: bool) -> None:
        """End recovery of ``region``: set or clear its sync bit and keep ``sync_count``."""
        self.recovering.clear(region)
        if in_sync:
            if not self.sync_bits.test(region):
                self.sync_bits.set(region)
                self.sync_count += 1
        elif self.sync_bits.test(region):
            self.sync_bits.clear(region)
            self.sync_count -= 1

    # -- status ------------------------------------------------------------------------------------
    def status_info(self) -> str:
        """The log's part of the INFO status: ``1 core``."""
        return "1 core"


class DiskDirtyLog(CoreDirtyLog):
    """The ``disk`` log: the clean bitmap persisted on a log device in the kernel's format.

    ``device`` is how the table names the log device (echoed in status); ``endpoint`` is the opened
    device. The constructor reads nothing; ``resume`` reads the header and applies the kernel's
    rules (see ``LogImage.resize``). Raises ``InvalidArgument`` when the device is too small.
    """

    persistent = True

    def __init__(self, endpoint: Endpoint, device: str, target_len: int, region_size: int,
                 sync: SyncMode = SyncMode.DEFAULT) -> None:
        super().__init__(target_len, region_size, sync)
        self.endpoint = endpoint
        self.device = device
        self.lbs = max(endpoint.logical_block_size, SECTOR)
        self.io_bytes = log_io_bytes(self.region_count, self.lbs)
        if self.io_bytes > endpoint.size:
            raise InvalidArgument(
                f"log device {device} too small: need {self.io_bytes} bytes", operation="log", device=device
            )
        self.image = LogImage(
            LogHeader(MIRROR_MAGIC, MIRROR_DISK_VERSION, 0), self.clean, bytearray(self.io_bytes), self.lbs
        )
        self.log_dev_failed = False
        self.log_dev_flush_failed = False

    def _fail_device(self, err: BaseException) -> None:
        if not self.log_dev_failed:
            log.warning("%s: dirty region log device failed: %s", self.device, err)
        self.log_dev_failed = True

    def _write(self) -> None:
        self.image.clean = self.clean
        self.endpoint.write(self.image.pack(), 0)

    def resume(self) -> None:
        """Read the log and apply the kernel's resume rules, then write the header and flush.

        A failed read counts every region out of sync and marks the log failed (``D``); a wrong
        magic or a ``sync``/``nosync`` argument makes the log count as new.
        """
        buf = bytearray(self.io_bytes)
        nr = 0
        try:
            got = self.endpoint.readinto(buf, 0)
            if got < self.io_bytes:
                raise OSError(f"short read of {got} bytes")
        except (OSError, DMError) as err:
            self._fail_device(err)
            buf = bytearray(self.io_bytes)
        else:
            head = LogHeader.unpack(buf)
            if self.sync is SyncMode.DEFAULT and head.magic == MIRROR_MAGIC:  # not a new log
                if head.version in (1, MIRROR_DISK_VERSION):  # version 1 is written as the current one
                    nr = head.nr_regions
                else:
                    self._fail_device(InvalidArgument(f"incompatible disk log version {head.version}"))
        clean = Bitmap(self.region_count, data=memoryview(buf)[BITMAP_OFFSET:])
        self.image = LogImage(LogHeader(MIRROR_MAGIC, MIRROR_DISK_VERSION, nr), clean, buf, self.lbs)
        self.image.resize(self.region_count, SyncMode.NOSYNC if self.sync is SyncMode.NOSYNC else SyncMode.DEFAULT)
        self.clean = self.image.clean
        self.sync_bits = self.clean.copy()
        self.sync_count = self.clean.count()
        self.recovering = Bitmap(self.region_count)
        self.sync_search = 0
        try:
            self._write()
            self._flush_device()
        except (OSError, DMError) as err:
            self._fail_device(err)
        self.touched_dirtied = self.touched_cleaned = False
        self.unflushed.clear()

    def flush(self, legs_flushed: bool = False) -> None:
        """Persist changes in the kernel's order (dm-log.c ``disk_flush``).

        1. If a bit went clean, flush every leg first (unless the caller just did: ``legs_flushed``);
           if that fails every region is marked dirty and ``clear_region`` is ignored from then on.
        2. Write header and bitmap in one I/O.
        3. If a bit went dirty, flush the log device.
        Raises ``DeviceIOError``-like errors after recording the log as failed.
        """
        pending = self.take_image(legs_flushed)
        if pending is not None:
            try:
                self.write_image(pending)
            except (OSError, DMError):
                self.restore(pending)
                raise

    def take_image(self, legs_flushed: bool = False) -> LogWrite | None:
        """Steps 1 and the packing of 2 of ``flush``, under the caller's lock.

        Returns the image to write (``None`` when nothing changed); from then on the changes
        count as flushed, and ``write_image`` may run without the lock while marks go on. The
        caller lets one image be written at a time, in the order they were taken, so the log
        device never goes back to an older image.
        """
        if not self.touched_cleaned and not self.touched_dirtied:
            return None
        if self.touched_cleaned and self.flush_legs is not None and not legs_flushed:
            try:
                self.flush_legs()
            except (OSError, DMError):
                self.flush_failed = True
                for r in range(self.region_count):
                    self.clean.clear(r)
        self.image.clean = self.clean
        pending = LogWrite(bytes(self.image.pack()), self.touched_dirtied, self.touched_cleaned,
                           frozenset(self.unflushed))
        self.touched_dirtied = self.touched_cleaned = False
        self.unflushed = set()
        return pending

    def write_image(self, pending: LogWrite) -> None:
        """Steps 2 and 3 of ``flush``: write the image, then flush the log device when a bit went
        dirty. On failure the log is recorded as failed and the error raised (the caller then
        gives the changes back with ``restore``, under its lock)."""
        try:
            self.endpoint.write(pending.image, 0)
            if pending.dirtied:
                self._flush_device()
        except (OSError, DMError) as err:
            self._fail_device(err)
            raise

    def _flush_device(self) -> None:
        """Flush the log device, recording a failure in ``log_dev_flush_failed``."""
        try:
            self.endpoint.flush()
        except (OSError, DMError):
            self.log_dev_flush_failed = True
            raise

    def postsuspend(self) -> None:
        """Flush pending changes (dm-log.c: ``postsuspend = disk_flush``)."""
        try:
            self.flush()
        except (OSError, DMError):
            log.warning("%s: log postsuspend failed", self.device)

    def status_info(self) -> str:
        """``3 disk <logdev> <A|D|F>``."""
        c = "F" if self.log_dev_flush_failed else "D" if self.log_dev_failed else "A"
        return f"3 disk {self.device} {c}"


def open_dirty_log(value: MirrorLog, target_len: int, open_device: Callable[[str], Endpoint]) -> CoreDirtyLog:
    """The runtime log for a table's log ``value`` (dm-dirty-log's ``dm_dirty_log_create``).

    ``open_device(ref)`` opens a disk log's device. Raises ``InvalidTable`` with dm-raid1.c's
    ``Error creating mirror dirty log`` for a log type this engine lacks or a log device too small.
    """
    if isinstance(value, CoreLog):
        return CoreDirtyLog(target_len, value.region, value.sync)
    if not isinstance(value, DiskLog):  # dm-log.c get_type: no such log module
        raise InvalidTable(f'Error creating mirror dirty log: Module for logging type "{value.log_type}" not found.')
    ep = open_device(value.device)  # the engine closes it if the table fails
    try:
        return DiskDirtyLog(ep, ep.name or value.device, target_len, value.region, value.sync)
    except InvalidArgument as err:
        raise InvalidTable(f"Error creating mirror dirty log: {err.message}") from err
