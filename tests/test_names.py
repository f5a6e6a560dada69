"""Device names and uuids against the kernel's limits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmtools.errors import DMError, InvalidName
from dmtools.names import (MAX_NAME_BYTES, MAX_UUID_BYTES, is_portable_name, mangle, validate_name,
                           validate_target_type, validate_uuid)


@pytest.mark.parametrize("name", ["vg-lv", "a", "x" * 127, "snap_1.cow", "LVM-abc:def=ghi@#+", "with space", "é" * 63])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "empty"),
        ("x" * 128, "at most 127"),
        ("é" * 64, "128 bytes"),
        ("a/b", "contains '/'"),
        ("/dev/mapper/x", "contains '/'"),
        (".", "reserved"),
        ("..", "reserved"),
        ("control", "reserved"),
        ("tab\there", "control character"),
        ("new\nline", "control character"),
        ("nul\0", "control character"),
        ("del\x7f", "control character"),
        ("\ud800", "UTF-8"),
    ],
)
def test_invalid_names(name: str, fragment: str) -> None:
    with pytest.raises(InvalidName, match=fragment):
        validate_name(name)


def test_name_must_be_a_string() -> None:
    with pytest.raises(InvalidName, match="string"):
        validate_name(b"bytes")  # type: ignore[arg-type]


def test_uuids() -> None:
    assert validate_uuid("") == ""
    assert validate_uuid("LVM-" + "x" * 124) == "LVM-" + "x" * 124
    assert len(("LVM-" + "x" * 124).encode()) == MAX_UUID_BYTES
    with pytest.raises(InvalidName, match="at most 128"):
        validate_uuid("u" * 129)
    with pytest.raises(InvalidName, match="control"):
        validate_uuid("a\nb")
    # A uuid may contain '/': the kernel only forbids it in names.
    assert validate_uuid("a/b") == "a/b"


def test_limits_are_the_ioctl_fields() -> None:
    assert MAX_NAME_BYTES == 127
    assert MAX_UUID_BYTES == 128


def test_target_type_names() -> None:
    assert validate_target_type("snapshot-origin") == "snapshot-origin"
    with pytest.raises(InvalidName, match="longer than 15"):
        validate_target_type("a" * 16)
    with pytest.raises(InvalidName, match="single word"):
        validate_target_type("two words")
    with pytest.raises(InvalidName, match="empty"):
        validate_target_type("")


def test_mangling_follows_libdm_whitelist() -> None:
    assert is_portable_name("vg-lv_1.2:x=y@z#+")
    assert not is_portable_name("with space")
    assert mangle("vg-lv") == "vg-lv"
    assert mangle("a b") == "a\\x20b"
    assert mangle("é") == "\\xc3\\xa9"
    assert mangle("a\\b") == "a\\x5cb"


@given(st.text(max_size=140))
def test_validate_name_only_raises_invalid_name(name: str) -> None:
    try:
        assert validate_name(name) == name
    except InvalidName:
        return
    except DMError as err:  # pragma: no cover - the assertion below reports it
        pytest.fail(f"unexpected error class {type(err).__name__}")
    assert "/" not in name and 0 < len(name.encode()) <= 127
