"""Dirty-region logs: ``core`` and ``disk`` (drivers/md/dm-log.c, include/linux/dm-dirty-log.h).

Three bitmaps per log, one bit per region:

- ``clean``: the on-disk bitmap of a disk log (1 = no write in flight, region consistent);
- ``sync``: in memory only, 1 = the legs hold the same data;
- ``recovering``: in memory only, 1 = handed out by ``get_resync_work``.

The ordering that makes a disk log safe lives in ``DiskLog.flush``: when any bit went clean, every
mirror leg is flushed first (the ``flush_legs`` callback); then header and bitmap are written in one
I/O; when any bit went dirty, the log device is flushed before ``flush`` returns. A caller marks a
region, flushes the log and only then writes data; it clears a region only after the data writes
completed, and the clean bit reaches the disk only after the legs were flushed.

Logs are not thread-safe: the mirror serialises every call under its own lock.
"""

from __future__ import annotations

import enum
import logging
from typing import Callable

from dmtools.endpoint import Endpoint
from dmtools.errors import DMError, InvalidArgument, InvalidTable

from mirror.bitmap import Bitmap
from mirror.format import (
    BITMAP_OFFSET,
    MIRROR_DISK_VERSION,
    MIRROR_MAGIC,
    SECTOR,
    LogHeader,
    LogImage,
    SyncMode,
    check_region_size,
    log_io_bytes,
    region_count,
)

log = logging.getLogger(__name__)

__all__ = ["RegionState", "DirtyLog", "CoreLog", "DiskLog", "SyncMode", "parse_log_args", "create_log"]


class RegionState(enum.IntFlag):
    """Region hash states (include/linux/dm-region-hash.h)."""

    CLEAN = 0x01  #: no writes in flight
    DIRTY = 0x02  #: writes in flight
    NOSYNC = 0x04  #: out of sync
    RECOVERING = 0x08  #: under resync


def _parse_u32(text: str, what: str) -> int:
    # The kernel parses with sscanf("%u%c") and rejects trailing characters.
    if not text.isdigit() or int(text) >= 1 << 32:
        raise InvalidArgument(f"invalid {what} {text}", operation="log")
    return int(text)


class DirtyLog:
    """The ``core`` log: clean bits start all 1 and live only in memory.

    Without ``nosync`` every region starts out of sync, so a core log resyncs everything on each
    activation (dm-log.c ``create_log_context``).
    """

    type_name = "core"

    def __init__(self, target_len: int, region_size: int, sync: SyncMode = SyncMode.DEFAULT) -> None:
        check_region_size(region_size, target_len)
        self.target_len = target_len
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

    def destroy(self) -> None:
        """Release the log's resources."""

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

    @property
    def failed(self) -> bool:
        """True when the log device failed (never for a core log)."""
        return False

    #: clean marks reach stable storage (so the legs must be flushed before them)
    persistent = False

    def leg_flush_failed(self) -> None:
        """The caller's leg flush failed: mark every region dirty, ignore clears from now on."""
        self.flush_failed = True
        for r in range(self.region_count):
            self.mark_region(r)

    # -- updates -----------------------------------------------------------------------------------
    def mark_region(self, region: int) -> None:
        """Clear the clean bit: a write is about to go to ``region``."""
        if self.clean.test(region):
            self.clean.clear(region)
            self.touched_dirtied = True

    def clear_region(self, region: int) -> None:
        """Set the clean bit (ignored after a failed leg flush: dm-log.c ``core_clear_region``)."""
        if not self.flush_failed and not self.clean.test(region):
            self.clean.set(region)
            self.touched_cleaned = True

    def flush(self, legs_flushed: bool = False) -> None:
        """Make mark/clear changes durable (a no-op for the core log)."""
        self.touched_dirtied = self.touched_cleaned = False

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

    def table_args(self) -> list[str]:
        """The log's part of the TABLE status: ``core <1|2> <region_size> [nosync|sync]``."""
        args = [str(self.region_size)]
        if self.sync is not SyncMode.DEFAULT:
            args.append(self.sync.value)
        return [self.type_name, str(len(args)), *args]

    def state(self, region: int) -> RegionState:
        """State of a region with no writes tracked by a region hash: CLEAN if in sync, else NOSYNC."""
        if self.recovering.test(region):
            return RegionState.RECOVERING
        return RegionState.CLEAN if self.in_sync(region) else RegionState.NOSYNC


CoreLog = DirtyLog


