"""The file or block device an offline export writes (``snapshot export``, ``thin export``): a new
or empty regular file; an existing non-empty file or a block device only with ``force``. An existing
output is claimed (:mod:`dmtools.claims`): no engine, mount or other tool uses it meanwhile."""

from __future__ import annotations

import contextlib
import os
import stat

from dmtools.blockdev import BlockDevice
from dmtools.claims import Holder
from dmtools.endpoint import Endpoint
from dmtools.errors import DeviceIOError, InvalidArgument

__all__ = ["discard_output", "open_output"]


def open_output(out: str | os.PathLike[str], size: int | None, least: int, *, force: bool, holder: Holder,
                operation: str = "export") -> tuple[BlockDevice, int, bool, str]:
    """Open or create the output: ``(device, the export's size, whether it is a block device, what was
    done to it)``. The export is ``size`` bytes, or (``None``) a block device's own size, a file's
    ``least``; a block device smaller than that or ``least`` is refused. A file starts over as one
    hole of that size (what the export skips reads as zeros); a block device has its first bytes
    written. Raises ``InvalidArgument`` (not a regular file or block device, too small, holding data
    without ``force``), ``DeviceBusy`` (claimed elsewhere), ``DeviceIOError``; writes nothing."""
    path = os.fspath(out)
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        is_blk = stat.S_ISBLK(st.st_mode)
        if not is_blk and not stat.S_ISREG(st.st_mode):
            raise InvalidArgument("output must be a regular file or a block device", device=path, operation=operation)
        if (is_blk or st.st_size) and not force:
            what = "is a block device" if is_blk else f"exists and holds {st.st_size} bytes"
            raise InvalidArgument(f"output {what}; --force overwrites it (a file starts over at the export's "
                                  "size, a block device's first bytes are written)", device=path, operation=operation)
        holder.claim(path, device=operation)  # no engine, mount or tool meanwhile
        if is_blk:
            dev = BlockDevice(path, writable=True)  # exclusive through the claim
            have = dev.size
            want = have if size is None else size
            if have < max(want, least):
                dev.close()
                raise InvalidArgument(f"output holds {have} bytes, the export needs {max(want, least)}",
                                      device=path, operation=operation)
            tail = have - want
            return dev, want, True, f"first {want} bytes of the block device written" + (
                f", its last {tail} bytes left as they were" if tail else "")
    want = least if size is None else size
    if st is None:
        action = f"created with {want} bytes"
    else:
        how = "truncated" if st.st_size > want else "extended" if st.st_size else "sized"
        action = f"{how} from {st.st_size} to {want} bytes"
    dev = BlockDevice(path, writable=True, create=True, exclusive=st is None)  # else: the claim's lock
    try:
        os.ftruncate(dev.fileno(), 0)  # an existing file starts over as one hole
        os.ftruncate(dev.fileno(), want)
    except OSError as err:
        dev.close()
        raise DeviceIOError(f"cannot size output: {err.strerror}", device=path, operation=operation) from err
    return dev, want, False, action


def discard_output(dev: Endpoint, out: str | os.PathLike[str], action: str) -> None:
    """Close the output of an export that failed; a file :func:`open_output` created (``action``
    says so) is removed again, so a partial image is not left to pass for a whole one (as ``dmtools
    copy`` removes the files it made). An existing file or a block device stays as written."""
    dev.close()
    if action.startswith("created "):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
