"""A WebSocket client process for the tests: ``ws_client.py URL COUNT [SIZE] [then]``.

Connects, sends COUNT text messages ``"0"``, ``"1"``... (padded to SIZE bytes when given),
prints ``sent COUNT`` and then, per ``then``: ``close`` (close normally and exit, the
default), ``wait`` (stay connected, answering pings, until killed) or ``echo`` (read
COUNT replies, print ``echoed N``, close).
"""

from __future__ import annotations

import asyncio
import sys

from websockets.asyncio.client import connect


async def main(url: str, count: int, size: int, then: str) -> None:
    async with connect(url, ping_interval=None, max_queue=None) as ws:
        for i in range(count):
            await ws.send(str(i).ljust(size))
        print(f"sent {count}", flush=True)
        if then == "wait":
            await ws.wait_closed()
            print(f"closed {ws.close_code}", flush=True)
        elif then == "echo":
            for _ in range(count):
                await ws.recv()
            print(f"echoed {count}", flush=True)


if __name__ == "__main__":
    url, count = sys.argv[1], int(sys.argv[2])
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    then = sys.argv[4] if len(sys.argv) > 4 else "close"
    asyncio.run(main(url, count, size, then))
