"""Kernel tier: a bad table gets the same words from the userspace engine and from the kernel.

The kernel's constructor errors (``ti->error`` in dm-linear.c, dm-stripe.c, dm-zero.c, dm-raid1.c,
and the table rules of dm-table.c) live in the typed values, which both backends parse with. Each case is
loaded three ways in the VM: on the in-process engine, through the kernel backend, and as raw text
through the real ``dmsetup`` (no parsing of ours), whose failure the kernel explains in its log.
The kernel's words must be in the engine's message, and the two backends' messages must be equal
where the value refused the table; where only the device can tell (it cannot be opened), both
messages carry the kernel's words.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import pytest

from dmtools.engine import Engine
from dmtools.errors import InvalidTable

pytestmark = pytest.mark.kernel

MiB = 1 << 20
MISSING = "/nonexistent-dmtools-device"

#: ``(table, the kernel's words)``; ``{dev}`` is a 2 MiB loop device.
BAD_TABLES = [
    ("0 8 linear {dev}", "linear: Invalid argument count"),
    ("0 8 linear {dev} 0 0", "linear: Invalid argument count"),
    ("0 8 linear {dev} x", "linear: Invalid device sector"),
    ("0 8 striped 1", "striped: Not enough arguments"),
    ("0 8 striped 0 8 {dev} 0", "striped: Invalid stripe count"),
    ("0 8 striped x 8 {dev} 0", "striped: Invalid stripe count"),
    ("0 8 striped 1 0 {dev} 0", "striped: Invalid chunk_size"),
    ("0 9 striped 2 1 {dev} 0 {dev} 8", "striped: Target length not divisible by number of stripes"),
    ("0 8 striped 2 8 {dev} 0 {dev} 8", "striped: Target length not divisible by chunk size"),
    ("0 16 striped 2 8 {dev} 0", "striped: Not enough destinations specified"),
    # two faults: dm-stripe.c divides the length before it counts the destinations
    ("0 9 striped 2 8 {dev} 0", "striped: Target length not divisible by number of stripes"),
    ("0 16 striped 2 8 {dev} 0 {dev} x", "striped: Couldn't parse stripe destination"),
    ("0 8 zero 1", "zero: No arguments required"),
    ("0 8 zero\n16 8 zero", "zero: Gap in table"),
    ("8 8 zero", "zero: Gap in table"),
    ("0 8 zero\n8 0 zero", "zero-length target"),
    ("0 18014398509481984 zero", "too large device"),
    ("0 8 zero\n8 18014398509481976 zero", "too large device"),
    # dm-raid1.c mirror_ctr; a log that dm-log.c refuses is dm-raid1.c's "Error creating ..."
    ("0 16 mirror core", "mirror: Insufficient mirror log arguments"),
    ("0 16 mirror core x 8", "mirror: Invalid mirror log argument count"),
    ("0 16 mirror core 1 3 2 {dev} 0 {dev} 8", "mirror: Error creating mirror dirty log"),
    ("0 16 mirror core 2 8 maybe 2 {dev} 0 {dev} 8", "mirror: Error creating mirror dirty log"),
    ("0 16 mirror core 1 8 1 {dev} 0", "mirror: Invalid number of mirrors"),
    ("0 16 mirror core 1 8 2 {dev} 0", "mirror: Too few mirror arguments"),
    ("0 16 mirror core 1 8 2 {dev} 0 {dev} x", "mirror: Invalid offset"),
    ("0 16 mirror core 1 8 2 {dev} 0 {dev} 8 1 bogus", "mirror: Unrecognised feature requested"),
    ("0 16 mirror core 1 8 2 {dev} 0 {dev} 8 1 keep_log", "mirror: keep_log feature requires the handle_errors"),
    ("0 16 mirror core 1 8 2 {dev} 0 {dev} 8 2 handle_errors", "mirror: Not enough arguments to support feature"),
    ("0 16 mirror core 1 8 2 {dev} 0 {dev} 8 1 handle_errors x", "mirror: Too many mirror arguments"),
]

#: Errors only the device can tell: the backends' messages differ in their detail.
CONTEXT_ERRORS = [
    (f"0 8 linear {MISSING} 0", "linear: Device lookup failed"),
    (f"0 16 striped 2 8 {{dev}} 0 {MISSING} 0", "striped: Couldn't parse stripe destination"),
]


def _dmesg() -> list[str]:
    out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.splitlines()


def _kernel_says(name: str, text: str) -> str:
    """Load ``text`` with the real dmsetup (refused) and return the kernel's log lines about it."""
    before = len(_dmesg())
    proc = subprocess.run(["dmsetup", "create", name], input=text, capture_output=True, text=True, timeout=60)
    subprocess.run(["dmsetup", "remove", name], capture_output=True, timeout=60)
    assert proc.returncode != 0, f"the kernel took {text!r}"
    return "\n".join(_dmesg()[before:])


def _refusal(create: Callable[[], Any]) -> str:
    with pytest.raises(InvalidTable) as info:
        create()
    return info.value.message


@pytest.fixture
def dev(make_image: Callable[..., Any], make_loop: Callable[..., Any]) -> str:
    return str(make_loop(make_image(2 * MiB)).path)


@pytest.mark.parametrize(("template", "words", "same_text"),
                         [(t, w, True) for t, w in BAD_TABLES] + [(t, w, False) for t, w in CONTEXT_ERRORS])
def test_bad_tables_get_the_kernels_words_on_both_backends(template: str, words: str, same_text: bool, dev: str,
                                                           kernel_dm: Any, kernel_tag: str) -> None:
    text = template.format(dev=dev)
    assert words in _kernel_says(f"{kernel_tag}-raw", text)
    with Engine() as eng:
        engine_says = _refusal(lambda: eng.create("bad", text))
    kernel_backend_says = _refusal(lambda: kernel_dm.create(f"{kernel_tag}-bad", text))
    assert words in engine_says and words in kernel_backend_says
    if same_text:  # the value refused it: one message for both
        assert engine_says == kernel_backend_says
    assert not [e for e in kernel_dm.list() if e.name.startswith(kernel_tag)]
