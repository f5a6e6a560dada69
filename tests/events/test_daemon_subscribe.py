"""Event subscription through the userspace daemon: one client subscribes (``events()``), another
creates and removes a device, and the subscriber hears of both within a bounded time."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmtools.engine import protocol
from dmtools.engine.client import UserspaceClient
from dmtools.engine.daemon import Daemon
from dmtools.testing.daemon import serving_daemon
from dmtools.events import DeviceAdded, DeviceRemoved, Event
from dmtools.testing.wait import wait_until

#: seconds an event may take to reach the subscriber (the daemon wakes its hub after each verb,
#: so this is a bound for a loaded machine, not the expected latency).
BOUND = 10.0


@pytest.fixture(params=[pytest.param(False, id="unexposed"), pytest.param(None, id="exposed", marks=pytest.mark.root)])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Daemon]:
    with serving_daemon(str(tmp_path / "run"), expose=request.param) as d:
        yield d


def _listen(stream: Iterator[Event], until: Callable[[Event], bool] = lambda ev: False,
            ) -> tuple["queue.Queue[Any]", threading.Thread]:
    """Read ``stream`` in a thread into a queue of ``(time, event)``; the thread hangs up (closes
    the generator, which it alone may do) after the event ``until`` accepts."""
    got: queue.Queue[Any] = queue.Queue()

    def run() -> None:
        try:
            for event in stream:
                got.put((time.monotonic(), event))
                if until(event):
                    stream.close()  # type: ignore[attr-defined]
                    break
        except Exception as err:  # noqa: BLE001 - handed to the test
            got.put((time.monotonic(), err))
        got.put((time.monotonic(), None))  # the stream ended

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return got, thread


def _wait_subscribed(daemon: Daemon, count: int) -> None:
    wait_until(lambda: daemon.hub is not None and daemon.hub.subscribers >= count,
               "the daemon to take the subscription", BOUND)


def _next_for(got: "queue.Queue[Any]", name: str, kind: type, since: float) -> float:
    """Seconds from ``since`` until an event ``kind`` for device ``name`` arrives."""
    deadline = since + BOUND
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {kind.__name__} for {name} within {BOUND} s"
        try:
            at, ev = got.get(timeout=left)
        except queue.Empty:
            continue
        assert not isinstance(ev, Exception), ev
        assert ev is not None, "the event stream ended early"
        if isinstance(ev, kind) and ev.device == name:
            return at - since


def test_subscriber_hears_another_clients_create_and_remove(daemon: Daemon, dm_name: str,
                                                            make_image: Callable[..., Path]) -> None:
    img = make_image(1 << 20)
    listener = UserspaceClient(daemon.run_dir)
    other = UserspaceClient(daemon.run_dir)
    stream = listener.events(timeout=BOUND)
    got, reader = _listen(stream, lambda ev: isinstance(ev, DeviceRemoved) and ev.device == dm_name)
    try:
        _wait_subscribed(daemon, 1)
        t0 = time.monotonic()
        other.create(dm_name, f"0 2048 linear {img} 0")
        added = _next_for(got, dm_name, DeviceAdded, t0)
        t1 = time.monotonic()
        other.remove(dm_name)
        removed = _next_for(got, dm_name, DeviceRemoved, t1)
        assert added < BOUND and removed < BOUND
        # the listener's own control connection still answers verbs
        assert dm_name not in [e.name for e in listener.list()]
    finally:
        listener.close()
        other.close()
    reader.join(BOUND)
    assert not reader.is_alive()
    # hanging up ends the daemon's stream: its subscription goes within a heartbeat or two
    wait_until(lambda: daemon.hub is None or not daemon.hub.subscribers, "the daemon to drop a hung-up subscriber",
               BOUND)


def test_stopping_the_daemon_ends_the_stream(daemon: Daemon) -> None:
    stream = UserspaceClient(daemon.run_dir).events(timeout=BOUND)
    got, reader = _listen(stream)
    _wait_subscribed(daemon, 1)
    daemon.stop()
    _, last = got.get(timeout=BOUND + 5)
    assert last is None, last
    reader.join(BOUND)
    assert not reader.is_alive()


def test_subscribe_with_arguments_is_refused(daemon: Daemon) -> None:
    assert "subscribe" in protocol.VERBS
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(BOUND)
    try:
        sock.connect(daemon.socket_path)
        sock.sendall(json.dumps({"verb": "subscribe", "args": {"x": 1}}).encode() + b"\n")
        with sock.makefile("rb") as f:
            reply = json.loads(f.readline())
    finally:
        sock.close()
    assert reply["ok"] is False and reply["error"]["class"] == "InvalidArgument"
