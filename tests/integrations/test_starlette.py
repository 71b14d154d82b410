"""guard_receive for Starlette on a real uvicorn, with each of its WebSocket implementations.

Clients are real processes (``ws_client.py``) so they can be killed or frozen.
"""

from __future__ import annotations

import gc
import os
import signal
import time
from typing import Any

import pytest
from loopguard_integrations import _receiver
from loopguard_integrations.starlette import guard_receive
from sapp import Scenario, make_app
from wsservers import UVICORN_WS, client_process, ready, uvicorn_server, wait_until

import loopguard
from loopguard.events import ConnectionClosed

pytestmark = [
    pytest.mark.parametrize("ws", UVICORN_WS),
    # The servers' loops run in threads of the test process: on a loaded machine a GIL
    # hand-off alone (pytest-xdist's I/O thread) can hold them for hundreds of ms.
    pytest.mark.loopguard(threshold=1.0),
]


def _all_received(scenario: Scenario, sent: int) -> bool:
    inbox = scenario.inbox
    return inbox.delivered + inbox.dropped + len(inbox) == sent


def test_messages_in_order_and_the_loop_ends_on_disconnect(ws: str) -> None:
    scenario = Scenario(options={"maxsize": 10})
    with uvicorn_server(make_app(scenario), ws) as url, client_process(f"{url}/ws/a", "300") as c:
        assert ready(c) == "sent 300"
        c.wait(30)
        wait_until(lambda: len(scenario.finished) == 1, what="the inbox to end")
    inbox = scenario.inbox
    assert scenario.received == [str(i) for i in range(300)]
    assert (inbox.delivered, inbox.dropped, inbox.close_code) == (300, 0, 1000)
    assert inbox.close_reason == "peer"
    assert inbox.route == "/ws/{room}"


@pytest.mark.parametrize("overflow", ["drop_newest", "drop_oldest", "block"])
def test_overflow_policies_with_a_stuck_consumer(ws: str, overflow: str) -> None:
    scenario = Scenario(options={"maxsize": 5, "overflow": overflow}, gated=True)
    with (
        uvicorn_server(make_app(scenario), ws) as url,
        client_process(f"{url}/ws/a", "50", "0", "wait") as c,
    ):
        assert ready(c) == "sent 50"
        wait_until(lambda: len(scenario.inboxes) == 1)
        inbox = scenario.inbox
        if overflow == "block":
            # The receiver stopped reading: 5 queued (and one held by the consumer),
            # none dropped, the rest left unread in the transport.
            wait_until(lambda: len(inbox) == 5)
            time.sleep(0.3)
            assert inbox.dropped == 0 and inbox.delivered <= 1 and len(inbox) == 5
            want = 50
        else:
            wait_until(lambda: _all_received(scenario, 50), what="every message received")
            # Held by the consumer (0 or 1, by timing) plus queued (5): all that is left.
            want = inbox.delivered + len(inbox)
        scenario.open_gate()
        wait_until(lambda: len(scenario.received) == want)
        time.sleep(0.2)  # nothing more may come
        os.kill(c.pid, signal.SIGKILL)
        wait_until(lambda: len(scenario.finished) == 1, what="the inbox to end")
    got = [int(m) for m in scenario.received]
    assert got == sorted(got) and len(got) == want  # order kept
    if overflow == "drop_newest":  # the first ones kept (plus one let in as the consumer took one)
        assert got[:5] == [0, 1, 2, 3, 4]
    elif overflow == "drop_oldest":  # the last ones kept
        assert got[-5:] == [45, 46, 47, 48, 49]
    assert inbox.delivered + inbox.dropped == 50
    assert inbox.drops["overflow"] == 50 - want


def test_close_policy_closes_with_1013_at_once(ws: str) -> None:
    scenario = Scenario(options={"maxsize": 5, "overflow": "close"}, gated=True)
    with (
        loopguard.watch(record=100) as wd,
        uvicorn_server(make_app(scenario), ws) as url,
        client_process(f"{url}/ws/a", "50", "0", "wait") as c,
    ):
        assert ready(c) == "sent 50"
        # The consumer is still stuck on its first message, yet the client is told at once.
        assert ready(c) == "closed 1013"
        assert scenario.received == []
        scenario.open_gate()
        wait_until(lambda: len(scenario.finished) == 1, what="the inbox to end")
        events = [e for e in wd.events if isinstance(e, ConnectionClosed)]
    inbox = scenario.inbox
    assert [int(m) for m in scenario.received] == list(range(len(scenario.received)))
    assert 5 <= len(scenario.received) <= 6
    assert (inbox.close_code, inbox.close_reason) == (1013, "overflow")
    # Every message the server read is delivered or counted; the server may discard the
    # rest unread once the close is under way (wsproto does).
    assert 11 <= inbox.delivered + inbox.dropped <= 50
    (event,) = events
    assert (event.code, event.reason, event.route) == (1013, "overflow", "/ws/{room}")
    assert (event.depth, event.maxsize) == (5, 5)
    assert event.full_since is not None and event.full_since <= time.time()
    assert event.dropped >= 1


