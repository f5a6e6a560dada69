"""New mappings that wait in core (``ThinMetadata.map_new``/``map_one``/``map_run``) until a fold or commit:
the metadata comes out byte for byte as inserting each at once leaves it, lookups and counts see
them meanwhile, an abort drops them, and a failed fold stops every commit until the abort."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dmtools.errors import DeviceIOError, InvalidArgument
from thin.metadata import ThinMetadata
from thin.metadata.check import check


def _history(path: Path, seed: int, defer: bool) -> bytes:
    """A random history of mappings (single and 16-block runs, up or scattered) on several
    devices, with unmaps, snapshots, new and deleted devices, commits and data frees."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    md = ThinMetadata.format(path, data_block_size=128, nr_data_blocks=20000)
    md.create_thin(1)
    mapped: dict[int, set[int]] = {1: set()}
    for _ in range(500):
        r = rng.random()
        dev = rng.choice(sorted(mapped))
        if r < 0.6:
            n = rng.choice([1, 1, 1, 16])
            start = rng.randrange(5000)
            keys = list(range(start, start + n)) if rng.random() < 0.5 else rng.sample(range(5000), n)
            pairs = [(k, md.alloc_data_block()) for k in keys]
            one = rng.random() < 0.5  # drawn either way: both histories take the same steps
            if defer and not any(md.lookup(dev, k) for k in keys):  # as the thin target finds them
                blocks = [b for _k, b in pairs]
                if n == 1 and one:
                    md.map_one(dev, *pairs[0])
                elif one and keys == list(range(start, start + n)) and blocks == list(range(blocks[0], blocks[0] + n)):
                    md.map_run(dev, start, blocks[0], n)  # a whole-block write's new run
                else:
                    md.map_new(dev, pairs)
            else:
                md.insert_many(dev, pairs)
            mapped[dev].update(keys)
        elif r < 0.7 and mapped[dev]:
            k = rng.choice(sorted(mapped[dev]))
            assert md.remove(dev, k)
            mapped[dev].discard(k)
        elif r < 0.75 and len(mapped) < 5:
            new = max(mapped) + 1
            if rng.random() < 0.5:
                md.create_snap(new, dev)
                mapped[new] = set(mapped[dev])
            else:
                md.create_thin(new)
                mapped[new] = set()
        elif r < 0.77 and len(mapped) > 1:
            md.delete(dev)
            del mapped[dev]
        elif r < 0.82:
            md.commit()
        elif r < 0.83:
            md.data_dec(md.alloc_data_block())
        elif r < 0.86:
            assert md.details(dev).mapped_blocks == len(mapped[dev])
    md.commit()
    md.close()
    assert check(path).ok
    return path.read_bytes()


def _pool(tmp_path: Path) -> tuple[Path, ThinMetadata]:
    """Fresh metadata with an empty thin device 1, committed."""
    path = tmp_path / "meta.img"
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    md = ThinMetadata.format(path, data_block_size=128, nr_data_blocks=1000)
    md.create_thin(1)
    md.commit()
    return path, md


@pytest.mark.parametrize("seed", range(8))
def test_waiting_mappings_write_what_immediate_inserts_write(tmp_path: Path, seed: int) -> None:
    assert _history(tmp_path / "defer.img", seed, True) == _history(tmp_path / "now.img", seed, False)


def test_waiting_mappings_are_found_counted_committed_and_aborted(tmp_path: Path) -> None:
    path, md = _pool(tmp_path)
    b = md.alloc_data_block()
    md.map_one(1, 7, b)
    assert md.pending == 1
    assert md.find(1, 7) == (b, False)
    look = md.lookup(1, 7)
    assert look is not None and look.data_block == b and not look.shared
    assert md.details(1).mapped_blocks == 1
    assert [(v, d) for v, d, _t in md.mappings(1)] == [(7, b)]  # folds
    assert md.pending == 0
    c = md.alloc_data_block()
    md.map_one(1, 8, c)
    md.abort()  # never committed: gone, and its block free again
    assert md.pending == 0 and md.find(1, 8) is None and md.find(1, 7) is None
    assert md.details(1).mapped_blocks == 0
    d = md.alloc_data_block()
    md.map_new(1, [(3, d), (4, md.alloc_data_block())])
    md.commit()
    md.close()
    with ThinMetadata.open(path) as again:
        assert again.find(1, 3) == (d, False)
        assert again.details(1).mapped_blocks == 2


