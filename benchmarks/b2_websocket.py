"""B2: WebSocket echo at full speed, with and without loopguard and the guarded receive.

Servers: uvicorn with each of its WebSocket implementations (``websockets``,
``websockets-sansio``, ``wsproto``) serving a Starlette echo route, and a plain
``websockets`` server. Each server runs in a fresh process; client *processes* hold
connections that send a message and wait for its echo, as fast as they can, for a fixed
time. Configurations of the server:

- ``none``: no loopguard, the handler receives and sends inline;
- ``watchdog``: ``loopguard.install()``, same handler;
- ``guard``: the watchdog and ``guard_receive`` (the handler iterates the inbox);
- ``guard-otel``: the same with an OpenTelemetry SDK ``MeterProvider`` and reader;
- ``guard-precise`` / ``guard-stats``: the guard with precise mode / loop statistics.

Reported per server: echoes per second and round-trip p50/p99 (medians over rounds),
the throughput ratio against ``none`` taken within each round (median), and the server's
CPU time per echo, whose difference between ``guard`` and ``watchdog`` is the guard's
cost per message.

Run it alone with ``python benchmarks/b2_websocket.py [--quick]`` or through
``benchmarks/run.py --only b2``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
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

NAME = "b2"
TITLE = "B2: WebSocket echo (msgs/s, round trip) under loopguard and guard_receive"
SERVERS = ("uvicorn-websockets", "uvicorn-websockets-sansio", "uvicorn-wsproto", "websockets")
CONFIGS = ("none", "watchdog", "guard", "guard-otel", "guard-precise", "guard-stats")
CLIENTS = 2  # client processes
CONNECTIONS = 2  # connections per client process


# -- server process --------------------------------------------------------------------


def _setup(config: str) -> Any:
    import loopguard

    reader = None
    if config == "guard-otel":
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        import loopguard.metrics

        reader = InMemoryMetricReader()
        loopguard.metrics.use_meter_provider(MeterProvider(metric_readers=[reader]))
    if config != "none":
        loopguard.install(
            log=False, precise=config == "guard-precise", stats=config == "guard-stats"
        )
    return reader


def _starlette_app(guarded: bool) -> Any:
    from loopguard_integrations.starlette import guard_receive
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        if guarded:
            async with guard_receive(websocket, maxsize=64) as inbox:
                async for message in inbox:
                    await websocket.send_text(message)  # type: ignore[arg-type]
            return
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            pass

    return Starlette(routes=[WebSocketRoute("/echo", echo)])


async def _websockets_server(port: int, guarded: bool) -> None:
    from loopguard_integrations.websockets import guard_receive
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    async def echo(connection: ServerConnection) -> None:
        if guarded:
            async with guard_receive(connection, maxsize=64) as inbox:
                async for message in inbox:
                    await connection.send(message)
            return
        try:
            async for message in connection:
                await connection.send(message)
        except ConnectionClosed:
            pass

    async with serve(echo, "127.0.0.1", port) as server:
        await server.serve_forever()


def serve_main(server: str, config: str, port: int) -> None:
    """Child: run one server in one configuration until killed."""
    _setup(config)
    guarded = config.startswith("guard")
    if server == "websockets":
        try:
            import uvloop

            uvloop.run(_websockets_server(port, guarded))
        except ImportError:
            asyncio.run(_websockets_server(port, guarded))
        return
    import uvicorn

    impl = server.removeprefix("uvicorn-")
    uvicorn.run(_starlette_app(guarded), host="127.0.0.1", port=port, ws=impl, log_level="error")


# -- client process --------------------------------------------------------------------


async def _client(url: str, seconds: float, connections: int) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    rtts: list[float] = []
    count = 0

    async def one() -> None:
        nonlocal count
        async with connect(url, ping_interval=None) as ws:
            payload = "x" * 64
            deadline = time.perf_counter() + seconds
            while True:
                start = time.perf_counter()
                if start >= deadline:
                    break
                await ws.send(payload)
                await ws.recv()
                rtts.append(time.perf_counter() - start)
                count += 1

    await asyncio.gather(*(one() for _ in range(connections)))
    rtts.sort()
    sample = rtts[:: max(1, len(rtts) // 2000)]
    return {"count": count, "rtts": sample}


def client_main(url: str, seconds: float, connections: int) -> None:
    """Child: echo for ``seconds`` on ``connections`` connections; print a JSON line."""
    print(json.dumps(asyncio.run(_client(url, seconds, connections))), flush=True)


# -- parent ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not listen")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server: str, config: str, seconds: float) -> dict[str, float]:
    """One server process, CLIENTS client processes for ``seconds``; the numbers."""
    port = _free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    me = [sys.executable, str(Path(__file__).resolve())]
    proc = subprocess.Popen([*me, "--serve", server, config, str(port)], env=env)
    try:
        _wait_port(port, proc)
        path = "/echo" if server.startswith("uvicorn") else "/"
        url = f"ws://127.0.0.1:{port}{path}"
        cpu0 = _cpu_seconds(proc.pid)
        clients = [
            subprocess.Popen(
                [*me, "--client", url, str(seconds), str(CONNECTIONS)],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(CLIENTS)
        ]
        outputs = [json.loads(c.communicate(timeout=seconds + 60)[0]) for c in clients]
        cpu = _cpu_seconds(proc.pid) - cpu0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    count = sum(o["count"] for o in outputs)
    rtts = sorted(r for o in outputs for r in o["rtts"])
    return {
        "rate": count / seconds,
        "p50": rtts[len(rtts) // 2] if rtts else float("nan"),
        "p99": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] if rtts else float("nan"),
        "cpu_us": cpu / count * 1e6 if count else float("nan"),
    }


class _Memory:
    """A transport that hands out ``n`` ready messages: the guard's own cost, no I/O."""

    route: str | None = None

    def __init__(self, n: int) -> None:
        self.left = n

    async def receive(self) -> str | None:
        if self.left == 0:
            return None
        self.left -= 1
        if self.left % 64 == 0:
            await asyncio.sleep(0)  # a real transport waits now and then
        return "x" * 64

    async def close(self, code: int, reason: str) -> None:
        pass

    def closed_code(self) -> int | None:
        return 1000

    def keepalive_closed(self) -> bool:
        return False

    async def ping(self) -> None:
        return None


