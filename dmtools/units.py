"""Sizes: sectors versus bytes, parsing sizes with units, formatting them for people.

Device-mapper counts in 512-byte sectors whatever the device's logical block size
(``SECTOR_SHIFT`` in include/linux/blkdev.h). Everything here keeps that split explicit: functions
named ``*_size`` work in bytes, functions named ``*_sectors`` in sectors, and :class:`Sectors` is an
``int`` that says which one it holds.

Accepted size syntax (``parse_size``/``parse_sectors``)::

    2048        a bare number is in the default unit (sectors unless the caller says otherwise)
    2048s       sectors (512 bytes)
    4096b       bytes
    512K 512k 512KiB   kibibytes; likewise M/MiB, G/GiB, T/TiB, P/PiB, E/EiB (all powers of 1024)
    1.5G        a decimal fraction is allowed when the result is a whole number of bytes

Decimal units written as ``KB``/``MB``/... are refused as ambiguous (LVM and dmsetup users mean
1024, disk vendors mean 1000): write ``K`` or ``KiB``. Negative numbers, empty strings, unknown
units and (where sectors are required) byte counts that are not a multiple of 512 raise
:class:`~dmtools.errors.InvalidArgument`.
"""

from __future__ import annotations

import re

from dmtools.errors import InvalidArgument

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import TypeGuard

__all__ = [
    "SECTOR",
    "SECTOR_SHIFT",
    "MAX_BYTES",
    "MAX_SECTORS",
    "Sectors",
    "parse_size",
    "parse_sectors",
    "bytes_to_sectors",
    "sectors_to_bytes",
    "format_size",
    "format_sectors",
    "int_in",
]

#: Bytes in a device-mapper sector (include/linux/blkdev.h SECTOR_SHIFT = 9).
SECTOR_SHIFT = 9
SECTOR = 1 << SECTOR_SHIFT

#: Largest device the kernel accepts: dm-table.c refuses ``start + len > LLONG_MAX >> SECTOR_SHIFT``.
MAX_SECTORS = ((1 << 63) - 1) >> SECTOR_SHIFT
MAX_BYTES = MAX_SECTORS * SECTOR

# Unit suffix (lower-cased) -> multiplier in bytes. "s" is a sector; "b" a byte.
_UNITS: dict[str, int] = {
    "b": 1,
    "s": SECTOR,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
    "p": 1 << 50,
    "pib": 1 << 50,
    "e": 1 << 60,
    "eib": 1 << 60,
}
_AMBIGUOUS = {"kb", "mb", "gb", "tb", "pb", "eb"}
_SIZE_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)")