def test_a_failed_fold_refuses_commits_until_the_abort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, md = _pool(tmp_path)
    before = path.read_bytes()
    b = md.alloc_data_block()
    md.map_one(1, 5, b)

    def broken(*_args: object, **_kw: object) -> None:
        raise DeviceIOError("injected: metadata block unreadable")
    monkeypatch.setattr(md, "_insert_tree", broken)
    with pytest.raises(DeviceIOError, match="injected"):
        md.commit()
    monkeypatch.undo()
    assert md.find(1, 5) == (b, False)  # still found until the abort
    with pytest.raises(DeviceIOError, match="aborted"):
        md.commit()
    assert path.read_bytes() == before  # nothing written
    md.abort()
    assert md.find(1, 5) is None
    md.map_one(1, 5, md.alloc_data_block())
    md.commit()
    md.close()
    assert check(path).ok


def test_a_run_joins_the_waiting_mappings_only_when_it_may(tmp_path: Path) -> None:
    """``map_new``'s way for a run of the device of the last run: it waits in core; a run with a
    block outside the pool is refused and changes nothing; a run with a virtual block waiting
    already (or twice) goes in at once, as ``insert_many``."""
    path, md = _pool(tmp_path)
    first = md.alloc_data_blocks(16)
    md.map_new(1, list(zip(range(0, 16), first)))
    second = md.alloc_data_blocks(16)
    md.map_new(1, list(zip(range(16, 32), second)))  # the device of the last run: joins it
    assert md.pending == 32
    assert [md.find(1, v) for v in (0, 15, 16, 31)] == [(first[0], False), (first[15], False),
                                                       (second[0], False), (second[15], False)]
    for bad in (-1, 1000):  # 1000 data blocks: 0..999
        with pytest.raises(InvalidArgument, match="outside the pool"):
            md.map_new(1, [(40, md.alloc_data_block()), (41, bad)])
        assert md.pending == 32 and md.find(1, 40) is None
    again = md.alloc_data_blocks(2)
    md.map_new(1, [(31, again[0]), (32, again[1])])  # 31 waits already: both go in now
    assert md.pending == 0  # the insert folded the waiting ones first
    assert md.find(1, 31) == (again[0], False) and md.find(1, 32) == (again[1], False)
    md.commit()
    md.close()
    assert check(path).ok


@pytest.mark.parametrize("seed", range(4))
def test_unmapped_agrees_with_the_mappings_of_the_range(tmp_path: Path, seed: int) -> None:
    """``unmapped`` over trees of several leaves and mappings waiting in core, for ranges inside,
    across and between leaves."""
    rng = random.Random(seed)
    _path, md = _pool(tmp_path)
    keys = rng.sample(range(3000), 700)
    committed, waiting = keys[:600], keys[600:]
    md.insert_many(1, [(k, md.alloc_data_block()) for k in committed])  # several leaves
    md.commit()
    for k in waiting:
        md.map_one(1, k, md.alloc_data_block())
    everything = set(keys)
    for _ in range(300):
        begin = rng.randrange(3100)
        end = begin + rng.choice([1, 2, 16, 40])
        expect = everything.isdisjoint(range(begin, end))
        assert md.unmapped(1, begin, end) is expect, (begin, end)
    assert md.pending == len(waiting)  # no fold needed to tell
    assert md.unmapped(1, 5000, 5016)
    md.close()


