"""``dmtools dm …``: dmsetup's verbs and table syntax on either backend."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dmtools.cli import common as cli_common
from dmtools.cli.common import actions, emit, verb
from dmtools.errors import InvalidArgument
from dmtools.linux import block_attr

#: The one line ``dmtools --help`` shows for this command (read without building its parser).
SUMMARY = "device-mapper verbs (dmsetup's words and table syntax)"

#: What dmsetup prints when a verb over all devices finds none (``dmsetup.c`` ``_process_all``).
NO_DEVICES = "No devices found"


def _asdict(value: Any) -> dict[str, Any]:
    """``dataclasses.asdict``, imported when a verb prints (``dmtools --help`` needs none of it)."""
    from dataclasses import asdict

    return asdict(value)


class IntermixedParser(argparse.ArgumentParser):
    """A verb's parser taking options and operands in any order, as dmsetup (getopt) does.

    Plain argparse stops filling optional positionals once an option came between them
    (``create NAME --uuid U TABLE_FILE`` would leave ``TABLE_FILE`` unrecognised).
    """

    _intermixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Any = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing:  # the two passes of parse_known_intermixed_args
            return super().parse_known_args(args, namespace)
        args = list(sys.argv[1:] if args is None else args)
        self._intermixing = True
        try:
            if "--" in args:
                return self._parse_operands_after_dashes(args, namespace)
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def _parse_operands_after_dashes(self, args: list[str], namespace: Any) -> tuple[argparse.Namespace, list[str]]:
        """Options before ``--``; everything after it is an operand (a name such as ``-x``).

        ``parse_known_intermixed_args`` drops the ``--`` in its first pass (Python 3.11), so the
        operands after it were read as options: the options are taken from the words before
        ``--`` with the positionals switched off, then the positionals from what is left.
        """
        cut = args.index("--")
        positionals = self._get_positional_actions()
        saved = [(a, a.nargs, a.default) for a in positionals]
        for action in positionals:
            action.nargs = argparse.SUPPRESS
            action.default = argparse.SUPPRESS
        try:
            namespace, words = super().parse_known_args(args[:cut], namespace)
        finally:
            for action, nargs, default in saved:
                action.nargs, action.default = nargs, default
        unknown = [w for w in words if w.startswith("-")]
        operands = [w for w in words if not w.startswith("-")]
        optionals = self._get_optional_actions()
        required = [(a, a.required) for a in optionals]
        for action in optionals:
            action.required = False
        try:
            namespace, extra = super().parse_known_args(operands + args[cut:], namespace)
        finally:
            for action, was in required:
                action.required = was
        return namespace, unknown + extra


def _read_table(args: argparse.Namespace, *, required: bool) -> str | None:
    """The table from ``--table`` (``;`` separates lines), a table file, or stdin when piped."""
    given = [
        opt
        for opt, present in (
            ("--table", args.table is not None),
            ("a table file", bool(getattr(args, "table_file", None))),
            ("--notable", getattr(args, "notable", False)),
        )
        if present
    ]
    if len(given) > 1:
        raise InvalidArgument(f"{' and '.join(given)} exclude each other", operation=args.verb)
    if args.table is not None:
        return "\n".join(part.strip() for part in args.table.split(";"))
    if getattr(args, "table_file", None):
        try:
            with open(args.table_file, encoding="utf-8") as f:
                return f.read()
        except OSError as err:
            raise InvalidArgument(f"cannot read table file: {err.strerror}", errno=err.errno,
                                  device=args.table_file) from err
        except UnicodeDecodeError as err:
            raise InvalidArgument(f"table file is not UTF-8 text (byte {err.start})", device=args.table_file) from err
    if getattr(args, "notable", False):
        return None
    if sys.stdin is not None and not sys.stdin.isatty():  # None: started with stdin closed
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError as err:
            raise InvalidArgument(f"the table on stdin is not UTF-8 text (byte {err.start})") from err
        if text.strip():
            return text
    if required:
        raise InvalidArgument("no table given (--table TEXT, a table file, or stdin)")
    return None


def _create(args: argparse.Namespace) -> int:
    from dmtools.table import Table

    text = _read_table(args, required=False)
    table = Table.parse(text) if text is not None else None
    dm = cli_common.open_backend(args)
    info = dm.create(args.name, table, uuid=args.uuid or "", readonly=args.readonly)
    return emit(args, _asdict(info), "")


def _load(args: argparse.Namespace) -> int:
    from dmtools.table import Table

    text = _read_table(args, required=True)
    assert text is not None
    cli_common.open_backend(args).load(args.name, Table.parse(text), readonly=args.readonly)
    return 0


def _suspend(args: argparse.Namespace) -> int:
    dm = cli_common.open_backend(args)
    for name in args.names:
        dm.suspend(name, noflush=args.noflush)
    return 0


def _resume(args: argparse.Namespace) -> int:
    dm = cli_common.open_backend(args)
    for name in args.names:
        dm.resume(name)
    return 0


def _remove(args: argparse.Namespace) -> int:
    dm = cli_common.open_backend(args)
    for name in args.names:
        dm.remove(name, retry=args.retry, deferred=args.deferred)
    return 0


def _clear(args: argparse.Namespace) -> int:
    cli_common.open_backend(args).clear(args.name)
    return 0


def _rename(args: argparse.Namespace) -> int:
    cli_common.open_backend(args).rename(args.name, args.new_name)
    return 0


def _ls(args: argparse.Namespace) -> int:
    entries = sorted(cli_common.open_backend(args).list(), key=lambda e: e.name)
    if not entries and not args.json:
        print(NO_DEVICES)
        return 0
    return emit(args, [_asdict(e) for e in entries],
                lambda: "\n".join(f"{e.name}\t({e.major}:{e.minor})" for e in entries))


def _names(dm: Any, args: argparse.Namespace) -> list[str]:
    return list(args.names) if args.names else sorted(e.name for e in dm.list())


def _table(args: argparse.Namespace) -> int:
    dm = cli_common.open_backend(args)
    tables = {name: dm.table(name, inactive=args.inactive) for name in _names(dm, args)}
    _emit_per_device(args, {name: t.dmsetup_text().splitlines() for name, t in tables.items()},
                     {name: str(t) for name, t in tables.items()})
    return 0


def _status(args: argparse.Namespace) -> int:
    """``status`` and ``measure`` (STATUSTYPE_IMA): the same lines, as dmsetup prints both."""
    dm = cli_common.open_backend(args)
    verb = dm.measure if args.verb == "measure" else dm.status
    statuses = {name: verb(name, inactive=args.inactive) for name in _names(dm, args)}
    _emit_per_device(args,
                     {name: [line.dmsetup_text().rstrip("\n") for line in lines] for name, lines in statuses.items()},
                     {name: "\n".join(str(line) for line in lines) for name, lines in statuses.items()})
    return 0


def _emit_per_device(args: argparse.Namespace, text: dict[str, list[str]], data: dict[str, str]) -> None:
    """``dmsetup table|status|measure`` layout: one named device bare, several or all prefixed ``NAME: ``.

    ``text`` holds dmsetup's lines (``"%llu %llu %s %s"``: a target without parameters keeps the
    space); ``data`` is the ``--json`` form, the canonical table text that ``Table.parse`` reads.
    A device without a table prints an empty line (bare) or ``NAME: `` (prefixed), as dmsetup does.
    """
    if args.json:
        emit(args, data, "")
    elif len(text) == 1 and args.names:
        print("\n".join(next(iter(text.values()))))
    elif not text:
        print(NO_DEVICES)
    else:
        for name, lines in text.items():
            for line in lines or [""]:
                print(f"{name}: {line}")


def read_ahead(info: Any) -> int | None:
    """Read-ahead in sectors as ``dmsetup info`` prints it, or None where there is none to read.

    libdm reads ``/sys/dev/block/MAJ:MIN/bdi/read_ahead_kb`` and doubles it
    (``libdm/libdm-common.c`` ``get_dev_node_read_ahead``); a kernel device without a table has no
    disk registered yet and dmsetup then prints no ``Read Ahead`` line. On the userspace backend
    the number is the exposing loop device's.
    """
    kb = block_attr((info.major, info.minor), "bdi/read_ahead_kb") if info.major else None
    return int(kb) * 2 if kb is not None and kb.isdigit() else None


def format_info(info: Any, readahead: int | None = None) -> str:
    """One device in ``dmsetup info``'s layout (``libdm/dm-tools/dmsetup.c`` ``_display_info_long``)."""
    state = info.state + (" (READ-ONLY)" if info.read_only else "")
    state += " (DEFERRED REMOVE)" if info.deferred_remove else ""
    tables = " & ".join(t for t, present in (("LIVE", info.live_table), ("INACTIVE", info.inactive_table)) if present)
    rows = [("Name", info.name), ("State", state)]
    if readahead is not None:
        rows.append(("Read Ahead", str(readahead)))
    rows += [
        ("Tables present", tables or "None"),
        ("Open count", str(info.open_count)),
        ("Event number", str(info.event_nr)),
        ("Major, minor", f"{info.major}, {info.minor}"),
        ("Number of targets", str(info.target_count)),
    ]
    lines = [f"{k + ':':<19}{v}" for k, v in rows]
    if info.uuid:
        lines.append(f"UUID: {info.uuid}")  # not aligned in dmsetup either
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    dm = cli_common.open_backend(args)
    infos = [(info, read_ahead(info)) for info in (dm.info(name) for name in _names(dm, args))]
    data = [dict(_asdict(info), read_ahead=ra) for info, ra in infos]
    # dmsetup ends every device with an empty line; print() adds the last newline.
    return emit(args, data, lambda: "".join(format_info(i, ra) + "\n\n" for i, ra in infos)[:-1] or NO_DEVICES)


