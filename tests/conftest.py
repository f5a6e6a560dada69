"""Set-up for the whole suite (every tier): ``ast.parse`` guarded against CPython gh-106905 on the
interpreters that have it (see ``tests/ast_guard.py``), Hypothesis's local constants fixed to the
project's code (``tests/fixed_constants.py``) and its deadline (``HYPOTHESIS_DEADLINE``), and a
daemon run directory of the session's own, whose daemons are stopped at its end
(``tests/session_daemons.py``)."""

from datetime import timedelta

import ast_guard
import fixed_constants
import pytest
import session_daemons
from hypothesis import settings

ast_guard.install()
fixed_constants.install()

#: How long one Hypothesis example may run, here and in CI (whose profile, kept otherwise, has
#: none): the tests that keep the deadline run examples of well under 1 ms, so only a blow-up in
#: the code passes 2 s, while a loaded machine taking the CPU away for a while does not (200 ms,
#: Hypothesis's default, it can). Tests whose examples do I/O set ``deadline=None``.
HYPOTHESIS_DEADLINE = timedelta(seconds=2)
settings.register_profile("dmtools", parent=settings.default, deadline=HYPOTHESIS_DEADLINE)
settings.load_profile("dmtools")


def pytest_configure(config: pytest.Config) -> None:
    session_daemons.configure(config)


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown (the runner's sessionfinish)
def pytest_sessionfinish(session: pytest.Session) -> None:
    session_daemons.finish(session)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    session_daemons.summary(terminalreporter, config)


def pytest_unconfigure(config: pytest.Config) -> None:
    session_daemons.unconfigure(config)
