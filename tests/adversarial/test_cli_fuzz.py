"""Hypothesis fuzz of the whole CLI (issue 15 item 6): bad input never gives a traceback.

Command lines are built from the real parser tree (``dmtools.cli.main.build_parser``): every
sub-command, any of its options in any order, random values (text, undecodable bytes, numbers,
names of devices that exist and do not, files that exist and do not), ``--`` and names starting
with ``-``. Input files (table files, JSON configs, COW and mirror-log images) hold random bytes
or almost-valid content. Each command runs in-process (``main(argv, propagate=False)``) on a fresh
in-process engine holding a linear device, a snapshot stack and a mirror, in a private working
and run directory. Only the documented exit statuses may come out, an error is one line starting
``dmtools``, and nothing prints a traceback; an exception escaping ``main`` fails the test.

Deterministic (``derandomize``, no example database, and Hypothesis's pool of constants from the
code fixed to the whole project's by ``tests/fixed_constants.py``, not the modules imported so far,
nor where the checkout is, nor the working directory's ``.hypothesis``), so every checkout and CI
draw the same command lines and CI cannot fail by chance; ``DMTT_FUZZ_RECORD=FILE`` appends every
example (its command line, a digest of its input files) to ``FILE`` as a JSON line, for comparing
two runs' draws. Commands that
serve until stopped get the options that bound them: ``daemon`` only ``stop``/``status``,
``monitor`` ``--once``, ``dm wait`` and the ``--rate``/``--timeout``/``--interval`` values from
short lists (a rate of 5 bytes/s is valid and merely slow). Loop devices are attached for real and
detached after each example; ``loop detach`` may only detach those (a guard at the ``dmtools.loop``
seam keeps the fuzz away from the host's other loop devices).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmtools import loop
from dmtools.cli import common as cli_common
from dmtools.cli import main as cli_main
from dmtools.errors import DaemonError, LoopError
from dmtools.testing.daemon import stop_daemon

#: ``dmtools`` exit statuses: success, error, usage (argparse), ``daemon status``: not running,
#: interrupted.
DOCUMENTED = {0, 1, 2, 3, 130}
#: a command that runs longer than this is a hang (every device here is 1 MiB)
HANG_LIMIT = 30
IMAGE = 1 << 20
#: examples per sub-command (about 45 of them)
EXAMPLES = int(os.environ.get("DMTOOLS_FUZZ_EXAMPLES", "8"))
#: where every example is recorded (``DMTT_FUZZ_RECORD``), or None
RECORD = os.environ.get("DMTT_FUZZ_RECORD")


# --- the parser tree ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """One runnable command: its words and its parser's actions."""

    words: tuple[str, ...]
    optionals: tuple[argparse.Action, ...]
    positionals: tuple[argparse.Action, ...]