def _deps(args: argparse.Namespace) -> int:
    dm = cli_common.open_backend(args)
    out = {name: dm.deps(name) for name in _names(dm, args)}

    def text() -> str:
        lines = []
        for name, deps in out.items():
            body = f"{len(deps)} dependencies\t:" + "".join(f" ({a}, {b})" for a, b in deps)
            lines.append(body if len(out) == 1 and args.names else f"{name}: {body}")
        return "\n".join(lines) or NO_DEVICES

    return emit(args, {k: [f"{a}:{b}" for a, b in v] for k, v in out.items()}, text)


def _targets(args: argparse.Namespace) -> int:
    targets = cli_common.open_backend(args).targets()
    return emit(args, {k: ".".join(map(str, v)) for k, v in targets.items()},
                lambda: "\n".join(f"{k:<16} v{'.'.join(map(str, v))}" for k, v in targets.items()))


def _version(args: argparse.Namespace) -> int:
    v = cli_common.open_backend(args).version()
    # dmsetup's two lines; a backend other than the kernel says which it is on a third
    other = v.backend and v.backend != "kernel"
    return emit(
               args,
               _asdict(v),
               f"Library version:   {v.library}\nDriver version:    {v.driver}"
               + (f"\nBackend:           {v.backend}" if other else ""),
    )