@pytest.mark.parametrize(("overflow", "code"), [("drop_newest", 1000), ("close", 1009)])
def test_messages_over_max_bytes(ws: str, overflow: str, code: int) -> None:
    scenario = Scenario(options={"maxsize": 50, "max_bytes": 100, "overflow": overflow})
    with (
        uvicorn_server(make_app(scenario), ws) as url,
        client_process(f"{url}/ws/a", "3", "200", "wait") as c,
    ):
        assert ready(c) == "sent 3"
        if overflow == "close":
            assert ready(c) == "closed 1009"
        else:
            wait_until(lambda: _all_received(scenario, 3))
            os.kill(c.pid, signal.SIGTERM)
        wait_until(lambda: len(scenario.finished) == 1, what="the inbox to end")
    inbox = scenario.inbox
    assert scenario.received == []
    assert inbox.drops["too_large"] >= 1
    if overflow == "close":  # what came after the close may never be read
        assert inbox.close_code == 1009
        assert 1 <= inbox.delivered + inbox.dropped <= 3
    else:
        assert inbox.delivered + inbox.dropped == 3


def test_idle_timeout_closes_and_ends(ws: str) -> None:
    scenario = Scenario(options={"maxsize": 5, "idle_timeout": 0.5})
    with (
        uvicorn_server(make_app(scenario), ws) as url,
        client_process(f"{url}/ws/a", "1", "0", "wait") as c,
    ):
        assert ready(c) == "sent 1"
        assert ready(c) == "closed 1000"
        wait_until(lambda: len(scenario.finished) == 1, what="the inbox to end")
    assert scenario.received == ["0"]
    assert (scenario.inbox.close_code, scenario.inbox.close_reason) == (1000, "idle")


def test_a_websocket_not_accepted_is_refused_clearly(ws: str) -> None:
    scenario = Scenario(accept=False)
    with uvicorn_server(make_app(scenario), ws) as url, client_process(f"{url}/ws/a", "0") as c:
        c.wait(30)
        wait_until(lambda: len(scenario.errors) == 1)
    (error,) = scenario.errors
    assert isinstance(error, RuntimeError)
    assert "accept()" in str(error)


def test_uvicorn_keepalive_ends_the_inbox_of_a_frozen_client(ws: str) -> None:
    """uvicorn's --ws-ping-interval/--ws-ping-timeout find the zombie; the inbox ends.

    uvicorn closes with 1011 on the wire, but the ASGI disconnect message it gives the
    application carries 1005 or 1006: the guard cannot tell a keepalive close from a
    vanished peer here, and reports what it was told.
    """
    scenario = Scenario(options={"maxsize": 5})
    with (
        uvicorn_server(make_app(scenario), ws, ws_ping_interval=0.5, ws_ping_timeout=0.5) as url,
        client_process(f"{url}/ws/a", "1", "0", "wait") as c,
    ):
        assert ready(c) == "sent 1"
        wait_until(lambda: scenario.received == ["0"])
        os.kill(c.pid, signal.SIGSTOP)  # alive for TCP, deaf to pings: a zombie
        started = time.monotonic()
        wait_until(lambda: len(scenario.finished) == 1, timeout=30, what="keepalive to close")
        took = time.monotonic() - started
    assert scenario.inbox.close_code in (1005, 1006, 1011)
    # Ping interval + timeout is 1 s (bounds generous for a loaded machine); the legacy
    # implementation then waits its 10 s closing timeout for the frozen peer's answer.
    assert took < (25 if ws == "websockets" else 10)


def test_clients_killed_abruptly_leave_nothing_behind(ws: str) -> None:
    scenario = Scenario(options={"maxsize": 5}, keep=False)
    clients = 12
    with uvicorn_server(make_app(scenario), ws) as url:
        for _ in range(clients):
            with client_process(f"{url}/ws/a", "3", "0", "wait") as c:
                assert ready(c) == "sent 3"
                wait_until(lambda: len(scenario.refs) > len(scenario.finished))
                os.kill(c.pid, signal.SIGKILL)
        wait_until(lambda: len(scenario.finished) == clients, what="every inbox to end")
        wait_until(lambda: _receiver.active_connections() == 0)
    gc.collect()
    assert [r for r in scenario.refs if r() is not None] == []


def test_bad_arguments_name_the_argument(ws: str) -> None:
    from starlette.websockets import WebSocket

    websocket = WebSocket({"type": "websocket", "path": "/"}, _never, _never)
    for kwargs, named in [
        ({"maxsize": 0}, "maxsize"),
        ({"maxsize": 1, "max_bytes": -1}, "max_bytes"),
        ({"maxsize": 1, "overflow": "drop"}, "overflow"),
        ({"maxsize": 1, "idle_timeout": 0}, "idle_timeout"),
    ]:
        with pytest.raises(ValueError, match=named):
            guard_receive(websocket, **kwargs)  # type: ignore[arg-type]


async def _never(*args: object) -> Any:
    raise AssertionError("not called")
