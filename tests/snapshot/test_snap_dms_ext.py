"""The snapshot's one-chunk copy-on-write in C, built as a CPython extension by cffi's API mode
(:mod:`dmtools._ffi.dms`): used where it builds, named by what it is built from, and where it
cannot be built the C library's copy of the same functions (cffi's ABI mode) is used instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmtools._ffi import dms, fastio
from snapshot import route

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(fastio.load() is None, reason="no C library (no compiler, or DMTOOLS_FAST_IO=0)")


def test_the_extension_is_what_copy_commit_calls() -> None:
    ext = dms.module()
    assert ext is not None, dms.unavailable()
    found = route.c_library()
    assert found is not None
    ffi, lib = found
    assert lib is ext.lib and ffi is ext.ffi
    route._c_function()
    assert route._c_copy is ext.lib.dms_copy_commit_chunk
    # a compiled wrapper, not a cffi ABI-mode call (whose functions are _cffi_backend cdata)
    assert type(ext.lib.dms_copy_commit_chunk).__name__ == "builtin_function_or_method"
    assert ext.__file__.startswith(tuple(fastio._cache_dirs()))


def test_out_of_range_arguments_do_nothing() -> None:
    ext = dms.module()
    assert ext is not None
    area = bytearray(4096)
    ffi, lib = ext.ffi, ext.lib
    # index past the area, a negative length: -1, no system call made
    assert lib.dms_copy_commit_chunk(-1, 0, 4096, -1, 0, 0, ffi.from_buffer(area), 4096, 0, 256, 1, 2, -1,
                                     ffi.NULL, 0, 0) == -1
    assert lib.dms_commit_copy(ffi.NULL, 4096, -1, 0, 0, ffi.from_buffer(area), 4096, 0, 0, 1, 2) == -1
    out = bytearray(8)
    assert lib.dms_last_ops(ffi.from_buffer(out), len(out)) == 0
    assert area == bytearray(4096)


def test_the_name_follows_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An edited dms.c is another extension, and another C library (which includes it)."""
    before, lib_before = dms._digest(), _fastio_digest(tmp_path / "a", monkeypatch)
    edited = tmp_path / "dms.c"
    edited.write_text(Path(dms.SOURCE).read_text() + "\n/* edited */\n")
    monkeypatch.setattr(dms, "SOURCE", str(edited))
    monkeypatch.setattr(fastio, "INCLUDED", (str(edited),))
    assert dms._digest() != before
    assert _fastio_digest(tmp_path / "b", monkeypatch) != lib_before


def _fastio_digest(cache: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of the C library ``fastio._build`` makes in the empty cache ``cache`` (its
    compiler replaced by one that only writes the output file)."""
    cc = cache / "fake-cc"
    cache.mkdir(mode=0o700)
    cc.write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done; : > "$2"\n')
    cc.chmod(0o700)
    monkeypatch.setenv("DMTOOLS_CACHE_DIR", str(cache / "c"))
    return Path(fastio._build(str(cc))).name


def test_without_the_extension_the_library_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that fails leaves ``module()`` None, says why, and ``c_library`` gives the C
    library's functions (ABI mode)."""
    monkeypatch.setenv("DMTOOLS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(dms, "_module", None)
    monkeypatch.setattr(dms, "_reason", None)

    def broken(cache: str, name: str, target: str) -> None:
        raise OSError("compiler says no")

    monkeypatch.setattr(dms, "_build", broken)
    assert dms.module() is None
    assert "compiler says no" in (dms.unavailable() or "")
    found = route.c_library()
    assert found is not None
    assert found[1] is fastio.kcopyd_lib()
    assert not list((tmp_path / "cache").glob("_dmtools_dms_*"))


def test_the_c_path_tests_pass_through_abi_mode() -> None:
    """The C copy-and-commit tests (failure at each step, short transfers, concurrency) and the
    whole first write's in C on the ABI-mode fallback."""
    env = dict(os.environ, DMTOOLS_DMS_API="0")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x",
                           "tests/snapshot/test_snap_copy_commit_c.py", "tests/snapshot/test_snap_fast.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " skipped" not in done.stdout
