"""Typed device-mapper targets: immutable values that format to, and parse from, the kernel's text.

Import these through :mod:`dmtools.table`; this module only keeps that one from growing too long.

Text conventions (the same for every target):

* ``target.params`` is the parameter text **as the kernel prints it back** in ``dmsetup table``
  (its ``STATUSTYPE_TABLE`` output): numbers in decimal without leading zeros, store types and
  features upper/lower-cased and ordered as the kernel emits them, zero feature counts omitted.
  Device references are the one exception: they are kept **as written** (a path or
  ``major:minor``), because the kernel rewrites them to ``major:minor`` only after resolving them.
* Text is split into arguments by :func:`split_args`, the kernel's ``dm_split_args``, and each
  argument is written back by :func:`format_args` with the escapes that make the split give it
  back, so a device path may hold spaces (``/srv/my\\ file``) or backslashes.
* Parsing accepts what the kernel's constructors accept (case-insensitive store types and
  snapshot features, feature lists in any order or with duplicates) and validates what they
  validate, raising :class:`~dmtools.errors.InvalidTable` with the kernel's reason where it has
  one. Checks that need the target's length (stripe and region sizes) are made by
  :meth:`Target.validate_length`, which :class:`dmtools.table.TableLine` calls.
* Numbers are decimal digits only (no sign, no ``0x``), where the kernel's ``sscanf`` would also
  take a sign.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, NamedTuple, Self

from dmtools.errors import InvalidName, InvalidTable
from dmtools.linux import parse_devno
from dmtools.names import validate_target_type
from dmtools.units import int_in

__all__ = [
    "Target",
    "GenericTarget",
    "Leg",
    "Linear",
    "Striped",
    "Zero",
    "Error",
    "Snapshot",
    "SnapshotMerge",
    "SnapshotOrigin",
    "StoreMode",
    "MirrorLog",
    "SyncMode",
    "CoreLog",
    "DiskLog",
    "OtherLog",
    "Mirror",
    "ThinPool",
    "Thin",
    "THIN_POOL_FEATURES",
    "MIN_THIN_BLOCK_SECTORS",
    "MAX_THIN_BLOCK_SECTORS",
    "MAX_THIN_DEV_ID",
    "TARGET_TYPES",
    "split_args",
    "format_args",
    "parse_devno",
    "U32_MAX",
    "U64_MAX",
    "MAX_NR_MIRRORS",
    "MAX_SNAPSHOT_CHUNK",
]

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
#: dm-raid1.c: MAX_NR_MIRRORS = DM_KCOPYD_MAX_REGIONS + 1.
MAX_NR_MIRRORS = 9
#: dm-exception-store.c: chunk size must be <= INT_MAX >> SECTOR_SHIFT.
MAX_SNAPSHOT_CHUNK = ((1 << 31) - 1) >> 9

# dm-table.c dm_split_args splits on the kernel's isspace(), which lib/ctype.c makes true for
# \t \n \v \f \r, space and the byte 0xA0; a backslash quotes the next byte, and one that ends the
# text is kept as it is.
_WORD_RE = re.compile(rb"(?:\\.|\\\Z|[^\\ \t\n\v\f\r\xa0])+", re.S)
_QUOTED_RE = re.compile(rb"\\(.)", re.S)
# What format_args escapes: white space and the backslash. A line end, a NUL or '#' cannot be
# carried by a dmsetup table line at all (dmsetup.c _parse_line), so values refuse them.
_ESCAPE_RE = re.compile(r"([\\ \t\v\f\r])")
_DIGITS_RE = re.compile(r"[0-9]+")
_WS = " \t\n\v\f\r"


def split_args(params: str) -> list[str]:
    """Split parameter text into arguments exactly as the kernel's ``dm_split_args`` (dm-table.c).

    Words are separated by the kernel's white space (of the UTF-8 bytes); a backslash makes the
    next byte literal (``\\ `` is a space inside a word, ``\\\\`` a backslash), and a backslash
    that ends the text is kept. Bytes a split leaves that are not UTF-8 come back as
    ``surrogateescape`` characters.
    """
    data = params.encode("utf-8", "surrogateescape")
    return [_QUOTED_RE.sub(rb"\1", word).decode("utf-8", "surrogateescape") for word in _WORD_RE.findall(data)]


def format_args(args: Iterable[str]) -> str:
    """Parameter text that :func:`split_args` splits back into ``args`` (white space and
    backslashes escaped with a backslash; the values refuse what no escape can carry)."""
    return " ".join(_ESCAPE_RE.sub(r"\\\1", arg) for arg in args)


def _fail(target_type: str, reason: str) -> InvalidTable:
    return InvalidTable(f"{target_type}: {reason}")


def _number(target_type: str, text: str, what: str, maximum: int = U64_MAX) -> int:
    if not _DIGITS_RE.fullmatch(text):
        raise _fail(target_type, f"{what} {text[:40]!r} is not a decimal number")
    if len(text.lstrip("0")) > 20:
        raise _fail(target_type, f"{what} {text[:40]}... is too large (maximum {maximum})")
    value = int(text.lstrip("0") or "0")
    if value > maximum:
        raise _fail(target_type, f"{what} {text} is too large (maximum {maximum})")
    return value


def _check_int(target_type: str, value: object, what: str, maximum: int = U64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(target_type, f"{what} must be an integer, not {value!r}")
    if value < 0 or value > maximum:
        raise _fail(target_type, f"{what} {value} is out of range 0..{maximum}")
    return value


def _features(target_type: str, features: object, known: tuple[str, ...], unknown: str, *,
              fold: bool = False) -> tuple[str, ...]:
    """``features`` (a sequence of names; with ``fold`` in any case) in ``known``'s order, each once;
    a name not in ``known`` raises the kernel's ``unknown`` text (``{!r}`` becomes the name)."""
    if isinstance(features, str) or not isinstance(features, Iterable):
        raise _fail(target_type, "features must be a sequence of feature names")
    wanted = set()
    for feat in features:
        name = feat.lower() if fold and isinstance(feat, str) else feat
        if name not in known:
            raise _fail(target_type, unknown.format(feat))
        wanted.add(name)
    return tuple(f for f in known if f in wanted)


