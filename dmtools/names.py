"""Device names and uuids, checked against the kernel's rules before they reach it.

Kernel rules (include/uapi/linux/dm-ioctl.h, drivers/md/dm-ioctl.c):

* a name is a NUL-terminated string in a ``DM_NAME_LEN = 128`` byte field, so at most 127 bytes;
  a uuid lives in ``DM_UUID_LEN = 129`` bytes, so at most 128 bytes;
* a name may not contain ``/`` and may not be ``.``, ``..`` or ``control`` (the node
  ``/dev/mapper/control``) — dm-ioctl.c ``check_name``;
* names and uuids are unique among live devices (checked by the backends, not here).

Decisions of this module beyond the kernel:

* The empty name is refused (the kernel looks devices up by it; dmsetup cannot create one).
* Control characters (0x00-0x1f, 0x7f) are refused in names and uuids: NUL would truncate the
  ioctl string and newlines break every line-oriented tool (dmsetup ls, udev rules).
* Other characters are allowed, as the kernel allows them. libdevmapper in its default ``auto``
  mangling mode encodes every byte outside ``0-9 A-Z a-z # + - . : = @ _`` as ``\\xNN`` for the
  node under ``/dev/mapper`` (libdm-common.c; see ``libdevmapper-and-python.md`` §1.2).
  :func:`mangle` reproduces that encoding and :func:`is_portable_name` tells whether a name needs it;
  tools that create devices for people should prefer portable names.
* Lengths are counted in UTF-8 bytes, which is what reaches the kernel.
"""

from __future__ import annotations

from dmtools.errors import InvalidName

__all__ = [
    "DM_NAME_LEN",
    "DM_UUID_LEN",
    "DM_MAX_TYPE_NAME",
    "MAX_NAME_BYTES",
    "MAX_UUID_BYTES",
    "validate_name",
    "validate_uuid",
    "validate_target_type",
    "is_portable_name",
    "mangle",
]

#: Sizes of the ioctl fields (include/uapi/linux/dm-ioctl.h), NUL included.
DM_NAME_LEN = 128
DM_UUID_LEN = 129
DM_MAX_TYPE_NAME = 16

MAX_NAME_BYTES = DM_NAME_LEN - 1
MAX_UUID_BYTES = DM_UUID_LEN - 1

# Names the kernel refuses (dm-ioctl.c check_name; DM_CONTROL_NODE is "control").
_RESERVED_NAMES = frozenset({".", "..", "control"})

# libdm's whitelist of characters that need no mangling (libdm-common.c _is_whitelisted_char).
_WHITELIST = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz#+-.:=@_")


def _control_chars(text: str) -> list[str]:
    return [c for c in text if ord(c) < 0x20 or ord(c) == 0x7F]


def _encoded(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidName(f"{what} must be a string, not {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidName(f"{what} {text!r} is not valid UTF-8: {err.reason}") from err


def validate_name(name: str) -> str:
    """Return ``name`` if the kernel accepts it as a device name, else raise :class:`InvalidName`.

    Raises :class:`InvalidName` when the name is empty, longer than 127 bytes (UTF-8), contains
    ``/`` or a control character, or is ``.``, ``..`` or ``control``.
    """
    raw = _encoded(name, "device name")
    if not raw:
        raise InvalidName("device name cannot be empty")
    if len(raw) > MAX_NAME_BYTES:
        raise InvalidName(f"device name is {len(raw)} bytes long; the kernel allows at most {MAX_NAME_BYTES}",
                          device=name[:40] + "...")
    if "/" in name:
        raise InvalidName(f"device name {name!r} contains '/'", device=name)
    if name in _RESERVED_NAMES:
        raise InvalidName(f"device name cannot be {name!r} (reserved by the kernel)", device=name)
    bad = _control_chars(name)
    if bad:
        raise InvalidName(f"device name {name!r} contains control character {bad[0]!r}", device=name)
    return name


def validate_uuid(uuid: str) -> str:
    """Return ``uuid`` if the kernel accepts it, else raise :class:`InvalidName`.

    The empty string means "no uuid" and is accepted. Raises :class:`InvalidName` when the uuid is
    longer than 128 bytes (UTF-8) or contains a control character.
    """
    raw = _encoded(uuid, "uuid")
    if len(raw) > MAX_UUID_BYTES:
        raise InvalidName(f"uuid is {len(raw)} bytes long; the kernel allows at most {MAX_UUID_BYTES}")
    bad = _control_chars(uuid)
    if bad:
        raise InvalidName(f"uuid {uuid!r} contains control character {bad[0]!r}")
    return uuid


def validate_target_type(target_type: str) -> str:
    """Return ``target_type`` if it fits the kernel's ``DM_MAX_TYPE_NAME`` field and is one word.

    Raises :class:`InvalidName` when it is empty, longer than 15 bytes or contains whitespace or a
    control character.
    """
    raw = _encoded(target_type, "target type")
    if not raw:
        raise InvalidName("target type cannot be empty")
    if len(raw) >= DM_MAX_TYPE_NAME:
        raise InvalidName(f"target type {target_type!r} is longer than {DM_MAX_TYPE_NAME - 1} bytes")
    if any(c.isspace() for c in target_type) or _control_chars(target_type):
        raise InvalidName(f"target type {target_type!r} must be a single word")
    return target_type


def is_portable_name(name: str) -> bool:
    """True when every character of ``name`` is in libdm's whitelist (no ``\\xNN`` mangling)."""
    return all(c in _WHITELIST for c in name)


def mangle(name: str) -> str:
    """libdm's ``auto``-mode mangling: bytes outside the whitelist become ``\\xNN`` (lower hex).

    This is the name the node gets under ``/dev/mapper`` when libdevmapper creates it.
    """
    out: list[str] = []
    for char in name:
        if char in _WHITELIST:
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode("utf-8"))
    return "".join(out)
