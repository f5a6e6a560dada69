"""Device-mapper tables: immutable values that parse and print dmsetup's table text.

A table is a sequence of lines ``<start> <length> <target_type> <params...>`` in 512-byte
sectors. :meth:`Table.parse` reads the text ``dmsetup create``/``load`` read (dmsetup.c
``_parse_line``): leading and trailing whitespace is dropped, blank lines and lines starting with
``#`` are skipped, and anything after a ``#`` inside the parameters is a comment.

Printing:

* ``str(table)`` is the canonical text: one line per target, ``"start length type params"``
  (no trailing space when a target has no parameters), lines joined with ``"\\n"`` and **no
  trailing newline**. For every table the kernel prints, ``str(Table.parse(text)) == text``
  (with devices as written), and ``Table.parse(str(t)) == t`` for every table ``t``.
* :meth:`Table.dmsetup_text` is byte for byte what ``dmsetup table`` prints: each line is
  ``printf("%llu %llu %s %s\\n")``, so a target without parameters keeps a trailing space and
  every line ends with a newline.

The kernel's table rules are checked when a table is built (dm-table.c
``dm_table_add_target``): no zero-length target, the first target starts at sector 0 and each
next one where the previous ended ("Gap in table"), and the device ends at or below
``LLONG_MAX >> 9`` sectors. An empty table (no lines) is allowed: it is what a device created
without a table has. Errors are :class:`~dmtools.errors.InvalidTable` naming the line.

Typed targets live in :mod:`dmtools.target_values` and are re-exported here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import overload

from dmtools import target_values as _target_values
from dmtools.errors import DMError, InvalidTable
from dmtools.target_values import *  # noqa: F403 - the typed targets are part of this module's API
from dmtools.target_values import Target
from dmtools.units import MAX_SECTORS, int_in

__all__ = ["Table", "TableLine", "format_line", *_target_values.__all__]

_WS = " \t\n\v\f\r"
# dmsetup reads "%llu %llu %s %n": two numbers and a type word, then the parameters.
_LINE_RE = re.compile(r"([^ \t\n\v\f\r]+)[ \t\n\v\f\r]+([^ \t\n\v\f\r]+)[ \t\n\v\f\r]+([^ \t\n\v\f\r]+)(.*)", re.S)


def format_line(start: int, length: int, target_type: str, params: str) -> str:
    """One line exactly as ``dmsetup table``/``dmsetup status`` prints it (newline included).

    dmsetup prints ``"%llu %llu %s %s\\n"``, so empty parameters leave a trailing space.
    """
    return f"{start} {length} {target_type} {params}\n"


def _sector_field(text: str, what: str, lineno: int) -> int:
    if not text.isascii() or not text.isdigit():
        raise InvalidTable(f"line {lineno}: {what} {text[:40]!r} is not a decimal number of sectors")
    digits = text.lstrip("0") or "0"
    if len(digits) > 20 or int(digits) > MAX_SECTORS:
        raise InvalidTable(f"line {lineno}: {what} {text[:40]}: too large device (limit {MAX_SECTORS} sectors)")
    return int(digits)


def _check_singleton(first: str | None, target_type: str, lineno: int) -> None:
    """dm-table.c ``dm_table_add_target``: a ``DM_TARGET_SINGLETON`` type (thin-pool) must be the
    only target of its table; ``first`` is the type of the table's first line (``None`` for the
    first line itself). Checked before the new line's own arguments, as the kernel does."""
    if first is None:
        return
    if _target_values.TARGET_TYPES.get(first, Target).SINGLETON:
        raise InvalidTable(f"line {lineno}: target type {first} must appear alone in table")
    if _target_values.TARGET_TYPES.get(target_type, Target).SINGLETON:
        raise InvalidTable(f"line {lineno}: {target_type}: singleton target type must appear alone in table")


@dataclass(frozen=True)
class TableLine:
    """One target of a table: ``start`` and ``length`` in sectors, and the target value."""

    start: int
    length: int
    target: Target

    def __post_init__(self) -> None:
        for name in ("start", "length"):
            value = getattr(self, name)
            if not int_in(value):
                raise InvalidTable(f"{name} must be a non-negative integer of sectors, not {value!r}")
        if not isinstance(self.target, Target):
            raise InvalidTable(f"target must be a Target, not {self.target!r}")
        if self.length == 0:
            raise InvalidTable(f"{self.target.target_type}: zero-length target")
        if self.start + self.length > MAX_SECTORS:
            raise InvalidTable(
                f"{self.target.target_type}: too large device (ends at sector "
                f"{self.start + self.length}, limit {MAX_SECTORS})"
            )
        self.target.validate_length(self.length)

    @property
    def end(self) -> int:
        """The first sector after this target."""
        return self.start + self.length

    @property
    def target_type(self) -> str:
        """The target's type name."""
        return self.target.target_type

    @property
    def params(self) -> str:
        """The target's parameter text."""
        return self.target.params

    def dmsetup_line(self) -> str:
        """This line as ``dmsetup table`` prints it (see :func:`format_line`)."""
        return format_line(self.start, self.length, self.target_type, self.params)

    def __str__(self) -> str:
        return f"{self.start} {self.length} {self.target}"


