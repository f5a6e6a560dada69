"""``dmtools copy SRC DST [DST ...]``: copy a device range to up to 8 destinations with kcopyd.

Each of SRC and DST may carry ``@SECTOR`` (start) and ``+COUNT`` (length), sizes with units
(``disk.img@1M+512M``, ``/dev/loop0@2048``); a bare number is in sectors. Without ``+COUNT`` the
copy runs from the source's start to its end. ``null:`` as a destination discards the data (as
nbdcopy's). Missing destination files are created and short ones extended (regular files only);
block devices must be large enough. An NBD URI (``nbd://HOST/EXPORT``,
``nbd+unix:///EXPORT?socket=PATH``, ``nbds://`` with TLS) names an export, taken whole (no
``@``/``+`` suffix); an export written to is flushed when the copy ends.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
import time

from dmtools.cli.lean import HelpFormatter
from dmtools.endpoint import Endpoint, NullEndpoint
from dmtools.errors import DMError, InvalidArgument
from dmtools.linux import DEVNO
from dmtools.nbd.uri import is_nbd_uri
from dmtools.record import record
from dmtools.units import SECTOR, format_size, parse_sectors, parse_size

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (dmtools.lazy)
if TYPE_CHECKING:
    from typing import Any, Sequence

#: The one line ``dmtools --help`` shows for this command (read without building its parser).
SUMMARY = "copy a device range to up to 8 destinations (kcopyd)"

__all__ = ["register", "cmd_copy", "parse_spec", "Spec", "main"]

DESCRIPTION = """\
Copy a device range to up to 8 destinations with kcopyd.

