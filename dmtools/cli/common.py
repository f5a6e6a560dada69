"""What every ``dmtools`` sub-command shares: the backend it opens, its output, argument types.

Kept apart from :mod:`dmtools.cli.main` (which loads the sub-commands) so that a sub-command
imports this and never the root that imports it. Tests replace :func:`open_backend` here.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from dmtools.errors import DMError

def open_backend(args: argparse.Namespace) -> Any:
    """Open the ``DeviceMapper`` backend named by ``--backend``; ``main`` closes it at the end."""
    import dmtools

    dm = dmtools.open(args.backend)
    opened = getattr(args, "opened_backends", None)
    if opened is not None:
        opened.append(dm)
    return dm


def close_backends(args: argparse.Namespace) -> None:
    """Close what :func:`open_backend` opened for this command (``main`` calls it at the end)."""
    for dm in getattr(args, "opened_backends", ()):
        try:
            dm.close()
        except (DMError, OSError) as err:  # the command's outcome stands; a failed close is noted
            import logging

            logging.getLogger("dmtools").debug("closing %r: %s", dm, err)


def one_line(err: BaseException) -> str:
    """The error as one line (libdevmapper's captured log may span several)."""
    return "; ".join(part.strip() for part in str(err).splitlines() if part.strip())


def emit(args: argparse.Namespace, data: Any, text: Callable[[], str] | str) -> None:
    """Print ``data`` as JSON with ``--json``, else the human text."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        out = text() if callable(text) else text
        if out:
            print(out)


def device_argument(text: str) -> str:
    """An argparse ``type`` for a device operand: a relative path is made absolute in the caller's
    working directory (``MAJ:MIN``, URIs and absolute paths stay as given), so it names the same
    file wherever it travels (the daemon has a working directory of its own)."""
    from dmtools.engine.protocol import absolute_reference

    return absolute_reference(text) if text else text


def seconds(text: str) -> float:
    """An argparse ``type`` for a time in seconds: a finite number, 0 or more (``nan`` or
    ``inf`` would wait forever, a negative time means nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"seconds must be a finite number, 0 or more, not {text!r}")
    return value


def log_argument(text: str) -> str:
    """``device_argument`` for a mirror log operand, keeping the keyword ``core``."""
    return text if text == "core" else device_argument(text)
