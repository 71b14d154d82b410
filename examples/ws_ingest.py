"""Telemetry ingest over WebSockets with FastAPI: receive fast, process separately.

Each device streams JSON readings to ``/ingest/{device}``. The receive loop does
nothing but read the socket into a bounded inbox (``guard_receive``); the handler
takes readings in batches and scores them in a worker thread (``@loopguard.offload``),
so the event loop stays free for pings, other devices and other routes. When a device
sends faster than the service scores, the oldest readings are dropped and counted
(``overflow="drop_oldest"``): for telemetry the newest value matters most.

Run it::

    uvicorn examples.ws_ingest:app --ws-ping-interval 20 --ws-ping-timeout 20

and send readings such as ``{"t": 1.0, "values": [0.1, 0.2]}``; each batch is
acknowledged with ``{"ack": n, "score": s, "dropped": d}``.
"""

from __future__ import annotations

import hashlib
import json
import time

from fastapi import FastAPI, WebSocket
from loopguard_integrations.starlette import guard_receive

import loopguard

app = FastAPI()


@loopguard.offload
def score(readings: list[dict[str, object]]) -> float:
    """CPU-heavy scoring: pure Python, so it runs in a worker thread, not on the loop."""
    total = 0.0
    for reading in readings:
        digest = json.dumps(reading, sort_keys=True).encode()
        for _ in range(200):  # stands in for feature extraction / model scoring
            digest = hashlib.sha256(digest).digest()
        total += digest[0] / 255
    return total / max(1, len(readings))


@app.websocket("/ingest/{device}")
async def ingest(websocket: WebSocket, device: str) -> None:
    """Receive readings fast; score them in batches, off the event loop."""
    await websocket.accept()
    async with guard_receive(
        websocket,
        maxsize=1000,  # readings waiting to be scored
        max_bytes=1_000_000,  # and at most 1 MB of them
        overflow="drop_oldest",
        idle_timeout=60,  # a silent device is closed (1000) after a minute
    ) as inbox:
        async for batch in inbox.batches(max_items=64, max_wait=0.01):
            readings = [json.loads(message) for message in batch]
            result = await score(readings)
            await websocket.send_json(
                {"ack": len(batch), "score": round(result, 3), "dropped": inbox.dropped}
            )


@app.get("/health")
async def health() -> dict[str, float]:
    """Answers at once even while devices stream: nothing blocks the loop."""
    return {"time": time.time()}
