"""The WebSocket scenario of ``loopguard demo websocket``: a naive receive loop, then the fix.

A real ``websockets`` server on 127.0.0.1 and a real client process that sends readings
at a steady rate and pings the server every 250 ms. First the server processes each
message inline, CPU work on the event loop: it falls behind, the client's ping round
trip climbs, and loopguard (the demo runs under ``loopguard run``) names the blocking
line. Then the same service with ``guard_receive`` and ``@loopguard.offload``: the
server prints its queue depth, drops and lag each second while the round trip stays
low. About 25 seconds.

Run it with ``loopguard demo websocket`` (or ``python -m
loopguard_integrations.demo_websocket`` for the scenario without the watchdog).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

import loopguard

from ._receiver import Inbox
from .websockets import guard_receive

__all__ = ["main"]

PHASE = 10.0  # seconds per phase
RATE = 12  # readings per second the client sends
WORK = 0.12  # seconds of CPU per reading: the consumer manages about 8 per second


def score(reading: str) -> int:
    """CPU-heavy scoring in pure Python (stands in for parsing and a model)."""
    digest = reading.encode()
    deadline = time.perf_counter() + WORK
    while time.perf_counter() < deadline:
        digest = hashlib.sha256(digest).digest()
    return digest[0]


async def naive(connection: ServerConnection) -> None:
    """The seed's receive loop: receive, then process inline on the event loop."""
    try:
        async for message in connection:
            score(str(message))  # blocks the loop: no reads, no pongs meanwhile
    except ConnectionClosed:
        pass


async def guarded(connection: ServerConnection) -> None:
    """Receive fast into a bounded inbox; process in a worker thread."""
    offloaded = loopguard.offload(score)
    async with guard_receive(
        connection, maxsize=20, overflow="drop_oldest", ping_interval=1.0, ping_timeout=5.0
    ) as inbox:
        reporter = asyncio.create_task(_report(inbox))
        try:
            async for message in inbox:
                await offloaded(str(message))
        finally:
            reporter.cancel()


async def _report(inbox: Inbox) -> None:
    while True:
        await asyncio.sleep(1.0)
        rtt = f"{inbox.ping_rtt * 1000:.1f} ms" if inbox.ping_rtt is not None else "-"
        print(
            f"  [server] queue {len(inbox):>2}/{inbox.maxsize}  delivered {inbox.delivered:>3}  "
            f"dropped {inbox.dropped:>3}  lag {inbox.lag * 1000:6.1f} ms  ping {rtt}",
            flush=True,
        )


async def _client(url: str, seconds: float) -> None:
    """Client process: send readings at RATE, ping every 250 ms, print each second."""
    async with connect(url, ping_interval=None) as ws:
        start = time.monotonic()
        sent = 0
        worst = 0.0
        pending: float | None = None  # when the ping still unanswered was sent

        async def pinger() -> None:
            nonlocal worst, pending
            while True:
                pending = time.monotonic()
                waiter = await ws.ping()
                await waiter
                worst = max(worst, time.monotonic() - pending)
                pending = None
                await asyncio.sleep(0.25)

        pings = asyncio.create_task(pinger())
        next_print = start + 1
        try:
            while (now := time.monotonic()) < start + seconds:
                await ws.send(f"reading {sent}")
                sent += 1
                await asyncio.sleep(max(0.0, start + sent / RATE - time.monotonic()))
                if now >= next_print:
                    if pending is not None:  # a pong still missing counts as it stands
                        worst = max(worst, now - pending)
                    state = "ok" if worst < 0.1 else "FALLING BEHIND"
                    print(
                        f"  [client] sent {sent:>3}  worst ping round trip this second "
                        f"{worst * 1000:7.1f} ms  {state}",
                        flush=True,
                    )
                    worst, next_print = 0.0, next_print + 1
        except ConnectionClosed:
            print("  [client] connection closed by the server", flush=True)
        finally:
            pings.cancel()


async def _phase(title: str, handler: object) -> None:
    print(f"\n--> {title}", flush=True)
    async with serve(handler, "127.0.0.1", 0, ping_interval=None) as server:  # type: ignore[arg-type]
        port = server.sockets[0].getsockname()[1]
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "loopguard_integrations.demo_websocket",
            "--client",
            f"ws://127.0.0.1:{port}",
            str(PHASE),
            stdout=None,
        )
        await client.wait()


async def main() -> None:
    """Run both phases (about 25 seconds)."""
    print(
        f"loopguard demo websocket: a client sends {RATE} readings/s; "
        f"scoring one takes {WORK * 1000:.0f} ms of CPU.",
        flush=True,
    )
    await _phase("naive: receive, then score inline on the event loop", naive)
    await _phase("guarded: guard_receive(maxsize=20, overflow='drop_oldest') + @offload", guarded)
    print(
        "\ndemo finished: inline, the loop was blocked and pings waited behind the work; "
        "guarded, the receive loop stayed responsive and the overload became counted drops.",
        flush=True,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        asyncio.run(_client(sys.argv[2], float(sys.argv[3])))
    else:
        asyncio.run(main())