SRC and each DST may carry @SECTOR (start) and +COUNT (length), with units: disk.img@1M+512M,
/dev/loop0@2048 (a bare number is in sectors). Without +COUNT the copy runs to the end of the
source. null: as a destination discards the data. NBD URIs (nbd://HOST[:PORT]/EXPORT,
nbd+unix:///EXPORT?socket=PATH, nbds://... with TLS) name exports, taken whole; an export written
to is flushed when the copy ends. Missing destination files are created and short
ones extended (regular files only); block devices must be large enough. The exit status is 1 when
any read or write failed, and the message names the destinations that failed.

Devices are compared by what they are, not how they are spelled (a symlink, /dev/block/M:m, a loop
device over a file, a dm device over it): destinations that share bytes are refused, and so is a
destination that a live device-mapper table maps (unless --allow-in-use). A source overlapping a
destination within one file or device is copied as memmove(3) does (img@0+100 img@50).
"""

_SPEC_RE = re.compile(r"^(?P<path>.*?)(?:@(?P<sector>[0-9][0-9A-Za-z.]*))?(?:\+(?P<count>[0-9][0-9A-Za-z.]*))?$")


@record(frozen=True)
class Spec:
    """A parsed ``PATH[@SECTOR][+COUNT]`` argument (sector and count in sectors)."""

    path: str
    sector: int = 0
    count: int | None = None

    @property
    def is_null(self) -> bool:
        """True for the ``null:`` sink."""
        return self.path == "null:"


def parse_spec(text: str) -> Spec:
    """Parse ``PATH[@SECTOR][+COUNT]``; a path that exists as written is taken whole."""
    if not text:
        raise InvalidArgument("empty device argument", operation="copy")
    if os.path.exists(text) or text == "null:" or is_nbd_uri(text):
        return Spec(text)
    m = _SPEC_RE.match(text)
    assert m is not None  # the pattern matches any string
    path = m.group("path")
    if not path:
        raise InvalidArgument(f"no device in {text!r}", operation="copy")
    sector = parse_sectors(m.group("sector")) if m.group("sector") else 0
    count = parse_sectors(m.group("count")) if m.group("count") else None
    return Spec(path, sector, count)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``copy`` sub-command to an argparse sub-parser collection."""
    p = subparsers.add_parser("copy", help=SUMMARY, description=DESCRIPTION, formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_copy)
    return p  # type: ignore[no-any-return]


#: Bounds of the numeric options: a worker thread each (the kernel's kcopyd has one), and pages of
#: 4 KiB (1 GiB at most), so a typo is refused before threads or memory run out.
MAX_THREADS = 256
MAX_NUM_PAGES = 1 << 18


def _int_in(low: int, high: int) -> Any:
    """An argparse ``type``: an integer from ``low`` to ``high`` (argparse reports the error)."""

    def convert(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        return value

    convert.__name__ = "integer"
    return convert


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``copy`` options (shared by ``dmtools copy`` and ``python -m kcopyd``)."""
    p.add_argument("src", metavar="SRC", help="source: PATH[@SECTOR][+COUNT]")
    p.add_argument("dests", metavar="DST", nargs="+", help="destination: PATH[@SECTOR][+COUNT] or null:")
    p.add_argument("--progress", nargs="?", const="bar", default=None, metavar="FD",
                   help="show a progress bar, or with =FD write 'N/100' lines to file descriptor FD "
                        "(nbdcopy's convention)")
    p.add_argument("-p", dest="progress", action="store_const", const="bar",
                   help="show a progress bar (same as --progress without FD)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar even on a terminal")
    p.add_argument("--rate", metavar="SIZE", help="limit to SIZE bytes per second (50M, 1G)")
    p.add_argument("--throttle", type=_int_in(1, 100), default=100, metavar="PERCENT",
                   help="duty cycle: percent of time with I/O in flight (kernel kcopyd throttle)")
    p.add_argument("--ignore-errors", action="store_true",
                   help="carry on after errors (unreadable ranges are written as zeros)")
    p.add_argument("--sequential", action="store_true", help="write in offset order (WRITE_SEQ)")
    p.add_argument("--destination-is-zero", action="store_true",
                   help="destinations already read as zeros: skip the source's holes")
    p.add_argument("--flush", action="store_true", help="make the destinations durable before exiting")
    p.add_argument("--allow-in-use", action="store_true",
                   help="write destinations that a live device-mapper table maps (refused by default)")
    # 1 MiB requests (dd's bs=1M, the kernel's largest kcopyd_subjob_size_kb), four in flight:
    # a working set that stays in the CPU caches between a read and its writes.
    # An NBD export answers after a round trip through its server: 16 MiB (nbdcopy's queue size)
    # keeps the sub-jobs of a job in flight.
    p.add_argument("--num-pages", type=_int_in(1, MAX_NUM_PAGES), default=None, metavar="N",
                   help="buffer pages of 4 KiB (default 1024 = 4 MiB; 4096 = 16 MiB when an NBD export "
                        "takes part)")
    p.add_argument("--sub-job-size", default="1M", metavar="SIZE", help="sub-job size, 512 bytes to 1M (default 1M)")
    # An NBD copy's pool holds four pieces (kcopyd.client.NBD_PIECE_SIZE): a worker per piece;
    # more only contend for the GIL (1 GiB export -> file at load 9: CPU 1.10-1.30 s with 8
    # workers, 0.91-0.95 s with 4).
    p.add_argument("--threads", type=_int_in(1, MAX_THREADS), default=None, metavar="N",
                   help=f"I/O worker threads, 1..{MAX_THREADS} (default 8; 4 when an NBD export takes part)")
    p.add_argument("--no-offload", action="store_true", help="never use copy_file_range")
    p.add_argument("--keep-cache", action="store_true",
                   help="keep an uncached file source's pages in the page cache, and a destination "
                        "file's (by default the source's are dropped once read, as dd iflag=nocache, "
                        "and a destination file not in the cache is written back and dropped as it "
                        "is written, as nbdcopy does)")
    # SUPPRESS keeps the root parser's --json when this one is not given.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print a JSON summary")


def _open_source(path: str) -> tuple[str | Endpoint, int]:
    """The source's size, and what its region names: an export is opened here once, its
    connections then serve the copy (a connection opened only to read the size cost a handshake
    with the server, and the server a thread); a path is opened by the job."""
    if is_nbd_uri(path):  # libnbd's bindings are loaded only when an export takes part
        from dmtools.nbd import NbdEndpoint, source_connections

        nbd_ep = NbdEndpoint(path, connections=source_connections())
        return nbd_ep, nbd_ep.size
    from dmtools.blockdev import BlockDevice

    with BlockDevice(path) as ep:
        return path, ep.size


def cmd_copy(args: argparse.Namespace) -> int:
    """Run the copy; print the summary; raise ``DeviceIOError`` naming what failed."""
    import kcopyd

    src = _devno_spec(parse_spec(args.src))
    if src.is_null:
        raise InvalidArgument("null: can only be a destination", operation="copy")
    dests = [_devno_spec(parse_spec(d)) for d in args.dests]
    if len(dests) > kcopyd.MAX_REGIONS:
        raise InvalidArgument(f"{len(dests)} destinations: at most {kcopyd.MAX_REGIONS}", operation="copy")
    src_dev, src_size = _open_source(src.path)
    try:
        return _copy(args, src, src_dev, src_size, dests)
    finally:
        if isinstance(src_dev, Endpoint):
            src_dev.close()


def _copy(args: argparse.Namespace, src: Spec, src_dev: str | Endpoint, src_size: int, dests: list[Spec]) -> int:
    """``cmd_copy`` once the source is open: the copy of ``src_dev`` (its path, or its endpoint)."""
    import kcopyd

    if src.sector * SECTOR > src_size:
        raise InvalidArgument(f"start sector {src.sector} is beyond the source's end", operation="copy",
                              device=src.path)
    count = src.count if src.count is not None else (src_size - src.sector * SECTOR) // SECTOR
    for d in dests:
        if d.count is not None and d.count != count:
            raise InvalidArgument(f"destination has +{d.count} sectors, the source {count}",
                                  operation="copy", device=d.path)
    _check_shared_bytes(src, dests, count, write_seq=args.sequential, allow_in_use=args.allow_in_use)
    rate = parse_size(args.rate, "b") if args.rate is not None else None  # --rate "" is an error, not no limit
    sub_job = parse_size(args.sub_job_size, "b")
    from kcopyd.progress import reporter_for

    reporter = reporter_for(args.progress, quiet=args.quiet, label="copy")
    flags = (kcopyd.IGNORE_ERROR if args.ignore_errors else 0) | (kcopyd.WRITE_SEQ if args.sequential else 0)
    if args.destination_is_zero:
        flags |= kcopyd.DEST_ZEROED

    nbd = any(is_nbd_uri(s.path) for s in [src, *dests])
    num_pages = args.num_pages if args.num_pages is not None else (4096 if nbd else 1024)
    threads = args.threads if args.threads is not None else (4 if nbd else 8)
    client = kcopyd.Client(num_pages=num_pages, sub_job_size=sub_job, threads=threads,
                           rate=rate, throttle_percent=args.throttle, offload=not args.no_offload,
                           drop_behind=not args.keep_cache, write_behind=not args.keep_cache)
    created: list[str] = []
    extended: list[tuple[str, int]] = []
    from dmtools.claims import Holder

    holder = Holder("dmtools copy")  # destinations: no engine, mount or tool while we write
    # an export is claimed by its server, not here (no local device to hold)
    local = [d for d in dests if not d.is_null and not is_nbd_uri(d.path) and not args.allow_in_use]
    try:
        for d in local:  # before a short one is extended: one claimed elsewhere is left as it is
            if os.path.exists(d.path):
                holder.claim(d.path, device="copy")
        regions = _prepare_dests(dests, count, created, extended)
        start = time.monotonic()
        try:
            for d in local:
                if d.path in created:
                    holder.claim(d.path, device="copy", created=True)
            # in use: checked above (before any file was created), as the caller asked
            job = client.copy(kcopyd.Region(src_dev, src.sector, count), regions, flags=flags, allow_in_use=True)
            if getattr(args, "start_up_gc_off", False):
                _gc_on()
        except DMError:
            for path in created:
                os.unlink(path)
            for path, size in extended:  # nothing copied: back to their sizes
                os.truncate(path, size)
            raise
        if getattr(args, "json", False):
            # The summary's encoder (with the decoder and scanner the package brings), loaded
            # while the copy runs instead of after it: 1.5 ms of the command's wall time.
            import json  # noqa: F401
        try:
            from kcopyd.progress import follow

            follow(lambda: (job.progress.done, job.progress.total), job.wait, reporter)
        except KeyboardInterrupt:
            job.cancel()
            job.wait()
            reporter.finish(ok=False)
            raise
        if job.ok and args.flush:
            _flush(dests)
        elapsed = time.monotonic() - start
        reporter.finish(job.progress.done, job.progress.total, ok=job.ok)
    finally:
        client.destroy()
        holder.close()
    # What reached the destinations, not what was asked: a copy whose source failed halfway
    # wrote only the pieces read before it stopped (a failed piece is not counted).
    nbytes = job.progress.done
    summary = {
        "source": {"path": src.path, "sector": src.sector, "count": count},
        "destinations": [  # ok: this destination holds the source's bytes (no read or write error)
            {"path": d.path, "sector": d.sector, "count": count, "ok": not job.read_err and not job.write_err >> i & 1}
            for i, d in enumerate(dests)
        ],
        "bytes": nbytes,
        "bytes_requested": count * SECTOR,
        "seconds": round(elapsed, 6),
        "bytes_per_second": int(nbytes / elapsed) if elapsed > 0 else None,
        "read_error": bool(job.read_err),
        "write_error_mask": job.write_err,
        "failed_destinations": [dests[i].path for i in job.failed_dests],
        "cancelled": job.cancelled,
        "ok": job.ok,
    }
    if getattr(args, "json", False):
        import json  # loaded while the copy ran

        print(json.dumps(summary, indent=2))
    elif reporter.bar and job.ok:  # a failed copy says so below, never "copied"
        print(f"copied {format_size(nbytes)} to {len(dests)} destination(s) in {elapsed:.2f} s", file=sys.stderr)
    job.raise_for_error()
    return 0


def _devno_spec(spec: Spec) -> Spec:
    """``MAJOR:MINOR`` (as tables name devices) made the device node's path."""
    if spec.is_null or os.path.exists(spec.path) or not DEVNO.fullmatch(spec.path):
        return spec
    from dmtools.blockdev import resolve_devno

    return Spec(resolve_devno(spec.path), spec.sector, spec.count)


def _check_shared_bytes(src: Spec, dests: list[Spec], count: int, *, write_seq: bool, allow_in_use: bool) -> None:
    """Before a destination file is created or extended, refuse what kcopyd would refuse
    (destinations that share bytes, a source sharing bytes with a destination through another
    device: ``kcopyd.overlap``) and a destination that a live table maps, unless ``allow_in_use``."""
    import kcopyd
    from kcopyd.client import _backend_may_be_live
    from kcopyd.overlap import check_dests_not_in_use, path_span, plan_overlap, region_identities

    real = [d for d in dests if not d.is_null]
    nbytes = count * SECTOR
    kernel = not allow_in_use and _kernel_can_map([d.path for d in real])
    backends: list[Any] = []
    if kernel or _backend_may_be_live():
        from dmtools.inputs import live_backends

        backends = live_backends(kernel=kernel)
    try:
        regions = [kcopyd.Region(s.path, s.sector, count) if os.path.exists(s.path) else None for s in [src, *real]]
        # Plain files with no table that could map them share bytes only as one inode, which
        # the spans compare; anything else is resolved to what it is (dmtools.identity).
        plain = not backends and all(r is None or _plain_file(r.dev) for r in regions)
        ids = [] if plain else region_identities(regions, backends)
        plan_overlap((path_span(src.path, src.sector * SECTOR, nbytes), src.path),
                     [(path_span(d.path, d.sector * SECTOR, nbytes), d.path) for d in real],
                     write_seq=write_seq, identities=ids)
        if not allow_in_use:
            check_dests_not_in_use(real, ids[1:], backends)
    finally:
        for b in backends:
            b.close()


def _plain_file(path: Any) -> bool:
    """True for a regular file on a device-backed file system: :func:`dmtools.identity.identify`
    gives it its own inode and nothing more. Files on anonymous devices (FUSE, where an engine's
    exposure lives, tmpfs, overlayfs) are not plain: identity looks further."""
    try:
        st = os.stat(path)
    except (OSError, TypeError, ValueError):
        return False
    return stat.S_ISREG(st.st_mode) and os.major(st.st_dev) != 0


def _kernel_can_map(paths: list[str]) -> bool:
    """False when each path is a regular file with no loop device over it, a file not made yet or
    an NBD URI: a kernel table maps block devices only (drivers/md/dm-table.c ``dm_get_device``),
    so its bytes are reached through a loop device or not at all, and the kernel's backend (its
    cffi binding) need not be loaded to look for tables."""
    from dmtools.claims import loops_over

    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue  # a new file, or an export's URI: no table maps it
        except OSError:
            return True  # unknown: look, as for a device
        if not stat.S_ISREG(st.st_mode) or loops_over(path, st):
            return True
    return False


def _prepare_dests(dests: list[Spec], count: int, created: list[str], extended: list[tuple[str, int]]) -> list[Any]:
    """Regions for the destinations; creates missing files (their paths go to ``created``) and
    extends short ones (files only; ``(path, size before)`` go to ``extended``)."""
    import kcopyd

    need_paths: list[tuple[str, int, bool]] = []
    for d in dests:
        if d.is_null or is_nbd_uri(d.path):
            continue
        end = (d.sector + count) * SECTOR
        try:
            st = os.stat(d.path)
        except FileNotFoundError:
            parent = os.path.dirname(os.path.abspath(d.path))
            if not os.path.isdir(parent):
                raise InvalidArgument("no such directory for the new file", operation="copy", device=d.path) from None
            need_paths.append((d.path, end, True))
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size < end:
            need_paths.append((d.path, end, False))
            extended.append((d.path, st.st_size))
    for path, end, create in need_paths:
        if create:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            created.append(path)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, end)
        finally:
            os.close(fd)
    regions = []
    for d in dests:
        dev: str | Endpoint = NullEndpoint((d.sector + count) * SECTOR) if d.is_null else d.path
        regions.append(kcopyd.Region(dev, d.sector, count))
    return regions


def _flush(dests: list[Spec]) -> None:
    from dmtools.blockdev import BlockDevice

    for d in dests:
        if not d.is_null and not is_nbd_uri(d.path):  # exports are flushed when kcopyd closes them
            with BlockDevice(d.path, writable=True) as ep:
                ep.flush()


def _gc_on() -> None:
    """Turn the cyclic garbage collector back on, the objects made so far kept out of its passes
    (``gc.freeze``: they live until exit)."""
    import gc

    gc.freeze()
    gc.enable()


def main(argv: Sequence[str] | None = None, *, start_up_gc_off: bool = False) -> int:
    """``python -m kcopyd SRC DST ...``: the ``copy`` command on its own. ``start_up_gc_off``: the
    caller turned the cyclic garbage collector off for the start-up (``kcopyd.__main__``); it is
    turned back on once the copy has started."""
    from dmtools.lazy import configure_logging

    parser = argparse.ArgumentParser(prog="python -m kcopyd", description=DESCRIPTION, formatter_class=HelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.start_up_gc_off = start_up_gc_off
    hook = configure_logging("kcopyd", False)
    try:
        return cmd_copy(args)
    except DMError as err:
        print(f"kcopyd: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kcopyd: interrupted", file=sys.stderr)
        return 130
    finally:
        if hook is not None:
            hook.remove()
