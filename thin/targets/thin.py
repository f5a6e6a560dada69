"""``thin <pool dev> <dev id> [<external origin dev>]``: a thin device of a pool (dm-thin.c ``thin_ctr``).

I/O is split at data-block boundaries (the kernel sets ``max_io_len`` to one block) and each block
is looked up under its cell, as ``process_bio`` does (see :mod:`thin.targets.cells`):

* mapped and not shared: the cell is released and the I/O goes to the data block, counted in
  flight on that block until it is done;
* a read of an unmapped block returns zeros, or the external origin's data;
* a write to an unmapped block allocates one, prepares it with kcopyd (zeroed unless
  ``skip_block_zeroing``, copied from the external origin, nothing when the write covers the whole
  block), writes it and then maps it; a write to a *shared* block (a snapshot was taken since it
  was written) does the same with a kcopyd copy of the old block (``break_sharing``); a job of at
  most one sub-job runs on the writer's thread (``kcopyd.Client.run``), larger blocks go through
  kcopyd's workers. A partial write to a shared block on a data file the engine opened is one
  step instead (:meth:`ThinTarget._break_sharing`): the old block read, the write's bytes put in,
  one write of the new block, which then holds what the copy and the write leave;
* discards unmap whole blocks and pass the freed ones down to the data device;
* a flush commits the pool when this device changed in the transaction, else flushes the data
  device, so no flushed write is lost.

The kernel remaps a thin bio to the pool device, whose target remaps it to the data device. Here
block I/O goes to the data device straight while the pool is live (the pool's gate, see
:mod:`thin.targets.cells`, counts it): a suspending pool closes the gate and waits for that I/O,
and from then on block I/O goes through the pool device, which holds it until the pool resumes,
as every kcopyd job always does.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
from collections.abc import Sequence
from typing import Any, Callable

import kcopyd
from kcopyd.inline import INLINE_MAX_BYTES
from dmtools.blockdev import HUGE_PAGE, aligned_buffer
from dmtools.endpoint import Endpoint, read_full
from dmtools.engine.backing import DIRECT_MIN
from dmtools.engine.device import RequeueIO
from dmtools.engine.device_endpoint import DeviceEndpoint
from dmtools.engine.target_driver import TargetContext, TargetDriver, fill_zero
from dmtools.errors import DeviceIOError, DeviceNotFound, DMError, InvalidTable, NoSpace
from dmtools.target_values import Thin

from thin.targets.pool_core import SECTOR, Mode
from thin.targets.pool_table import pool_table

__all__ = ["ThinTarget"]


class ThinTarget(TargetDriver):
    """A thin device: see the module docstring."""

    name = "thin"
    version = (1, 24, 0)  # dm-thin.c
    value_type = Thin

    def __init__(self, ctx: TargetContext, start: int, length: int, value: Thin) -> None:
        super().__init__(ctx, start, length, value.args())
        self.value = value
        try:
            self.pool_dev = ctx.get_device(value.pool)
        except DMError as err:
            raise self.fail(f"Error opening pool device: {err.message}") from err
        self.devices.append(self.pool_dev)
        inner = self.pool_dev.inner
        table = pool_table(ctx)
        pool = table.by_pool_device(inner.device) if isinstance(inner, DeviceEndpoint) else None
        if pool is None:
            raise self.fail("Couldn't get pool mapped device" if not isinstance(inner, DeviceEndpoint)
                            else "Couldn't find pool object")
        if pool.mode == Mode.FAIL:
            raise self.fail("Couldn't open thin device, Pool is in fail mode")
        if pool.suspended:
            raise self.fail("Unable to activate thin device while pool is suspended")
        self.origin = None
        if value.origin is not None:
            try:
                self.origin = ctx.get_device(value.origin, writable=False)
            except DMError as err:
                raise self.fail(f"Error opening origin device: {err.message}") from err
            self.devices.append(self.origin)
        table.acquire(pool)
        try:
            self.state = pool.open_device(value.dev_id)
        except DeviceNotFound as err:
            table.put(pool)
            raise InvalidTable("thin: Couldn't open thin internal device", errno=errno.ENODATA,
                               operation="load", device=ctx.device_name) from err
        except BaseException:
            table.put(pool)
            raise
        self.pool = pool
        self.dev_id = value.dev_id
        self.block_sectors = pool.block_size
        self.bb = pool.block_bytes
        self.origin_sectors = self.origin.sectors if self.origin is not None else 0
        #: the data device the pool's gate gave last and its writer (:func:`_writer_of`).
        self._route: tuple[Any, Callable[[memoryview, int], Any]] = (None, self.pool_dev.write)
        #: the data device :meth:`_break_sharing` used last and its copier (:func:`_block_copier`).
        self._copier: tuple[Any, Callable[[int, int, int, memoryview], None] | None] = (None, None)
        self._closed = False

    # -- helpers -------------------------------------------------------------------------------
    def _writer(self, data: Endpoint) -> Callable[[memoryview, int], Any]:
        """The writer of ``data``, a data device the pool's gate gave (:func:`_writer_of`), kept
        for the next I/O the gate gives it to."""
        route = self._route
        if route[0] is not data:
            route = self._route = (data, _writer_of(data))
        return route[1]

    def _per_block(self, buf: memoryview, offset: int, fn: Callable[[int, int, memoryview], None]) -> None:
        """``fn(vblock, offset in block, piece)`` for each block the I/O touches, in order (the
        kernel splits bios at block boundaries)."""
        pos = 0
        bb = self.bb
        while pos < len(buf):
            vblock, within = divmod(offset + pos, bb)
            n = min(bb - within, len(buf) - pos)
            fn(vblock, within, buf[pos:pos + n])
            pos += n

    # A block-sized kcopyd job runs on the writer's thread (kcopyd.inline): the writer waits for
    # it anyway, and a hand-off to kcopyd's threads costs more than the copy.
    def _copy(self, src: kcopyd.Region, dst: kcopyd.Region) -> None:
        self.pool.kc.run(src, [dst]).raise_for_error()

    def _zero(self, dst: kcopyd.Region) -> None:
        self.pool.kc.run(None, [dst]).raise_for_error()

    # -- reads ---------------------------------------------------------------------------------
    def read(self, buf: memoryview, offset: int) -> None:
        bb = self.bb
        vblock, within = divmod(offset, bb)
        if within + len(buf) <= bb:  # one block: most I/O
            self._read_block(vblock, within, buf)
            return
        v0, v1 = vblock, -(-(offset + len(buf)) // bb)
        if v1 - v0 < 2:
            self._per_block(buf, offset, self._read_block)
            return
        # Several blocks: their cells together, one walk of the mappings, one read per run of
        # blocks that are consecutive on the data device too.
        pool = self.pool
        with pool.prison.hold_range(self.dev_id, v0, v1):
            pool.check_io()
            looks = pool.lookup_range(self.dev_id, v0, v1)
            run_start = run_at = run_end = -1
            pos = 0
            while pos < len(buf):
                vblock, within = divmod(offset + pos, bb)
                n = min(bb - within, len(buf) - pos)
                look = looks.get(vblock)
                at = look.data_block * bb + within if look is not None else -1
                if run_start >= 0 and at != run_at + (pos - run_start):
                    read_full(self.pool_dev, buf[run_start:run_end], run_at)
                    run_start = -1
                if look is None:
                    self._read_unmapped(vblock, within, buf[pos:pos + n])
                elif run_start < 0:
                    run_start, run_at = pos, at
                run_end = pos + n
                pos += n
            if run_start >= 0:
                read_full(self.pool_dev, buf[run_start:run_end], run_at)

    def _read_block(self, vblock: int, within: int, piece: memoryview) -> None:
        pool = self.pool
        block, _old, _new, _aborts, data = pool.begin_io(self.dev_id, vblock, False)
        if block < 0:  # unmapped: read under the cell
            try:
                self._read_unmapped(vblock, within, piece)
            finally:
                pool.prison.release((self.dev_id, vblock))
            return
        try:  # the read runs outside the cell (thin_bio_map's remap)
            read_full(data or self.pool_dev, piece, block * self.bb + within)
        finally:
            pool.prison.leave(block, data is not None)

    def _read_unmapped(self, vblock: int, within: int, piece: memoryview) -> None:
        """An unprovisioned block reads zeros, or the external origin's data."""
        if self.origin is not None:
            self._read_origin(vblock * self.bb + within, piece)
        else:
            fill_zero(piece)

    def _read_origin(self, at: int, piece: memoryview) -> None:
        """A read of an unprovisioned block from the external origin; past its end reads zeros."""
        inside = max(0, min(len(piece), self.origin_sectors * SECTOR - at))
        if inside:
            assert self.origin is not None
            read_full(self.origin, piece[:inside], at)
        if inside < len(piece):
            fill_zero(piece[inside:])

    # -- writes --------------------------------------------------------------------------------
    def write(self, buf: memoryview, offset: int) -> None:
        bb = self.bb
        vblock, within = divmod(offset, bb)
        if within + len(buf) <= bb:  # one block: most I/O (_write_block, inline)
            pool = self.pool
            known = pool.prison.enter_mapped((self.dev_id, vblock), True)  # begin_io's first step
            if known is not None:
                block, data = known
            else:
                block, old, new, aborts, data = pool.look_up_io(self.dev_id, vblock, True)
                if block < 0:
                    self._provision_cell(vblock, within, buf, old, new, aborts, data)
                    return
            try:  # the write runs outside the cell (thin_bio_map)
                if data is None:
                    self.pool_dev.write(buf, block * bb + within)
                else:
                    route = self._route
                    (route[1] if route[0] is data else self._writer(data))(buf, block * bb + within)
            finally:
                pool.prison.leave(block, data is not None)
            return
        v0, v1 = -(-offset // bb), (offset + len(buf)) // bb
        if v1 - v0 < 2:
            self._per_block(buf, offset, self._write_block)
            return
        head = v0 * bb - offset
        tail = head + (v1 - v0) * bb
        if head:
            self._per_block(buf[:head], offset, self._write_block)
        self._write_whole_blocks(v0, v1, buf[head:tail])
        if tail < len(buf):
            self._per_block(buf[tail:], v1 * bb, self._write_block)

    def _write_whole_blocks(self, v0: int, v1: int, data: memoryview) -> None:
        """Whole-block writes of ``[v0, v1)``: no zeroing or copying is needed, so the blocks are
        allocated together, written with one I/O per run that is consecutive on the data device,
        and mapped together. Blocks the pool cannot give at once go the per-block way."""
        pool, bb, dev_id = self.pool, self.bb, self.dev_id
        prison = pool.prison
        cells, route = prison.take_range_to_write(dev_id, v0, v1)
        try:
            pool.check_io()
            fresh = pool.alloc_unmapped(dev_id, v0, v1)
            if fresh is not None:
                news, aborts = fresh
                n = len(news)
                if n == v1 - v0 and (isinstance(news, range) or news == list(range(news[0], news[0] + n))):
                    # first writes on one new run of blocks (the sequential writer's case): one
                    # write, then the run mapped
                    try:  # straight to the data device while the pool's gate is open (_write_data)
                        (self.pool_dev if route is None else route).write(data, news[0] * bb)
                    except BaseException:
                        for block in news:
                            pool.release_block(block, aborts)
                        raise
                    pool.insert_many(self.state, (), aborts, new=True, run=(v0, news[0], n))
                    return
            need = self._write_runs(v0, v1, data, fresh)
        finally:
            prison.give_range(cells, route is not None)
        for v in need:
            self._write_block(v, 0, data[(v - v0) * bb:(v - v0 + 1) * bb])

    def _write_runs(self, v0: int, v1: int, data: memoryview, fresh: tuple[Sequence[int], int] | None) -> Sequence[int]:
        """:meth:`_write_whole_blocks` of blocks that are mapped, shared, or new but not one run
        (``fresh``: the new blocks and abort count :meth:`Pool.alloc_unmapped` gave, ``None``
        when some block is mapped), their cells held: one write per run consecutive on the data
        device, then the new mappings. Returns the blocks the pool could not give at once."""
        pool, bb = self.pool, self.bb
        need: Sequence[int]
        shared: list[int]  # the old blocks of shared ones
        if fresh is not None:  # first writes: nothing to look up
            need, shared = range(v0, v1), []
            news, aborts = fresh
            dest: dict[int, int] = {}
        else:
            looks = pool.lookup_range(self.dev_id, v0, v1)
            dest = {v: look.data_block for v, look in looks.items() if not look.shared}
            shared = [look.data_block for look in looks.values() if look.shared]
            need = [v for v in range(v0, v1) if v not in dest]
            aborts = pool.aborts
            news = pool.try_alloc_many(len(need)) if need else []
        pairs = list(zip(need, news))
        try:
            dest.update(pairs)
            start = v0
            while start < v1:
                if start not in dest:
                    start += 1
                    continue
                end = start + 1
                while end < v1 and dest.get(end) == dest[start] + (end - start):
                    end += 1
                self._write_data(data[(start - v0) * bb:(end - v0) * bb], dest[start] * bb)
                start = end
        except BaseException:
            for _v, block in pairs:
                pool.release_block(block, aborts)
            raise
        for block in shared:  # reads still in flight on the old block (shared_read_ds)
            pool.prison.quiesce(block)
        if pairs:
            pool.insert_many(self.state, pairs, aborts, new=not shared)
        return need[len(news):]

    def _write_block(self, vblock: int, within: int, piece: memoryview) -> None:
        pool = self.pool
        block, old, new, aborts, data = pool.begin_io(self.dev_id, vblock, True)
        if block < 0:  # unmapped or shared: provision under the cell
            self._provision_cell(vblock, within, piece, old, new, aborts, data)
            return
        try:  # the write runs outside the cell (thin_bio_map)
            if data is None:
                self.pool_dev.write(piece, block * self.bb + within)
            else:
                self._writer(data)(piece, block * self.bb + within)
        finally:
            pool.prison.leave(block, data is not None)

    def _provision_cell(self, vblock: int, within: int, piece: memoryview, old: int | None, new: int | None,
                        aborts: int, data: Endpoint | None) -> None:
        """:meth:`_provision` with the cell :meth:`Pool.begin_io` gave, released when done."""
        pool = self.pool
        try:
            if (old is None and new is not None and data is not None and self.origin is None
                    and (not pool.pf.zero_new_blocks or (not within and len(piece) == self.bb))):
                # a first write that needs no preparation (_provision's commonest case, inline)
                try:
                    route = self._route
                    (route[1] if route[0] is data else self._writer(data))(piece, new * self.bb + within)
                except BaseException:
                    pool.release_block(new, aborts)
                    raise
                pool.insert_many(self.state, ((vblock, new),), aborts, new=True)
            else:
                self._provision(vblock, within, piece, old, new, aborts, data)
        finally:
            pool.prison.release((self.dev_id, vblock), data is not None)

    def _write_data(self, piece: memoryview, at: int) -> None:
        """Write ``piece`` at byte ``at`` of the pool's data: straight to the data device while
        the pool's gate is open, else through the pool device (see :mod:`thin.targets.cells`)."""
        prison = self.pool.prison
        data = prison.enter_direct(True)
        if data is None:
            self.pool_dev.write(piece, at)
            return
        try:
            data.write(piece, at)
        finally:
            prison.leave_direct()

    def _provision(self, vblock: int, within: int, piece: memoryview, old: int | None, new: int | None,
                   aborts: int, data: Endpoint | None = None) -> None:
        """Write ``piece`` to a new block for ``vblock`` (unmapped, or shared with data block ``old``), its cell
        held: ``new`` is the block :meth:`Pool.begin_io` gave (with ``data``, the data device the
        pool's gate let it write to), else one is allocated here (waiting for space or failing
        as the pool's mode says). The new mapping goes in once the block is prepared and
        written, and I/O still in flight on a shared old block is done."""
        pool = self.pool
        if new is None:
            aborts = pool.aborts
            try:
                new = pool.alloc_data_block(lambda: not self.ctx.noflush_suspending)
            except NoSpace:
                if self.ctx.noflush_suspending and not pool.pf_error_if_no_space:
                    raise RequeueIO("out of data space: requeued", device=self.ctx.device_name) from None
                raise
        try:
            partial = within or len(piece) != self.bb
            if not (partial and old is not None and data is not None
                    and self._break_sharing(data, old, new, within, piece)):
                if partial and (old is not None or self.origin is not None or pool.pf.zero_new_blocks):
                    self._prepare(vblock, new, old, data)
                if data is not None:
                    self._writer(data)(piece, new * self.bb + within)
                else:
                    self._write_data(piece, new * self.bb + within)
        except BaseException:
            pool.release_block(new, aborts)
            raise
        if old is not None:
            pool.prison.quiesce(old)
            pool.insert_many(self.state, ((vblock, new),), aborts)
        else:
            pool.insert_many(self.state, ((vblock, new),), aborts, new=True)

    def _break_sharing(self, data: Endpoint, old: int, new: int, within: int, piece: memoryview) -> bool:
        """A partial write to shared block ``old`` as one step on ``data``, the data device the
        pool's gate gave: the old block is read, ``piece`` put in at ``within``, and the result
        written to ``new`` with one write. The new block then holds what dm-thin.c leaves there
        with its kcopyd copy of the old block (``break_sharing``/``schedule_copy``) followed by
        the write, and the write is done when this returns, as there; an error of either is the
        write's error (``copy_complete`` fails the cell), and the caller releases ``new``.

        Done only where kcopyd's own job would be a plain ``pread``/``pwrite`` of a block of at
        most ``INLINE_MAX_BYTES`` (:func:`_block_copier`) and the pool's kcopyd client is not
        throttled; returns ``False`` having done nothing otherwise (the caller goes kcopyd's way).
        """
        route = self._copier
        if route[0] is not data:
            route = self._copier = (data, _block_copier(data, self.bb))
        copy = route[1]
        if copy is None or self.pool.kc.throttle.active:
            return False
        copy(old * self.bb, new * self.bb, within, piece)
        return True

    def _prepare(self, vblock: int, new: int, old: int | None, data: Endpoint | None = None) -> None:
        """Fill a new block before a partial write (dm-thin.c ``schedule_copy``/``schedule_zero``/
        ``schedule_external_copy``). ``data`` is the data device the pool's gate let this write
        use (:meth:`Pool.begin_io`): the kcopyd job's pool-side regions go there straight, as the
        write does, else through the pool device."""
        bs = self.block_sectors
        dev = data or self.pool_dev
        if old is not None:  # break_sharing
            self._copy(kcopyd.Region(dev, old * bs, bs), kcopyd.Region(dev, new * bs, bs))
            return
        start = vblock * bs
        if self.origin is not None and start < self.origin_sectors:
            n = min(bs, self.origin_sectors - start)
            self._copy(kcopyd.Region(self.origin, start, n), kcopyd.Region(dev, new * bs, n))
            if n < bs and self.pool.pf.zero_new_blocks:
                self._zero(kcopyd.Region(dev, new * bs + n, bs - n))
            return
        if self.pool.pf.zero_new_blocks and not self._reads_zeros(new, data):
            self._zero(kcopyd.Region(dev, new * bs, bs))

    def _reads_zeros(self, block: int, data: Endpoint | None = None) -> bool:
        """A data block the data device reports as a hole (never written, or discarded) already
        reads zeros: zeroing it again changes nothing. ``data``: the data device the caller's
        I/O already counts on (:meth:`_prepare`), else the pool's gate is asked for it."""
        prison = self.pool.prison
        entered = data is None
        if entered:
            data = prison.enter_direct(False)  # straight to the data device while the pool is live
            entered = data is not None
        try:
            extents = (data or self.pool_dev).data_extents(block * self.bb, self.bb)
        except (DMError, OSError):
            return False
        finally:
            if entered:
                prison.leave_direct()
        return extents is not None and not extents

    # -- discards and flushes ------------------------------------------------------------------
    def discard(self, offset: int, length: int) -> None:
        """Unmap the whole blocks inside the range (``process_discard_bio``); a discard smaller
        than a block does nothing. Read-only pools complete discards without effect."""
        pool = self.pool
        if not pool.pf.discard_enabled:
            return
        first = -(-offset // self.bb)
        end = (offset + length) // self.bb
        if first >= end:
            return
        pool.check_io()
        if pool.mode >= Mode.OUT_OF_METADATA_SPACE:
            return
        mapped = pool.run("dm_thin_find_mapped_range",
                          lambda md: [v for v, _b, _t in md.mappings(self.dev_id, first, end)])
        for vblock in mapped:
            with pool.prison.hold((self.dev_id, vblock)):
                look = pool.lookup(self.dev_id, vblock)
                if look is None:
                    continue
                pool.prison.quiesce(look.data_block)  # I/O sent to it before the discard (all_io_ds)
                aborts = pool.aborts
                block = pool.unmap(self.state, vblock)
                if block is None:
                    continue
                try:
                    self.pool_dev.discard(block * self.bb, self.bb)
                except (DMError, OSError):
                    pass  # errors of a passed-down discard are ignored (dm-thin.c passdown_endio)
                finally:
                    pool.discard_done(block, aborts)

    def flush(self) -> None:
        """Commit when this device changed in the transaction (``bio_triggers_commit``), else
        flush the data device; a device whose changes an abort dropped fails the flush."""
        state = self.state
        if state.aborted_with_changes:
            raise DeviceIOError("metadata changes of this device were lost by an abort",
                                errno=errno.EIO, operation="flush", device=self.ctx.device_name)
        if state.changed:
            self.pool.flush_and_commit()
        else:
            self.pool_dev.flush()

    # -- text and lifetime ---------------------------------------------------------------------
    def status(self) -> str:
        return self.pool.thin_status(self.state)

    def presuspend(self) -> None:
        """A noflush suspend hands writes waiting for data space back to the device
        (``do_noflush_start``): wake them."""
        if self.ctx.noflush_suspending:
            self.pool.wake()

    def preresume(self) -> None:
        """The external origin's size is sampled at every resume (``thin_preresume``)."""
        if self.origin is not None:
            self.origin_sectors = self.origin.sectors

    def destroy(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.pool.close_device(self.state)
        pool_table(self.ctx).put(self.pool)


def _writer_of(dev: Endpoint) -> Callable[[memoryview, int], Any]:
    """A function writing a piece of a block at a byte of ``dev``, the pool's data device: its
    ``write``, or, where a write under ``DIRECT_MIN`` bytes is a plain ``pwrite``
    (:meth:`~dmtools.endpoint.Endpoint.plain_fd`: a writable file or block device the engine
    opened, under the table's handle), one ``pwrite`` on that descriptor. Its offset and length
    checks are not needed here: a thin device writes inside a data block of the pool, which the
    data device holds (checked at the pool's resume). A failed or short ``pwrite`` goes on through
    ``write``, which writes the rest or raises the device's error; so does every write while the
    handle's ``write`` is replaced on the handle itself (a test's probe)."""
    fd = dev.plain_fd(DIRECT_MIN - 1, True)
    if fd < 0:
        return dev.write
    own = getattr(dev, "__dict__", {})

    def write(piece: memoryview, at: int) -> Any:
        n = len(piece)
        if n >= DIRECT_MIN or "write" in own:
            return dev.write(piece, at)
        try:
            done = os.pwrite(fd, piece, at)
        except OSError:
            done = 0
        if done < n:
            dev.write(piece[done:], at + done)
        return n
    return write


#: free block buffers by size (:func:`_take_buffer`).
_free: dict[int, "queue.SimpleQueue[memoryview]"] = {}


def _take_buffer(n: int) -> memoryview:
    """A buffer of ``n`` bytes (``n`` at most 2 MiB) for one block copy, given back with
    :func:`_give_buffer`: a slice of a 2 MiB buffer on a transparent huge page
    (``aligned_buffer(huge=True)``), physically contiguous, so an ``O_DIRECT`` read into it is
    one segment (measured, random 64 KiB direct reads of a cold file: 65-86 us into a huge page,
    84-103 us into 16 separate pages; about 3 us less CPU). The free slices of one size are kept
    in a queue; a new 2 MiB buffer is cut when the queue is empty (as many as copies run at once)."""
    free = _free.get(n)
    if free is None:
        free = _free.setdefault(n, queue.SimpleQueue())
    try:
        return free.get_nowait()
    except queue.Empty:
        pass
    whole = memoryview(aligned_buffer(HUGE_PAGE, huge=True))
    for at in range(n, HUGE_PAGE - n + 1, n):
        free.put(whole[at:at + n])
    return whole[:n]


def _give_buffer(buf: memoryview) -> None:
    """Give back a buffer :func:`_take_buffer` gave."""
    _free[len(buf)].put(buf)


def _block_copier(dev: Endpoint, bb: int) -> Callable[[int, int, int, memoryview], None] | None:
    """``copy(src, dst, within, piece)``: the block of ``bb`` bytes at byte ``src`` of ``dev``
    (the pool's data device) written at byte ``dst`` with ``piece`` put in at ``within`` (see
    :meth:`ThinTarget._break_sharing`); ``None`` unless reading ``dev`` is a plain ``pread``
    (:meth:`~dmtools.endpoint.Endpoint.plain_fd`) and the block at most ``INLINE_MAX_BYTES``.

    The block is read with ``O_DIRECT`` where ``dev`` has such a descriptor
    (:meth:`~dmtools.endpoint.Endpoint.direct_fileno`), as kcopyd reads a block device in the
    kernel: a shared block is old data, not in the page cache as a rule, and a cold read through
    it costs the page cache's work on top (measured on this VM's disk, random 64 KiB reads of a
    cold file: 68-96 us direct, 106-113 us buffered). The kernel writes back dirty pages of the
    range before a direct read, so it reads what the buffered descriptor would. Otherwise, and
    for what a direct read leaves (a short or failed read), ``dev``'s plain descriptor, then
    ``dev.readinto``, which raises the device's error. The write is ``dev``'s (:func:`_writer_of`).
    """
    if bb > INLINE_MAX_BYTES:
        return None
    fd = dev.plain_fd(bb, False)
    if fd < 0:
        return None
    direct = dev.direct_fileno()
    if direct is not None and not bb % direct[1] and not mmap.PAGESIZE % direct[1]:
        fd = direct[0]  # blocks start at multiples of bb: every read is aligned
    write = _writer_of(dev)
    own = getattr(dev, "__dict__", {})

    def copy(src: int, dst: int, within: int, piece: memoryview) -> None:
        buf = _take_buffer(bb)
        try:
            got = 0
            if "readinto" not in own:  # else a test's probe: through it
                try:
                    got = os.preadv(fd, [buf], src)
                except OSError:
                    got = 0  # dev.readinto below raises the device's error
            if got < bb:
                read_full(dev, buf[got:], src + got)
            buf[within:within + len(piece)] = piece
            write(buf, dst)
        finally:
            _give_buffer(buf)
    return copy
