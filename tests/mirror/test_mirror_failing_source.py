"""A source leg that fails at a random moment of a resync, a repair or a rebuild (issue 15).

Mirrors are made by ``MirrorManager`` on the in-process engine; leg 0 is a ``trip`` device that
starts failing every I/O after a seeded number of reads, as a leg whose table is replaced by
``error`` does. After each run:

- no region is in sync on the mirror's log unless every readable leg holds its data;
- every read of the mirror returns the data written or fails with EIO;
- the manager raised ``RecoveryFailed`` exactly when some region could not be copied, naming those
  regions and leg 0, and the status shows leg 0 with the kernel's ``S``.

Without ``handle_errors`` the target keeps the kernel's rule (a failed copy is marked in sync,
dm-region-hash.c ``complete_resync_work``) and the manager still reports the failure.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable

import pytest

from mirror import MirrorManager
from mirror.resync import RecoveryFailed
from dmtools.testing.trip import Switch, install, read_pieces
from test_mirror_cli import run as _cli
from test_mirror_manager import _image

REGION = 16  # sectors: 8 KiB regions
REGION_BYTES = REGION * 512
NR = 24
SIZE = NR * REGION_BYTES
#: seeded runs per scenario with handle_errors (3 scenarios: 105 runs) and without (3 x 12)
RUNS = 35
UNSAFE_RUNS = 12


def _target(eng: Any, name: str) -> Any:
    """The live ``MirrorTarget`` of ``name`` (to read its log's sync bits)."""
    return eng._get(name, "test").live.targets[0]


def _region(path: str, r: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(r * REGION_BYTES)
        return f.read(REGION_BYTES)


class Run:
    """One mirror ``m`` over ``src`` (a trip device on file ``a``) and a second leg. With
    ``fail_early`` leg 0 fails after 0..NR+4 reads counted from the mirror's creation."""

    def __init__(self, eng: Any, tmp: Path, seed: int, *, handle_errors: bool, second_has_data: bool,
                 nosync: bool, fail_early: bool = False) -> None:
        self.eng = eng
        self.rng = random.Random(seed)
        fail_after = self.rng.randrange(NR + 5) if fail_early else None
        self.data = self.rng.randbytes(SIZE)
        self.dir = tmp / f"run{seed}"
        self.dir.mkdir()
        self.a = _image(self.dir, "a", SIZE, self.data)
        self.b = _image(self.dir, "b", SIZE, self.data if second_has_data else None)
        self.switch = Switch(f"s{seed}-{id(self)}", fail_after=fail_after)
        eng.create("src", f"0 {SIZE // 512} trip {self.a} 0 {self.switch.name}")
        self.mm = MirrorManager(eng)
        self.mm.create("m", [eng.device_ref("src"), self.b], region_size=REGION, nosync=nosync,
                       handle_errors=handle_errors)

    def fail_after_random_reads(self) -> int:
        """Leg 0 fails after 0..NR+4 more reads (past NR the copy may finish first)."""
        k = self.rng.randrange(NR + 5)
        self.switch.fail_after_more(k)
        return k

    def op(self, fn: Callable[[], Any]) -> RecoveryFailed | None:
        try:
            fn()
        except RecoveryFailed as err:
            return err
        return None

    def check(self, err: RecoveryFailed | None, legs: list[str], *, handle_errors: bool) -> None:
        t = _target(self.eng, "m")
        st = self.mm.status("m")
        in_sync = [r for r in range(NR) if t.log.in_sync(r)]
        lacking = [r for r in range(NR) if any(_region(p, r) != self.data[r * REGION_BYTES:(r + 1) * REGION_BYTES]
                                                for p in legs)]
        if handle_errors:
            # never reported in sync without the data on every leg but the failed source
            assert not set(in_sync) & set(lacking), (in_sync, lacking)
            assert st.in_sync == len(in_sync)
            if err is None:
                assert st.fully_in_sync and not lacking and st.health == "AA", st
            else:
                assert err.regions == sorted(set(range(NR)) - set(in_sync))
                assert 0 in err.legs and err.source == 0
                assert st.health[0] == "S" and not st.fully_in_sync, st
                assert "could not read source leg 0" in str(err) and str(err).count("\n") == 0
        else:
            # the kernel's unsafe rule: every region ends in sync, failed copies included
            assert st.fully_in_sync and len(in_sync) == NR
            assert (err is None) == (not lacking), (err, lacking)
            if err is not None:
                assert err.regions is not None and set(lacking) <= set(err.regions)
                assert 0 in err.legs
            return
        # every read returns the written data or EIO
        with self.eng.open_endpoint("m", writable=False) as ep:
            pieces = read_pieces(ep, REGION_BYTES, NR)
        for r, got in enumerate(pieces):
            assert got is None or got == self.data[r * REGION_BYTES:(r + 1) * REGION_BYTES], f"region {r}"

    def close(self) -> None:
        self.mm.remove("m")
        self.eng.remove("src")


@pytest.fixture
def eng(engine: Any) -> Any:
    install(engine)
    return engine


def _resync(eng: Any, tmp: Path, seed: int, handle_errors: bool) -> RecoveryFailed | None:
    # The mirror's initial resync starts at creation: the source may fail before the first copy.
    run = Run(eng, tmp, seed, handle_errors=handle_errors, second_has_data=False, nosync=False, fail_early=True)
    try:
        err = run.op(lambda: run.mm.resync("m", timeout=60))
        run.check(err, [run.b], handle_errors=handle_errors)
        return err
    finally:
        run.close()


def _repair(eng: Any, tmp: Path, seed: int, handle_errors: bool) -> RecoveryFailed | None:
    run = Run(eng, tmp, seed, handle_errors=handle_errors, second_has_data=True, nosync=True)
    try:
        c = _image(run.dir, "c", SIZE)
        run.fail_after_random_reads()
        err = run.op(lambda: run.mm.repair("m", 1, c))
        # the repair copies with handle_errors whatever the mirror's features, as on the kernel
        # (MirrorManager._rebuild): a failed copy stays out of sync
        run.check(err, [c], handle_errors=True)
        return err
    finally:
        run.close()


def _rebuild(eng: Any, tmp: Path, seed: int, handle_errors: bool) -> RecoveryFailed | None:
    # leg 1 is blank although the mirror was created "nosync": the rebuild message copies it all
    run = Run(eng, tmp, seed, handle_errors=handle_errors, second_has_data=False, nosync=True)
    try:
        run.fail_after_random_reads()
        err = run.op(lambda: run.mm.resync("m", leg=1, timeout=60))
        run.check(err, [run.b], handle_errors=handle_errors)
        return err
    finally:
        run.close()


SCENARIOS = {"resync": _resync, "repair": _repair, "rebuild": _rebuild}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_failing_source_with_handle_errors(eng: Any, tmp_path: Path, scenario: str) -> None:
    outcomes = [SCENARIOS[scenario](eng, tmp_path, seed, True) for seed in range(RUNS)]
    failed = sum(1 for e in outcomes if e is not None)
    # the seeds cover both outcomes: the source failing before and after the copy finished
    assert 0 < failed < RUNS, failed


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_failing_source_without_handle_errors(eng: Any, tmp_path: Path, scenario: str) -> None:
    outcomes = [SCENARIOS[scenario](eng, tmp_path, seed, False) for seed in range(UNSAFE_RUNS)]
    assert any(e is not None for e in outcomes)


# -- the commands: exit status, one-line error, --json list ----------------------------------------
@pytest.fixture
def cli_engine(eng: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    from mirror import cli

    monkeypatch.setattr(cli, "_manager", lambda args: MirrorManager(eng))
    return eng


@pytest.mark.parametrize("json_out", [False, True])
def test_repair_command_exits_1_naming_regions_and_leg(cli_engine: Any, tmp_path: Path, json_out: bool,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import json

    data = os.urandom(SIZE)
    a, b, c = _image(tmp_path, "a", SIZE, data), _image(tmp_path, "b", SIZE, data), _image(tmp_path, "c", SIZE)
    sw = Switch(f"cli{json_out}")
    cli_engine.create("src", f"0 {SIZE // 512} trip {a} 0 {sw.name}")
    src = cli_engine.device_ref("src")
    assert _cli(["mirror", "create", "m", src, b, "--region-size", "8K", "--nosync"]) == 0
    assert "1 handle_errors" in cli_engine.table("m").lines[0].target.params  # the default
    capsys.readouterr()
    sw.fail_after_more(5)  # five regions get copied, then leg 0 fails
    argv = ["mirror", "repair", "m", "1", c, "-q"] + (["--json"] if json_out else [])
    assert _cli(argv) == 1
    out, err = capsys.readouterr()
    line = f"dmtools: repair m: repair failed: could not read source leg 0 ({src}); regions 5-{NR - 1} stay out of sync\n"
    assert err == line
    if json_out:
        report = json.loads(out)
        assert report["failed_regions"] == list(range(5, NR)) and report["failed_legs"] == [0]
        assert report["source_leg"] == 0 and report["error"] in line
    st = MirrorManager(cli_engine).status("m")
    assert st.health[0] == "S" and st.in_sync == 5


@pytest.mark.parametrize("handle_errors", [True, False])
def test_progress_fd_of_a_failed_repair_never_reaches_100(cli_engine: Any, tmp_path: Path, handle_errors: bool,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """nbdcopy's ``--progress=FD`` convention: ``100/100`` means every byte was copied. Without
    handle_errors the kernel's rule marks the failed regions in sync, so the mirror reads 100%:
    the lines must still stop at what was copied."""
    data = os.urandom(SIZE)
    a, b, c = _image(tmp_path, "a", SIZE, data), _image(tmp_path, "b", SIZE, data), _image(tmp_path, "c", SIZE)
    sw = Switch(f"fd{handle_errors}")
    cli_engine.create("src", f"0 {SIZE // 512} trip {a} 0 {sw.name}")
    assert _cli(["mirror", "create", "m", cli_engine.device_ref("src"), b, "--region-size", "8K", "--nosync",
                 "--handle-errors" if handle_errors else "--no-handle-errors"]) == 0
    sw.fail_after_more(5)  # five regions get copied, then leg 0 fails
    r, w = os.pipe()
    try:
        assert _cli(["mirror", "repair", "m", "1", c, f"--progress={w}"]) == 1
        os.close(w)
        lines = os.read(r, 65536).decode().split()
    finally:
        os.close(r)
    assert "100/100" not in lines, lines
    assert "could not read source leg 0" in capsys.readouterr().err


def test_create_opt_out_of_handle_errors(cli_engine: Any, tmp_path: Path) -> None:
    a, b = _image(tmp_path, "a", SIZE), _image(tmp_path, "b", SIZE)
    assert _cli(["mirror", "create", "m", a, b, "--region-size", "8K", "--no-handle-errors"]) == 0
    assert "handle_errors" not in cli_engine.table("m").lines[0].target.params
    with pytest.raises(SystemExit):
        _cli(["mirror", "create", "m2", a, b, "--handle-errors", "--no-handle-errors"])


def test_offline_resync_names_regions_and_leg(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from dmtools.testing.faults import FaultyEndpoint
    from dmtools.blockdev import open_endpoint
    from mirror.format import LogImage, format_log
    from mirror.manager import resync_offline

    data = os.urandom(SIZE)
    a, b = _image(tmp_path, "a", SIZE, data), _image(tmp_path, "b", SIZE)
    logp = _image(tmp_path, "log", 64 << 10)
    with open_endpoint(logp, writable=True) as lep:
        format_log(lep, NR, in_sync=False)
    bad = range(7 * REGION, 9 * REGION)  # regions 7 and 8 of the source cannot be read
    with open_endpoint(a, writable=True) as ea, open_endpoint(b, writable=True) as eb:
        src = FaultyEndpoint(ea, read_errors=[bad], name="A")
        with pytest.raises(RecoveryFailed) as info:
            resync_offline([src, eb], logp, region_size=REGION)
    assert info.value.regions == [7, 8] and info.value.legs == [0]
    assert "could not read source leg 0 (A); regions 7-8 stay out of sync" in str(info.value)
    with open_endpoint(logp) as lep:
        assert LogImage.read(lep).out_of_sync() == [7, 8]  # never marked clean
    # once the source reads again, the command copies only what is still out of sync
    assert _cli(["--json", "mirror", "resync-offline", a, b, "--log", logp, "--region-size", "8K", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["regions_copied"] == 2
    with open_endpoint(logp) as lep:
        assert LogImage.read(lep).out_of_sync() == []
    with open(b, "rb") as f:
        assert f.read() == data


@pytest.mark.parametrize("handle_errors", [True, False], ids=["handle_errors", "unsafe"])
def test_events_as_dm_raid1_raises_them(eng: Any, tmp_path: Path, handle_errors: bool) -> None:
    """dm-raid1.c: ``fail_mirror`` raises an event only with handle_errors, once per new error type
    of a leg; ``do_recovery`` raises one when the mirror becomes fully in sync."""
    a, b = _image(tmp_path, "a", SIZE, os.urandom(SIZE)), _image(tmp_path, "b", SIZE)
    sw = Switch(f"events{handle_errors}", fail_after=0)
    eng.create("src", f"0 {SIZE // 512} trip {a} 0 {sw.name}")
    mm = MirrorManager(eng)
    mm.create("m", [eng.device_ref("src"), b], region_size=REGION, handle_errors=handle_errors)
    if handle_errors:
        with pytest.raises(RecoveryFailed):
            mm.resync("m", timeout=30)
    else:
        assert _target(eng, "m").wait_in_sync(30)
    # handle_errors: the first S of leg 0 (later ones add no new type); unsafe: full sync only
    assert eng.info("m").event_nr == 1
    with eng.open_endpoint("m", writable=False) as ep:
        got = read_pieces(ep, REGION_BYTES, 2)
    assert got == [None, None] if handle_errors else None not in got
    # unsafe: the read failed on leg 0 (R) and was retried on leg 1; no event either way
    assert mm.status("m").health == ("SA" if handle_errors else "RA")
    assert eng.info("m").event_nr == 1
