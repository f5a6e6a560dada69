"""``dmtools copy``: argument syntax, summary, progress FD, exit status naming failed destinations."""

from __future__ import annotations

import io
import json
import os

import pytest

from dmtools.errors import DeviceIOError, InvalidArgument
from kcopyd.cli import Spec, main, parse_spec
from kcopyd.progress import ProgressReporter
from kc_helpers import evict_file, pattern

MiB = 1 << 20


def test_parse_spec(tmp_path):
    assert parse_spec("disk.img") == Spec("disk.img")
    assert parse_spec("disk.img@2048") == Spec("disk.img", 2048, None)
    assert parse_spec("disk.img@1M+512M") == Spec("disk.img", 2048, 1048576)
    assert parse_spec("/dev/loop0+8s") == Spec("/dev/loop0", 0, 8)
    assert parse_spec("null:").is_null
    odd = tmp_path / "a@b+c"
    odd.write_bytes(b"")
    assert parse_spec(str(odd)) == Spec(str(odd)), "an existing path is taken whole"
    with pytest.raises(InvalidArgument):
        parse_spec("disk.img@1000b")  # not a whole sector
    with pytest.raises(InvalidArgument):
        parse_spec("@8")


def test_copy_to_new_and_existing_files_with_json(tmp_path, capsys):
    src = tmp_path / "s.img"
    src.write_bytes(pattern(2 * MiB))
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    b.write_bytes(bytes(4096))
    rc = main([str(src) + "@1M", str(a), f"{b}@8", "null:", "--json", "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] and summary["bytes"] == MiB and summary["failed_destinations"] == []
    assert [d["sector"] for d in summary["destinations"]] == [0, 8, 0]
    assert a.read_bytes() == pattern(2 * MiB)[MiB:]
    assert b.read_bytes()[4096:] == pattern(2 * MiB)[MiB:] and len(b.read_bytes()) == 4096 + MiB


def test_dmtools_root_cli_has_copy(tmp_path, capsys):
    from dmtools.cli.main import main as dmtools_main

    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    src.write_bytes(pattern(MiB))
    assert dmtools_main(["copy", str(src), str(dst), "--rate", "1G", "--json"], propagate=True) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    assert dst.read_bytes() == src.read_bytes()


def test_progress_fd_writes_nbdcopy_lines(tmp_path):
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    src.write_bytes(pattern(4 * MiB))
    r, w = os.pipe()
    try:
        rc = main([str(src), str(dst), f"--progress={w}", "--quiet", "--rate", "16M"])
        os.close(w)
        w = -1
        with os.fdopen(r, "r") as f:
            r = -1
            lines = f.read().splitlines()
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    assert rc == 0
    assert dst.read_bytes() == src.read_bytes(), "the progress reported is that of a real copy"
    assert lines[-1] == "100/100"
    values = [int(line.split("/")[0]) for line in lines]
    assert values == sorted(set(values)) and all(line.endswith("/100") for line in lines)


def test_failed_destination_is_named_and_exit_is_nonzero(tmp_path, monkeypatch, capsys):
    import kcopyd.client

    real = kcopyd.client.write_exact

    def failing(ep, views, offset):
        if ep.name.endswith("bad.img"):
            raise DeviceIOError("injected", operation="write", device=ep.name)
        return real(ep, views, offset)

    monkeypatch.setattr(kcopyd.client, "write_exact", failing)
    src, good, bad = tmp_path / "s.img", tmp_path / "good.img", tmp_path / "bad.img"
    src.write_bytes(pattern(MiB))
    rc = main([str(src), str(good), str(bad), "--no-offload", "--ignore-errors", "--json", "-q"])
    out = capsys.readouterr()
    assert rc == 1
    assert "destination 1" in out.err and "bad.img" in out.err
    summary = json.loads(out.out)
    assert summary["failed_destinations"] == [str(bad)] and summary["write_error_mask"] == 2
    assert good.read_bytes() == src.read_bytes()


def test_bad_arguments_change_nothing(tmp_path, capsys):
    src = tmp_path / "s.img"
    src.write_bytes(pattern(MiB))
    new = tmp_path / "new.img"
    assert main([str(src), f"{new}+16", "-q"]) == 1  # +16 sectors differs from the source's 2048
    assert main([str(src) + "@4M", str(new), "-q"]) == 1
    assert main([str(tmp_path / "missing.img"), str(new), "-q"]) == 1
    assert main(["null:", str(new), "-q"]) == 1
    for rate in ("", "0", "-1", "x"):  # an empty rate is not "no limit"
        assert main([str(src), str(new), "--rate", rate, "-q"]) == 1
    assert not new.exists()
    err = capsys.readouterr().err
    assert "2048" in err and "null:" in err and "empty size" in err


def test_progress_bar_on_a_terminal_stream():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    rep = ProgressReporter(stream=stream, label="copy", interval=0)
    rep.update(MiB, 4 * MiB)
    rep.update(4 * MiB, 4 * MiB)
    rep.finish(4 * MiB, 4 * MiB)
    text = stream.getvalue()
    assert "\r" in text and " 25%" in text and "100%" in text and text.endswith("\n")
    quiet = io.StringIO()
    ProgressReporter(stream=quiet).update(1, 2)
    assert quiet.getvalue() == "", "no bar when the stream is not a terminal"
    with pytest.raises(InvalidArgument):
        ProgressReporter(fd=999)


@pytest.mark.parametrize("flag", [[], ["--keep-cache"]])
def test_uncached_source_to_several_files(tmp_path, capsys, flag):
    """The 1->N file path from an uncached source: one writer per file (lanes), with and without dropping the source behind."""
    src = tmp_path / "s.img"
    data = pattern(3 * MiB, seed=2)
    src.write_bytes(data)
    evict_file(src)
    dsts = [tmp_path / f"d{i}.img" for i in range(3)]
    assert main([str(src)] + [str(d) for d in dsts] + flag + ["--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    assert all(d.read_bytes() == data for d in dsts)


def test_a_short_destination_claimed_by_another_tool_is_not_extended(tmp_path, capsys):
    from dmtools import claims

    src, short, new = tmp_path / "s.img", tmp_path / "short.img", tmp_path / "new.img"
    src.write_bytes(pattern(MiB))
    short.write_bytes(b"\x07" * 4096)
    with claims.claim(short, holder="another tool"):
        assert main([str(src), str(new), str(short), "-q"]) == 1
    assert "claimed by another" in capsys.readouterr().err
    assert short.read_bytes() == b"\x07" * 4096 and not new.exists()  # not extended, nothing created


def test_a_refused_copy_gives_an_extended_destination_its_size_back(tmp_path, capsys):
    src, short, new = tmp_path / "s.img", tmp_path / "short.img", tmp_path / "new.img"
    src.write_bytes(pattern(MiB))
    short.write_bytes(b"\x07" * 4096)
    # a range past the source's end: kcopyd refuses it once the destinations are ready
    assert main([f"{src}@0+4M", str(short), str(new), "-q"]) == 1
    assert "ends beyond the device" in capsys.readouterr().err
    assert short.read_bytes() == b"\x07" * 4096 and not new.exists()
