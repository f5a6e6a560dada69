"""Set-up for the whole suite (every tier): ``ast.parse`` guarded against CPython gh-106905 on the
interpreters that have it (see ``tests/ast_guard.py``), Hypothesis's local constants fixed to the
project's code (``tests/fixed_constants.py``), and a daemon run directory of the session's own,
whose daemons are stopped at its end (``tests/session_daemons.py``)."""

import ast_guard
import fixed_constants
import pytest
import session_daemons

ast_guard.install()
fixed_constants.install()


def pytest_configure(config: pytest.Config) -> None:
    session_daemons.configure(config)


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown (the runner's sessionfinish)
def pytest_sessionfinish(session: pytest.Session) -> None:
    session_daemons.finish(session)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    session_daemons.summary(terminalreporter, config)


def pytest_unconfigure(config: pytest.Config) -> None:
    session_daemons.unconfigure(config)
