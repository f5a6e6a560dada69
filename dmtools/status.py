"""Parsers for the targets' status text (``dmsetup status``), as immutable values.

Each status value formats back to the kernel's text exactly (``format()``/``str()``), so the
userspace targets build a status value and print it, and the kernel's text parses into the same
value: ``parse_X(text).format() == text`` for every text the kernel prints.

Formats (the kernel's STATUSTYPE_INFO output):

* ``snapshot`` / ``snapshot-merge`` (dm-snap.c ``snapshot_status``, dm-snap-persistent.c
  ``persistent_usage``): exactly one of ``Invalid``, ``Merge failed``, ``Overflow``,
  ``<allocated>/<total> <metadata>`` (sectors) or ``Unknown``. libdm also accepts the legacy
  two-field ``<allocated>/<total>`` of old kernels.
* ``mirror`` (dm-raid1.c ``mirror_status``, dm-log.c ``core_status``/``disk_status``):
  ``<#legs> <dev>... <in_sync>/<regions> 1 <health letters> <#log_args> <log_args...>`` where the
  log part is ``1 core`` or ``3 disk <logdev> <A|D|F>``; for example
  ``2 253:1 253:2 2048/2048 1 AA 1 core``.
* ``striped`` (dm-stripe.c ``stripe_status``): ``<#stripes> <dev>... 1 <A|D per stripe>``.
* ``thin-pool`` (dm-thin.c ``pool_status``): ``Fail``, ``Error``, or ``<transaction id>
  <used>/<total metadata blocks> <used>/<total data blocks> <held root|-> <rw|ro|out_of_data_space>
  <discard> <error_if_no_space|queue_if_no_space> <needs_check|-> <metadata low watermark> `` with
  a space after every word; the older, shorter shapes are accepted too (see
  :class:`ThinPoolStatus`).
* ``thin`` (dm-thin.c ``thin_status``): ``Fail``, ``Error``, ``-`` or ``<mapped sectors>
  <highest mapped sector|->``.
* ``linear``, ``zero``, ``error``, ``snapshot-origin``: the empty string.

Errors are :class:`~dmtools.errors.InvalidStatus` naming the target type and the text.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Union

from dmtools.errors import InvalidStatus
from dmtools.target_values import format_args, split_args
from dmtools.units import int_in

__all__ = [
    "SnapshotState",
    "SnapshotStatus",
    "LegHealth",
    "LogHealth",
    "MirrorStatus",
    "StripedStatus",
    "PoolMode",
    "ThinPoolStatus",
    "ThinStatus",
    "EmptyStatus",
    "GenericStatus",
    "TargetStatus",
    "parse_snapshot_status",
    "parse_mirror_status",
    "parse_striped_status",
    "parse_thin_pool_status",
    "parse_thin_status",
    "parse_status",
    "EMPTY_STATUS_TYPES",
]

_WS_RE = re.compile(r"[ \t\n\v\f\r]+")
_NUM_RE = re.compile(r"[0-9]{1,20}")
_RATIO_RE = re.compile(r"([0-9]{1,20})/([0-9]{1,20})")

#: Targets whose INFO status is always empty (no status function, or one that prints nothing).
EMPTY_STATUS_TYPES = frozenset({"linear", "zero", "error", "snapshot-origin"})


def _words(target_type: str, params: str) -> list[str]:
    """The words of a status line, split as table text is (``dm_split_args``): a device the
    userspace engine names by a path with white space in it is escaped as in its table."""
    if not isinstance(params, str):
        raise InvalidStatus(f"{target_type} status must be a string, not {type(params).__name__}")
    return split_args(params)


def _bad(target_type: str, params: str, reason: str) -> InvalidStatus:
    return InvalidStatus(f"{target_type} status {params[:120]!r}: {reason}")


def _num(target_type: str, params: str, word: str, what: str) -> int:
    if not _NUM_RE.fullmatch(word):
        raise _bad(target_type, params, f"{what} {word[:40]!r} is not a number")
    return int(word)


def _counted(target_type: str, params: str, what: str) -> tuple[list[str], int]:
    """The words of a status that opens with a count of devices, and that count."""
    words = _words(target_type, params)
    if not words:
        raise _bad(target_type, params, "empty")
    return words, _num(target_type, params, words[0], what)


def _counts(status: object, target_type: str, *names: str, optional: bool = False) -> None:
    """Raise :class:`InvalidStatus` unless each field ``names`` of ``status`` is a non-negative
    integer (or ``None`` when ``optional``)."""
    for name in names:
        value = getattr(status, name)
        if not (int_in(value) or optional and value is None):
            raise InvalidStatus(f"{target_type} status: {name} must be a non-negative integer"
                                + (" or None" if optional else ""))


class _Status:
    """A parsed status: ``str()`` is the kernel's text (``format()``)."""

    def format(self) -> str:
        """The kernel's text for this status."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.format()


# -- snapshot ----------------------------------------------------------------------------------


class SnapshotState(enum.Enum):
    """What a snapshot's status line says (dm-snap.c ``snapshot_status``, in the kernel's order)."""

    #: Usage figures are reported: the snapshot is valid.
    ACTIVE = "active"
    #: ``Invalid``: the COW filled up or an I/O error happened; every I/O fails.
    INVALID = "Invalid"
    #: ``Merge failed``: a merge hit an error and stopped; I/O is served normally.
    MERGE_FAILED = "Merge failed"
    #: ``Overflow``: a ``PO`` snapshot ran out of COW space; writes fail, reads work.
    OVERFLOW = "Overflow"
    #: ``Unknown``: the store reports no usage (unreachable for P and N stores).
    UNKNOWN = "Unknown"


_SNAPSHOT_WORDS = {s.value: s for s in SnapshotState if s is not SnapshotState.ACTIVE}


@dataclass(frozen=True)
class SnapshotStatus(_Status):
    """Status of a ``snapshot`` or ``snapshot-merge`` target.

    For ``ACTIVE``, ``allocated`` and ``total`` are sectors (allocated includes the header and
    metadata chunks) and ``metadata`` is the metadata sectors, or ``None`` in the legacy two-field
    form. For the other states all three are ``None``.
    """

    state: SnapshotState
    allocated: int | None = None
    total: int | None = None
    metadata: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.state, SnapshotState):
            raise InvalidStatus(f"snapshot state must be a SnapshotState, not {self.state!r}")
        if self.state is SnapshotState.ACTIVE:
            _counts(self, "snapshot", "allocated", "total")
            _counts(self, "snapshot", "metadata", optional=True)
        elif (self.allocated, self.total, self.metadata) != (None, None, None):
            raise InvalidStatus(f"snapshot status {self.state.value!r} carries no usage figures")

    @classmethod
    def usage(cls, allocated: int, total: int, metadata: int | None) -> SnapshotStatus:
        """An ``ACTIVE`` status with usage figures in sectors."""
        return cls(SnapshotState.ACTIVE, allocated, total, metadata)

    @property
    def valid(self) -> bool:
        """False only for ``Invalid``."""
        return self.state is not SnapshotState.INVALID

    @property
    def percent(self) -> float | None:
        """Allocated as a percentage of the COW size (``None`` without usage or size)."""
        if self.allocated is None or not self.total:
            return None
        return 100.0 * self.allocated / self.total

    @property
    def merge_done(self) -> bool:
        """True when a merge has finished: allocated == metadata (snapshot.rst)."""
        return self.state is SnapshotState.ACTIVE and self.metadata is not None and self.allocated == self.metadata

    def format(self) -> str:
        """The kernel's text for this status."""
        if self.state is not SnapshotState.ACTIVE:
            return self.state.value
        text = f"{self.allocated}/{self.total}"
        return text if self.metadata is None else f"{text} {self.metadata}"