def _check_device(target_type: str, device: object) -> str:
    """A device reference that a table line can carry: escaped white space and backslashes are
    fine; a NUL, a line end or ``#`` (dmsetup.c ``_parse_line``: a comment) are not, nor white
    space at its end (dmsetup drops it from the line) or a character with the UTF-8 byte 0xA0."""
    if not isinstance(device, str) or not device:
        raise _fail(target_type, f"device reference must be a non-empty string, not {device!r}")
    if "\0" in device or "\n" in device or "#" in device:
        raise _fail(target_type, f"device reference {device!r} contains a NUL, a line end or '#', "
                                 "which a table line cannot carry")
    if device[-1] in _WS:
        raise _fail(target_type, f"device reference {device!r} ends in white space, which dmsetup "
                                 "drops from a table line")
    try:
        split = b"\xa0" in device.encode("utf-8")
    except UnicodeEncodeError:  # a character split_args cut apart at its 0xA0 byte
        split = True
    if split:
        raise _fail(target_type, f"device reference {device!r} contains a character whose UTF-8 "
                                 "bytes the kernel takes for white space (0xA0)")
    return device


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class Leg(NamedTuple):
    """A device and the sector offset where the target's data starts on it."""

    device: str
    offset: int = 0

    def __str__(self) -> str:
        return format_args((self.device, str(self.offset)))


def _legs(target_type: str, legs: Iterable[object]) -> tuple[Leg, ...]:
    out: list[Leg] = []
    for leg in legs:
        if isinstance(leg, str):
            leg = (leg, 0)
        if not isinstance(leg, tuple) or len(leg) != 2:
            raise _fail(target_type, f"a leg is a (device, offset) pair, not {leg!r}")
        device = _check_device(target_type, leg[0])
        out.append(Leg(device, _check_int(target_type, leg[1], "offset")))
    return tuple(out)


class _DeviceFields:
    """``devices`` and ``map_devices`` of a value whose device references are its fields named in
    ``DEVICE_FIELDS`` (``None`` in one of them: not given)."""

    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def devices(self) -> tuple[str, ...]:
        """The device references this value names, in table order."""
        return tuple(d for d in (getattr(self, f) for f in self.DEVICE_FIELDS) if d is not None)

    def map_devices(self, fn: Callable[[str], str]) -> Self:
        """A copy with every device reference replaced by ``fn(reference)``."""
        new = {f: fn(getattr(self, f)) for f in self.DEVICE_FIELDS if getattr(self, f) is not None}
        return dataclasses.replace(self, **new) if new else self  # type: ignore[type-var]  # subclasses are dataclasses


class Target(_DeviceFields):
    """Base of every target value. Subclasses are frozen dataclasses.

    Every target has ``target_type`` (the kernel's name for it), ``params`` (its table text) and
    ``devices`` (the device references it names, in table order).
    """

    #: Kernel target type name; set by each typed subclass.
    TYPE: ClassVar[str] = ""
    #: ``DM_TARGET_SINGLETON``: the type must be the only target of its table (dm-table.c).
    SINGLETON: ClassVar[bool] = False

    @property
    def target_type(self) -> str:
        """The kernel's name for this target type."""
        return self.TYPE

    @property
    def params(self) -> str:
        """The parameter text, as the kernel prints it in ``dmsetup table`` (devices as written,
        escaped by :func:`format_args`)."""
        return format_args(self.args())

    def args(self) -> list[str]:
        """The parameters as a list of arguments."""
        raise NotImplementedError

    def validate_length(self, length: int) -> None:
        """Checks that depend on the target's length in sectors; raise :class:`InvalidTable`."""

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Target:
        """Build the target from its split arguments; raises :class:`InvalidTable`."""
        raise NotImplementedError

    @staticmethod
    def parse(target_type: str, params: str = "", length: int | None = None) -> Target:
        """Parse ``params`` for ``target_type``: a typed target, or :class:`GenericTarget`.

        Raises :class:`InvalidTable` when a known type's arguments are wrong, or when the type
        name or text cannot be given to the kernel. With the line's ``length``, checks that the
        kernel makes against it before reading all arguments come in the kernel's order.
        """
        try:
            validate_target_type(target_type)
        except InvalidName as err:
            raise InvalidTable(err.message) from err
        if not isinstance(params, str):
            raise InvalidTable(f"{target_type}: parameters must be a string, not {params!r}")
        if "\0" in params:
            raise InvalidTable(f"{target_type}: parameters contain a NUL character")
        try:
            params.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidTable(f"{target_type}: parameters are not valid UTF-8") from err
        cls = TARGET_TYPES.get(target_type)
        if cls is None:
            return GenericTarget(target_type, params.strip(_WS))
        args = split_args(params)
        if length is not None:
            cls.check_length_first(args, length)
        return cls.from_args(args)

    @classmethod
    def check_length_first(cls, args: Sequence[str], length: int) -> None:
        """Length checks the kernel's constructor makes before it reads every argument."""

    def __str__(self) -> str:
        params = self.params
        return f"{self.target_type} {params}" if params else self.target_type


