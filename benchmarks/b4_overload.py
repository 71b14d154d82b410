"""B4: a client sending at twice what the consumer processes, for 30 s.

A ``websockets`` server whose consumer takes ``1/RATE`` s per message; one client
process sends 1 KiB messages at ``2 x RATE`` per second (as fast as the connection
lets it, never faster) and pings every 100 ms. Server variants:

- ``naive``: the seed's inline loop, ``recv()`` then the work on the loop
  (``time.sleep``, standing in for synchronous processing);
- ``unbounded``: a receiver task into an unbounded ``asyncio.Queue``, the work
  offloaded (``@loopguard.offload``);
- ``guard-<policy>``: ``guard_receive(maxsize=100, overflow=<policy>)``, the work
  offloaded, for each of ``block``, ``drop_oldest``, ``drop_newest``, ``close``.

Reported per variant: messages the client sent (and its achieved rate: slowed by
backpressure under ``block``), received by the server, delivered and dropped; receive
lag p99 (send time to the moment the server's receive returned it, same host clock)
and ping round trip p99 as the client sees it; the server's RSS growth over the run;
and how the connection ended.

Run it alone with ``python benchmarks/b4_overload.py [--quick]`` or through
``benchmarks/run.py --only b4``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(HERE), str(ROOT), str(ROOT / "integrations")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import _harness as h  # noqa: E402

NAME = "b4"
TITLE = "B4: overload (client at 2x the consumer rate): lag, ping RTT, memory, accounting"
VARIANTS = (
    "naive",
    "unbounded",
    "guard-block",
    "guard-drop_oldest",
    "guard-drop_newest",
    "guard-close",
)
RATE = 100  # messages the consumer processes per second
SIZE = 8192  # large enough that 30 s of excess outgrows the loopback socket buffers


# -- server process ----------------------------------------------------------------------


async def _serve(variant: str, port: int, out: Path) -> None:
    from loopguard_integrations.websockets import guard_receive
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    import loopguard

    work_time = 1 / RATE
    lags: list[float] = []
    stats: dict[str, Any] = {"received": 0, "delivered": 0, "dropped": 0, "close_code": None}
    rss: list[int] = [h.rss_bytes()]
    done = asyncio.Event()

    @loopguard.offload
    def work() -> None:
        time.sleep(work_time)

    def timed(connection: ServerConnection) -> None:
        original = connection.recv

        async def recv(*args: Any, **kwargs: Any) -> Any:
            message = await original(*args, **kwargs)
            lags.append(time.monotonic() - float(message[:20]))
            stats["received"] += 1
            return message

        connection.recv = recv  # type: ignore[method-assign]

    async def handler(connection: ServerConnection) -> None:
        timed(connection)
        try:
            if variant == "naive":
                try:
                    while True:
                        await connection.recv()
                        time.sleep(work_time)  # the seed's inline processing
                        stats["delivered"] += 1
                except ConnectionClosed:
                    pass
            elif variant == "unbounded":
                queue: asyncio.Queue[str | bytes | None] = asyncio.Queue()

                async def receiver() -> None:
                    try:
                        while True:
                            queue.put_nowait(await connection.recv())
                    except ConnectionClosed:
                        queue.put_nowait(None)

                task = asyncio.create_task(receiver())
                while await queue.get() is not None:
                    await work()
                    stats["delivered"] += 1
                await task
            else:
                policy = variant.removeprefix("guard-")
                async with guard_receive(
                    connection,
                    maxsize=100,
                    overflow=policy,
                    ping_interval=None,  # type: ignore[arg-type]
                ) as inbox:
                    async for _ in inbox:
                        await work()
                stats["delivered"], stats["dropped"] = inbox.delivered, inbox.dropped
        finally:
            stats["close_code"] = connection.close_code
            done.set()

    async def sample_rss() -> None:
        while True:
            await asyncio.sleep(0.5)
            rss.append(h.rss_bytes())

    sampler = asyncio.create_task(sample_rss())
    async with serve(handler, "127.0.0.1", port, max_size=2**20):
        await done.wait()
    sampler.cancel()
    lags.sort()
    stats["lag_p99"] = lags[int(len(lags) * 0.99)] if lags else None
    stats["lag_max"] = lags[-1] if lags else None
    stats["rss_start"], stats["rss_max"], stats["rss_end"] = rss[0], max(rss), rss[-1]
    out.write_text(json.dumps(stats))


# -- client process ----------------------------------------------------------------------


async def _client(url: str, seconds: float) -> dict[str, Any]:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    sent = 0
    rtts: list[float] = []
    lost_pings = 0
    code = None
    ws = await connect(url, ping_interval=20, ping_timeout=20, max_size=2**20)
    start = time.monotonic()
    stop = start + seconds

    # Fresh random text per message: websockets compresses by default (permessage-
    # deflate, with a 32 KiB window), and a repeated or uniform padding would shrink to
    # a few bytes on the wire, so the socket buffers would hold the whole run's excess.
    def pad() -> str:
        return base64.b64encode(os.urandom((SIZE - 21) * 3 // 4)).decode()[: SIZE - 21]

    async def pinger() -> None:
        nonlocal lost_pings
        while time.monotonic() < stop:
            began = time.monotonic()
            try:
                waiter = await ws.ping()
                await asyncio.wait_for(waiter, 10)
                rtts.append(time.monotonic() - began)
            except (asyncio.TimeoutError, ConnectionClosed):
                lost_pings += 1
                if ws.close_code is not None:
                    return
            await asyncio.sleep(0.1)

    pings = asyncio.create_task(pinger())
    try:
        while (now := time.monotonic()) < stop:
            due = start + sent / (2 * RATE)
            if due > now:
                await asyncio.sleep(due - now)
            await ws.send(f"{time.monotonic():20.6f}|{pad()}")
            sent += 1
    except ConnectionClosed:
        pass
    elapsed = time.monotonic() - start
    await pings
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(), 15)
    code = ws.close_code
    rtts.sort()
    return {
        "sent": sent,
        "send_rate": sent / elapsed,
        "ping_p99": rtts[int(len(rtts) * 0.99)] if rtts else None,
        "ping_max": rtts[-1] if rtts else None,
        "lost_pings": lost_pings,
        "close_code": code,
    }


# -- parent ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(variant: str, seconds: float, tmp: Path) -> dict[str, Any]:
    """One server process and one client process; the merged numbers."""
    port = _free_port()
    out = tmp / f"b4-{variant}-{os.getpid()}.json"
    me = [sys.executable, str(Path(__file__).resolve())]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    server = subprocess.Popen([*me, "--serve", variant, str(port), str(out)], env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), 0.2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"b4 server {variant} did not start") from None
                time.sleep(0.05)
        client = subprocess.run(
            [*me, "--client", f"ws://127.0.0.1:{port}", str(seconds)],
            capture_output=True,
            text=True,
            timeout=seconds + 120,
            env=env,
            check=True,
        )
        server.wait(120)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGKILL)
            server.wait()
    result = {**json.loads(client.stdout.strip().splitlines()[-1])}
    server_stats = json.loads(out.read_text())
    out.unlink()
    result.update({f"server_{k}": v for k, v in server_stats.items()})
    return result


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1e3:,.1f}"


def run(options: Any) -> h.Report:
    """Measure each variant once (each run lasts the whole overload period)."""
    import tempfile

    quick = bool(getattr(options, "quick", False))
    seconds = 5.0 if quick else 30.0
    variants = tuple(getattr(options, "configs", ()) or VARIANTS)
    log = (lambda text: print(text, file=sys.stderr, flush=True)) if options.verbose else None
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            results[variant] = measure(variant, seconds, Path(tmp))
            if log:
                log(f"b4: {variant} done")
    rows = []
    for variant, r in results.items():
        accounted = r["server_delivered"] + r["server_dropped"]
        growth = (r["server_rss_max"] - r["server_rss_start"]) / 2**20
        rows.append(
            [
                variant,
                f"{r['sent']:,}",
                f"{r['send_rate']:,.0f}",
                f"{r['server_received']:,}",
                f"{r['server_delivered']:,}",
                f"{r['server_dropped']:,}",
                "yes" if accounted == r["server_received"] else f"no ({accounted:,})",
                _ms(r["server_lag_p99"]),
                _ms(r["ping_p99"]),
                str(r["lost_pings"]),
                f"{growth:+.1f}",
                str(r["server_close_code"]),
            ]
        )
    header = [
        "server",
        "sent",
        "sent/s",
        "received",
        "delivered",
        "dropped",
        "delivered+dropped = received",
        "receive lag p99 ms",
        "ping RTT p99 ms",
        "pings lost",
        "RSS growth MiB",
        "close code",
    ]
    markdown = (
        f"## {TITLE}\n\nconsumer {RATE} msg/s, client {2 * RATE} msg/s of {SIZE} B for "
        f"{seconds:g} s\n\n" + h.markdown_table(header, rows, "l" + "r" * 11)
    )
    return h.Report(name=NAME, markdown=markdown, data={"seconds": seconds, "results": results})


def main(argv: list[str] | None = None) -> int:
    """Command line: run the benchmark, or one of its child roles."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        asyncio.run(_serve(argv[1], int(argv[2]), Path(argv[3])))
        return 0
    if argv[:1] == ["--client"]:
        print(json.dumps(asyncio.run(_client(argv[1], float(argv[2])))), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true", help="5 s per variant instead of 30")
    parser.add_argument("--configs", default="", help=f"subset of {','.join(VARIANTS)}")
    args = parser.parse_args(argv)
    opts = h.Options(
        rounds=1, quick=args.quick, configs=tuple(c for c in args.configs.split(",") if c)
    )
    print(run(opts).markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
