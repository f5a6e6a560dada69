"""Pool histories and their expected dumps, shared by the thin tests.

``PoolModel`` is the reference: devices, their mappings and details, the pool time and transaction
id, kept in plain dicts; ``xml`` renders it as thin_dump 0.9.0 prints it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from thin.metadata import ThinMetadata


@dataclass
class DeviceModel:
    transaction: int
    creation_time: int
    snap_time: int
    mappings: dict[int, tuple[int, int]] = field(default_factory=dict)  # vblock -> (data block, time)


@dataclass
class PoolModel:
    data_block_size: int = 128
    nr_data_blocks: int = 1000
    time: int = 0
    transaction: int = 0
    flags: int = 0
    version: int = 2
    devices: dict[int, DeviceModel] = field(default_factory=dict)

    def runs(self, dev: DeviceModel) -> list[tuple[int, int, int, int]]:
        out: list[tuple[int, int, int, int]] = []
        for vb in sorted(dev.mappings):
            db, t = dev.mappings[vb]
            if out:
                v0, d0, n, t0 = out[-1]
                if vb == v0 + n and db == d0 + n and t == t0:
                    out[-1] = (v0, d0, n + 1, t0)
                    continue
            out.append((vb, db, 1, t))
        return out

    def xml(self) -> str:
        lines = [f'<superblock uuid="" time="{self.time}" transaction="{self.transaction}" flags="{self.flags}" '
                 f'version="{self.version}" data_block_size="{self.data_block_size}" '
                 f'nr_data_blocks="{self.nr_data_blocks}">']
        for dev_id in sorted(self.devices):
            d = self.devices[dev_id]
            lines.append(f'  <device dev_id="{dev_id}" mapped_blocks="{len(d.mappings)}" '
                         f'transaction="{d.transaction}" creation_time="{d.creation_time}" '
                         f'snap_time="{d.snap_time}">')
            for vb, db, n, t in self.runs(d):
                if n == 1:
                    lines.append(f'    <single_mapping origin_block="{vb}" data_block="{db}" time="{t}"/>')
                else:
                    lines.append(f'    <range_mapping origin_begin="{vb}" data_begin="{db}" length="{n}" '
                                 f'time="{t}"/>')
            lines.append("  </device>")
        lines.append("</superblock>")
        return "\n".join(lines) + "\n"


def random_pool(rng: random.Random, *, devices: int, mappings: int, nr_data_blocks: int,
                shared: bool = True) -> PoolModel:
    """A pool with runs and scattered blocks; with ``shared`` some data blocks are mapped twice."""
    pool = PoolModel(nr_data_blocks=nr_data_blocks, time=rng.randrange(0, 5), transaction=rng.randrange(0, 100))
    ids = rng.sample(range(1 << 24), devices)
    for dev_id in ids:
        pool.devices[dev_id] = DeviceModel(transaction=rng.randrange(0, 100),
                                           creation_time=rng.randrange(0, pool.time + 1), snap_time=pool.time)
    used: list[int] = []
    cursor = 0
    for dev in pool.devices.values():
        vb = rng.randrange(0, 1000)
        while len(dev.mappings) < mappings // devices:
            if shared and used and rng.random() < 0.2:
                db = rng.choice(used)
            else:
                if rng.random() < 0.1:
                    cursor += rng.randrange(1, 50)
                if cursor >= nr_data_blocks:
                    return pool
                db = cursor
                cursor += 1
                used.append(db)
            dev.mappings[vb] = (db, rng.randrange(0, pool.time + 1) if rng.random() < 0.1 else 0)
            vb += 1 if rng.random() < 0.8 else rng.randrange(2, 10000)
    return pool


def build_pool(meta: Path, data: Path, *, block_sectors: int = 128, nr_blocks: int = 64,
               seed: int = 5) -> dict[int, dict[int, bytes]]:
    """A pool written by our metadata library, with data: thin 1 maps blocks 0-9 and 40, snapshot 2
    of it rewrites block 3 and adds block 50. Returns each volume's contents by block."""
    block = block_sectors * 512
    rng = random.Random(seed)
    views: dict[int, dict[int, bytes]] = {1: {}, 2: {}}
    with ThinMetadata.format(meta, data_block_size=block_sectors, nr_data_blocks=nr_blocks) as md, \
            open(data, "r+b" if data.exists() else "w+b") as f:
        f.truncate(nr_blocks * block)

        def write(dev: int, vblock: int) -> None:
            b = md.alloc_data_block()
            payload = rng.randbytes(block)
            f.seek(b * block)
            f.write(payload)
            md.insert(dev, vblock, b)
            views[dev][vblock] = payload

        md.create_thin(1)
        for v in [*range(10), 40]:
            write(1, v)
        md.commit()
        md.create_snap(2, 1)
        views[2] = dict(views[1])
        write(2, 3)
        write(2, 50)
        f.flush()
        md.commit()
    return views


def volume_bytes(view: dict[int, bytes], size: int, block: int) -> bytes:
    """A volume's expected contents: its blocks where mapped, zeros elsewhere, cut at ``size``."""
    out = bytearray(size)
    for v, payload in view.items():
        if v * block < size:
            out[v * block:(v + 1) * block] = payload[: size - v * block]
    return bytes(out)
