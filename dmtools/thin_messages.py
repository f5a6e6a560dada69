"""Thin-pool messages as typed values and typed calls (dm-thin.c ``pool_message``, thin.md §2).

Each message is an immutable value whose ``str()`` is the exact text the kernel reads from
``dmsetup message <pool> 0 "<text>"``; :func:`parse_pool_message` reads that text back with the
kernel's rules (verbs case-insensitive, exact argument counts, 24-bit device ids). The calls
:func:`create_thin`, :func:`create_snap`, :func:`delete`, :func:`set_transaction_id`,
:func:`reserve_metadata_snap` and :func:`release_metadata_snap` send one message through
:meth:`dmtools.backend.DeviceMapper.message` and turn the kernel's errno into an error named for
the condition:

==========  ============================================  ===============================
errno       when (dm-thin.c / dm-thin-metadata.c)          raised
==========  ============================================  ===============================
EEXIST      ``create_thin``/``create_snap``: id in use     :class:`DeviceExists`
ENODATA     ``create_snap`` origin or ``delete`` id        :class:`DeviceNotFound`
            missing
EBUSY       ``delete`` of an open thin; a second           :class:`DeviceBusy`
            ``reserve_metadata_snap``
EINVAL      ``set_transaction_id`` mismatch, nothing to    :class:`InvalidArgument`
            release, bad arguments
EOPNOTSUPP  pool read-only, out of metadata space, failed  :class:`PoolNotWritable`
==========  ============================================  ===============================

The pool commits its metadata after every successful message, so the change is durable when
the call returns.
"""

from __future__ import annotations

import errno as _errno
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Union

from dmtools.errors import DeviceBusy, DeviceExists, DeviceNotFound, DMError, InvalidArgument, PoolNotWritable
from dmtools.target_values import MAX_THIN_DEV_ID, U64_MAX, split_args
from dmtools.units import int_in

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.backend import DeviceMapper

__all__ = [
    "PoolMessage",
    "CreateThin",
    "CreateSnap",
    "Delete",
    "SetTransactionId",
    "ReserveMetadataSnap",
    "ReleaseMetadataSnap",
    "parse_pool_message",
    "send",
    "create_thin",
    "create_snap",
    "delete",
    "set_transaction_id",
    "reserve_metadata_snap",
    "release_metadata_snap",
]

_DIGITS = re.compile(r"[0-9]+")


def _check(value: object, what: str = "device id", maximum: int = MAX_THIN_DEV_ID) -> None:
    # dm-thin.c: a device id (read_dev_id) or transaction id is a decimal u64, a device id no
    # larger than MAX_DEV_ID.
    if not int_in(value, 0, maximum):
        raise InvalidArgument(f"invalid {what} {value!r}: 0 to {maximum}", operation="message")


class _Message:
    VERB: ClassVar[str] = ""

    def args(self) -> list[str]:
        return []

    def __str__(self) -> str:
        return " ".join([self.VERB, *self.args()])


@dataclass(frozen=True)
class _OneDevice(_Message):
    """A message whose one argument is a device id."""

    dev_id: int

    def __post_init__(self) -> None:
        _check(self.dev_id)

    def args(self) -> list[str]:
        return [str(self.dev_id)]


@dataclass(frozen=True)
class CreateThin(_OneDevice):
    """``create_thin <dev id>``: a new, empty thin device."""

    VERB: ClassVar[str] = "create_thin"


@dataclass(frozen=True)
class CreateSnap(_Message):
    """``create_snap <dev id> <origin id>``: a snapshot of thin device ``origin_id``.

    Suspend an active origin first; the kernel does not enforce it (thin-provisioning.rst).
    """

    VERB: ClassVar[str] = "create_snap"
    dev_id: int
    origin_id: int

    def __post_init__(self) -> None:
        _check(self.dev_id)
        _check(self.origin_id, "origin device id")

    def args(self) -> list[str]:
        return [str(self.dev_id), str(self.origin_id)]


@dataclass(frozen=True)
class Delete(_OneDevice):
    """``delete <dev id>``: drop a thin device and free its unshared blocks (irreversible)."""

    VERB: ClassVar[str] = "delete"


@dataclass(frozen=True)
class SetTransactionId(_Message):
    """``set_transaction_id <current> <new>``: compare-and-swap of the pool's transaction id."""

    VERB: ClassVar[str] = "set_transaction_id"
    current: int
    new: int

    def __post_init__(self) -> None:
        _check(self.current, "current transaction id", U64_MAX)
        _check(self.new, "new transaction id", U64_MAX)

    def args(self) -> list[str]:
        return [str(self.current), str(self.new)]


@dataclass(frozen=True)
class ReserveMetadataSnap(_Message):
    """``reserve_metadata_snap``: hold a read-only copy of the metadata (one at a time)."""

    VERB: ClassVar[str] = "reserve_metadata_snap"


@dataclass(frozen=True)
class ReleaseMetadataSnap(_Message):
    """``release_metadata_snap``: drop the held metadata copy."""

    VERB: ClassVar[str] = "release_metadata_snap"


PoolMessage = Union[CreateThin, CreateSnap, Delete, SetTransactionId, ReserveMetadataSnap, ReleaseMetadataSnap]

_VERBS: dict[str, type[_Message]] = {
    cls.VERB: cls
    for cls in (CreateThin, CreateSnap, Delete, SetTransactionId, ReserveMetadataSnap, ReleaseMetadataSnap)
}
_ARGC = {"create_thin": 2, "create_snap": 3, "delete": 2, "set_transaction_id": 3,
         "reserve_metadata_snap": 1, "release_metadata_snap": 1}


