"""A root test that starts the daemon of its session's run directory, as the root tests do.

Not collected by the suite (its name is not ``test_*``): ``tests/test_session_daemons.py`` runs it
in a pytest session of its own, so that session's end can be checked. It writes what the daemon
said (pid, run directory) as JSON to ``$DMTT_INNER_REPORT``, and leaves its device in the daemon
when ``DMTT_INNER_LEAVE=1``; with ``DMTT_INNER_FAIL=1`` it adds a line to the daemon's log (as a
daemon's error would) and fails.
"""

from __future__ import annotations

import json
import os

import pytest

import dmtools
from dmtools.engine.client import UserspaceClient

pytestmark = pytest.mark.root


def test_a_device_on_the_daemon_of_the_run(dm_name: str) -> None:
    with dmtools.open("userspace") as dm:
        assert isinstance(dm, UserspaceClient)
        dm.create(dm_name, "0 8 zero")
        info = dm.ping()
        with open(os.environ["DMTT_INNER_REPORT"], "w", encoding="utf-8") as f:
            json.dump({"pid": info["pid"], "run_dir": info["run_dir"], "device": dm_name}, f)
        assert dm_name in {e.name for e in dm.list()}
        if os.environ.get("DMTT_INNER_LEAVE") != "1":
            dm.remove(dm_name)
        if os.environ.get("DMTT_INNER_FAIL") == "1":
            with open(os.path.join(info["run_dir"], "daemon.log"), "a", encoding="utf-8") as log:
                log.write("dmtools daemon: what the test's failure left in the log\n")
            pytest.fail("asked to fail")