def _message(args: argparse.Namespace) -> int:
    resp = cli_common.open_backend(args).message(args.name, args.sector, " ".join(args.message))
    if resp:  # dmsetup adds a newline only where the target's response lacks one
        sys.stdout.write(resp if resp.endswith("\n") else resp + "\n")
    return 0


def _wait(args: argparse.Namespace) -> int:
    nr = cli_common.open_backend(args).wait_event(args.name, args.event_nr, timeout=args.timeout)
    return emit(args, {"event_nr": nr}, str(nr))


def register(sub: Any) -> None:
    """Add ``dm`` and its verbs to the root parser's sub-commands."""
    _, verbs = actions(sub, "dm", SUMMARY, dest="verb", metavar="VERB", parser_class=IntermixedParser)

    def table_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--table", help="table text; ';' separates lines")
        p.add_argument("table_file", nargs="?", help="file holding the table (else stdin)")
        p.add_argument("--readonly", "-r", action="store_true", help="read-only table")

    p = verb(verbs, "create", _create, "create a device (empty with --notable)", "name")
    table_opts(p)
    p.add_argument("--uuid", "-u", help="device uuid")
    p.add_argument("--notable", action="store_true", help="create without a table")
    table_opts(verb(verbs, "load", _load, "load a table into the inactive slot", "name", aliases=["reload"]))
    p = verb(verbs, "suspend", _suspend, "suspend devices (I/O is held)", "names+")
    p.add_argument("--noflush", action="store_true", help="do not flush outstanding I/O")
    verb(verbs, "resume", _resume, "resume devices, swapping in an inactive table", "names+")
    p = verb(verbs, "remove", _remove, "remove devices", "names+")
    p.add_argument("--retry", action="store_true", help="retry while the device is busy")
    p.add_argument("--deferred", action="store_true", help="remove when the last user closes it")
    verb(verbs, "clear", _clear, "drop the inactive table", "name")
    verb(verbs, "rename", _rename, "rename a device", "name", "new_name")
    verb(verbs, "ls", _ls, "list devices")
    for name, func, helptext in (("table", _table, "print tables"), ("status", _status, "print target status"),
                                 ("measure", _status, "print what the kernel measures into IMA per target")):
        verb(verbs, name, func, helptext, "names*").add_argument("--inactive", action="store_true",
                                                                  help="the inactive table")
    verb(verbs, "info", _info, "device information", "names*")
    verb(verbs, "deps", _deps, "dependencies", "names*")
    verb(verbs, "targets", _targets, "list target types and versions")
    verb(verbs, "version", _version, "library and driver versions")
    p = verb(verbs, "message", _message, "send a message to a target", "name")
    p.add_argument("sector", type=int)
    p.add_argument("message", nargs="+")
    p = verb(verbs, "wait", _wait, "wait for a device event", "name")
    p.add_argument("event_nr", type=int, nargs="?", default=0)
    p.add_argument("--timeout", type=cli_common.seconds, default=None, metavar="SECONDS")
