"""A copy whose source and destination share bytes of one device copies exactly as ``memmove``.

The reference is Python's slice assignment (``b[d:d+n] = b[s:s+n]`` reads the right side first,
i.e. memmove). Jobs are cut into many small sub-jobs with several worker threads, so a copy that
handed pieces out in the wrong order, or in parallel, would read bytes it had already overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kcopyd
from dmtools.cli import main as cli_main
from dmtools.errors import InvalidArgument
from dmtools.testing.faults import MemoryEndpoint

SECTOR = 512
TIMEOUT = 60


def _pattern(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def _memmove(data: bytes, src: int, dst: int, n: int) -> bytes:
    out = bytearray(data)
    out[dst:dst + n] = out[src:src + n]
    return bytes(out)


overlapping = st.tuples(
    st.integers(1, 160),  # sectors copied
    st.integers(0, 80),  # source start
    st.integers(-80, 80),  # destination start minus source start
    st.sampled_from([512, 1024, 4096, 8192]),  # sub-job size
    st.integers(1, 6),  # pages
    st.integers(1, 4),  # threads
    st.sampled_from([0, kcopyd.IGNORE_ERROR, kcopyd.WRITE_SEQ]),
).filter(lambda c: c[1] + c[2] >= 0)


def _run(src_dev, dst_dev, case) -> None:
    count, s, delta, sub_job, pages, threads, flags = case
    with kcopyd.Client(num_pages=pages, sub_job_size=sub_job, threads=threads) as kc:
        job = kc.copy(kcopyd.Region(src_dev, s, count), [kcopyd.Region(dst_dev, s + delta, count)], flags=flags)
        assert job.wait(TIMEOUT)
        job.raise_for_error()


def _expected_refusal(case) -> bool:
    count, s, delta, *_rest, flags = case
    return bool(flags & kcopyd.WRITE_SEQ) and 0 < delta < count


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overlapping, st.integers(0, 2**32))
def test_a_copy_within_one_file_is_a_memmove(tmp_path: Path, case, seed: int) -> None:
    count, s, delta, *_ = case
    size = (max(s, s + delta) + count + 3) * SECTOR
    data = _pattern(size, seed)
    path = tmp_path / "dmtt-one.img"
    path.write_bytes(data)
    if _expected_refusal(case):
        with pytest.raises(InvalidArgument, match="back to front"):
            _run(str(path), str(path), case)
        assert path.read_bytes() == data  # refused before any I/O
        return
    # the same file through two spellings: the path and a symlink to it
    link = tmp_path / "dmtt-link"
    link.unlink(missing_ok=True)
    link.symlink_to(path)
    _run(str(path), str(link), case)
    assert path.read_bytes() == _memmove(data, s * SECTOR, (s + delta) * SECTOR, count * SECTOR)


@settings(max_examples=60, deadline=None)
@given(overlapping, st.integers(0, 2**32))
def test_a_copy_within_one_endpoint_is_a_memmove(case, seed: int) -> None:
    count, s, delta, *_ = case
    size = (max(s, s + delta) + count + 3) * SECTOR
    data = _pattern(size, seed)
    ep = MemoryEndpoint(bytearray(data))
    if _expected_refusal(case):
        with pytest.raises(InvalidArgument):
            _run(ep, ep, case)
        assert bytes(ep.data) == data
        return
    _run(ep, ep, case)
    assert bytes(ep.data) == _memmove(data, s * SECTOR, (s + delta) * SECTOR, count * SECTOR)


def test_destinations_sharing_bytes_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    src, dst = tmp_path / "dmtt-src.img", tmp_path / "dmtt-dst.img"
    src.write_bytes(_pattern(64 * SECTOR, 1))
    before = _pattern(64 * SECTOR, 2)
    dst.write_bytes(before)
    with kcopyd.Client() as kc:
        with pytest.raises(InvalidArgument, match="destinations 0 .* and 1 .* share bytes"):
            kc.copy(kcopyd.Region(str(src), 0, 16), [kcopyd.Region(str(dst), 0, 16), kcopyd.Region(str(dst), 8, 16)])
    assert dst.read_bytes() == before


def test_a_source_overlapping_destinations_on_both_sides_is_refused() -> None:
    data = _pattern(64 * SECTOR, 3)
    ep = MemoryEndpoint(bytearray(data))
    with kcopyd.Client() as kc:
        with pytest.raises(InvalidArgument, match="both sides"):
            kc.copy(kcopyd.Region(ep, 16, 16), [kcopyd.Region(ep, 8, 16), kcopyd.Region(ep, 24, 16)])
    assert bytes(ep.data) == data


@pytest.mark.parametrize("delta", [-5, 5, 0])
def test_dmtools_copy_within_one_file_is_a_memmove(tmp_path: Path, delta: int, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dmtt-cli.img"
    data = _pattern(256 * SECTOR, 7)
    path.write_bytes(data)
    rc = cli_main.main(["copy", f"{path}@40+100", f"{path}@{40 + delta}", "--sub-job-size", "4K", "--num-pages", "2",
                        "--quiet"], propagate=True)
    assert rc == 0
    assert path.read_bytes() == _memmove(data, 40 * SECTOR, (40 + delta) * SECTOR, 100 * SECTOR)


@pytest.mark.root
@pytest.mark.parametrize("delta", [-24, 24])
def test_dmtools_copy_within_one_loop_device_is_a_memmove(tmp_path: Path, make_loop, delta: int) -> None:
    """The same block device on both sides (O_DIRECT where aligned): back to front or front to back."""
    path = tmp_path / "dmtt-loop.img"
    data = _pattern(1 << 20, 11)
    path.write_bytes(data)
    lp = make_loop(path)
    st = os.stat(lp.path)
    devno = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"  # the destination spelled as tables do
    rc = cli_main.main(["copy", f"{lp.path}@64+512", f"{devno}@{64 + delta}", "--sub-job-size", "16K",
                        "--num-pages", "4", "--quiet"], propagate=True)
    assert rc == 0
    with open(lp.path, "rb") as f:
        assert f.read() == _memmove(data, 64 * SECTOR, (64 + delta) * SECTOR, 512 * SECTOR)
