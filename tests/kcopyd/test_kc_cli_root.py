"""Root tier: ``dmtools copy`` from a source that fails halfway, a real block device (a userspace
engine device exposed through FUSE and a loop device, its second part an ``error`` target). The
summary, the progress lines and the messages claim only the bytes that reached the destinations."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from dmtools.cli import main as cli_main
from dmtools.engine.rundir import run_dir

pytestmark = pytest.mark.root

MiB = 1 << 20
SIZE = 4 * MiB
#: where the source starts failing: inside the second 1 MiB piece, so that piece is lost whole
BAD = 3 * MiB // 2


@pytest.fixture
def failing_source(private_daemon: Any, tmp_path: Path) -> tuple[str, bytes]:
    """An engine device reading ``data`` up to ``BAD`` and failing with EIO from there."""
    data = os.urandom(SIZE)
    img = tmp_path / "src.img"
    img.write_bytes(data)
    good = BAD // 512
    private_daemon.create("fsrc-dmtt", f"0 {good} linear {img} 0\n{good} {(SIZE - BAD) // 512} error")
    return os.path.join(run_dir(), "mapper", "fsrc-dmtt"), data


def test_a_copy_whose_source_fails_halfway_claims_only_what_it_wrote(
        failing_source: tuple[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, data = failing_source
    dests = [tmp_path / "d1.img", tmp_path / "d2.img"]
    r, w = os.pipe()
    try:
        capsys.readouterr()
        rc = cli_main.main(["--json", "copy", src, *map(str, dests), f"--progress={w}"])
        os.close(w)
        lines = os.read(r, 65536).decode().split()
    finally:
        os.close(r)
    out = capsys.readouterr()
    assert rc == 1 and out.err.strip().splitlines() == [f"dmtools: copy: read error on {src}"]
    summary = json.loads(out.out)
    written = summary["bytes"]
    assert written < BAD  # the pieces read before the failing one: nothing of it or after
    assert summary["bytes_requested"] == SIZE and summary["read_error"] and not summary["ok"]
    for d in dests:
        got = d.read_bytes()
        assert got[:written] == data[:written] and got[written:BAD] != data[written:BAD]
    assert [d["ok"] for d in summary["destinations"]] == [False, False]  # neither holds the copy
    assert lines[-1] == f"{written * 100 // SIZE}/100" and "100/100" not in lines


def test_a_failed_copy_with_a_progress_bar_does_not_say_copied(
        failing_source: tuple[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, _ = failing_source
    capsys.readouterr()
    rc = cli_main.main(["copy", src, str(tmp_path / "d.img"), "-p"])
    err = capsys.readouterr().err
    assert rc == 1 and "read error" in err
    assert "copied" not in err, err


def test_a_read_only_block_device_is_refused_before_any_destination_is_written(
        tmp_path: Path, make_loop: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """A loop device attached read-only opens for writing and fails each write: it is refused as a
    destination up front, not after the other destinations were written."""
    src, image, new = tmp_path / "s.img", tmp_path / "ro.img", tmp_path / "new.img"
    src.write_bytes(os.urandom(MiB))
    image.write_bytes(bytes(MiB))
    ro = make_loop(image, read_only=True)
    capsys.readouterr()
    assert cli_main.main(["copy", str(src), str(new), ro.path, "-q"]) == 1
    assert capsys.readouterr().err == f"dmtools: copy {ro.path}: destination 1 device is read-only\n"
    assert not new.exists() and image.read_bytes() == bytes(MiB)
