"""The ``dmtools thin`` command group."""

from __future__ import annotations

import pytest

from dmtools.cli.main import main


def test_thin_group_is_registered(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["thin", "--help"])
    assert exc.value.code == 0
    assert "dmtools thin" in capsys.readouterr().out
