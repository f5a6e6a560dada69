"""The suite's Hypothesis deadline (``tests/conftest.py``): a stall of the machine is not a
failure, slowness of the code still is."""

import time

from hypothesis import given, settings
from hypothesis import strategies as st


def test_an_example_the_machine_stalled_once_is_not_a_failure() -> None:
    stalled: list[int] = []

    @given(st.integers())
    def example(n: int) -> None:
        if not stalled:  # a loaded machine keeps the process off the CPU during one example
            stalled.append(n)
            time.sleep(0.3)

    example()  # with Hypothesis's 200 ms default: "Unreliable test timings", a chance failure
    assert len(stalled) == 1


def test_the_deadline_holds_in_ci_too() -> None:
    assert settings.default.deadline is not None
    assert settings.get_profile("dmtools").deadline == settings.default.deadline