def _parse_number(word: str, what: str, maximum: int) -> int:
    if not _DIGITS.fullmatch(word) or len(word.lstrip("0")) > 20 or int(word) > maximum:
        raise InvalidArgument(f"invalid {what} {word[:40]!r}", errno=_errno.EINVAL, operation="message")
    return int(word)


def parse_pool_message(text: str) -> PoolMessage:
    """Read a pool message as the kernel does (dm-thin.c ``pool_message``).

    Verbs match case-insensitively; a wrong argument count gives the kernel's "Message received
    with N arguments instead of M."; device ids are decimal and at most 2^24 - 1. Raises
    :class:`InvalidArgument` (``EINVAL``) for anything the kernel refuses.
    """
    if not isinstance(text, str):
        raise InvalidArgument("a pool message is text", operation="message")
    argv = split_args(text)  # dm-ioctl.c target_message splits with dm_split_args
    if not argv:
        raise InvalidArgument("empty message", operation="message")
    verb = argv[0].lower()
    cls = _VERBS.get(verb)
    if cls is None:
        raise InvalidArgument(f"Unrecognised thin pool target message received: {argv[0][:40]}", operation="message")
    if len(argv) != _ARGC[verb]:
        raise InvalidArgument(f"Message received with {len(argv)} arguments instead of {_ARGC[verb]}.",
                              operation="message")
    if cls is CreateThin:
        return CreateThin(_parse_number(argv[1], "device id", MAX_THIN_DEV_ID))
    if cls is CreateSnap:
        return CreateSnap(_parse_number(argv[1], "device id", MAX_THIN_DEV_ID),
                          _parse_number(argv[2], "origin device id", MAX_THIN_DEV_ID))
    if cls is Delete:
        return Delete(_parse_number(argv[1], "device id", MAX_THIN_DEV_ID))
    if cls is SetTransactionId:
        return SetTransactionId(_parse_number(argv[1], "transaction id", U64_MAX),
                                _parse_number(argv[2], "transaction id", U64_MAX))
    return ReserveMetadataSnap() if cls is ReserveMetadataSnap else ReleaseMetadataSnap()


def _translate(err: DMError, msg: PoolMessage, pool: str) -> DMError:
    """The error named for what the kernel's errno means for this message."""
    code = err.errno
    cls: type[DMError]
    if code == _errno.EEXIST:
        cls, why = DeviceExists, "the pool already has a thin device with that id"
    elif code == _errno.ENODATA:
        missing = msg.origin_id if isinstance(msg, CreateSnap) else getattr(msg, "dev_id", "?")
        cls, why = DeviceNotFound, f"the pool has no thin device {missing}"
    elif code == _errno.EBUSY:
        cls, why = DeviceBusy, ("a metadata snapshot is already held" if isinstance(msg, ReserveMetadataSnap)
                                else "the thin device is active")
    elif code == _errno.EOPNOTSUPP:
        cls, why = PoolNotWritable, "the pool takes no messages in read-only, out-of-metadata-space or fail mode"
    elif code == _errno.EINVAL:
        cls = InvalidArgument
        if isinstance(msg, SetTransactionId):
            why = f"the pool's transaction id is not {msg.current}"
        elif isinstance(msg, ReleaseMetadataSnap):
            why = "no metadata snapshot is held"
        else:
            why = "the pool refused the message"
    else:
        return err
    return cls(f"{msg}: {why} ({err.message})", errno=code, operation="message", device=pool)


def send(dm: DeviceMapper, pool: str, msg: PoolMessage) -> None:
    """Send ``msg`` to the thin-pool device ``pool`` (sector 0); raises the errors in the table
    of this module's docstring, and :class:`DeviceNotFound` when ``pool`` does not exist."""
    try:
        dm.message(pool, 0, str(msg))
    except DMError as err:
        translated = _translate(err, msg, pool)
        if translated is err:
            raise
        raise translated from err


def create_thin(dm: DeviceMapper, pool: str, dev_id: int) -> None:
    """``create_thin``: make empty thin device ``dev_id``; :class:`DeviceExists` if it exists."""
    send(dm, pool, CreateThin(dev_id))


def create_snap(dm: DeviceMapper, pool: str, dev_id: int, origin_id: int) -> None:
    """``create_snap``: snapshot ``origin_id`` as ``dev_id`` (suspend an active origin first).

    Raises :class:`DeviceExists` (id in use) or :class:`DeviceNotFound` (no such origin).
    """
    send(dm, pool, CreateSnap(dev_id, origin_id))


def delete(dm: DeviceMapper, pool: str, dev_id: int) -> None:
    """``delete``: drop thin device ``dev_id``; :class:`DeviceNotFound` if missing,
    :class:`DeviceBusy` while it is active."""
    send(dm, pool, Delete(dev_id))


def set_transaction_id(dm: DeviceMapper, pool: str, current: int, new: int) -> None:
    """``set_transaction_id``: swap ``current`` for ``new``; :class:`InvalidArgument` if the pool's
    id is not ``current``."""
    send(dm, pool, SetTransactionId(current, new))


def reserve_metadata_snap(dm: DeviceMapper, pool: str) -> None:
    """``reserve_metadata_snap``: hold a metadata snapshot; :class:`DeviceBusy` if one is held."""
    send(dm, pool, ReserveMetadataSnap())


def release_metadata_snap(dm: DeviceMapper, pool: str) -> None:
    """``release_metadata_snap``: drop the held snapshot; :class:`InvalidArgument` if none is held."""
    send(dm, pool, ReleaseMetadataSnap())
