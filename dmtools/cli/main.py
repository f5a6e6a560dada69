"""Root of the ``dmtools`` command line: global options, sub-command discovery, one error path."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable, Sequence

from dmtools.cli.common import close_backends, one_line
from dmtools.cli.lean import HelpFormatter, leave
from dmtools.errors import DMError
from dmtools.lazy import configure_logging
from dmtools.plugins import entry_points

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Any

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
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


#: How a command module states its ``SUMMARY`` so that ``--help`` can read it without importing.
_SUMMARY_LINE = re.compile(r'^SUMMARY = "([^"\\]*)"$', re.MULTILINE)


def _summary(spec: str) -> str | None:
    """A command's one line for ``--help``: the ``SUMMARY = "..."`` line of the module its
    ``register`` lives in, read from the source so that neither the module nor its package is
    imported (``copy`` would pull in kcopyd); a module without that line is imported and asked.
    ``None`` when it has no ``SUMMARY`` at all."""
    module = spec.partition(":")[0]
    origin = _source_of(module)
    if origin is not None:
        try:
            with open(origin, encoding="utf-8") as f:
                found = _SUMMARY_LINE.search(f.read())
        except OSError:
            found = None
        if found is not None:
            return found.group(1)
    summary = getattr(importlib.import_module(module), "SUMMARY", None)
    return summary if isinstance(summary, str) else None


def _source_of(module: str) -> str | None:
    """The ``.py`` file of ``module``, found by the import system's finders without importing
    the module or its parent packages (``importlib.util.find_spec`` would import the parents)."""
    path = None
    spec = None
    parts = module.split(".")
    for depth in range(1, len(parts) + 1):
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(".".join(parts[:depth]), path) if find is not None else None
            if spec is not None:
                break
        if spec is None:
            return None
        path = spec.submodule_search_locations
    origin = spec.origin if spec is not None else None
    return origin if origin is not None and origin.endswith(".py") else None


def _commands() -> dict[str, Any]:
    """Every sub-command, not yet loaded: name -> ``"module:function"`` (the built-in ones) or the
    ``dmtools.commands`` entry point (a plugin cannot replace a built-in command)."""
    found: dict[str, Any] = dict(BUILTIN_COMMANDS)
    for ep in sorted(entry_points("dmtools.commands"), key=lambda e: e.name):
        found.setdefault(ep.name, ep)
    return found


def build_parser(only: str | None = None, *, summaries: bool = False,
                 commands: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """Build the parser: built-in commands plus the ``dmtools.commands`` entry points.

    With ``only``, just that sub-command is imported and registered (start-up stays fast: each
    sub-command pulls in its own package); ``None`` registers them all. With ``summaries`` (what
    ``--help`` and a missing or unknown command need) a command is listed by the ``SUMMARY`` of
    its module, without building its parser; one whose module has no ``SUMMARY`` is registered
    in full. ``commands``: what :func:`_commands` gave, when the caller has it already (the
    installed entry points are then not read again).
    """
    parser = argparse.ArgumentParser(
        prog="dmtools",
        description="Linux device-mapper toolkit: tables, snapshots, mirrors and kcopyd, "
        "on the kernel or the embedded userspace engine.",
        formatter_class=HelpFormatter,  # argparse's own imports shutil for the width
    )
    parser.add_argument("--backend", choices=("auto", "kernel", "userspace"), default="auto",
                        help="device-mapper engine (default: the kernel where /dev/mapper/control works)")
    parser.add_argument("--json", action="store_true", help="machine-readable output for listings")
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    if only in BUILTIN_COMMANDS:
        commands = {only: BUILTIN_COMMANDS[only]}
    elif commands is None:
        commands = _commands()
    for name, where in commands.items():
        if only is not None and name != only:
            continue
        try:
            spec = where if isinstance(where, str) else getattr(where, "value", None)
            summary = _summary(spec) if summaries and spec else None
            if summary is not None:
                sub.add_parser(name, help=summary, add_help=False)
            else:
                (_load(where) if isinstance(where, str) else where.load())(sub)
        except ImportError as err:  # a part that is not installed is reported, not fatal
            _log().debug("command %s unavailable: %s", name, err)
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


def _command_named(argv: Sequence[str], found: dict[str, Any] | None = None) -> str | None:
    """The sub-command ``argv`` names, if it is a known one (global options already in front).
    ``found``: a dict that receives :func:`_commands` when the entry points had to be read."""
    it = iter(argv)
    for arg in it:
        if arg == "--backend":
            next(it, None)
        elif not arg.startswith("-"):
            if arg in BUILTIN_COMMANDS:  # found without reading the installed entry points
                return arg
            commands = _commands()
            if found is not None:
                found.update(commands)
            return arg if arg in commands else None
        elif arg in ("-h", "--help"):
            return None
    return None


def _log() -> Any:
    import logging

    return logging.getLogger("dmtools")


def main(argv: Sequence[str] | None = None, *, propagate: bool = False) -> int:
    """Run the CLI; return the exit status. With ``propagate`` exceptions are re-raised (tests)."""
    argv_given = argv
    argv = sys.argv[1:] if argv is None else list(argv)
    if any("\0" in arg for arg in argv):  # an exec'd command line cannot hold one; a caller's list can
        print("dmtools: an argument contains a NUL byte", file=sys.stderr)
        return 2
    hoisted = hoist_globals(argv)
    found: dict[str, Any] = {}
    command = _command_named(hoisted, found)  # ``copy``, a plugin's command, reads the entry points once
    parser = build_parser(command, summaries=command is None, commands=found or None)
    args = parser.parse_args(hoisted)
    # A sub-command that declares its own --json/--debug would reset the global value with its
    # default (argparse copies sub-parser defaults over the parent's): the flag given wins.
    options = argv[: argv.index("--")] if "--" in argv else argv
    for flag in GLOBAL_FLAGS:
        if flag in options:
            setattr(args, flag.lstrip("-"), True)
    hook = configure_logging("dmtools", args.debug)
    args.opened_backends = []
    if argv_given is None and command in FAST_EXIT:
        # The process's own copy: the cyclic collector is off while it loads and sets up what it
        # runs (objects that live until exit), and on again once it runs (kcopyd.__main__).
        import gc

        gc.disable()
        args.start_up_gc_off = True
    try:
        code = int(args.func(args) or 0)
    except (DMError, OSError) as err:
        if propagate:
            raise
        if args.debug:
            _log().exception("failed")
        print(f"dmtools: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if propagate:
            raise
        print("dmtools: interrupted", file=sys.stderr)
        return 130
    finally:
        close_backends(args)
        if hook is not None:
            hook.remove()
    if argv_given is None and command in FAST_EXIT:
        leave(code, "dmtools")  # the process's own command line: no interpreter teardown
    return code


#: Commands that leave without the interpreter's teardown once done (:func:`dmtools.cli.lean.leave`)
#: when ``main`` runs the process's own command line.
FAST_EXIT = frozenset({"copy"})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