def parse_snapshot_status(params: str, target_type: str = "snapshot") -> SnapshotStatus:
    """Parse a ``snapshot``/``snapshot-merge`` status; raises :class:`InvalidStatus`."""
    words = _words(target_type, params)
    text = " ".join(words)
    if text in _SNAPSHOT_WORDS:
        return SnapshotStatus(_SNAPSHOT_WORDS[text])
    if len(words) not in (1, 2):
        raise _bad(target_type, params, "expected <allocated>/<total> [<metadata>], Invalid, "
                   "Merge failed, Overflow or Unknown")
    ratio = _RATIO_RE.fullmatch(words[0])
    if ratio is None:
        raise _bad(target_type, params, f"{words[0][:40]!r} is not <allocated>/<total>")
    metadata = _num(target_type, params, words[1], "metadata") if len(words) == 2 else None
    return SnapshotStatus.usage(int(ratio.group(1)), int(ratio.group(2)), metadata)


# -- mirror ------------------------------------------------------------------------------------


class LegHealth(enum.Enum):
    """A mirror leg's health letter: the most severe error seen (dm-raid1.c ``device_status_char``)."""

    ALIVE = "A"
    """No failures."""
    FLUSH_FAILED = "F"
    """A flush failed."""
    DEAD = "D"
    """A write failed; the leg is out of sync."""
    SYNC_FAILED = "S"
    """A resynchronisation failed; the leg is out of sync."""
    READ_FAILED = "R"
    """A read failed; the data is unaffected."""
    UNKNOWN = "U"
    """An error of no known kind."""

    @property
    def meaning(self) -> str:
        """A short description for people."""
        return _LEG_MEANINGS[self]