@dataclass(frozen=True, init=False)
class Table:
    """An immutable device-mapper table: contiguous :class:`TableLine` values from sector 0.

    ``Table(lines)`` takes :class:`TableLine` values or ``(start, length, target)`` tuples and
    raises :class:`InvalidTable` when the kernel would refuse them.
    """

    lines: tuple[TableLine, ...]

    def __init__(self, lines: Iterable[TableLine | tuple[int, int, Target]] = ()) -> None:
        if isinstance(lines, (str, bytes)):
            raise InvalidTable("Table() takes lines; use Table.parse(text) for table text")
        checked: list[TableLine] = []
        for item in lines:
            if isinstance(item, TableLine):
                checked.append(item)
            elif isinstance(item, tuple) and len(item) == 3:
                checked.append(TableLine(*item))
            else:
                raise InvalidTable(f"a table line is a TableLine or (start, length, target), not {item!r}")
        expected = 0
        for number, line in enumerate(checked, 1):
            _check_singleton(checked[0].target_type if number > 1 else None, line.target_type, number)
            if line.start != expected:
                where = "the first target must start at sector 0" if number == 1 else (
                    f"previous target ends at sector {expected}"
                )
                raise InvalidTable(
                    f"line {number}: {line.target_type}: Gap in table: starts at sector "
                    f"{line.start} but {where}"
                )
            expected = line.end
        object.__setattr__(self, "lines", tuple(checked))

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> Table:
        """Parse dmsetup table text (several lines, comments and blank lines allowed).

        Raises :class:`InvalidTable` naming the line for anything the kernel or dmsetup would
        refuse; no other exception escapes for any ``str`` input.
        """
        if not isinstance(text, str):
            raise InvalidTable(f"table text must be a string, not {type(text).__name__}")
        lines: list[TableLine] = []
        expected = 0
        for lineno, raw in enumerate(text.split("\n"), 1):
            stripped = raw.strip(_WS)
            if not stripped or stripped.startswith("#"):
                continue
            match = _LINE_RE.fullmatch(stripped)
            if match is None:
                raise InvalidTable(
                    f"line {lineno}: invalid format {stripped[:60]!r}: expected "
                    "<start> <length> <target_type> [<params>...]"
                )
            start = _sector_field(match.group(1), "start", lineno)
            length = _sector_field(match.group(2), "length", lineno)
            _check_singleton(lines[0].target_type if lines else None, match.group(3), lineno)
            params = match.group(4).split("#", 1)[0]
            try:
                target = Target.parse(match.group(3), params, length)
                line = TableLine(start, length, target)
            except DMError as err:
                raise InvalidTable(f"line {lineno}: {err.message}") from err
            if line.start != expected:
                raise InvalidTable(
                    f"line {lineno}: {line.target_type}: Gap in table: starts at sector {start}"
                    f" but {'the table starts at 0' if not lines else f'the previous target ends at {expected}'}"
                )
            expected = line.end
            lines.append(line)
        return cls(tuple(lines))

    @classmethod
    def single(cls, length: int, target: Target) -> Table:
        """A one-target table covering sectors ``0..length``."""
        return cls((TableLine(0, length, target),))

    @classmethod
    def from_targets(cls, targets: Iterable[tuple[int, Target]]) -> Table:
        """A table of ``(length, target)`` pairs laid end to end from sector 0."""
        lines = []
        start = 0
        for length, target in targets:
            line = TableLine(start, length, target)
            lines.append(line)
            start = line.end
        return cls(tuple(lines))

    # -- queries --------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Device size in sectors (0 for an empty table)."""
        return self.lines[-1].end if self.lines else 0

    @property
    def targets(self) -> tuple[Target, ...]:
        """The targets, in order."""
        return tuple(line.target for line in self.lines)

    @property
    def target_types(self) -> tuple[str, ...]:
        """The target type names, in order (duplicates kept)."""
        return tuple(line.target_type for line in self.lines)

    def devices(self) -> tuple[str, ...]:
        """Every device reference in the table, first appearance first, without duplicates."""
        seen: dict[str, None] = {}
        for line in self.lines:
            for dev in line.target.devices:
                seen.setdefault(dev, None)
        return tuple(seen)

    def line_at(self, sector: int) -> TableLine:
        """The line that maps ``sector``; raises :class:`InvalidTable` past the end."""
        lo, hi = 0, len(self.lines)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.lines[mid].end <= sector:
                lo = mid + 1
            else:
                hi = mid
        if sector < 0 or lo == len(self.lines):
            raise InvalidTable(f"sector {sector} is outside the table (size {self.size})")
        return self.lines[lo]

    def map_devices(self, fn: Callable[[str], str]) -> Table:
        """A copy with every device reference replaced by ``fn(reference)``."""
        return Table(tuple(TableLine(ln.start, ln.length, ln.target.map_devices(fn)) for ln in self.lines))

    # -- text -----------------------------------------------------------------------------------

    def dmsetup_text(self) -> str:
        """The table exactly as ``dmsetup table`` prints it (see :func:`format_line`)."""
        return "".join(line.dmsetup_line() for line in self.lines)

    def __str__(self) -> str:
        return "\n".join(str(line) for line in self.lines)

    # -- sequence protocol ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.lines)

    def __iter__(self) -> Iterator[TableLine]:
        return iter(self.lines)

    @overload
    def __getitem__(self, index: int) -> TableLine: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[TableLine, ...]: ...

    def __getitem__(self, index: int | slice) -> TableLine | tuple[TableLine, ...]:
        return self.lines[index]

    def __bool__(self) -> bool:
        return bool(self.lines)
