"""The devices one request names: they must not share bytes, and must not be in use elsewhere.

Every command that takes two or more devices (a snapshot's origin and COW, a mirror's legs and
log, an export's inputs and output, a copy's source and destinations) checks its arguments here
before it opens anything for writing. Identity is :mod:`dmtools.identity`'s: a symlink, a relative
path, ``/dev/block/M:m``, ``M:m``, a second loop device over the same file or a ``linear`` device
over it all name the same bytes. "In use" is the kernel's notion: a live table of a backend maps
those bytes (``bd_claim`` of the devices a table uses, drivers/md/dm-table.c ``dm_get_device``).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Union

from dmtools.errors import DeviceBusy, DeviceNotFound, DMError
from dmtools.identity import Identity, devno_of, ensure_disjoint, identify, users
from dmtools.nbd.uri import is_nbd_uri

if TYPE_CHECKING:  # pragma: no cover
    from dmtools.backend import DeviceMapper

__all__ = ["Ref", "check_devices", "check_not_in_use", "live_backends"]

Ref = Union[str, os.PathLike[str], Identity]  # no string: a ForwardRef compiles it at import


def live_backends(*, kernel: bool = True) -> list["DeviceMapper"]:
    """The backends whose tables can hold a device now: the kernel's where it works (unless
    ``kernel`` is false: the caller knows no kernel table can map its devices), and the userspace
    engine's daemon when one runs (never started for this). The caller closes them."""
    out: list[DeviceMapper] = []
    if kernel:
        from dmtools.backends import kernel_available

        if kernel_available():
            from dmtools.kernel import KernelBackend

            out.append(KernelBackend())
    from dmtools.engine import rundir

    if not os.path.lexists(rundir.socket_path()):
        return out  # no daemon: no userspace tables (its client's connect() would say ENOENT)
    from dmtools.engine.client import open_userspace

    with contextlib.suppress(DMError, OSError):  # no daemon: no userspace tables
        out.append(open_userspace(start=False))
    return out


def _stack(ref: str, dm: "DeviceMapper") -> set[str]:
    """Names of ``dm``'s devices that ``ref`` is, or stacks on (through ``deps``): they map the
    role's bytes because the role *is* them, not because someone else holds it."""
    devno = devno_of(ref)
    if devno is None:
        return set()
    names = {(e.major, e.minor): e.name for e in dm.list()}
    seen: set[tuple[int, int]] = set()
    todo = [devno]
    while todo:
        d = todo.pop()
        if d in seen or d not in names:
            continue
        seen.add(d)
        try:
            todo.extend(dm.deps(names[d]))
        except DMError:
            continue
    return {names[d] for d in seen}


def check_not_in_use(idents: Mapping[str, Identity], backends: Iterable["DeviceMapper"], *, operation: str) -> None:
    """Raise ``DeviceBusy`` when a live table of any backend maps a byte of any role's device."""
    for dm in backends:
        for role, ident in idents.items():
            holders = users(ident, dm)
            if holders:
                own = _stack(ident.ref, dm)  # a dm device given as the role maps its own bytes
                if is_nbd_uri(ident.ref) and len(ident.via) > 1:  # an export served from a device
                    own |= _stack(ident.via[1], dm)  # is written through it (dmtools.nbd.peer)
                holders = [n for n in holders if n not in own]
            if holders:
                raise DeviceBusy(
                    f"{role} {ident.ref} is in use by device {', '.join(holders)}"
                    + (f" ({ident.describe()})" if ident.describe() != ident.ref else ""),
                    errno=errno.EBUSY,
                    operation=operation,
                    device=ident.ref,
                )


def check_devices(roles: Mapping[str, Ref], *, backends: Sequence["DeviceMapper"], operation: str,
                  in_use: Sequence[str] = (), missing_ok: Iterable[str] = ()) -> dict[str, Identity]:
    """Identify every role's device; refuse two that share bytes, and the roles of ``in_use``
    (all roles when it holds ``"*"``) that a live table of one of ``backends`` maps. Roles in
    ``missing_ok`` whose device no longer exists are left out.

    References are resolved through the userspace backend among ``backends`` when there is one
    (its devices, exposed or not), else through the first (the kernel's are also found in sysfs).
    Returns the identities by role. Raises ``DeviceConflict`` (two roles alias: the message names
    both and how), ``DeviceBusy`` (in use, naming the device that holds it), ``DeviceNotFound``.
    """
    dm = next((b for b in backends if b.backend == "userspace"), backends[0] if backends else None)
    present: dict[str, Ref] = {}
    missing = set(missing_ok)
    for role, ref in roles.items():
        if role in missing and not isinstance(ref, Identity):
            try:
                ref = identify(ref, dm=dm)
            except DeviceNotFound:
                continue  # gone (a failed leg's device removed): it shares nothing
        present[role] = ref
    idents = ensure_disjoint(present, dm=dm)
    wanted = {r: i for r, i in idents.items() if "*" in in_use or r in in_use}
    if wanted:
        check_not_in_use(wanted, backends, operation=operation)
    return idents