def _leaves(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> Iterator[Leaf]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subs:
        seen: set[int] = set()
        for name, child in subs[0].choices.items():
            if id(child) not in seen:  # an alias (reload) is the same parser
                seen.add(id(child))
                yield from _leaves(child, (*words, name))
        return
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    yield Leaf(words, tuple(a for a in actions if a.option_strings), tuple(a for a in actions if not a.option_strings))


LEAVES = sorted(_leaves(cli_main.build_parser()), key=lambda leaf: leaf.words)


# --- values ----------------------------------------------------------------------------------------

FILES = ("table.good", "table.rand", "cow.rand", "cow.img", "log.rand", "conf.json", "conf.rand",
         "img0", "img1", "img2", "missing", "adir", "dev/loop0", "state")
#: a monitor state directory (``--state-dir``): journal, per-device checkpoints and cursor
STATE_FILES = ("state/userspace/journal", "state/userspace/s.json", "state/userspace/m.json",
               "state/userspace/d0.json", "state/userspace/cursor")
ALMOST_JSON = (b"{}", b'{"state": null}', b'{"seq": "x"}', b'{"state": {"x": 1}, "recent": [1]}',
               b'{"seq": 1, "device": "s", "events": [{}]}\n', b"[]", b"null", b'{"seq": 1e999}',
               b'{"state": {}, "recent": [], "applied": -1}', b"\xff\xfe{", b"",
               b'{"state": null, "recent": 5, "applied": "x"}', b'{"recent": [{"event": 1}], "applied": [1]}',
               b'{"r": 1, "device": "s", "events": 5}\n', b'{"r": 1, "device": "m", "events": [5], "state": 7}\n',
               b'{"r": 1, "device": "s", "plan": {"x": 1}}\n{"r": 2, "started": "x"}\n')
DEVICES = ("d0", "o", "s", "s-cow", "o-real", "m", "nosuch", "-x", "m_mlog")
NUMBERS = ("0", "1", "-1", "2", "8", "4K", "512K", "1M", "64", "99999999999999999999999", "0x10",
           "1.5", "nan", "inf", "-inf", "1e9", "", " ", "8s", "1G")
#: options whose valid values could keep a command busy for hours: short lists
BOUNDED = {
    "--rate": ("1M", "1G", "0", "-1", "x", "1.5M", "", "1e3G"),
    "--timeout": ("0", "0.1", "-1", "nan", "x", ""),
    "--interval": ("0.01", "0", "-1", "nan", "x"),
}


#: options whose input files the fuzz writes: given them half the time
PREFERRED = {"--state-dir": "state", "--config": "conf.json"}


def _safe(text: str) -> str:
    """Random text as a path stays inside the working directory (no ``/`` root, no ``..``)."""
    return text.lstrip("/").replace("..", "__")


random_text = st.text(max_size=12).map(_safe)
random_bytes = st.binary(max_size=12).map(lambda b: _safe(b.decode("utf-8", "surrogateescape")))
values = st.one_of(st.sampled_from(FILES), st.sampled_from(FILES).map(lambda f: f"./{f}"), st.sampled_from(DEVICES),
                   st.sampled_from(NUMBERS), random_text, random_bytes)


@st.composite
def command_lines(draw: Any, leaf: Leaf) -> list[str]:
    words = list(leaf.words)
    pieces: list[list[str]] = []
    for action in leaf.optionals:
        if not draw(st.integers(0, 3)) == 0:  # each option in about a quarter of the lines
            continue
        opt = draw(st.sampled_from(action.option_strings))
        pool = st.sampled_from(BOUNDED[opt]) if opt in BOUNDED else (
            st.sampled_from(action.choices) if action.choices else values)
        if opt in PREFERRED:
            pool = st.one_of(st.just(PREFERRED[opt]), pool)
        n = {None: 1, "?": draw(st.integers(0, 1)), "+": draw(st.integers(1, 3)),
             "*": draw(st.integers(0, 2))}.get(action.nargs, action.nargs)  # type: ignore[arg-type]
        pieces.append([opt, *[str(draw(pool)) for _ in range(n if isinstance(n, int) else 0)]])
    operands: list[str] = []
    for action in leaf.positionals:
        pool = st.sampled_from(action.choices) if action.choices else values
        n = {None: 1, "?": draw(st.integers(0, 1)), "+": draw(st.integers(1, 3)),
             "*": draw(st.integers(0, 3))}.get(action.nargs, 1)  # type: ignore[arg-type]
        operands += [str(draw(pool)) for _ in range(n if isinstance(n, int) else 1)]
    if draw(st.integers(0, 9)) == 0:  # now and then one operand too many or too few
        operands = operands[:-1] if operands and draw(st.booleans()) else [*operands, draw(values)]
    tokens = [t for piece in draw(st.permutations(pieces)) for t in piece]
    if draw(st.booleans()):
        tokens += operands
    elif operands:
        tokens += ["--", *operands]
    if words[0] == "daemon":  # "run" (the default) serves until stopped
        tokens = [draw(st.sampled_from(["stop", "status"])), *[t for t in tokens if t not in ("run", "stop", "status")]]
    if words[0] == "monitor":
        tokens = ["--once", *tokens]
    if words == ["dm", "wait"]:
        tokens = ["--timeout", "0.05", *tokens]
    front: list[str] = []
    if draw(st.integers(0, 4)) == 0:
        front.append("--json")
    if draw(st.integers(0, 6)) == 0:
        front += ["--backend", draw(st.sampled_from(["auto", "kernel", "userspace", "nope", ""]))]
    return [*front, *words, *tokens]


@st.composite
def file_contents(draw: Any) -> dict[str, bytes]:
    """What the input files hold in this example: random bytes, or almost the real thing."""
    rand = st.binary(max_size=4096)
    good_table = f"0 {IMAGE // 512} linear img2 0\n".encode()
    return {
        "table.good": draw(st.sampled_from([good_table, good_table + b"\xff", b"0 8 zero\n"])),
        "table.rand": draw(rand),
        "cow.rand": draw(st.one_of(rand, rand.map(lambda b: b"SnAp\x01\x00\x00\x00" + b))),
        "log.rand": draw(st.one_of(rand, rand.map(lambda b: b"MiRr\x02\x00\x00\x00" + b))),
        "conf.json": draw(st.sampled_from([b"{}", b'{"warn": [50, 90]}', b"[", b'{"x": 1}', b"\xff"])),
        "conf.rand": draw(rand),
        **{name: draw(st.one_of(st.sampled_from(ALMOST_JSON), rand)) for name in STATE_FILES},
    }


# --- the world each command runs in ----------------------------------------------------------------


class Hang(Exception):
    """A command ran past ``HANG_LIMIT``."""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private working directory and run directory; loop detaches guarded, attaches tracked."""
    work = tmp_path_factory.mktemp("cli-fuzz")
    run = work / "run"
    run.mkdir(mode=0o700)
    saved = (os.getcwd(), os.environ.get("DMTOOLS_RUN_DIR"), loop.attach, loop.detach, sys.stdin)
    attached: list[Any] = []

    def attach(*args: Any, **kwargs: Any) -> Any:
        dev = saved[2](*args, **kwargs)
        attached.append(dev)
        return dev

    def detach(dev: Any, **kwargs: Any) -> bool:
        ours = {str(d.path) for d in attached} | {os.path.basename(str(d.path)) for d in attached}
        if str(dev) not in ours:
            raise LoopError(f"{dev}: not a loop device of this test", operation="detach")
        return saved[3](dev, **kwargs)  # type: ignore[no-any-return]

    os.chdir(work)
    os.environ["DMTOOLS_RUN_DIR"] = str(run)
    loop.attach, loop.detach = attach, detach  # type: ignore[assignment]
    try:
        yield work
    finally:
        _stop_daemon(run)
        loop.attach, loop.detach = saved[2], saved[3]  # type: ignore[assignment]
        for dev in attached:
            with contextlib.suppress(Exception):
                saved[3](dev)
        os.chdir(saved[0])
        if saved[1] is None:
            os.environ.pop("DMTOOLS_RUN_DIR", None)
        else:
            os.environ["DMTOOLS_RUN_DIR"] = saved[1]
        sys.stdin = saved[4]


def _stop_daemon(run: Path) -> None:
    """Stop the daemon a fuzzed command may have started in ``run`` (and wait until it is gone)."""
    from dmtools.engine.client import UserspaceClient

    try:
        client = UserspaceClient(str(run))
    except DaemonError:
        return  # none was started
    stop_daemon(client)


def _prepare(work: Path, contents: dict[str, bytes]) -> Any:
    """Fresh files and a fresh in-process engine with d0, o + snapshot s, mirror m."""
    from dmtools.engine import Engine
    from mirror import MirrorManager
    from snapshot import SnapshotManager

    for name in ("img0", "img1", "img2", "cow.img", "leg0", "leg1"):
        with open(work / name, "wb") as f:
            f.truncate(IMAGE)
    (work / "adir").mkdir(exist_ok=True)
    (work / "state" / "userspace").mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        (work / name).write_bytes(data)
    (work / "dev").mkdir(exist_ok=True)
    (work / "dev" / "loop0").write_bytes(b"\0" * 4096)
    eng = Engine()
    eng.create("d0", f"0 {IMAGE // 512} linear {work / 'img0'} 0")
    eng.create("o", f"0 {IMAGE // 512} linear {work / 'img1'} 0")
    SnapshotManager(eng).create("o", str(work / "cow.img"), "s", chunk_size=8)
    MirrorManager(eng).create("m", [str(work / "leg0"), str(work / "leg1")], nosync=True)
    return eng


def _run(argv: list[str], eng: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()

    def on_alarm(*_: object) -> None:
        raise Hang(f"{argv!r} still runs after {HANG_LIMIT} s")

    old_open, old_alarm = cli_common.open_backend, signal.signal(signal.SIGALRM, on_alarm)
    cli_common.open_backend = lambda args: eng  # type: ignore[assignment]
    sys.stdin = io.StringIO("")  # not a terminal, nothing piped
    signal.alarm(HANG_LIMIT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli_main.main(argv, propagate=False)
            except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
                rc = exc.code if isinstance(exc.code, int) else 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_alarm)
        cli_common.open_backend = old_open  # type: ignore[assignment]
    return rc, out.getvalue(), err.getvalue()


def _record(argv: list[str], contents: dict[str, bytes]) -> None:
    """Append the example to ``RECORD``: its command line and a digest of its input files."""
    if RECORD:
        files = hashlib.sha256()
        for name, data in sorted(contents.items()):
            files.update(f"{name} {len(data)}\n".encode() + data)
        with open(RECORD, "a", encoding="utf-8") as f:
            f.write(json.dumps({"argv": argv, "files": files.hexdigest()[:16]}) + "\n")


def _check(argv: list[str], rc: int, err: str) -> None:
    assert rc in DOCUMENTED, f"{argv!r}: exit status {rc}\n{err}"
    assert "Traceback" not in err, f"{argv!r}: traceback\n{err}"
    if rc == 1:
        lines = err.strip().splitlines()
        assert lines and lines[-1].startswith("dmtools"), f"{argv!r}: no one-line error\n{err}"


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data(), contents=file_contents())
def _fuzz(world: Path, leaf: Leaf, data: Any, contents: dict[str, bytes]) -> None:
    argv = data.draw(command_lines(leaf), label="argv")
    _record(argv, contents)
    eng = _prepare(world, contents)
    try:
        rc, _, err = _run(argv, eng)
    finally:
        eng.close()
    _check(argv, rc, err)


@pytest.mark.parametrize("leaf", LEAVES, ids=[" ".join(leaf.words) for leaf in LEAVES])
def test_no_command_line_gives_a_traceback(world: Path, leaf: Leaf) -> None:
    """Every sub-command, ``EXAMPLES`` random command lines and input files each."""
    _fuzz(world, leaf)


def test_every_command_is_reached() -> None:
    """The tree walk sees every sub-command the parser has (a new one is fuzzed without edits)."""
    words = {" ".join(leaf.words) for leaf in LEAVES}
    for expected in ("dm create", "dm wait", "loop detach", "daemon", "monitor", "copy",
                     "snapshot export", "mirror resync-offline"):
        assert expected in words
    assert len(LEAVES) >= 40
