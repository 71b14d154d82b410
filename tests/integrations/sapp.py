"""A Starlette app whose WebSocket route runs ``guard_receive`` with options a test sets.

``Scenario`` holds the options, a gate the consumer waits on before taking each message
(so a test can fill the queue on purpose), and what the server side saw.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from loopguard_integrations.starlette import Inbox, guard_receive
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket


@dataclass
class Scenario:
    options: dict[str, Any] = field(default_factory=lambda: {"maxsize": 100})
    gated: bool = False
    received: list[str | bytes] = field(default_factory=list)
    inboxes: list[Inbox] = field(default_factory=list)
    finished: list[Inbox] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    refs: list[weakref.ref[Inbox]] = field(default_factory=list)
    keep: bool = True  # keep strong references to inboxes (False: only weak ones)
    accept: bool = True
    gate: threading.Event = field(default_factory=threading.Event)

    def open_gate(self) -> None:
        self.gate.set()

    async def wait_for_gate(self) -> None:
        # Polled: the test thread opens it (no cross-thread wake-up of the server loop).
        while not self.gate.is_set():
            await asyncio.sleep(0.01)

    @property
    def inbox(self) -> Inbox:
        return self.inboxes[0]


def make_app(scenario: Scenario) -> Starlette:
    async def endpoint(websocket: WebSocket) -> None:
        if scenario.accept:
            await websocket.accept()
        try:
            inbox = guard_receive(websocket, **scenario.options)
        except Exception as exc:
            scenario.errors.append(exc)
            await websocket.close()
            return
        if scenario.keep:
            scenario.inboxes.append(inbox)
        scenario.refs.append(weakref.ref(inbox))
        async with inbox:
            async for message in inbox:
                if scenario.gated:
                    await scenario.wait_for_gate()
                scenario.received.append(message)
        if scenario.keep:
            scenario.finished.append(inbox)
        else:
            scenario.finished.append(None)  # type: ignore[arg-type]

    return Starlette(routes=[WebSocketRoute("/ws/{room}", endpoint)])
