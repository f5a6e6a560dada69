"""Property test: random job sizes, offsets, sub-job sizes, pools and holes against a plain copy."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kcopyd
from dmtools.testing.faults import MemoryEndpoint
from kc_helpers import TIMEOUT, pattern


@st.composite
def jobs(draw):
    count = draw(st.integers(0, 300))  # sectors
    ndest = draw(st.integers(1, 4))
    src_off = draw(st.integers(0, 40))
    dest_offs = [draw(st.integers(0, 40)) for _ in range(ndest)]
    sub_job = 512 * draw(st.integers(1, 40))
    num_pages = draw(st.integers(1, 12))
    threads = draw(st.integers(1, 4))
    flags = draw(st.sampled_from([0, kcopyd.IGNORE_ERROR, kcopyd.WRITE_SEQ]))
    # Allocated extents of the source (sector granularity); the rest reads as zeros.
    holes = draw(st.booleans())
    extents = []
    if holes:
        for _ in range(draw(st.integers(0, 4))):
            start = draw(st.integers(0, src_off + count + 8))
            extents.append((start * 512, draw(st.integers(1, 64)) * 512))
    dest_zeroed = holes and draw(st.booleans())
    return count, src_off, dest_offs, sub_job, num_pages, threads, flags, extents if holes else None, dest_zeroed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs())
def test_random_jobs_match_a_plain_copy(case):
    count, src_off, dest_offs, sub_job, num_pages, threads, flags, extents, dest_zeroed = case
    src_size = (src_off + count + 8) * 512
    data = bytearray(pattern(src_size, seed=count))
    src = MemoryEndpoint(src_size)
    if extents is None:
        src.data[:] = data
    else:
        for off, n in extents:  # only the allocated ranges hold data
            src.data[off : off + n] = data[off : off + n]
        src.set_extents(sorted(extents))
    dests = []
    expected = []
    for i, off in enumerate(dest_offs):
        size = (off + count + 3) * 512
        init = bytes(size) if dest_zeroed else pattern(size, seed=100 + i)
        dests.append(MemoryEndpoint(init))
        exp = bytearray(init)
        exp[off * 512 : (off + count) * 512] = src.data[src_off * 512 : (src_off + count) * 512]
        expected.append(bytes(exp))
    flags |= kcopyd.DEST_ZEROED if dest_zeroed else 0
    with kcopyd.Client(num_pages=num_pages, sub_job_size=sub_job, threads=threads) as kc:
        job = kc.copy(kcopyd.Region(src, src_off, count),
                      [kcopyd.Region(d, off, count) for d, off in zip(dests, dest_offs)], flags=flags)
        assert job.wait(TIMEOUT)
        assert kc.pool.peak <= num_pages and kc.pool.in_use == 0
    assert job.ok
    assert job.progress.done == count * 512
    for d, exp in zip(dests, expected):
        assert bytes(d.data) == exp