@dataclass(frozen=True)
class GenericTarget(Target):
    """A target type this library does not model; its parameter text is kept verbatim."""

    type_name: str
    text: str = ""

    def __post_init__(self) -> None:
        try:
            validate_target_type(self.type_name)
        except InvalidName as err:
            raise InvalidTable(err.message) from err
        if not isinstance(self.text, str) or "\0" in self.text or "\n" in self.text:
            raise InvalidTable(f"{self.type_name}: parameters must be one line of text")
        if "#" in self.text:
            raise InvalidTable(f"{self.type_name}: parameters contain '#', which dmsetup reads as a comment")
        # dmsetup drops the whitespace around the parameters; so does the value.
        object.__setattr__(self, "text", self.text.strip(_WS))

    @property
    def target_type(self) -> str:
        return self.type_name

    @property
    def params(self) -> str:
        return self.text

    def args(self) -> list[str]:
        return split_args(self.text)


@dataclass(frozen=True)
class Linear(Target):
    """``linear <dev> <offset>`` (dm-linear.c)."""

    TYPE: ClassVar[str] = "linear"
    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ("device",)
    device: str
    offset: int = 0

    def __post_init__(self) -> None:
        _check_device(self.TYPE, self.device)
        _check_int(self.TYPE, self.offset, "offset")

    def args(self) -> list[str]:
        return [self.device, str(self.offset)]

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Linear:
        if len(args) != 2:
            raise _fail(cls.TYPE, f"Invalid argument count: expected <dev> <offset>, got {len(args)} arguments")
        return cls(args[0], _number(cls.TYPE, args[1], "Invalid device sector"))