def int_in(value: object, low: int = 0, high: int | None = None) -> TypeGuard[int]:
    """True when ``value`` is an ``int`` (``bool`` is not) with ``low <= value <= high``
    (``high`` ``None``: no upper bound): the check every count, id and percentage takes."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high)


class Sectors(int):
    """A count of 512-byte sectors (an ``int``; arithmetic on it gives plain ``int``)."""

    def __new__(cls, value: int = 0) -> Sectors:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"sector count must be an integer, not {value!r}")
        if value < 0:
            raise InvalidArgument(f"sector count cannot be negative: {value}")
        return super().__new__(cls, value)

    @classmethod
    def from_bytes_exact(cls, nbytes: int) -> Sectors:
        """Sectors in ``nbytes``; raises :class:`InvalidArgument` unless a multiple of 512."""
        return cls(bytes_to_sectors(nbytes))

    @classmethod
    def parse(cls, text: str, default_unit: str = "s") -> Sectors:
        """Parse ``text`` (see :func:`parse_sectors`)."""
        return cls(parse_sectors(text, default_unit))

    @property
    def bytes(self) -> int:
        """The same size in bytes."""
        return int(self) << SECTOR_SHIFT

    def __repr__(self) -> str:
        return f"Sectors({int(self)})"

    def __str__(self) -> str:
        return str(int(self))


def parse_size(text: str | int, default_unit: str = "s") -> int:
    """Parse a size with an optional unit and return it in **bytes**.

    ``default_unit`` applies to a bare number: ``"s"`` (sectors, dmsetup's convention) or ``"b"``
    (bytes), or any other unit suffix such as ``"K"``. An ``int`` is taken as already in
    ``default_unit``. Raises :class:`InvalidArgument` for negatives, garbage, unknown or ambiguous
    units, fractions that do not give whole bytes and sizes beyond the kernel's limit.
    """
    unit_default = default_unit.strip().lower()
    if unit_default not in _UNITS:
        raise InvalidArgument(f"unknown default unit {default_unit!r}")
    if isinstance(text, bool):
        raise InvalidArgument(f"invalid size {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"size cannot be negative: {text}")
        return _check_max(text * _UNITS[unit_default], str(text))
    if not isinstance(text, str):
        raise InvalidArgument(f"invalid size {text!r}: expected a string or an integer")
    stripped = text.strip()
    if not stripped:
        raise InvalidArgument("empty size")
    if stripped.startswith("-"):
        raise InvalidArgument(f"size cannot be negative: {text!r}")
    if stripped.startswith("+"):
        stripped = stripped[1:]
    match = _SIZE_RE.fullmatch(stripped)
    if match is None:
        raise InvalidArgument(
            f"invalid size {text!r}: expected a number with an optional unit "
            "(s, b, K, M, G, T, P, E or KiB, MiB, ...)"
        )
    if len(match.group("num")) > 40:
        raise InvalidArgument(f"size {text[:50]!r}... is too long to be a size")
    unit = match.group("unit").lower() or unit_default
    if unit in _AMBIGUOUS:
        raise InvalidArgument(
            f"ambiguous unit in {text!r}: write {unit[0].upper()} or {unit[0].upper()}iB "
            "(powers of 1024)"
        )
    if unit not in _UNITS:
        raise InvalidArgument(f"unknown unit {match.group('unit')!r} in size {text!r}")
    num = match.group("num")
    if "." not in num:  # a whole number (ASCII digits, _SIZE_RE): no fractions/decimal to load
        return _check_max(int(num) * _UNITS[unit], text)
    from fractions import Fraction  # with decimal, 10 ms of start-up that most commands never use

    exact = Fraction(num) * _UNITS[unit]
    if exact.denominator != 1:
        raise InvalidArgument(f"size {text!r} is not a whole number of bytes")
    return _check_max(int(exact), text)


def parse_sectors(text: str | int, default_unit: str = "s") -> int:
    """Parse a size with an optional unit and return it in **sectors**.

    Like :func:`parse_size`, and also raises :class:`InvalidArgument` when the size is not a whole
    number of 512-byte sectors (``100b``, ``0.1K``).
    """
    nbytes = parse_size(text, default_unit)
    if nbytes % SECTOR:
        raise InvalidArgument(f"size {text!r} ({nbytes} bytes) is not a multiple of {SECTOR} bytes")
    return nbytes >> SECTOR_SHIFT


def bytes_to_sectors(nbytes: int) -> int:
    """Exact conversion; raises :class:`InvalidArgument` for negatives and non-multiples of 512."""
    if nbytes < 0:
        raise InvalidArgument(f"size cannot be negative: {nbytes}")
    if nbytes % SECTOR:
        raise InvalidArgument(f"{nbytes} bytes is not a multiple of {SECTOR} bytes")
    return nbytes >> SECTOR_SHIFT


def sectors_to_bytes(sectors: int) -> int:
    """``sectors * 512``; raises :class:`InvalidArgument` for negatives."""
    if sectors < 0:
        raise InvalidArgument(f"sector count cannot be negative: {sectors}")
    return sectors << SECTOR_SHIFT


_HUMAN_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size(nbytes: int) -> str:
    """A size for people, in powers of 1024: ``512 B``, ``4 KiB``, ``1.5 GiB``, ``1.23 TiB``.

    Exact values print without decimals; others are rounded to two decimals (trailing zeros
    dropped).
    """
    if nbytes < 0:
        raise InvalidArgument(f"size cannot be negative: {nbytes}")
    from fractions import Fraction

    index = 0
    value = Fraction(nbytes)
    while value >= 1024 and index < len(_HUMAN_UNITS) - 1:
        value /= 1024
        index += 1
    if value.denominator == 1:
        number = str(value.numerator)
    else:
        number = f"{float(value):.2f}".rstrip("0").rstrip(".")
    return f"{number} {_HUMAN_UNITS[index]}"


def format_sectors(sectors: int) -> str:
    """Sectors with the size for people: ``2048s (1 MiB)``."""
    return f"{sectors}s ({format_size(sectors_to_bytes(sectors))})"


def _check_max(value: int, text: str) -> int:
    if value > MAX_BYTES:
        raise InvalidArgument(f"size {text!r} exceeds the kernel's limit of {MAX_SECTORS} sectors")
    return value
