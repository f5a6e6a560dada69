"""Progress reporting for long copies: a terminal bar and/or ``N/100`` lines on a file descriptor.

The FD convention is nbdcopy's ``--progress=FD``: a line ``N/100`` each time the whole percentage
changes, ending with ``100/100`` on success, so another program can follow the copy. The bar is
drawn on a terminal (stderr by default) with ``\\r``, at most every ``interval`` seconds.
Reused by the ``copy``, ``snapshot`` and ``mirror`` commands (:func:`follow` polls any job).
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dmtools.errors import DeviceIOError, InvalidArgument
from dmtools.units import format_size

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import TextIO

__all__ = ["CopyTally", "ProgressFn", "ProgressReporter", "follow", "check_fd", "reporter_for", "reporting"]

#: ``progress(done, total)``, in bytes unless the caller says otherwise.
ProgressFn = Callable[[int, int], None]


def check_fd(fd: int) -> int:
    """Return ``fd`` if it is an open descriptor, else raise ``InvalidArgument``."""
    if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
        raise InvalidArgument(f"progress FD must be a non-negative integer, not {fd!r}")
    try:
        os.fstat(fd)
    except OSError as err:
        raise InvalidArgument(f"progress FD {fd} is not open", errno=err.errno) from err
    return fd


class ProgressReporter:
    """Report ``done``/``total`` bytes on a bar (``bar``: None = when ``stream`` is a terminal)
    and/or as ``N/100`` lines on ``fd``."""

    def __init__(self, *, fd: int | None = None, bar: bool | None = None, stream: TextIO | None = None, label: str = "",
                 interval: float = 0.1, width: int = 30) -> None:
        self.fd = check_fd(fd) if fd is not None else None
        self.stream = stream if stream is not None else sys.stderr
        if bar is None:
            try:
                bar = self.stream.isatty()
            except (AttributeError, ValueError):
                bar = False
        self.bar = bar
        self.label = label
        self.interval = interval
        self.width = width
        self._last_percent = -1
        self._last_draw = 0.0
        self._start = time.monotonic()
        self._drawn = False

    def update(self, done: int, total: int) -> None:
        """Record progress; writes only when the percentage or the bar changed enough."""
        percent = 100 if total <= 0 else min(100, done * 100 // total)
        if self.fd is not None and percent != self._last_percent:
            self._write_fd(percent)
        self._last_percent = percent
        if self.bar:
            now = time.monotonic()
            if now - self._last_draw >= self.interval or done >= total:
                self._last_draw = now
                self._draw(done, total, now)

    def finish(self, done: int | None = None, total: int | None = None, *, ok: bool = True) -> None:
        """Final update (``100/100`` on success) and end the bar's line."""
        if done is not None and total is not None:
            if self.bar:
                self._draw(done, total, time.monotonic())
            percent = 100 if total <= 0 else min(100, done * 100 // total)
            if self.fd is not None and percent != self._last_percent and (ok or percent < 100):
                self._write_fd(percent)
            self._last_percent = percent
        if ok and self.fd is not None and self._last_percent != 100:
            self._write_fd(100)
            self._last_percent = 100
        if self.bar and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def _write_fd(self, percent: int) -> None:
        assert self.fd is not None
        data = f"{percent}/100\n".encode()
        try:
            os.write(self.fd, data)
        except OSError as err:
            if err.errno in (errno.EPIPE, errno.EBADF):  # the reader went away: stop reporting
                self.fd = None
            else:
                raise

    def _draw(self, done: int, total: int, now: float) -> None:
        frac = 1.0 if total <= 0 else min(1.0, done / total)
        filled = int(frac * self.width)
        elapsed = max(now - self._start, 1e-6)
        rate = done / elapsed
        eta = ""
        if 0 < done < total and rate > 0:
            secs = int((total - done) / rate)
            eta = f" ETA {secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d}"
        label = f"{self.label} " if self.label else ""
        line = (
            f"\r{label}[{'#' * filled}{'.' * (self.width - filled)}] {int(frac * 100):3d}% "
            f"{format_size(done)}/{format_size(total)} {format_size(int(rate))}/s{eta}"
        )
        self.stream.write(line + "\x1b[K")
        self.stream.flush()
        self._drawn = True


def follow(progress: Callable[[], tuple[int, int]], wait: Callable[[float], bool], reporter: ProgressReporter,
           interval: float = 0.2) -> None:
    """Poll ``progress()`` (``(done, total)``) into ``reporter`` until ``wait(interval)`` is True.

    For a kcopyd job: ``follow(lambda: (job.progress.done, job.progress.total), job.wait, r)``.
    The caller calls ``reporter.finish`` (it knows whether the work succeeded).
    """
    while True:
        finished = wait(interval)
        done, total = progress()
        reporter.update(done, total)
        if finished:
            return


def reporter_for(progress: str | None, *, quiet: bool = False, label: str = "") -> ProgressReporter:
    """The reporter a ``--progress[=FD]`` option (``dmtools.cli.common.progress_options``) asks for:
    ``None`` (a bar only on a terminal, nothing with ``quiet``), ``"bar"``, or a file descriptor
    number for ``N/100`` lines."""
    if progress is None:
        return ProgressReporter(label=label, bar=False if quiet else None)
    if progress == "bar":
        return ProgressReporter(label=label, bar=True)
    try:
        fd = int(progress)
    except ValueError:
        raise InvalidArgument(f"--progress takes a file descriptor number, not {progress!r}") from None
    return ProgressReporter(fd=fd, bar=False, label=label)


@contextmanager
def reporting(reporter: ProgressReporter, scale: int = 1) -> Iterator[ProgressFn]:
    """A ``progress(done, total)`` callback feeding ``reporter`` (units times ``scale`` bytes); the
    reporter is finished on exit, as a success unless the block raised."""
    last = [0, 0]

    def progress(done: int, total: int) -> None:
        last[:] = [done * scale, total * scale]
        reporter.update(done * scale, total * scale)

    ok = False
    try:
        yield progress
        ok = True
    finally:
        reporter.finish(last[0], last[1], ok=ok)


class CopyTally:
    """The notify callback of a batch of kcopyd jobs (``ctx``: ``(what, bytes)``): adds the bytes of
    each job that succeeded to ``progress(done, total)`` (a failed job's were not all written: the
    progress never claims them, so a batch with a failure never shows ``100/100``) and keeps a line
    for each job that failed; :meth:`check` raises them."""

    def __init__(self, total: int, progress: ProgressFn | None = None) -> None:
        self.total = total
        self.progress = progress
        self.done = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, read_err: bool, write_err: int, ctx: tuple[str, int]) -> None:
        what, nbytes = ctx
        with self._lock:
            if read_err or write_err:
                self.errors.append(f"{what} failed (read_err={int(read_err)}, write_err={write_err:#x})")
            else:
                self.done += nbytes
            if self.progress is not None:
                self.progress(self.done, self.total)

    def check(self, device: str, operation: str) -> None:
        """Raise ``DeviceIOError`` naming the first five failed jobs, if any failed."""
        if self.errors:
            raise DeviceIOError("; ".join(self.errors[:5]), device=device, operation=operation)
