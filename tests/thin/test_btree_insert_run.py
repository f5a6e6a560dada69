"""``btree.insert_run`` (the runs of mappings a whole-block write inserts) leaves the metadata byte
for byte as the same inserts one at a time do: same splits, same blocks, same reference counts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from thin.metadata import ThinMetadata


def _image(path: Path, batches: list[list[int]], one_by_one: bool) -> bytes:
    with open(path, "wb") as f:
        f.truncate(8 << 20)
    md = ThinMetadata.format(path, data_block_size=128, nr_data_blocks=1 << 17)
    md.create_thin(1)
    for n, keys in enumerate(batches):
        batch = [(k, md.alloc_data_block()) for k in keys]  # each mapping holds its block's reference
        if one_by_one:
            for v, b in batch:
                md.insert(1, v, b)
        else:
            md.insert_many(1, batch)
        if n % 7 == 6:
            md.commit()  # later runs start from shared (committed) nodes
    md.commit()
    md.close()
    return path.read_bytes()


@pytest.mark.parametrize("seed", range(12))
def test_insert_run_writes_what_single_inserts_write(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    batches = []
    for _ in range(40):
        start, n = rng.randrange(6000), rng.randrange(1, 300)
        keys = list(range(start, start + n))
        if rng.random() < 0.3:
            keys.reverse()  # a run going down takes the full path for each key
        if rng.random() < 0.3:
            keys = rng.sample(range(6000), n)
        batches.append(keys)  # runs overlap: overwrites too
    assert _image(tmp_path / "run.img", batches, False) == _image(tmp_path / "single.img", batches, True)


def test_insert_run_splits_full_internal_nodes_as_single_inserts_do(tmp_path: Path) -> None:
    """Enough ascending runs (a volume written front to back) that internal nodes fill and split
    too: the runs must leave that to the full path, as a single insert splits them on the way down."""
    batches = [list(range(start, start + 128)) for start in range(0, 90_000, 128)]
    assert _image(tmp_path / "run.img", batches, False) == _image(tmp_path / "single.img", batches, True)


@pytest.mark.parametrize("seed", range(4))
def test_runs_in_no_order_write_what_single_inserts_write(tmp_path: Path, seed: int) -> None:
    """Runs of random keys (the first writes of random blocks, folded) into a tree of two levels:
    most keys go straight into their leaf, found from the root; leaves fill and split, keys below
    the root's first key and overwrites take the full path, and a commit between runs makes every
    node shared again."""
    rng = random.Random(seed)
    batches = [rng.sample(range(100, 30_000), rng.randrange(200, 1500)) for _ in range(12)]
    last = rng.sample(range(30_000), 800) + list(range(100))  # overwrites, and keys below every other
    rng.shuffle(last)
    batches.append(last)
    assert _image(tmp_path / "run.img", batches, False) == _image(tmp_path / "single.img", batches, True)
