"""Units: sectors versus bytes, parsing and formatting sizes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmtools.errors import DMError, InvalidArgument
from dmtools.units import (MAX_BYTES, MAX_SECTORS, SECTOR, Sectors, bytes_to_sectors, format_sectors, format_size,
                           parse_sectors, parse_size, sectors_to_bytes)


@pytest.mark.parametrize(
    ("text", "expected_bytes"),
    [
        ("2048", 2048 * 512),
        ("2048s", 2048 * 512),
        ("2048S", 2048 * 512),
        ("4096b", 4096),
        ("4096B", 4096),
        ("512K", 512 * 1024),
        ("512k", 512 * 1024),
        ("512KiB", 512 * 1024),
        ("512kib", 512 * 1024),
        ("16M", 16 << 20),
        ("16MiB", 16 << 20),
        ("1G", 1 << 30),
        ("1g", 1 << 30),
        ("1T", 1 << 40),
        ("2P", 2 << 50),
        ("1.5G", 3 << 29),
        (".5K", 512),
        ("0", 0),
        ("0s", 0),
        (" 8s ", 4096),
        ("+8", 4096),
        ("64 K", 64 << 10),
    ],
)
def test_parse_size_units(text: str, expected_bytes: int) -> None:
    assert parse_size(text) == expected_bytes


def test_bare_number_takes_the_default_unit() -> None:
    assert parse_size("2048", default_unit="b") == 2048
    assert parse_size("2048", default_unit="s") == 2048 * 512
    assert parse_size("4", default_unit="K") == 4096
    assert parse_size(16, default_unit="s") == 16 * 512
    assert parse_size(16, default_unit="b") == 16


def test_parse_sectors() -> None:
    assert parse_sectors("1M") == 2048
    assert parse_sectors("2048") == 2048
    assert parse_sectors("1024b") == 2
    assert parse_sectors("4096", default_unit="b") == 8


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("-1", "negative"),
        ("-5M", "negative"),
        ("abc", "invalid size"),
        ("12X", "unknown unit"),
        ("1.2.3", "invalid size"),
        ("1e6", "invalid size"),
        ("0x10", "invalid size"),
        ("10x", "unknown unit"),
        ("16MB", "ambiguous"),
        ("1kB", "ambiguous"),
        ("0.3b", "whole number of bytes"),
        ("1" * 60, "too long"),
        ("99999999E", "exceeds"),
    ],
)
def test_parse_size_rejects(text: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        parse_size(text)


@pytest.mark.parametrize("text", ["100b", "0.25K", "513b", "1b"])
def test_parse_sectors_requires_whole_sectors(text: str) -> None:
    with pytest.raises(InvalidArgument, match="not a multiple of 512"):
        parse_sectors(text)


def test_parse_size_rejects_bad_types_and_default_unit() -> None:
    with pytest.raises(InvalidArgument):
        parse_size(-1)
    with pytest.raises(InvalidArgument):
        parse_size(True)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        parse_size(1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="default unit"):
        parse_size("1", default_unit="furlong")


def test_sectors_type() -> None:
    s = Sectors(2048)
    assert s == 2048 and isinstance(s, int)
    assert s.bytes == 1 << 20
    assert repr(s) == "Sectors(2048)"
    assert str(s) == "2048"
    assert Sectors.from_bytes_exact(4096) == 8
    assert Sectors.parse("1M") == 2048
    with pytest.raises(InvalidArgument):
        Sectors(-1)
    with pytest.raises(InvalidArgument):
        Sectors.from_bytes_exact(100)
    with pytest.raises(InvalidArgument):
        Sectors("12")  # type: ignore[arg-type]


def test_conversions() -> None:
    assert bytes_to_sectors(1024) == 2
    assert sectors_to_bytes(3) == 1536
    with pytest.raises(InvalidArgument):
        bytes_to_sectors(1000)
    with pytest.raises(InvalidArgument):
        bytes_to_sectors(-512)
    with pytest.raises(InvalidArgument):
        sectors_to_bytes(-1)


def test_limit_is_the_kernels() -> None:
    assert parse_sectors(str(MAX_SECTORS)) == MAX_SECTORS
    with pytest.raises(InvalidArgument, match="limit"):
        parse_sectors(str(MAX_SECTORS + 1))


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1024, "1 KiB"),
        (4096, "4 KiB"),
        (1 << 20, "1 MiB"),
        (3 << 29, "1.5 GiB"),
        (1234567890, "1.15 GiB"),
        (1 << 40, "1 TiB"),
        (1 << 62, "4 EiB"),
    ],
)
def test_format_size(nbytes: int, text: str) -> None:
    assert format_size(nbytes) == text


def test_format_sectors_and_negative() -> None:
    assert format_sectors(2048) == "2048s (1 MiB)"
    with pytest.raises(InvalidArgument):
        format_size(-1)


@given(st.integers(min_value=0, max_value=MAX_SECTORS))
def test_sector_strings_round_trip(n: int) -> None:
    assert parse_sectors(f"{n}s") == n
    assert parse_size(f"{n * SECTOR}b") == n * SECTOR


@given(st.text(max_size=30))
def test_parse_size_only_raises_dmerrors(text: str) -> None:
    try:
        value = parse_size(text)
    except DMError:
        return
    # What parses is a whole byte count within the kernel's limit, the same whatever blanks
    # surround it, and a bare number is sectors (dmsetup's default unit).
    assert type(value) is int and 0 <= value <= MAX_BYTES
    assert parse_size(f" {text}\t") == value == parse_size(f"{value}b")
    digits = text.strip().lstrip("+")
    if digits.isascii() and digits.isdigit():
        assert value == int(digits) * SECTOR
