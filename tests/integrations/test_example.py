"""The FastAPI ingest example the docs use, run on a real uvicorn with a real client."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from websockets.asyncio.client import connect
from wsservers import uvicorn_server

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ws_ingest.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ws_ingest_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_ingest_example_acknowledges_every_reading() -> None:
    app = _load().app
    with uvicorn_server(app, "websockets-sansio") as url:
        acks = asyncio.run(_stream(f"{url}/ingest/sensor-1", 500))
    assert sum(a["ack"] for a in acks) + acks[-1]["dropped"] == 500
    assert acks[-1]["dropped"] == 0  # 500 readings fit the inbox
    assert all(0 <= a["score"] <= 1 for a in acks)
    assert len(acks) < 500  # batched


async def _stream(url: str, count: int) -> list[dict[str, float]]:
    acks: list[dict[str, float]] = []
    async with connect(url) as ws:
        for i in range(count):
            await ws.send(json.dumps({"t": i, "values": [i / 10, i / 20]}))
            if i % 20 == 0:
                await asyncio.sleep(0)  # a send that fits the buffer does not yield
        while sum(a["ack"] for a in acks) < count:
            acks.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
    return acks


# The servers' loops run in threads of the test process: on a loaded machine a GIL
# hand-off alone (pytest-xdist's I/O thread) can hold them for hundreds of ms.
pytestmark = pytest.mark.loopguard(threshold=1.0)
