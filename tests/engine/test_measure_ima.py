"""``measure`` (STATUSTYPE_IMA, ``dmsetup measure``) of the built-in targets on every backend.

The ``dm`` fixture runs each test on the in-process engine, behind the daemon's socket and (kernel
tier) on the real device-mapper. The expected text is spelled out here from the kernel's formats
(``linear_status``, ``stripe_status``; ``zero`` and ``error`` have no status function and measure
nothing), with each target's version as the backend reports it in ``targets()``: on the kernel the
same assertions check those formats against the kernel itself.
"""

from __future__ import annotations

import pytest

from dmtools.backend import StatusLine
from dmtools.engine import Engine
from dmtools.engine.basic_targets import ZeroTarget
from dmtools.errors import DeviceNotFound, DMError, TargetNotSupported

MiB = 1 << 20


def _head(dm, target_type: str) -> str:
    version = ".".join(map(str, dm.dm.targets()[target_type]))
    return f"target_name={target_type},target_version={version}"


def test_linear_striped_zero_error_text(dm, dm_name):
    a, b = dm.backing(2 * MiB), dm.backing(MiB)
    pa, pb = dm.printed(a), dm.printed(b)
    dm.dm.create(dm_name, f"0 1024 linear {a} 16\n"
                          f"1024 2048 striped 2 64 {a} 1040 {pb} 0\n"
                          "3072 100 zero\n"
                          "3172 28 error")
    try:
        assert dm.dm.measure(dm_name) == [
            StatusLine(0, 1024, "linear", f"{_head(dm, 'linear')},device_name={pa},start=16;"),
            StatusLine(1024, 2048, "striped",
                       f"{_head(dm, 'striped')},stripes=2,chunk_size=64"
                       f",stripe_0_device_name={pa},stripe_0_physical_start=1040,stripe_0_status=A"
                       f",stripe_1_device_name={pb},stripe_1_physical_start=0,stripe_1_status=A;"),
            StatusLine(3072, 100, "zero", ""),
            StatusLine(3172, 28, "error", ""),
        ]
        # dmsetup's line keeps the space after a type that measured nothing, as for status
        assert [line.dmsetup_text() for line in dm.dm.measure(dm_name)][2:] == ["3072 100 zero \n", "3172 28 error \n"]
    finally:
        dm.dm.remove(dm_name)


def test_inactive_table_and_device_without_table(dm, dm_name):
    a = dm.backing(MiB)
    dm.dm.create(dm_name)
    try:
        assert dm.dm.measure(dm_name) == []
        dm.dm.load(dm_name, f"0 8 linear {a} 0")
        assert dm.dm.measure(dm_name) == []  # nothing live yet
        inactive = dm.dm.measure(dm_name, inactive=True)
        assert [(s.start, s.length, s.target_type) for s in inactive] == [(0, 8, "linear")]
        assert inactive[0].params.endswith(f",device_name={dm.printed(a)},start=0;")
    finally:
        dm.dm.remove(dm_name)


def test_missing_device(dm, dm_name):
    with pytest.raises(DeviceNotFound):
        dm.dm.measure(dm_name)


def test_striped_stripe_with_errors_measures_d(make_image):
    """A stripe that failed an I/O is ``D`` in the IMA text as in the status health letters."""
    a = str(make_image(MiB))
    with Engine() as eng:
        eng.create("lower", f"0 2048 linear {a} 0")
        eng.create("top", f"0 64 striped 2 8 {a} 0 {eng.device_ref('lower')} 0")
        eng.load("lower", "0 2048 error")
        eng.resume("lower")
        with eng.open_endpoint("top") as ep, pytest.raises((OSError, DMError)):
            ep.write(b"x" * 8192, 0)  # chunk 1 lands on stripe 1, the failing one
        text = eng.measure("top")[0].params
        assert ",stripe_0_status=A," in text and text.endswith(",stripe_1_status=D;")


class _Plain(ZeroTarget):
    """A target type that does not measure itself (zero's I/O, another name and version)."""

    name = "plain"
    version = (3, 2, 1)


def test_default_ima_status_is_empty_and_prefix_is_the_kernels_macro():
    with Engine() as eng:
        eng.register_target(_Plain)
        eng.create("p", "0 8 plain")
        assert eng.measure("p") == [StatusLine(0, 8, "plain", "")]
        target = eng._get("p", "test").live.targets[0]  # noqa: SLF001 - the live target itself
        assert target.ima_prefix() == "target_name=plain,target_version=3.2.1"


def test_a_backend_without_measure_says_so():
    """The ABC's default for third-party backends: a clear error, not an empty answer."""
    from dmtools.backend import DeviceMapper

    abstract = {name for name in DeviceMapper.__abstractmethods__}
    cls = type("NoMeasure", (DeviceMapper,), {name: lambda *a, **k: None for name in abstract})
    with pytest.raises(TargetNotSupported, match="cannot report IMA"):
        cls().measure("x")
