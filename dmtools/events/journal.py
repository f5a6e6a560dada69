"""An append-only journal of JSON records: what makes a monitor's events exactly-once.

Each record is one line ``{"r": N, ...}\\n`` written with a single ``write`` on an ``O_APPEND``
descriptor and made durable with ``fsync`` before :meth:`Journal.append` returns; ``r`` numbers the
records (1, 2, 3, …) and never repeats. A record is committed once its whole line, newline included,
is on disk: a SIGKILL or a power cut in the middle of an append leaves at most a torn last line,
which :meth:`Journal.open` cuts off (that record never happened). A malformed line that is *not*
the last one means the file was damaged from outside: ``CorruptMetadata``.

:meth:`Journal.rewrite` replaces the whole journal atomically (temporary file, ``fsync``, rename,
``fsync`` of the directory) with the records still needed; its first record carries ``"base"``
numbers (next record and event sequence numbers) so numbering continues across rewrites.
"""

from __future__ import annotations

import errno
import contextlib
import json
import os
import tempfile
from typing import Any, Iterable

from dmtools.errors import CorruptMetadata, DMError

__all__ = ["Journal", "read_records", "fsync_path", "atomic_replace"]


def fsync_path(path: str) -> None:
    """Make what ``path`` holds durable: a file's data, or a directory's entries (a rename or a
    new file in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_replace(path: str, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` by ``data`` all or nothing (temporary file, rename); ``durable``: with
    ``fsync`` of the file before the rename and of the directory after it."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_path(directory)


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _well_formed(record: Any) -> bool:
    """A record as the store writes it: an integer ``r``; ``events`` (if any) a list of objects
    whose ``seq`` (if any) is an integer; an integer ``base_seq`` (if any). A state directory
    may be given by hand (``--state-dir``): anything else is damage, not a crash."""
    if not isinstance(record, dict) or not _is_int(record.get("r")):
        return False
    events = record.get("events", [])
    if not isinstance(events, list) or not all(isinstance(e, dict) and _is_int(e.get("seq", 0)) for e in events):
        return False
    return _is_int(record.get("base_seq", 0))


def _parse(data: bytes, path: str, *, strict: bool) -> tuple[list[dict[str, Any]], int]:
    """The records in ``data`` and the length of its committed part.

    A last line without its newline, or one that does not parse, is a torn append: excluded.
    ``strict``: a bad line before the last raises ``CorruptMetadata`` (else reading stops there).
    """
    records: list[dict[str, Any]] = []
    good = 0
    lines = data.split(b"\n")
    # After the final "\n" split() leaves b"" (complete file) or the torn tail.
    for index, line in enumerate(lines[:-1]):
        try:
            record = json.loads(line)
            if not _well_formed(record):
                raise ValueError("not a journal record")
        except ValueError as err:
            if index == len(lines) - 2 and not lines[-1]:
                break  # the last complete-looking line is garbage: a torn append too
            if strict:
                raise CorruptMetadata(f"{path}: record {index + 1} is damaged ({err})",
                                      errno=errno.EUCLEAN, operation="journal") from err
            break
        records.append(record)
        good += len(line) + 1
    return records, good


def read_records(path: str) -> list[dict[str, Any]]:
    """The committed records of the journal at ``path`` (none when it does not exist), for
    readers that do not own it: a torn or damaged tail is ignored, never repaired."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise DMError(f"cannot read {path}: {err.strerror}", errno=err.errno, operation="journal") from err
    return _parse(data, path, strict=False)[0]


class Journal:
    """The writer's side of one journal file (the caller holds whatever lock keeps writers out)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.directory = os.path.dirname(os.path.abspath(path))
        #: the committed records, oldest first (what :meth:`open` read plus what was appended).
        self.records: list[dict[str, Any]] = []
        self._fd: int | None = None
        self._next_r = 1

    @property
    def next_r(self) -> int:
        """The number the next appended record gets."""
        return self._next_r

    def open(self) -> list[dict[str, Any]]:
        """Read the journal, cut off a torn last record, and open it for appending."""
        created = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            records, good = _parse(data, self.path, strict=True)
            if good != len(data):
                os.ftruncate(fd, good)
                os.fsync(fd)
            if created:
                fsync_path(self.directory)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.records = records
        self._next_r = 1
        for record in records:
            self._next_r = max(self._next_r, int(record["r"]) + 1, int(record.get("base_r", 0)))
        return list(records)

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Commit ``record`` (its ``"r"`` is set here); durable when this returns."""
        if self._fd is None:
            raise DMError("the journal is not open for writing", errno=errno.EBADF, operation="journal")
        full = {**record, "r": self._next_r}
        line = _line(full)
        written = 0
        while written < len(line):  # a regular file takes it in one write; loop for safety
            written += os.write(self._fd, line[written:])
        os.fsync(self._fd)
        self._next_r += 1
        self.records.append(full)
        return full

    def rewrite(self, records: Iterable[dict[str, Any]], base: dict[str, Any]) -> None:
        """Replace the journal by ``base`` (a record holding the numbering to continue from) and
        ``records``; all or nothing."""
        kept = [{**base, "r": self._next_r, "base_r": self._next_r + 1}, *records]
        atomic_replace(self.path, b"".join(_line(record) for record in kept))
        self.close()
        self.open()

    def size(self) -> int:
        """Bytes in the journal file."""
        return os.fstat(self._fd).st_size if self._fd is not None else 0

    def close(self) -> None:
        """Close the descriptor (the records stay readable in :attr:`records`)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