@dataclass(frozen=True)
class Striped(Target):
    """``striped <#stripes> <chunk_sectors> <dev> <offset>...`` (dm-stripe.c)."""

    TYPE: ClassVar[str] = "striped"
    chunk_size: int
    stripes: tuple[Leg, ...] = field(default=())

    def __post_init__(self) -> None:
        _check_int(self.TYPE, self.chunk_size, "chunk size", U32_MAX)
        if self.chunk_size == 0:
            raise _fail(self.TYPE, "Invalid chunk_size 0")
        object.__setattr__(self, "stripes", _legs(self.TYPE, self.stripes))
        if not self.stripes:
            raise _fail(self.TYPE, "Invalid stripe count 0")
        if len(self.stripes) > U32_MAX:
            raise _fail(self.TYPE, "Invalid stripe count")

    def args(self) -> list[str]:
        out = [str(len(self.stripes)), str(self.chunk_size)]
        for leg in self.stripes:
            out += [leg.device, str(leg.offset)]
        return out

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(leg.device for leg in self.stripes)

    def validate_length(self, length: int) -> None:
        self._check_width(len(self.stripes), self.chunk_size, length)

    @classmethod
    def check_length_first(cls, args: Sequence[str], length: int) -> None:
        # dm-stripe.c stripe_ctr divides the length before it counts the destinations.
        if len(args) >= 2 and all(_DIGITS_RE.fullmatch(a) and len(a) < 20 for a in args[:2]):
            count, chunk = int(args[0]), int(args[1])
            if 0 < count <= U32_MAX and 0 < chunk <= U32_MAX:
                cls._check_width(count, chunk, length)

    @classmethod
    def _check_width(cls, count: int, chunk: int, length: int) -> None:
        if length % count:
            raise _fail(cls.TYPE, f"Target length not divisible by number of stripes ({length} % {count})")
        if (length // count) % chunk:
            raise _fail(cls.TYPE, f"Target length not divisible by chunk size ({length}/{count} % {chunk})")

    def map_devices(self, fn: Callable[[str], str]) -> Striped:
        return Striped(self.chunk_size, tuple(Leg(fn(d), o) for d, o in self.stripes))

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Striped:
        if len(args) < 2:
            raise _fail(cls.TYPE, "Not enough arguments: expected <#stripes> <chunk_size> <dev> <offset>...")
        count = _number(cls.TYPE, args[0], "Invalid stripe count", U32_MAX)
        if count == 0:
            raise _fail(cls.TYPE, "Invalid stripe count 0")
        chunk = _number(cls.TYPE, args[1], "Invalid chunk_size", U32_MAX)
        if len(args) != 2 + 2 * count:
            raise _fail(
                cls.TYPE,
                f"Not enough destinations specified: {count} stripes need {2 * count} "
                f"device/offset arguments, got {len(args) - 2}",
            )
        legs = [
            Leg(args[i], _number(cls.TYPE, args[i + 1], "Couldn't parse stripe destination offset"))
            for i in range(2, len(args), 2)
        ]
        return cls(chunk, tuple(legs))


@dataclass(frozen=True)
class Zero(Target):
    """``zero``: reads return zeros, writes are discarded (dm-zero.c; takes no arguments)."""

    TYPE: ClassVar[str] = "zero"

    def args(self) -> list[str]:
        return []

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Zero:
        if args:
            raise _fail(cls.TYPE, "No arguments required")
        return cls()


@dataclass(frozen=True)
class Error(Target):
    """``error``: every I/O fails (dm-target.c).

    Newer kernels read an optional ``<dev> <offset>`` (used for zoned limits); it is kept as
    written, although the kernel prints no parameters for this target. Any other arguments are
    ignored, as the kernel ignores them.
    """

    TYPE: ClassVar[str] = "error"
    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ("device",)
    device: str | None = None
    offset: int = 0

    def __post_init__(self) -> None:
        if self.device is not None:
            _check_device(self.TYPE, self.device)
        _check_int(self.TYPE, self.offset, "offset")
        if self.device is None and self.offset:
            raise _fail(self.TYPE, "an offset needs a device")

    def args(self) -> list[str]:
        return [] if self.device is None else [self.device, str(self.offset)]

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Error:
        # dm-target.c io_err_ctr reads exactly two arguments and ignores any other number of them.
        if len(args) == 2:
            return cls(args[0], _number(cls.TYPE, args[1], "Invalid device sector"))
        return cls()


_SNAPSHOT_FEATURES = ("discard_zeroes_cow", "discard_passdown_origin")


class StoreMode(StrEnum):
    """A snapshot's exception store, valued as tables write it (dm-exception-store.c)."""

    PERSISTENT = "P"
    #: persistent; a full COW fails snapshot writes (``Overflow``) instead of invalidating.
    PERSISTENT_OVERFLOW = "PO"
    TRANSIENT = "N"

    @property
    def persistent(self) -> bool:
        """True for the stores that keep their exceptions on the COW."""
        return self is not StoreMode.TRANSIENT


def _store_mode(target_type: str, text: object) -> StoreMode:
    """What ``dm_exception_store_create`` makes of a store argument (case-insensitive): the first
    letter picks the type; dm-snap-persistent.c takes ``O`` as its first option and refuses any
    other, dm-snap-transient.c ignores its options."""
    if isinstance(text, StoreMode):
        return text
    if not isinstance(text, str) or text[:1].upper() not in ("P", "N"):
        raise _store_failure(target_type, "Exception store type is not P or N")
    if text[:1].upper() == "N":
        return StoreMode.TRANSIENT
    option = text[1:2].upper()
    if option not in ("", "O"):
        raise _store_failure(target_type, "Exception store type constructor failed")
    return StoreMode.PERSISTENT_OVERFLOW if option else StoreMode.PERSISTENT


def _store_failure(target_type: str, reason: str) -> InvalidTable:
    # dm-snap.c snapshot_ctr replaces dm-exception-store.c's reason with its own.
    return _fail(target_type, f"Couldn't create exception store: {reason}")


@dataclass(frozen=True)
class Snapshot(Target):
    """``snapshot <origin> <cow> P|PO|N <chunk_sectors> [<#feat> <feat>...]`` (dm-snap.c).

    ``store`` is a :class:`StoreMode` (its letters are accepted too, in either case).
    ``chunk_size`` 0 means "read it from the COW header" (persistent only). ``features`` are
    ``discard_zeroes_cow`` and ``discard_passdown_origin`` (the latter requires the former), kept
    in the kernel's order. Errors carry dm-snap.c's and dm-exception-store.c's ``ti->error`` texts.
    """

    TYPE: ClassVar[str] = "snapshot"
    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ("origin", "cow")
    origin: str
    cow: str
    store: StoreMode = StoreMode.PERSISTENT
    chunk_size: int = 8
    features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        t = self.TYPE
        _check_device(t, self.origin)
        _check_device(t, self.cow)
        if self.origin == self.cow:
            raise _fail(t, "COW device cannot be the same as origin device")
        object.__setattr__(self, "store", _store_mode(t, self.store))
        _check_int(t, self.chunk_size, "chunk size", U32_MAX)
        if self.chunk_size and not _power_of_two(self.chunk_size):
            raise _store_failure(t, "Chunk size is not a power of 2")
        if self.chunk_size > MAX_SNAPSHOT_CHUNK:
            raise _store_failure(t, "Chunk size is too high")
        if self.chunk_size == 0 and not self.store.persistent:
            raise _fail(t, "Chunk size not set")
        features = _features(t, self.features, _SNAPSHOT_FEATURES, "Unrecognised feature requested", fold=True)
        if "discard_passdown_origin" in features and "discard_zeroes_cow" not in features:
            raise _fail(t, "discard_passdown_origin feature depends on discard_zeroes_cow")
        object.__setattr__(self, "features", features)

    @property
    def persistent(self) -> bool:
        """True for ``P``/``PO`` stores."""
        return self.store.persistent

    @property
    def overflow(self) -> bool:
        """True for ``PO``: a full COW reports ``Overflow`` rather than invalidating."""
        return self.store is StoreMode.PERSISTENT_OVERFLOW

    def args(self) -> list[str]:
        out = [self.origin, self.cow, self.store.value, str(self.chunk_size)]
        if self.features:
            out += [str(len(self.features)), *self.features]
        return out

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Snapshot:
        t = cls.TYPE
        if len(args) < 4:
            raise _fail(t, "requires 4 or more arguments")
        if not _DIGITS_RE.fullmatch(args[3]) or int(args[3]) > U32_MAX:  # kstrtouint
            raise _store_failure(t, "Invalid chunk size")
        rest = list(args[4:])
        if rest:  # dm_read_arg_group: a count of 0..2 and at least that many arguments
            if not _DIGITS_RE.fullmatch(rest[0]) or int(rest[0]) > 2 or int(rest[0]) > len(rest) - 1:
                raise _fail(t, "Invalid number of feature arguments")
            if int(rest[0]) < len(rest) - 1:
                raise _fail(t, f"Too many arguments: {' '.join(rest[1 + int(rest[0]):])!r}")
        return cls(args[0], args[1], _store_mode(t, args[2]), int(args[3]), tuple(rest[1:]))


@dataclass(frozen=True)
class SnapshotMerge(Snapshot):
    """``snapshot-merge``: same arguments as ``snapshot``; persistent stores only (dm-snap.c)."""

    TYPE: ClassVar[str] = "snapshot-merge"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.persistent:
            raise _fail(self.TYPE, "Snapshot exception store does not support snapshot-merge.")


@dataclass(frozen=True)
class SnapshotOrigin(Target):
    """``snapshot-origin <origin_dev>`` (dm-snap.c; exactly one argument)."""

    TYPE: ClassVar[str] = "snapshot-origin"
    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ("origin",)
    origin: str

    def __post_init__(self) -> None:
        _check_device(self.TYPE, self.origin)

    def args(self) -> list[str]:
        return [self.origin]

    @classmethod
    def from_args(cls, args: Sequence[str]) -> SnapshotOrigin:
        if len(args) != 1:
            raise _fail(cls.TYPE, "origin: incorrect number of arguments")  # dm-snap.c origin_ctr
        return cls(args[0])


class MirrorLog(_DeviceFields):
    """A mirror's dirty-region log: ``<log_type> <#log_args> <log_args...>`` (dm-log.c)."""

    log_type: str

    def args(self) -> list[str]:
        """The log's arguments after the argument count."""
        raise NotImplementedError

    @property
    def region_size(self) -> int | None:
        """Region size in sectors, when the log type has one this library knows."""
        return None

    def words(self) -> list[str]:
        """``<log_type> <#log_args> <log_args...>`` as a list."""
        args = self.args()
        return [self.log_type, str(len(args)), *args]

    def __str__(self) -> str:
        return format_args(self.words())


class SyncMode(StrEnum):
    """A mirror log's optional ``sync``/``nosync`` argument, valued as tables write it (dm-log.c
    ``enum sync``)."""

    DEFAULT = ""  #: no argument: resync what the log says is out of sync
    NOSYNC = "nosync"  #: the legs are known to be in sync
    FORCESYNC = "sync"  #: resync every region


def _log_fail(reason: str) -> InvalidTable:
    """dm-raid1.c's ``ti->error`` for a log constructor failure, with dm-log.c's reason."""
    return _fail("mirror", f"Error creating mirror dirty log: {reason}")


def _sync_mode(sync: object) -> SyncMode:
    """What dm-log.c ``create_log_context`` makes of the optional sync argument (``None``: none)."""
    if sync is None:
        return SyncMode.DEFAULT
    if isinstance(sync, str) and sync in list(SyncMode):  # a member, or its text
        return SyncMode(sync)
    if sync == "block_on_error":
        raise _log_fail("block_on_error is no longer a log argument (removed in Linux 2.6.22); "
                        "use the handle_errors feature")
    raise _log_fail(f"unrecognised sync argument to dirty region log: {sync}")


def _check_region(region_size: object) -> None:
    if not int_in(region_size, 0, U32_MAX):
        raise _log_fail(f"invalid region size {region_size!r}")
    if region_size < 2 or not _power_of_two(region_size):
        raise _log_fail(f"invalid region size {region_size}: a power of 2, at least 2")


@dataclass(frozen=True)
class CoreLog(MirrorLog):
    """``core <1|2> <region_size> [sync|nosync]``: the log lives in memory only."""

    region: int
    sync: SyncMode = SyncMode.DEFAULT
    log_type: str = field(default="core", init=False)

    def __post_init__(self) -> None:
        _check_region(self.region)
        object.__setattr__(self, "sync", _sync_mode(self.sync))

    @property
    def region_size(self) -> int:
        return self.region

    def args(self) -> list[str]:
        return [str(self.region)] + ([self.sync.value] if self.sync else [])


@dataclass(frozen=True)
class DiskLog(MirrorLog):
    """``disk <2|3> <log_dev> <region_size> [sync|nosync]``: the log is kept on ``device``."""

    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ("device",)
    device: str
    region: int
    sync: SyncMode = SyncMode.DEFAULT
    log_type: str = field(default="disk", init=False)

    def __post_init__(self) -> None:
        _check_device("mirror", self.device)
        _check_region(self.region)
        object.__setattr__(self, "sync", _sync_mode(self.sync))

    @property
    def region_size(self) -> int:
        return self.region

    def args(self) -> list[str]:
        return [self.device, str(self.region)] + ([self.sync.value] if self.sync else [])


@dataclass(frozen=True)
class OtherLog(MirrorLog):
    """Any other log type (``userspace``, ``clustered-disk``...), its arguments kept verbatim."""

    log_type: str
    log_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.log_type, str) or not self.log_type or self.log_type[0].isdigit():
            raise _fail("mirror", f"invalid log type {self.log_type!r}")
        _check_device("mirror", self.log_type)
        object.__setattr__(self, "log_args", tuple(self.log_args))
        for arg in self.log_args:
            _check_device("mirror", arg)

    def args(self) -> list[str]:
        return list(self.log_args)