_LEG_MEANINGS = {
    LegHealth.ALIVE: "alive",
    LegHealth.FLUSH_FAILED: "flush failed",
    LegHealth.DEAD: "write failed (out of sync)",
    LegHealth.SYNC_FAILED: "resync failed (out of sync)",
    LegHealth.READ_FAILED: "read failed (data unaffected)",
    LegHealth.UNKNOWN: "unknown error",
}


class LogHealth(enum.Enum):
    """A disk log's health letter (dm-log.c ``disk_status``)."""

    ALIVE = "A"
    """The log device works."""
    FLUSH_FAILED = "F"
    """Flushing the log device failed."""
    DEAD = "D"
    """The log device failed."""


@dataclass(frozen=True)
class MirrorStatus(_Status):
    """Status of a ``mirror`` target.

    ``devices`` are the legs as the kernel names them (``major:minor``), ``in_sync``/``regions``
    the region counts, ``health`` one :class:`LegHealth` letter per leg, and ``log_args`` the
    log's status words (``("core",)`` or ``("disk", "253:3", "A")``).
    """

    devices: tuple[str, ...]
    in_sync: int
    regions: int
    health: str
    log_args: tuple[str, ...] = ("core",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        object.__setattr__(self, "log_args", tuple(self.log_args))
        if not self.devices:
            raise InvalidStatus("mirror status: no legs")
        for dev in (*self.devices, *self.log_args):
            if not isinstance(dev, str) or not dev:
                raise InvalidStatus(f"mirror status: {dev!r} is not a device or word")
        _counts(self, "mirror", "in_sync", "regions")
        if not isinstance(self.health, str) or len(self.health) != len(self.devices):
            raise InvalidStatus(
                f"mirror status: {len(self.devices)} legs need {len(self.devices)} health "
                f"letters, got {self.health!r}"
            )
        for letter in self.health:
            try:
                LegHealth(letter)
            except ValueError as err:
                raise InvalidStatus(f"mirror status: unknown leg health letter {letter!r}") from err
        if not self.log_args:
            raise InvalidStatus("mirror status: the log status is missing")
        if self.log_args[0] == "disk":
            if len(self.log_args) != 3:
                raise InvalidStatus("mirror status: a disk log reports 3 words: disk <dev> <A|D|F>")
            try:
                LogHealth(self.log_args[2])
            except ValueError as err:
                raise InvalidStatus(f"mirror status: unknown log health letter {self.log_args[2]!r}") from err
        elif self.log_args[0] == "core" and len(self.log_args) != 1:
            raise InvalidStatus("mirror status: a core log reports 1 word: core")

    @property
    def legs(self) -> int:
        """Number of legs."""
        return len(self.devices)

    @property
    def leg_health(self) -> tuple[LegHealth, ...]:
        """Each leg's health, in leg order."""
        return tuple(LegHealth(c) for c in self.health)

    @property
    def in_sync_complete(self) -> bool:
        """True when every region is in sync."""
        return self.in_sync == self.regions

    @property
    def sync_percent(self) -> float:
        """Regions in sync as a percentage (100.0 for a mirror without regions)."""
        return 100.0 if not self.regions else 100.0 * self.in_sync / self.regions

    @property
    def healthy(self) -> bool:
        """Every leg alive and the log (if on disk) alive."""
        return set(self.health) <= {"A"} and self.log_health in (None, LogHealth.ALIVE)

    @property
    def log_type(self) -> str:
        """``core``, ``disk`` or another log type's name."""
        return self.log_args[0]

    @property
    def log_device(self) -> str | None:
        """The disk log's device, or ``None``."""
        return self.log_args[1] if self.log_type == "disk" else None

    @property
    def log_health(self) -> LogHealth | None:
        """The disk log's health, or ``None`` for other logs."""
        return LogHealth(self.log_args[2]) if self.log_type == "disk" else None

    def format(self) -> str:
        """The kernel's text for this status."""
        return format_args(
            [str(len(self.devices)), *self.devices, f"{self.in_sync}/{self.regions}", "1",
             self.health, str(len(self.log_args)), *self.log_args]
        )


def parse_mirror_status(params: str) -> MirrorStatus:
    """Parse a ``mirror`` status; raises :class:`InvalidStatus`."""
    t = "mirror"
    words, count = _counted(t, params, "leg count")
    if count == 0 or len(words) < count + 5:
        raise _bad(t, params, f"too short for {count} legs")
    devices = tuple(words[1 : 1 + count])
    ratio = _RATIO_RE.fullmatch(words[1 + count])
    if ratio is None:
        raise _bad(t, params, f"{words[1 + count][:40]!r} is not <in_sync>/<regions>")
    if words[2 + count] != "1":
        raise _bad(t, params, f"expected 1 status argument, got {words[2 + count][:40]!r}")
    health = words[3 + count]
    nlog = _num(t, params, words[4 + count], "log argument count")
    log_args = tuple(words[5 + count :])
    if len(log_args) != nlog:
        raise _bad(t, params, f"the log reports {nlog} arguments but {len(log_args)} follow")
    try:
        return MirrorStatus(devices, int(ratio.group(1)), int(ratio.group(2)), health, log_args)
    except InvalidStatus as err:
        raise _bad(t, params, err.message) from err


# -- striped -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StripedStatus(_Status):
    """Status of a ``striped`` target: the stripes' devices and one ``A``/``D`` letter each."""

    devices: tuple[str, ...]
    health: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        if not self.devices:
            raise InvalidStatus("striped status: no stripes")
        for dev in self.devices:
            if not isinstance(dev, str) or not dev:
                raise InvalidStatus(f"striped status: {dev!r} is not a device")
        if not isinstance(self.health, str) or len(self.health) != len(self.devices) or set(self.health) - {"A", "D"}:
            raise InvalidStatus(f"striped status: expected one A or D per stripe, got {self.health!r}")

    @property
    def healthy(self) -> bool:
        """No stripe has seen an I/O error."""
        return "D" not in self.health

    def format(self) -> str:
        """The kernel's text for this status."""
        return format_args([str(len(self.devices)), *self.devices, "1", self.health])


def parse_striped_status(params: str) -> StripedStatus:
    """Parse a ``striped`` status; raises :class:`InvalidStatus`."""
    t = "striped"
    words, count = _counted(t, params, "stripe count")
    if len(words) != count + 3:
        raise _bad(t, params, f"expected {count + 3} words for {count} stripes, got {len(words)}")
    if words[1 + count] != "1":
        raise _bad(t, params, f"expected 1 status argument, got {words[1 + count][:40]!r}")
    try:
        return StripedStatus(tuple(words[1 : 1 + count]), words[2 + count])
    except InvalidStatus as err:
        raise _bad(t, params, err.message) from err


# -- thin-pool and thin ------------------------------------------------------------------------


class PoolMode(enum.Enum):
    """A thin pool's mode word (dm-thin.c ``pool_status``)."""

    WRITE = "rw"
    """Normal operation."""
    READ_ONLY = "ro"
    """Read-only: the ``read_only`` feature, ``needs_check``, a metadata failure, or out of
    metadata space (the kernel reports that internal mode as ``ro`` too)."""
    OUT_OF_DATA_SPACE = "out_of_data_space"
    """No free data block: writes that need one are queued or failed."""


_POOL_DISCARDS = ("ignore_discard", "discard_passdown", "no_discard_passdown")
_POOL_NO_SPACE = ("error_if_no_space", "queue_if_no_space")


@dataclass(frozen=True)
class ThinPoolStatus(_Status):
    """Status of a ``thin-pool`` target.

    ``fail`` is the whole status ``Fail`` (pool in fail mode), ``error`` the whole status
    ``Error`` (a metadata query failed); both leave every other field ``None``. Otherwise the
    metadata counts are 4 KiB metadata blocks (``used_metadata`` includes the kernel's reserve),
    the data counts are data blocks, and ``held_root`` is the held metadata snapshot's block or
    ``None`` (``-``).

    Older kernels print fewer fields (thin.md §3.2); the missing ones are ``None`` and
    :meth:`format` prints the same shape back: without ``mode`` the 4-field form, without
    ``no_space`` the 6-field form (both without a trailing space), without ``needs_check`` the
    7-field form, without ``metadata_low_watermark`` the 8-field form. Words the kernel does not
    print (vendor additions) are kept in ``extra``, printed last.
    """

    transaction_id: int | None = None
    used_metadata: int | None = None
    total_metadata: int | None = None
    used_data: int | None = None
    total_data: int | None = None
    held_root: int | None = None
    mode: PoolMode | None = None
    discard: str | None = None
    no_space: str | None = None
    needs_check: bool | None = None
    metadata_low_watermark: int | None = None
    fail: bool = False
    error: bool = False
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", tuple(self.extra))
        counts = ("transaction_id", "used_metadata", "total_metadata", "used_data", "total_data")
        if self.fail or self.error:
            if self.fail and self.error:
                raise InvalidStatus("thin-pool status: Fail and Error exclude each other")
            if any(getattr(self, n) is not None for n in counts) or self.mode is not None or self.extra:
                raise InvalidStatus("thin-pool status: Fail and Error carry no other fields")
            return
        _counts(self, "thin-pool", *counts)
        _counts(self, "thin-pool", "held_root", "metadata_low_watermark", optional=True)
        if self.mode is not None and not isinstance(self.mode, PoolMode):
            raise InvalidStatus(f"thin-pool status: mode must be a PoolMode, not {self.mode!r}")
        if self.discard is not None and self.discard not in _POOL_DISCARDS:
            raise InvalidStatus(f"thin-pool status: unknown discard word {self.discard!r}")
        if self.no_space is not None and self.no_space not in _POOL_NO_SPACE:
            raise InvalidStatus(f"thin-pool status: unknown no-space word {self.no_space!r}")
        shape = (self.mode, self.discard, self.no_space, self.needs_check, self.metadata_low_watermark)
        given = [v is not None for v in shape]
        if given != sorted(given, reverse=True) or given[0] != given[1]:
            raise InvalidStatus(
                "thin-pool status: mode and discard come together, and each later field needs the "
                "earlier ones (thin.md §3.2 shapes)"
            )
        for word in self.extra:
            if not isinstance(word, str) or not word or _WS_RE.search(word):
                raise InvalidStatus(f"thin-pool status: {word!r} is not a single word")

    @property
    def read_only(self) -> bool:
        """The pool reports ``ro`` (read-only, or out of metadata space)."""
        return self.mode is PoolMode.READ_ONLY

    @property
    def out_of_data_space(self) -> bool:
        """The pool reports ``out_of_data_space``."""
        return self.mode is PoolMode.OUT_OF_DATA_SPACE

    @property
    def error_if_no_space(self) -> bool:
        """I/O fails at once (rather than queueing) when the data space is full."""
        return self.no_space == "error_if_no_space"

    @property
    def free_data(self) -> int | None:
        """Free data blocks."""
        if self.total_data is None or self.used_data is None:
            return None
        return self.total_data - self.used_data

    @property
    def data_percent(self) -> float | None:
        """Data use in percent, as LVM computes it (used / total; 0.0 for an empty pool)."""
        if self.total_data is None or self.used_data is None:
            return None
        return 100.0 * self.used_data / self.total_data if self.total_data else 0.0

    @property
    def metadata_percent(self) -> float | None:
        """Metadata use in percent (the kernel's reserve counts as used)."""
        if self.total_metadata is None or self.used_metadata is None:
            return None
        return 100.0 * self.used_metadata / self.total_metadata if self.total_metadata else 0.0

    @property
    def healthy(self) -> bool:
        """Neither failed nor in error, writable, no check needed."""
        return not self.fail and not self.error and self.mode in (None, PoolMode.WRITE) and not self.needs_check

    def format(self) -> str:
        """The kernel's text for this status."""
        if self.fail:
            return "Fail"
        if self.error:
            return "Error"
        words = [
            str(self.transaction_id),
            f"{self.used_metadata}/{self.total_metadata}",
            f"{self.used_data}/{self.total_data}",
            "-" if self.held_root is None else str(self.held_root),
        ]
        if self.mode is not None and self.discard is not None:
            words += [self.mode.value, self.discard]
        trailing = self.no_space is not None
        if self.no_space is not None:
            words.append(self.no_space)
        if self.needs_check is not None:
            words.append("needs_check" if self.needs_check else "-")
        if self.metadata_low_watermark is not None:
            words.append(str(self.metadata_low_watermark))
        words += self.extra
        text = " ".join(words)
        return text + " " if trailing else text


def parse_thin_pool_status(params: str) -> ThinPoolStatus:
    """Parse a ``thin-pool`` status of any kernel (thin.md §3.1, §3.2); raises :class:`InvalidStatus`.

    The five leading fields are read by position and the rest as keywords, as libdm does, but
    strictly: a word that is neither a known keyword nor the metadata low watermark (a number
    after the needs_check word) is kept in ``extra``.
    """
    t = "thin-pool"
    words = _words(t, params)
    if words == ["Fail"]:
        return ThinPoolStatus(fail=True)
    if words == ["Error"]:
        return ThinPoolStatus(error=True)
    if len(words) < 4:
        raise _bad(t, params, "expected <transaction id> <used>/<total metadata> "
                   "<used>/<total data> <held root|-> [...], Fail or Error")
    tid = _num(t, params, words[0], "transaction id")
    meta = _RATIO_RE.fullmatch(words[1])
    data = _RATIO_RE.fullmatch(words[2])
    if meta is None or data is None:
        bad = words[1] if meta is None else words[2]
        raise _bad(t, params, f"{bad[:40]!r} is not <used>/<total>")
    held = None if words[3] == "-" else _num(t, params, words[3], "held metadata root")
    fields: dict[str, object] = {}
    extra: list[str] = []
    rest = words[4:]
    if rest:
        try:
            fields["mode"] = PoolMode(rest[0])
        except ValueError:
            raise _bad(t, params, f"unknown pool mode {rest[0][:40]!r}") from None
        if len(rest) < 2 or rest[1] not in _POOL_DISCARDS:
            raise _bad(t, params, "the mode is followed by ignore_discard, discard_passdown or "
                       "no_discard_passdown")
        fields["discard"] = rest[1]
        rest = rest[2:]
    if rest and rest[0] in _POOL_NO_SPACE:
        fields["no_space"] = rest[0]
        rest = rest[1:]
        if rest and rest[0] in ("needs_check", "-"):
            fields["needs_check"] = rest[0] == "needs_check"
            rest = rest[1:]
            if rest and _NUM_RE.fullmatch(rest[0]):
                fields["metadata_low_watermark"] = int(rest[0])
                rest = rest[1:]
    for word in rest:
        if word in _POOL_DISCARDS or word in _POOL_NO_SPACE or word in ("needs_check", "ro", "rw"):
            raise _bad(t, params, f"{word!r} is out of place")
        extra.append(word)
    try:
        return ThinPoolStatus(
            tid, int(meta.group(1)), int(meta.group(2)), int(data.group(1)), int(data.group(2)),
            held, extra=tuple(extra), **fields,  # type: ignore[arg-type]
        )
    except InvalidStatus as err:
        raise _bad(t, params, err.message) from err


@dataclass(frozen=True)
class ThinStatus(_Status):
    """Status of a ``thin`` target (dm-thin.c ``thin_status``).

    ``mapped_sectors`` is mapped blocks × block size; ``highest_mapped`` the last sector of the
    highest mapped block, ``None`` (``-``) when nothing is mapped: an empty device shows ``0 -``.
    ``fail`` is the whole status ``Fail`` (the pool failed), ``error`` the whole status ``Error``
    (a lookup failed) and ``unopened`` the whole status ``-`` (no device open); each leaves the
    counts ``None``.
    """

    mapped_sectors: int | None = None
    highest_mapped: int | None = None
    fail: bool = False
    error: bool = False
    unopened: bool = False

    def __post_init__(self) -> None:
        if sum((self.fail, self.error, self.unopened)) > 1:
            raise InvalidStatus("thin status: Fail, Error and - exclude each other")
        if self.fail or self.error or self.unopened:
            if self.mapped_sectors is not None or self.highest_mapped is not None:
                raise InvalidStatus("thin status: Fail, Error and - carry no counts")
            return
        _counts(self, "thin", "mapped_sectors")
        _counts(self, "thin", "highest_mapped", optional=True)

    def format(self) -> str:
        """The kernel's text for this status."""
        if self.fail:
            return "Fail"
        if self.error:
            return "Error"
        if self.unopened:
            return "-"
        return f"{self.mapped_sectors} {'-' if self.highest_mapped is None else self.highest_mapped}"


def parse_thin_status(params: str) -> ThinStatus:
    """Parse a ``thin`` status; raises :class:`InvalidStatus`."""
    t = "thin"
    words = _words(t, params)
    if words in (["Fail"], ["Error"], ["-"]):
        return ThinStatus(fail=words[0] == "Fail", error=words[0] == "Error", unopened=words[0] == "-")
    if len(words) != 2:
        raise _bad(t, params, "expected <mapped sectors> <highest mapped sector|->, Fail, Error or -")
    mapped = _num(t, params, words[0], "mapped sectors")
    highest = None if words[1] == "-" else _num(t, params, words[1], "highest mapped sector")
    return ThinStatus(mapped, highest)


# -- the rest ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmptyStatus(_Status):
    """The empty status of ``linear``, ``zero``, ``error`` and ``snapshot-origin``."""

    target_type: str

    def format(self) -> str:
        """The kernel's text: nothing."""
        return ""


@dataclass(frozen=True)
class GenericStatus(_Status):
    """The status of a target type without a parser here, kept verbatim."""

    target_type: str
    text: str = field(default="")

    def format(self) -> str:
        """The text as given."""
        return self.text


TargetStatus = Union[
    SnapshotStatus, MirrorStatus, StripedStatus, ThinPoolStatus, ThinStatus, EmptyStatus, GenericStatus
]


def parse_status(target_type: str, params: str) -> TargetStatus:
    """Parse one target's status text by its type; unknown types give :class:`GenericStatus`.

    Raises :class:`InvalidStatus` when a known type's text is malformed.
    """
    if target_type in ("snapshot", "snapshot-merge"):
        return parse_snapshot_status(params, target_type)
    if target_type == "mirror":
        return parse_mirror_status(params)
    if target_type == "striped":
        return parse_striped_status(params)
    if target_type == "thin-pool":
        return parse_thin_pool_status(params)
    if target_type == "thin":
        return parse_thin_status(params)
    if target_type in EMPTY_STATUS_TYPES:
        if _words(target_type, params):
            raise _bad(target_type, params, "this target reports no status")
        return EmptyStatus(target_type)
    if not isinstance(params, str):
        raise InvalidStatus(f"{target_type} status must be a string")
    return GenericStatus(target_type, params)
