"""Root of the ``dmtools`` command line: global options, sub-command discovery, one error path."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dmtools.cli.common import close_backends, one_line
from dmtools.errors import DMError
from dmtools.plugins import entry_points

log = logging.getLogger("dmtools")

#: Sub-commands that live in dmtools itself: name -> "module:function" taking the sub-parsers.
BUILTIN_COMMANDS = {
    "dm": "dmtools.cli.dm_cmd:register",
    "loop": "dmtools.cli.loop_cmd:register",
    "nbd": "dmtools.cli.nbd_cmd:register",
    "daemon": "dmtools.engine.cli:register_daemon",
    "monitor": "dmtools.cli.monitor_cmd:register",
    "serve": "dmtools.cli.serve_cmd:register",
}


def _load(spec: str) -> Callable[[Any], None]:
    import importlib

    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Build the parser: built-in commands plus the ``dmtools.commands`` entry points.

    With ``only``, just that sub-command is imported and registered (start-up stays fast: each
    sub-command pulls in its own package); ``None`` registers them all (``--help``, unknown names).
    """
    parser = argparse.ArgumentParser(
        prog="dmtools",
        description="Linux device-mapper toolkit: tables, snapshots, mirrors and kcopyd, "
        "on the kernel or the embedded userspace engine.",
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "kernel", "userspace"),
        default="auto",
        help="device-mapper engine (default: the kernel where /dev/mapper/control works)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output for listings")
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    registered: set[str] = set()
    for name, spec in BUILTIN_COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            _load(spec)(sub)
        except ImportError as err:  # a part that is not installed is reported, not fatal
            log.debug("command %s unavailable: %s", name, err)
            continue
        registered.add(name)
    if only is not None and only in registered:
        return parser
    for ep in sorted(entry_points("dmtools.commands"), key=lambda e: e.name):
        if ep.name in registered or (only is not None and ep.name != only):
            continue
        try:
            ep.load()(sub)
        except ImportError as err:
            log.debug("command %s unavailable: %s", ep.name, err)
            continue
        registered.add(ep.name)
    return parser


GLOBAL_FLAGS = ("--json", "--debug")


def hoist_globals(argv: Sequence[str]) -> list[str]:
    """Move the global options to the front so ``dmtools dm ls --json`` works like ``--json dm ls``."""
    front: list[str] = []
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":
            rest.append(arg)
            rest.extend(it)
            break
        if arg in GLOBAL_FLAGS or arg.startswith("--backend="):
            front.append(arg)
        elif arg == "--backend":
            front.append(arg)
            front.append(next(it, ""))
        else:
            rest.append(arg)
    return front + rest


def _command_named(argv: Sequence[str]) -> str | None:
    """The sub-command ``argv`` names, if it is a known one (global options already in front)."""
    it = iter(argv)
    for arg in it:
        if arg == "--backend":
            next(it, None)
        elif not arg.startswith("-"):
            if arg in BUILTIN_COMMANDS:  # found without reading the installed entry points
                return arg
            return arg if arg in {ep.name for ep in entry_points("dmtools.commands")} else None
        elif arg in ("-h", "--help"):
            return None
    return None


def main(argv: Sequence[str] | None = None, *, propagate: bool = False) -> int:
    """Run the CLI; return the exit status. With ``propagate`` exceptions are re-raised (tests)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any("\0" in arg for arg in argv):  # an exec'd command line cannot hold one; a caller's list can
        print("dmtools: an argument contains a NUL byte", file=sys.stderr)
        return 2
    hoisted = hoist_globals(argv)
    parser = build_parser(_command_named(hoisted))
    args = parser.parse_args(hoisted)
    # A sub-command that declares its own --json/--debug would reset the global value with its
    # default (argparse copies sub-parser defaults over the parent's): the flag given wins.
    options = argv[: argv.index("--")] if "--" in argv else argv
    for flag in GLOBAL_FLAGS:
        if flag in options:
            setattr(args, flag.lstrip("-"), True)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="dmtools: %(levelname)s: %(message)s",
    )
    args.opened_backends = []
    try:
        rc = args.func(args)
        return int(rc or 0)
    except (DMError, OSError) as err:
        if propagate:
            raise
        if args.debug:
            log.exception("failed")
        print(f"dmtools: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if propagate:
            raise
        print("dmtools: interrupted", file=sys.stderr)
        return 130
    finally:
        close_backends(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