def _count_allocs(md: ThinMetadata, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list whose length counts the metadata blocks allocated from now on."""
    taken: list[int] = []
    alloc = md.tm.msm.alloc

    def counted() -> int:
        taken.append(alloc())
        return taken[-1]
    monkeypatch.setattr(md.tm.msm, "alloc", counted)
    return taken


@pytest.mark.parametrize("where", ["below", "between", "above"])
@pytest.mark.parametrize("seed", range(3))
def test_a_fold_takes_no_more_metadata_blocks_than_its_inserts_are_counted_for(
        tmp_path: Path, seed: int, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pending_inserts``, what the pool bounds a fold's metadata blocks with (``INSERT_COST``,
    8, each): a run of consecutive unmapped blocks counts as one insert plus one per 124 more
    blocks, and a run that continues the last one joins it. The fold of one long run (200
    writes of 16 blocks) below, between or above the keys of a committed tree of many leaves
    takes at most 8 blocks per insert counted, and more than 8 (what one insert per run would
    allow)."""
    rng = random.Random(seed)
    path, md = _pool(tmp_path)
    md.resize_data(20000)
    n = 16 * 200
    start = {"below": 0, "between": 100000, "above": 300000}[where]
    keys = rng.sample(range(n, 100000), 2000) + rng.sample(range(100000 + n, 300000), 2000)
    md.insert_many(1, [(k, md.alloc_data_block()) for k in keys])  # random order: leaves part full
    md.commit()
    assert md.unmapped(1, start, start + n)
    taken = _count_allocs(md, monkeypatch)
    for v in range(start, start + n, 16):
        blocks = md.alloc_data_blocks(16)
        md.map_run(1, v, blocks[0], 16)
    assert md.pending == n and md.pending_inserts == 1 + -(-(n - 1) // 124)
    counted = md.pending_inserts
    md.fold()
    assert 8 < len(taken) <= 8 * counted
    md.commit()
    md.close()
    assert check(path).ok


def test_only_a_run_that_continues_the_last_one_joins_it(tmp_path: Path) -> None:
    """What ``pending_inserts`` counts: a run continuing the run added just before on the same
    device joins it; a mapping added between, a gap or another device start a new count; a
    fold or commit starts from none."""
    _path, md = _pool(tmp_path)
    md.create_thin(2)
    md.resize_data(20000)

    def run(dev: int, v: int, n: int) -> None:
        md.map_run(dev, v, md.alloc_data_blocks(n)[0], n)
    run(1, 0, 16)  # the first key, then one split of its leaf at most
    assert md.pending_inserts == 2
    for v in range(16, 125, 16):
        run(1, v, 16)  # 0..127: 1 + ceil(127 / 124)
    assert md.pending_inserts == 3
    md.map_one(1, 1000, md.alloc_data_block())
    run(1, 128, 16)  # continues 0..127, but a mapping came between
    assert md.pending_inserts == 3 + 1 + 2
    run(1, 200, 16)  # not where the last run ended
    run(2, 216, 16)  # another device
    assert md.pending_inserts == 10
    run(2, 232, 16)
    assert md.pending_inserts == 10
    md.commit()
    assert md.pending == md.pending_inserts == 0
    run(2, 248, 16)  # after a fold: counted afresh
    assert md.pending_inserts == 2
    md.close()


def _runs_history(path: Path, seed: int, defer: bool) -> bytes:
    """Sequential writers' runs (16 blocks, continuing each other on both sides or only on the
    virtual side), single mappings between them and a second device; with ``defer`` every
    block, waiting or not, is looked up, and ranges across runs are checked unmapped or not."""
    rng = random.Random(seed)
    probe = random.Random(-seed)  # the checks' draws: both histories take the same steps
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    md = ThinMetadata.format(path, data_block_size=128, nr_data_blocks=20000)
    md.create_thin(1)
    md.create_thin(2)
    md.commit()
    mapped: dict[int, dict[int, int]] = {1: {}, 2: {}}
    nxt = {1: 0, 2: 5000}
    for step in range(300):
        dev = 1 if rng.random() < 0.8 else 2
        r = rng.random()
        if r < 0.7:
            v = nxt[dev] if rng.random() < 0.9 else rng.randrange(0, 9000, 16)
            if any(k in mapped[dev] for k in range(v, v + 16)):
                continue
            if rng.random() < 0.2:
                md.alloc_data_block()  # the next run's data blocks do not continue the last's
            blocks = md.alloc_data_blocks(16)
            assert list(blocks) == list(range(blocks[0], blocks[0] + 16))
            if defer:
                md.map_run(dev, v, blocks[0], 16)
            else:
                md.insert_many(dev, list(zip(range(v, v + 16), blocks)))
            mapped[dev].update(zip(range(v, v + 16), blocks))
            nxt[dev] = v + 16
        elif r < 0.85:
            v = rng.randrange(9000)
            if v in mapped[dev]:
                continue
            b = md.alloc_data_block()
            if defer:
                md.map_one(dev, v, b)
            else:
                md.insert(dev, v, b)
            mapped[dev][v] = b
        elif r < 0.9:
            md.commit()
        if defer and step % 10 == 0:
            for k in range(0, max(nxt[dev], 200) + 20):
                found = md.find(dev, k)
                assert found == ((mapped[dev][k], False) if k in mapped[dev] else None), (dev, k)
            for _ in range(50):
                begin = probe.randrange(max(nxt[dev], 200) + 20)
                end = begin + probe.choice([1, 5, 16, 40])
                assert md.unmapped(dev, begin, end) is all(k not in mapped[dev] for k in range(begin, end))
            assert md.details(dev).mapped_blocks == len(mapped[dev])
    if defer:
        begin = probe.randrange(max(nxt[1], 200))
        got = [(v, b) for v, b, _t in md.mappings(1, begin, begin + 50)]  # folds what waits there
        assert got == sorted((v, b) for v, b in mapped[1].items() if begin <= v < begin + 50)
    md.commit()
    md.close()
    assert check(path).ok
    return path.read_bytes()


@pytest.mark.parametrize("seed", range(4))
def test_waiting_runs_are_found_block_by_block_and_write_what_immediate_inserts_write(tmp_path: Path, seed: int) -> None:
    assert _runs_history(tmp_path / "defer.img", seed, True) == _runs_history(tmp_path / "now.img", seed, False)