def _parse_log(words: Sequence[str]) -> tuple[MirrorLog, int]:
    """dm-raid1.c ``create_dirty_log``, then dm-log.c's core/disk constructors (``create_log_context``)."""
    if len(words) < 2:
        raise _fail("mirror", "Insufficient mirror log arguments")
    log_type = words[0]
    count = _number("mirror", words[1], "Invalid mirror log argument count", U32_MAX)
    if len(words) < 2 + count:
        raise _fail("mirror", "Insufficient mirror log arguments")
    args = list(words[2 : 2 + count])
    if log_type not in ("core", "disk"):
        return OtherLog(log_type, tuple(args)), 2 + count
    disk = log_type == "disk"
    if not 1 + disk <= count <= 2 + disk:
        raise _log_fail(f"wrong number of arguments to {'disk ' * disk}dirty region log")
    sync = _sync_mode(args[1 + disk] if count == 2 + disk else None)
    if not _DIGITS_RE.fullmatch(args[disk]) or int(args[disk]) > U32_MAX:
        raise _log_fail(f"invalid region size {args[disk][:40]}")
    log = DiskLog(args[0], int(args[1]), sync) if disk else CoreLog(int(args[0]), sync)
    return log, 2 + count


_MIRROR_FEATURES = ("handle_errors", "keep_log")


