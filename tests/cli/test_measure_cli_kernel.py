"""Kernel tier: ``measure`` (STATUSTYPE_IMA) against the real ``dmsetup measure`` (VM: scripts/vmtest).

linear, striped, zero, error and mirror devices on loop devices. For each, three texts must agree:
``KernelBackend.measure``, ``dmtools --backend kernel dm measure`` and ``dmsetup measure``, byte for
byte; and the userspace engine, given the same table over the same loop devices, measures the
same text apart from ``target_version`` (the engine follows a newer kernel's target versions than
the VM's; the kernel's own version from ``targets()`` is put in its place before comparing).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmtools.engine import Engine

pytestmark = pytest.mark.kernel

MiB = 1 << 20
LEN = 4 * MiB // 512


def dmsetup(*argv: str) -> str:
    """``dmsetup ARGV``'s stdout (raises when it fails)."""
    return subprocess.check_output([shutil.which("dmsetup") or "/sbin/dmsetup", *argv], text=True, timeout=60)


@pytest.fixture
def ours(run: Callable[..., tuple[int, str, str]]) -> Callable[..., str]:
    """``ours(*argv)``: stdout of ``dmtools --backend kernel dm ARGV`` (the ``run`` fixture)."""

    def ours_out(*argv: str) -> str:
        rc, out, _err = run("--backend", "kernel", "dm", *argv)
        assert rc == 0
        return out

    return ours_out


@pytest.fixture
def loops(make_image: Callable[..., Path], make_loop: Callable[..., Any]) -> list[str]:
    return [make_loop(make_image(LEN * 512 + MiB)).path for _ in range(4)]


@pytest.fixture
def names(dm_name: str, kernel_dm: Any, make_loop: Any) -> Iterator[Callable[[str], str]]:
    """``names(tag)``: a device name for this test; every one is removed at teardown
    (make_loop is requested first, so devices go before their loop devices)."""
    made: list[str] = []

    def name(tag: str) -> str:
        made.append(dm_name.replace("-dmtt", f"{tag}-dmtt"))
        return made[-1]

    yield name
    for n in reversed(made):
        if kernel_dm.exists(n):
            kernel_dm.resume(n)
            kernel_dm.remove(n, retry=True)


def _kernel_versions(text: str, versions: dict[str, tuple[int, int, int]]) -> str:
    """``text`` with every ``target_version`` replaced by the kernel's for that target type."""
    return re.sub(r"target_name=([^,;]+),target_version=[0-9.]+",
                  lambda m: f"target_name={m.group(1)},target_version={'.'.join(map(str, versions[m.group(1)]))}", text)


def _tables(loops: list[str]) -> dict[str, str]:
    a, b, c, log = loops
    return {
        "mix": (f"0 1024 linear {a} 16\n"
                f"1024 2048 striped 2 64 {a} 1040 {b} 0\n"
                "3072 100 zero\n"
                "3172 28 error"),
        "stripe3": f"0 3072 striped 3 8 {a} 0 {b} 8 {c} 16",
        "mcore": f"0 {LEN} mirror core 2 1024 nosync 2 {a} 0 {b} 0",
        "mdisk": f"0 {LEN} mirror disk 2 {log} 1024 3 {a} 0 {b} 0 {c} 0 2 handle_errors keep_log",
    }


def test_measure_equals_dmsetup_and_the_userspace_engine(kernel_dm: Any, loops: list[str], names: Callable[[str], str],
                                                         ours: Callable[..., str]) -> None:
    tables = _tables(loops)
    made = {tag: names(tag) for tag in tables}
    # One engine at a time: each claims the loop devices its tables use (the kernel's bd_claim, and
    # the userspace engine's claims), so the engine measures first and lets them go.
    engine_texts: dict[str, str] = {}
    eng = Engine()
    try:
        for tag, table in tables.items():
            eng.create(tag, table)
            engine_texts[tag] = "".join(line.dmsetup_text() for line in eng.measure(tag))
        for tag in reversed(list(tables)):
            eng.remove(tag)
    finally:
        eng.close()
    for tag, table in tables.items():
        kernel_dm.create(made[tag], table)
    versions = kernel_dm.targets()
    for tag in tables:
        name = made[tag]
        reference = dmsetup("measure", name)
        lines = kernel_dm.measure(name)
        assert "".join(line.dmsetup_text() for line in lines) == reference, tag
        assert ours("measure", name) == reference, tag
        assert _kernel_versions(engine_texts[tag], versions) == reference, tag
    # several devices, and all of them: the "NAME: " layout of dmsetup
    pair = [made["mix"], made["mcore"]]
    assert ours("measure", *pair) == dmsetup("measure", *pair)
    assert ours("measure") == dmsetup("measure")
    # what the formats come to, so a change in either engine shows here too
    mix = kernel_dm.measure(made["mix"])
    assert [line.params for line in mix][2:] == ["", ""]  # zero and error measure nothing
    assert mix[0].params.endswith(f",start=16;") and ",stripe_1_status=A;" in mix[1].params
    assert kernel_dm.measure(made["mdisk"])[0].params.endswith(",handle_errors=y,keep_log=y,log_type_status=;")


def test_inactive_table_measured(kernel_dm: Any, loops: list[str], names: Callable[[str], str],
                                 ours: Callable[..., str]) -> None:
    name = names("inact")
    kernel_dm.create(name, f"0 64 linear {loops[0]} 0")
    kernel_dm.load(name, f"0 64 striped 2 8 {loops[0]} 0 {loops[1]} 0")
    inactive = kernel_dm.measure(name, inactive=True)
    assert [line.target_type for line in inactive] == ["striped"]
    assert ours("measure", "--inactive", name) == dmsetup("measure", "--inactive", name)
    assert [line.target_type for line in kernel_dm.measure(name)] == ["linear"]


def test_failed_mirror_leg_is_measured_d(kernel_dm: Any, loops: list[str], names: Callable[[str], str]) -> None:
    """A mirror leg that failed a write: ``mirror_device_1_status=D`` on the kernel, as our
    engine writes it (tests/mirror/test_measure_mirror.py)."""
    a, b, _c, _log = loops
    leg1, mirror = names("leg1"), names("mir")
    kernel_dm.create(leg1, f"0 {LEN} linear {b} 0")
    ref = kernel_dm.device_ref(leg1)
    kernel_dm.create(mirror, f"0 {LEN} mirror core 2 1024 nosync 2 {a} 0 {ref} 0 2 handle_errors keep_log")
    kernel_dm.load(leg1, f"0 {LEN} error")
    kernel_dm.resume(leg1)
    with open(kernel_dm.device_path(mirror), "r+b", buffering=0) as f:
        f.write(b"w" * 65536)  # completes on leg 0 (keep_log), fails on leg 1
        os.fsync(f.fileno())
    text = kernel_dm.measure(mirror)[0].params
    assert f",mirror_device_1={ref},mirror_device_1_status=D," in text
    assert text == dmsetup("measure", mirror).split(" ", 3)[3].rstrip("\n")
