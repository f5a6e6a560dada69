"""Unit tier: the rules of ``dmtools.engine.openers`` that depend on the kernel's version."""

from __future__ import annotations

import pytest

from dmtools.engine.openers import _swap_opens


@pytest.mark.parametrize(("release", "opens"), [("6.1.0-57-amd64", 2), ("5.10.0", 2), ("6.9.12", 2), ("6.10.0", 1),
                                                ("6.18.44-fc-v1252", 1), ("7.0.1", 1), ("unknown", 1)])
def test_swap_holds_two_opens_before_linux_6_10(release: str, opens: int) -> None:
    assert _swap_opens(release) == opens
