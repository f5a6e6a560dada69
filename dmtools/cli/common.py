"""What every ``dmtools`` sub-command shares: the backend it opens, its output, argument types.

Kept apart from :mod:`dmtools.cli.main` (which loads the sub-commands) so that a sub-command
imports this and never the root that imports it. Tests replace :func:`open_backend` here.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from dmtools.errors import DMError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Any


def actions(sub: Any, name: str, help: str, doc: str | None = None, *, dest: str | None = None,
            metavar: str = "ACTION", **options: Any) -> tuple[argparse.ArgumentParser, Any]:
    """Add command ``name`` to ``sub`` whose first operand is one of its actions: returns its parser
    and the collection to ``verb`` the actions into (``args.NAME_action`` holds the one given).
    ``doc`` (a module docstring) is its ``--help`` description, kept as written."""
    layout = {} if doc is None else {"description": doc, "formatter_class": argparse.RawDescriptionHelpFormatter}
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, **layout)
    collection = parser.add_subparsers(dest=dest or f"{name}_action", metavar=metavar, **options)
    collection.required = True
    return parser, collection


def verb(sub: Any, name: str, func: Callable[[argparse.Namespace], int], help: str, *operands: str,
         **parser_options: Any) -> argparse.ArgumentParser:
    """Add sub-command ``name`` to ``sub`` (an ``add_subparsers`` result) that runs ``func``.

    Each operand is a positional argument named as written: ``"name"`` is shown ``name``, ``"NAME"``
    is shown ``NAME``, both read into ``args.name``; a last ``?``, ``+`` or ``*`` is its ``nargs``.
    ``parser_options`` go to ``add_parser`` (``description``, ``aliases``, ...)."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help, **parser_options)
    for word in operands:
        nargs = word[-1] if word[-1] in "?+*" else None
        word = word.rstrip("?+*")
        p.add_argument(word.lower(), metavar=word if word.isupper() else None, nargs=nargs)
    p.set_defaults(func=func)
    return p


def json_option(p: argparse.ArgumentParser, help: str = "JSON output") -> None:
    """The command's own ``--json`` (SUPPRESS keeps the root parser's when this one is not given)."""
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=help)


def columns(rows: list[list[str]]) -> str:
    """``rows`` (the first is the header) as left-aligned columns, losetup style: the last column
    is not padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(" ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + " " + r[-1] for r in rows)


def progress_options(p: argparse.ArgumentParser) -> None:
    """``--progress[=FD]`` and ``--quiet``, read by ``kcopyd.progress.reporter_for``."""
    p.add_argument("--progress", "-p", nargs="?", const="bar", default=None, metavar="FD",
                   help="show a progress bar, or with =FD write 'N/100' lines to file descriptor FD")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar even on a terminal")


#: how many of a device's last monitor events ``snapshot status`` and ``mirror status`` show.
STATUS_EVENTS = 5


def state_dir_option(p: argparse.ArgumentParser) -> None:
    """``--state-dir`` of the status commands: where the monitor keeps the events they show."""
    p.add_argument("--state-dir", metavar="DIR", default=None,
                   help="read the last events from this monitor state directory (as 'dmtools "
                   "monitor --state-dir'; default the monitor's, /run/dmtools/monitor as root)")


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


def emit(args: argparse.Namespace, data: Any, text: Callable[[], str] | str) -> int:
    """Print ``data`` as JSON with ``--json``, else the human text. Returns 0, the exit status of a
    command whose last step this is (``return emit(...)``)."""
    if getattr(args, "json", False):
        import json  # only for --json: its decoder and scanner come with it

        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        out = text() if callable(text) else text
        if out:
            print(out)
    return 0


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
