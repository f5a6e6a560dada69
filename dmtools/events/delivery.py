"""Where a monitor's numbered events go, and how it knows what a consumer already has.

A monitor commits every event to its store's journal, numbered (``seq``), before handing it out
(:mod:`dmtools.events.store`); a restart hands out the committed events the consumer lacks. What
the consumer "has" is the sink's :meth:`Sink.last_seq`:

- :class:`JsonLinesFile` appends one JSON line per event to a file and reads the file's last
  line back at start: the output *is* the cursor, so every event is in the file exactly once
  whenever the monitor is killed (a line torn by the kill is cut off and written again).
- :class:`CursorSink` hands each event to a callable (a pipe, a terminal) and then records its
  ``seq`` in the store's ``cursor`` file. A pipe cannot be read back, so a kill between the two
  steps hands that one event out again on restart; it carries the same ``seq``, which is how a
  reader recognises it.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Callable, Protocol

from dmtools.closing import Closing
from dmtools.errors import InvalidArgument
from dmtools.events.store import StateStore
from dmtools.events.types import Event
from dmtools.units import int_in

__all__ = ["Sink", "CursorSink", "JsonLinesFile", "event_line"]


def event_line(event: Event) -> str:
    """The JSON line of ``event`` (without the newline), as ``dmtools monitor --json`` prints it."""
    return json.dumps(event.to_dict(), sort_keys=True)


class Sink(Protocol):
    """A consumer of numbered events."""

    def last_seq(self) -> int:
        """The ``seq`` of the last event this sink holds (0: none)."""

    def write(self, event: Event) -> None:
        """Take ``event``; when this returns, :meth:`last_seq` includes it."""


class CursorSink:
    """Events to ``emit`` (e.g. print), the store's cursor moved after each."""

    def __init__(self, store: StateStore | None, emit: Callable[[Event], None]) -> None:
        self.store = store if store is not None and store.locked else None
        self._emit = emit
        self._last = self.store.cursor() if self.store is not None else 0

    def last_seq(self) -> int:
        return self._last

    def write(self, event: Event) -> None:
        self._emit(event)
        if self.store is not None and event.seq > self._last:
            self.store.set_cursor(event.seq)
        self._last = max(self._last, event.seq)


class JsonLinesFile(Closing):
    """An append-only file of JSON event lines that is its own cursor.

    Opening it cuts off a last line without its newline (torn by a kill) and reads the ``seq`` of
    the last complete line. Each event is written with one ``write`` and made durable
    (``fsync``) before :meth:`write` returns. Raises ``InvalidArgument`` when the file
    does not end with an event line of a monitor.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise InvalidArgument(f"cannot open {path}: {err.strerror}", errno=err.errno) from err
        try:
            self._last = self._recover()
        except BaseException:
            os.close(self._fd)
            raise

    def _recover(self) -> int:
        size = os.fstat(self._fd).st_size
        tail = b""
        pos = size
        # Read backwards until the tail holds the last complete line (and what follows it).
        while pos > 0 and tail.count(b"\n") < 2:
            step = min(pos, 65536)
            pos -= step
            tail = os.pread(self._fd, step, pos) + tail
        end = tail.rfind(b"\n") + 1  # bytes after the last newline: a torn line
        if end < len(tail):
            os.ftruncate(self._fd, pos + end)
            os.fsync(self._fd)
        lines = tail[:end].splitlines()
        if not lines:
            return 0
        try:
            seq = json.loads(lines[-1])["seq"]
            if not int_in(seq, 1):
                raise ValueError(f"seq {seq!r}")
        except (ValueError, KeyError, TypeError) as err:
            raise InvalidArgument(f"{self.path} does not end with a numbered monitor event "
                                  f"({err}); give a new file or one this monitor wrote",
                                  errno=errno.EINVAL) from err
        return seq

    def last_seq(self) -> int:
        return self._last

    def write(self, event: Event) -> None:
        if event.seq <= self._last:
            return  # already there
        data = (event_line(event) + "\n").encode()
        done = 0
        while done < len(data):
            done += os.write(self._fd, data[done:])
        os.fsync(self._fd)
        self._last = event.seq

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