@dataclass(frozen=True)
class Mirror(Target):
    """``mirror <log> <#legs> <dev> <offset>... [<#features> <feature>...]`` (dm-raid1.c).

    ``legs`` holds 2 to 9 ``(device, offset)`` pairs; leg 0 is the default (primary) leg.
    ``features`` are ``handle_errors`` and ``keep_log`` (which requires ``handle_errors``).
    """

    TYPE: ClassVar[str] = "mirror"
    log: MirrorLog
    legs: tuple[Leg, ...]
    features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        t = self.TYPE
        if not isinstance(self.log, MirrorLog):
            raise _fail(t, f"log must be a CoreLog, DiskLog or OtherLog, not {self.log!r}")
        object.__setattr__(self, "legs", _legs(t, self.legs))
        if not 2 <= len(self.legs) <= MAX_NR_MIRRORS:
            raise _fail(t, f"Invalid number of mirrors {len(self.legs)} (2 to {MAX_NR_MIRRORS})")
        features = _features(t, self.features, _MIRROR_FEATURES, "Unrecognised feature requested: {!r}")
        if "keep_log" in features and "handle_errors" not in features:
            raise _fail(t, "keep_log feature requires the handle_errors feature")
        object.__setattr__(self, "features", features)

    @property
    def handle_errors(self) -> bool:
        """Leg failures are handled (failover, events) rather than ignored."""
        return "handle_errors" in self.features

    @property
    def keep_log(self) -> bool:
        """The log is kept when it fails (requires handle_errors)."""
        return "keep_log" in self.features

    @property
    def region_size(self) -> int | None:
        """The log's region size in sectors."""
        return self.log.region_size

    def region_count(self, length: int) -> int | None:
        """Regions of a ``length``-sector mirror: ``ceil(length / region_size)`` (dm-raid1.c)."""
        region = self.log.region_size
        return None if region is None else -(-length // region)

    def args(self) -> list[str]:
        out = self.log.words() + [str(len(self.legs))]
        for leg in self.legs:
            out += [leg.device, str(leg.offset)]
        if self.features:
            out += [str(len(self.features)), *self.features]
        return out

    @property
    def devices(self) -> tuple[str, ...]:
        return self.log.devices + tuple(leg.device for leg in self.legs)

    def validate_length(self, length: int) -> None:
        region = self.log.region_size  # dm-log.c _check_region_size, create_log_context
        if region is not None and region > length:
            raise _log_fail(f"invalid region size {region}: larger than the target ({length} sectors)")
        if region is not None and -(-length // region) > U32_MAX:
            raise _log_fail(f"region count exceeds limit of {U32_MAX}")

    def map_devices(self, fn: Callable[[str], str]) -> Mirror:
        return Mirror(self.log.map_devices(fn), tuple(Leg(fn(d), o) for d, o in self.legs), self.features)

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Mirror:
        t = cls.TYPE
        log, used = _parse_log(args)
        rest = list(args[used:])
        if not rest:
            raise _fail(t, "Invalid number of mirrors: missing")
        count = _number(t, rest[0], "Invalid number of mirrors", U32_MAX)
        if not 2 <= count <= MAX_NR_MIRRORS:
            raise _fail(t, f"Invalid number of mirrors {count} (2 to {MAX_NR_MIRRORS})")
        rest = rest[1:]
        if len(rest) < 2 * count:
            raise _fail(t, f"Too few mirror arguments: {count} legs need {2 * count}, got {len(rest)}")
        legs = [Leg(rest[i], _number(t, rest[i + 1], "Invalid offset")) for i in range(0, 2 * count, 2)]
        rest = rest[2 * count :]
        features: list[str] = []
        if rest:
            nfeat = _number(t, rest[0], "Invalid number of features", U32_MAX)
            if nfeat > len(rest) - 1:
                raise _fail(t, "Not enough arguments to support feature count")
            if nfeat < len(rest) - 1:
                raise _fail(t, f"Too many mirror arguments: {' '.join(rest[1 + nfeat:])!r}")
            features = rest[1:]
        return cls(log, tuple(legs), tuple(features))


#: dm-thin.c pool_status (STATUSTYPE_TABLE): the feature words in the order the kernel prints them.
THIN_POOL_FEATURES = ("skip_block_zeroing", "ignore_discard", "no_discard_passdown", "read_only", "error_if_no_space")
#: dm-thin.c DATA_DEV_BLOCK_SIZE_MIN_SECTORS (64 KiB); block sizes are multiples of it.
MIN_THIN_BLOCK_SECTORS = 128
#: dm-thin.c DATA_DEV_BLOCK_SIZE_MAX_SECTORS (1 GiB).
MAX_THIN_BLOCK_SECTORS = 2097152
#: dm-thin.c MAX_DEV_ID: device ids are 24 bits.
MAX_THIN_DEV_ID = (1 << 24) - 1
#: dm-thin.c parse_pool_features: dm_read_arg_group with at most 4 feature words.
_MAX_POOL_FEATURE_ARGS = 4


def _thin_block_size_ok(value: int) -> bool:
    """dm-thin.c pool_ctr: 128 <= size <= 2097152 and a multiple of 128 (the kernel masks with 127)."""
    return MIN_THIN_BLOCK_SECTORS <= value <= MAX_THIN_BLOCK_SECTORS and value % MIN_THIN_BLOCK_SECTORS == 0


@dataclass(frozen=True)
class ThinPool(Target):
    """``thin-pool <metadata dev> <data dev> <block size> <low water mark> [<#feat> <feat>...]``.

    dm-thin.c ``pool_ctr``: ``block_size`` is the data block size in sectors (128..2097152, a
    multiple of 128), ``low_water_mark`` a count of free data blocks that raises an event.
    ``features`` are words of :data:`THIN_POOL_FEATURES`, matched case-insensitively and kept in
    the kernel's order; at most four of them fit (the kernel reads a group of 0 to 4 words).

    The kernel prints the feature count even when it is 0, and ends every word, the last one
    included, with a space (``253:0 253:1 128 0 0 ``); :attr:`params` is exactly that text. LVM's
    own order and spacing (``... 1 skip_block_zeroing``) parse to the same value.
    """

    TYPE: ClassVar[str] = "thin-pool"
    SINGLETON: ClassVar[bool] = True  # dm-thin.c pool_target.features
    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ("metadata", "data")
    metadata: str
    data: str
    block_size: int = MIN_THIN_BLOCK_SECTORS
    low_water_mark: int = 0
    features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        t = self.TYPE
        _check_device(t, self.metadata)
        _check_device(t, self.data)
        if self.metadata == self.data:
            raise _fail(t, "Error setting metadata or data device: they are the same device")
        _check_int(t, self.block_size, "Invalid block size", U64_MAX)
        if not _thin_block_size_ok(self.block_size):
            raise _fail(
                t,
                f"Invalid block size {self.block_size}: {MIN_THIN_BLOCK_SECTORS} to "
                f"{MAX_THIN_BLOCK_SECTORS} sectors, a multiple of {MIN_THIN_BLOCK_SECTORS}",
            )
        _check_int(t, self.low_water_mark, "Invalid low water mark")
        raw = self.features
        if isinstance(raw, Sequence) and not isinstance(raw, str) and len(raw) > _MAX_POOL_FEATURE_ARGS:
            raise _fail(t, f"Invalid number of pool feature arguments {len(raw)} (0 to 4)")
        unknown = "Unrecognised pool feature requested: {!r}"
        object.__setattr__(self, "features", _features(t, raw, THIN_POOL_FEATURES, unknown, fold=True))

    @property
    def zero_new_blocks(self) -> bool:
        """New data blocks are zeroed before first use (no ``skip_block_zeroing``)."""
        return "skip_block_zeroing" not in self.features

    @property
    def discard_enabled(self) -> bool:
        """Discards are handled (no ``ignore_discard``)."""
        return "ignore_discard" not in self.features

    @property
    def discard_passdown(self) -> bool:
        """Discards are passed down to the data device (no ``no_discard_passdown``)."""
        return "no_discard_passdown" not in self.features

    @property
    def read_only(self) -> bool:
        """The pool is loaded read-only (``read_only``)."""
        return "read_only" in self.features

    @property
    def error_if_no_space(self) -> bool:
        """I/O fails at once when data space runs out, rather than being queued."""
        return "error_if_no_space" in self.features

    def args(self) -> list[str]:
        return [
            self.metadata, self.data, str(self.block_size), str(self.low_water_mark),
            str(len(self.features)), *self.features,
        ]

    @property
    def params(self) -> str:
        # dm-thin.c pool_status: DMEMIT("%u ", count) and DMEMIT("<feature> ") - a trailing space.
        return format_args(self.args()) + " "

    def data_blocks(self, length: int) -> int:
        """Data blocks a pool target of ``length`` sectors provides (dm-thin.c ``pool_preresume``)."""
        return length // self.block_size

    @classmethod
    def from_args(cls, args: Sequence[str]) -> ThinPool:
        t = cls.TYPE
        if len(args) < 4:
            raise _fail(t, f"Invalid argument count: expected <metadata dev> <data dev> <block size> "
                           f"<low water mark> [<#features> <feature>...], got {len(args)} arguments")
        block_size = _number(t, args[2], "Invalid block size")
        low_water = _number(t, args[3], "Invalid low water mark")
        rest = list(args[4:])
        features: list[str] = []
        if rest:
            count = _number(t, rest[0], "Invalid number of pool feature arguments", U32_MAX)
            if count > _MAX_POOL_FEATURE_ARGS:
                raise _fail(t, f"Invalid number of pool feature arguments {count} (0 to 4)")
            if count > len(rest) - 1:
                raise _fail(t, "Invalid number of pool feature arguments: not enough arguments "
                               "for the feature count")
            # dm-thin.c parse_pool_features reads the group and pool_ctr never looks past it:
            # words after the group are accepted and dropped (the table printed back has none).
            features = rest[1 : 1 + count]
        return cls(args[0], args[1], block_size, low_water, tuple(features))


@dataclass(frozen=True)
class Thin(Target):
    """``thin <pool dev> <dev id> [<external origin dev>]`` (dm-thin.c ``thin_ctr``).

    ``pool`` is the thin-pool device (LVM's ``-tpool``), ``dev_id`` the 24-bit id of a device
    made by ``create_thin``/``create_snap``; ``origin`` an optional read-only external origin
    whose data unprovisioned blocks read.
    """

    TYPE: ClassVar[str] = "thin"
    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ("pool", "origin")
    pool: str
    dev_id: int
    origin: str | None = None

    def __post_init__(self) -> None:
        t = self.TYPE
        _check_device(t, self.pool)
        _check_int(t, self.dev_id, "Invalid device id", MAX_THIN_DEV_ID)
        if self.origin is not None:
            _check_device(t, self.origin)
            if self.origin == self.pool:
                raise _fail(t, "Error setting origin device: it is the pool device")

    def args(self) -> list[str]:
        return [self.pool, str(self.dev_id)] + ([self.origin] if self.origin is not None else [])

    @classmethod
    def from_args(cls, args: Sequence[str]) -> Thin:
        t = cls.TYPE
        if len(args) not in (2, 3):
            raise _fail(t, f"Invalid argument count: expected <pool dev> <dev id> [<external origin "
                           f"dev>], got {len(args)} arguments")
        dev_id = _number(t, args[1], "Invalid device id", MAX_THIN_DEV_ID)
        return cls(args[0], dev_id, args[2] if len(args) == 3 else None)


#: Target type name -> typed class. Types not listed parse to :class:`GenericTarget`.
TARGET_TYPES: dict[str, type[Target]] = {
    cls.TYPE: cls
    for cls in (Linear, Striped, Zero, Error, Snapshot, SnapshotMerge, SnapshotOrigin, Mirror, ThinPool, Thin)
}