class DiskLog(DirtyLog):
    """The ``disk`` log: the clean bitmap persisted on a log device in the kernel's format.

    ``device`` is how the table names the log device (echoed in status); ``endpoint`` is the opened
    device. The constructor reads nothing; ``resume`` reads the header and applies the kernel's
    rules (see ``LogImage.resize``). Raises ``InvalidArgument`` when the device is too small.
    """

    type_name = "disk"
    persistent = True

    def __init__(
        self,
        endpoint: Endpoint,
        device: str,
        target_len: int,
        region_size: int,
        sync: SyncMode = SyncMode.DEFAULT,
    ) -> None:
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

    @property
    def failed(self) -> bool:
        return self.log_dev_failed

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
            version = head.version
            if self.sync is not SyncMode.DEFAULT or head.magic != MIRROR_MAGIC:
                version = MIRROR_DISK_VERSION
            elif version == 1:
                version = MIRROR_DISK_VERSION
            if version != MIRROR_DISK_VERSION:
                self._fail_device(InvalidArgument(f"incompatible disk log version {head.version}"))
            elif self.sync is SyncMode.DEFAULT and head.magic == MIRROR_MAGIC:
                nr = head.nr_regions
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
            try:
                self.endpoint.flush()
            except (OSError, DMError):
                self.log_dev_flush_failed = True
                raise
        except (OSError, DMError) as err:
            self._fail_device(err)
        self.touched_dirtied = self.touched_cleaned = False

    def flush(self, legs_flushed: bool = False) -> None:
        """Persist changes in the kernel's order (dm-log.c ``disk_flush``).

        1. If a bit went clean, flush every leg first (unless the caller just did: ``legs_flushed``);
           if that fails every region is marked dirty and ``clear_region`` is ignored from then on.
        2. Write header and bitmap in one I/O.
        3. If a bit went dirty, flush the log device.
        Raises ``DeviceIOError``-like errors after recording the log as failed.
        """
        if not self.touched_cleaned and not self.touched_dirtied:
            return
        if self.touched_cleaned and self.flush_legs is not None and not legs_flushed:
            try:
                self.flush_legs()
            except (OSError, DMError):
                self.flush_failed = True
                for r in range(self.region_count):
                    self.clean.clear(r)
        try:
            self._write()
        except (OSError, DMError) as err:
            self._fail_device(err)
            raise
        if self.touched_dirtied:
            try:
                self.endpoint.flush()
            except (OSError, DMError) as err:
                self.log_dev_flush_failed = True
                self._fail_device(err)
                raise
            self.touched_dirtied = False
        self.touched_cleaned = False

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

    def table_args(self) -> list[str]:
        """``disk <2|3> <logdev> <region_size> [nosync|sync]``."""
        args = [self.device, str(self.region_size)]
        if self.sync is not SyncMode.DEFAULT:
            args.append(self.sync.value)
        return [self.type_name, str(len(args)), *args]

    def destroy(self) -> None:
        self.endpoint.close()


def parse_log_args(args: list[str]) -> tuple[str, list[str], int]:
    """Split ``<log_type> <#log_args> <log_args...>`` off a mirror table's argument list.

    Returns ``(type, log_args, args_used)``; raises ``InvalidTable`` with the kernel's messages.
    """
    if len(args) < 2:
        raise InvalidTable("Insufficient mirror log arguments")
    if not args[1].isdigit():
        raise InvalidTable("Invalid mirror log argument count")
    n = int(args[1])
    if len(args) < 2 + n:
        raise InvalidTable("Insufficient mirror log arguments")
    return args[0], args[2 : 2 + n], 2 + n


def create_log(
    log_type: str,
    log_args: list[str],
    target_len: int,
    open_device: Callable[[str], Endpoint] | None = None,
) -> DirtyLog:
    """Build a ``core`` or ``disk`` log from table arguments, checking them as dm-log.c does.

    ``open_device(ref)`` opens the disk log's device; it is called only after the other arguments
    are valid. Raises ``InvalidTable`` (``TargetNotSupported`` style message for other log types).
    """
    try:
        if log_type == "core":
            if not 1 <= len(log_args) <= 2:
                raise InvalidTable("wrong number of arguments to dirty region log")
            sync = SyncMode.parse(log_args[1]) if len(log_args) > 1 else SyncMode.DEFAULT
            size = _parse_u32(log_args[0], "region size")
            return DirtyLog(target_len, size, sync)
        if log_type == "disk":
            if not 2 <= len(log_args) <= 3:
                raise InvalidTable("wrong number of arguments to disk dirty region log")
            sync = SyncMode.parse(log_args[2]) if len(log_args) > 2 else SyncMode.DEFAULT
            size = _parse_u32(log_args[1], "region size")
            check_region_size(size, target_len)
            if open_device is None:
                raise InvalidTable("disk log needs a device opener")
            ep = open_device(log_args[0])
            try:
                return DiskLog(ep, ep.name or log_args[0], target_len, size, sync)
            except BaseException:
                ep.close()
                raise
    except InvalidArgument as err:
        raise InvalidTable(f"Error creating mirror dirty log: {err.message}") from err
    raise InvalidTable(f"Error creating mirror dirty log: unknown log type {log_type!r} (core or disk)")
