"""Commit order: a commit interrupted after any number of block writes leaves the metadata as the
last commit left it (the superblock is written last; no block the old tree uses is overwritten)."""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from dmtools.errors import DeviceIOError
from thin.metadata import ThinMetadata, dump_xml
from thin.metadata.check import check
from thin.metadata.transaction import MetadataDevice


def _dump(path: Path) -> str:
    out = io.StringIO()
    with ThinMetadata.open(path) as md:
        dump_xml(md, out)
    return out.getvalue()


def _history(md: ThinMetadata, rng: random.Random) -> None:
    for dev in md.devices():
        for _ in range(rng.randrange(50, 400)):
            v = rng.randrange(0, 5000)
            if rng.random() < 0.3:
                md.remove(dev, v)
            else:
                md.insert(dev, v, md.alloc_data_block())
    if rng.random() < 0.5:
        md.create_snap(max(md.devices()) + 1, rng.choice(list(md.devices())))
    if rng.random() < 0.2 and len(md.devices()) > 1:
        md.delete(min(md.devices()))


@pytest.mark.parametrize("seed", range(6))
def test_interrupted_commit_keeps_the_last_one(seed: int, thin_tools, meta_image: Callable[..., Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    path = meta_image(8 << 20)
    with ThinMetadata.format(path, data_block_size=128, nr_data_blocks=20000) as md:
        md.create_thin(1)
        md.create_thin(2)
        _history(md, rng)
        md.commit()
    base, before = path.read_bytes(), _dump(path)
    real_write = MetadataDevice.write
    writes: list[int] = []

    def counting_write(self: MetadataDevice, blocknr: int, data: bytes | bytearray) -> None:
        writes.append(blocknr)
        real_write(self, blocknr, data)

    monkeypatch.setattr(MetadataDevice, "write", counting_write)
    with ThinMetadata.open(path, writable=True) as md:
        _history(md, random.Random(seed + 100))
        md.commit()
    assert writes[-1] == 0 and 0 not in writes[:-1]  # the superblock goes last, once
    assert _dump(path) != before
    for stop in sorted(rng.sample(range(len(writes)), min(8, len(writes)))):
        path.write_bytes(base)
        done = [0]

        def failing_write(self: MetadataDevice, blocknr: int, data: bytes | bytearray) -> None:
            if done[0] == stop:
                raise DeviceIOError("injected crash", device=self.path, operation="write")
            done[0] += 1
            real_write(self, blocknr, data)

        monkeypatch.setattr(MetadataDevice, "write", failing_write)
        with ThinMetadata.open(path, writable=True) as md:
            _history(md, random.Random(seed + 100))  # the same transaction, cut after ``stop`` writes
            with pytest.raises(DeviceIOError):
                md.commit()
        monkeypatch.setattr(MetadataDevice, "write", real_write)
        assert _dump(path) == before, f"crash after {stop} of {len(writes)} writes"
        thin_tools.check(path)
        assert check(path).ok