async def _core_once(n: int, guarded: bool) -> float:
    from loopguard_integrations._receiver import guard

    transport = _Memory(n)
    start = time.perf_counter()
    if guarded:
        async with guard(transport, maxsize=64) as inbox:
            async for _ in inbox:
                pass
    else:
        while await transport.receive() is not None:
            pass
    return (time.perf_counter() - start) / n


def core_cost(n: int = 50_000, repeats: int = 7) -> dict[str, float]:
    """Per-message cost of the guard in µs (best of ``repeats``), without and with an SDK."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import loopguard.metrics

    out: dict[str, float] = {}
    for label, sdk in (("no SDK", False), ("SDK reader", True)):
        provider = MeterProvider(metric_readers=[InMemoryMetricReader()]) if sdk else None
        loopguard.metrics.use_meter_provider(provider)
        plain = min(asyncio.run(_core_once(n, False)) for _ in range(repeats))
        guarded = min(asyncio.run(_core_once(n, True)) for _ in range(repeats))
        out[label] = (guarded - plain) * 1e6
    loopguard.metrics.use_meter_provider(None)
    return out


def run(options: Any) -> h.Report:
    """Measure every server and configuration, interleaved over rounds."""
    quick = bool(getattr(options, "quick", False))
    rounds = max(1, int(getattr(options, "rounds", 3))) if not quick else 1
    seconds = 1.0 if quick else 4.0
    configs = tuple(getattr(options, "configs", ()) or CONFIGS)
    log = (lambda text: print(text, file=sys.stderr, flush=True)) if options.verbose else None
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for round_no in range(rounds):
        order = [(s, c) for s in SERVERS for c in configs]
        random.Random(f"{options.seed}:{round_no}").shuffle(order)
        for server, config in order:
            results.setdefault((server, config), []).append(measure(server, config, seconds))
        if log:
            log(f"b2: round {round_no + 1}/{rounds} done")
    rows = []
    data: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "results": {}}
    for server in SERVERS:
        base = results.get((server, "none"), [])
        watchdog_cpu = _median(results.get((server, "watchdog"), []), "cpu_us")
        for config in configs:
            runs = results[(server, config)]
            ratios = [r["rate"] / b["rate"] for r, b in zip(runs, base, strict=False) if b["rate"]]
            cpu = _median(runs, "cpu_us")
            extra = f"{cpu - watchdog_cpu:+.1f}" if config.startswith("guard") else ""
            rows.append(
                [
                    server,
                    config,
                    f"{_median(runs, 'rate'):,.0f}",
                    f"{statistics.median(ratios):.3f}" if ratios else "",
                    f"{_median(runs, 'p50') * 1e3:.3f}",
                    f"{_median(runs, 'p99') * 1e3:.3f}",
                    f"{cpu:.1f}",
                    extra,
                ]
            )
            data["results"][f"{server}/{config}"] = runs
    header = [
        "server",
        "config",
        "echo/s",
        "vs none",
        "RTT p50 ms",
        "RTT p99 ms",
        "server CPU µs/echo",
        "vs watchdog µs",
    ]
    markdown = f"## {TITLE}\n\n" + h.markdown_table(header, rows, "llrrrrrr")
    core = core_cost(10_000 if quick else 50_000)
    data["core_us"] = core
    markdown += "\n\nGuard cost per message in-process (receive, queue, hand out; best of 7):\n\n"
    markdown += h.markdown_table(
        ["metrics", "µs per message"], [[k, f"{v:.2f}"] for k, v in core.items()]
    )
    return h.Report(name=NAME, markdown=markdown, data=data)


def _median(runs: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) == r.get(key)]
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    """Command line: run the benchmark, or one of its child roles."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        serve_main(argv[1], argv[2], int(argv[3]))
        return 0
    if argv[:1] == ["--client"]:
        client_main(argv[1], float(argv[2]), int(argv[3]))
        return 0
    if argv[:1] == ["--core"]:
        for label, cost in core_cost().items():
            print(f"guard cost per message ({label}): {cost:.2f} µs")
        return 0
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s per variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default="", help=f"subset of {','.join(CONFIGS)}")
    args = parser.parse_args(argv)
    opts = h.Options(
        rounds=args.rounds,
        quick=args.quick,
        configs=tuple(c for c in args.configs.split(",") if c),
    )
    print(run(opts).markdown)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:  # a server child being stopped
        raise SystemExit(0) from None
