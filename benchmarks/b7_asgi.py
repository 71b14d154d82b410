"""B7: the ASGI middleware's cost on throughput, and what load shedding buys under load.

    python benchmarks/b7_asgi.py [--quick] [--rounds N] [--seconds S] [--out FILE]

Each variant is a real uvicorn server (one process, asyncio loop, loopguard installed
with loop statistics) serving a Starlette hello-world; load comes from separate
client processes speaking HTTP/1.1 over keep-alive sockets (a minimal client, so the
server, not the client, is the bottleneck).

1. **Throughput**: ``plain`` (no middleware), ``middleware`` (attribution), and
   ``middleware+shed`` (shedding armed, never triggered) are loaded in interleaved
   rounds, in a shuffled order each round; the table gives median req/s and the
   server's CPU time per request, each with the median of the per-round ratios to
   ``plain`` (target: the middleware costs at most 2 %). On a shared machine CPU per
   request is the steadier of the two. The same three run in process too (the ASGI
   path alone, no server or sockets): the CPU time loopguard adds to each request.
2. **Shedding**: a probe client calls the cheap route ``/hello`` every 20 ms, first
   alone (unloaded), then while client processes hammer ``/cpu`` (20 ms of pure
   Python per call, enough to saturate the loop; a refused client waits out
   ``Retry-After``, 1 s). Servers: no shedding; shedding on
   loop delay; the same with ``/hello`` exempt (shed only the
   expensive route); the limit is a 2 ms p99 wait over a 5 s window (the latency to
   keep: twice the probe's unloaded p99). The table
   gives the probe's p50/p99 latency (all answers, 503s included, and 200s alone),
   the share it got served, the ratio of its loaded p99 to the unloaded p99 (target:
   within 2x with shedding), and how many ``/cpu`` calls were served per second.

The machine's other load moves these numbers; ratios measured side by side in one
run are what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CPU_HOLD = 0.02
RETRY_AFTER = 1
# The shedding limit is the latency to keep: 2 ms, twice the probe's unloaded p99.
SHED_LIMIT = 0.002

# -- the server -------------------------------------------------------------------

VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "middleware": {},
    "middleware+shed": {"shed_delay_p99": 5.0},  # armed, never reached
    "no-shedding": {},
    "shedding": {"shed_delay_p99": SHED_LIMIT, "shed_window": 5.0, "retry_after": RETRY_AFTER},
    "shedding, /hello exempt": {
        "shed_delay_p99": SHED_LIMIT,
        "shed_window": 5.0,
        "retry_after": RETRY_AFTER,
        "exempt_paths": ["/health", "/hello"],
    },
}


def serve(port: int, variant: str) -> None:
    """Run one variant's uvicorn server (the child process)."""
    import uvicorn
    from loopguard_integrations.asgi import LoopguardMiddleware
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    import loopguard

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    async def cpu(request: Request) -> PlainTextResponse:
        deadline = time.perf_counter() + CPU_HOLD
        while time.perf_counter() < deadline:
            pass
        return PlainTextResponse("done")

    routes = [Route("/hello", hello), Route("/health", hello), Route("/cpu", cpu)]
    app: Any = Starlette(routes=routes)
    options = VARIANTS[variant]
    if options is not None:
        app = LoopguardMiddleware(app, **options)
    loopguard.install(threshold=0.1, log=False, stats=True)
    uvicorn.run(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop="asyncio"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(variant: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "integrations"), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), variant],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if asyncio.run(_one(port, "/health"))[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server {variant} did not start")


# -- the clients -------------------------------------------------------------------


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def _one(port: int, path: str) -> tuple[int, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.perf_counter()
        status = await _request(reader, writer, path)
        return status, time.perf_counter() - started
    finally:
        writer.close()


async def _hammer(port: int, path: str, connections: int, seconds: float) -> int:
    served = 0
    stop_at = time.monotonic() + seconds

    async def connection() -> None:
        nonlocal served
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < stop_at:
                status = await _request(reader, writer, path)
                if status == 200:
                    served += 1
                elif status == 503:
                    await asyncio.sleep(RETRY_AFTER)  # a client that honours Retry-After
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return served


def hammer(port: int, path: str, connections: int, seconds: float, out: Any) -> None:
    """A load process: requests back to back on keep-alive connections; puts how many
    were served (200)."""
    out.put(asyncio.run(_hammer(port, path, connections, seconds)))


async def _probe(port: int, seconds: float, every: float) -> list[tuple[int, float]]:
    results = []
    stop_at = time.monotonic() + seconds
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            status = await _request(reader, writer, "/hello")
            results.append((status, time.perf_counter() - started))
            await asyncio.sleep(every)
    finally:
        writer.close()
    return results


def probe(port: int, seconds: float, out: Any) -> None:
    """The probe process: one cheap request every 20 ms; puts (status, latency) pairs."""
    out.put(asyncio.run(_probe(port, seconds, 0.02)))


def server_cpu(proc: subprocess.Popen[bytes]) -> float:
    """CPU seconds the server process has used so far (user + system)."""
    import psutil

    times = psutil.Process(proc.pid).cpu_times()
    return float(times.user + times.system)


def run_load(port: int, path: str, processes: int, connections: int, seconds: float) -> float:
    """Requests per second served under ``processes`` load processes."""
    queue: Any = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=hammer, args=(port, path, connections, seconds, queue))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    total = sum(queue.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


# -- the two measurements ----------------------------------------------------------


def throughput(rounds: int, seconds: float) -> dict[str, Any]:
    names = ["plain", "middleware", "middleware+shed"]
    servers = {name: start(name) for name in names}
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}  # server CPU s per request
    try:
        for name in names:  # warm-up
            run_load(servers[name][1], "/hello", 2, 8, 1.0)
        for _ in range(rounds):
            order = names[:]
            random.shuffle(order)
            for name in order:
                proc, port = servers[name]
                before = server_cpu(proc)
                rate = run_load(port, "/hello", 2, 16, seconds)
                rates[name].append(rate)
                cpu[name].append((server_cpu(proc) - before) / max(1.0, rate * seconds))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
    plain = statistics.median(rates["plain"])
    # Ratio per round (side by side), then the median of those ratios.
    return {
        name: {
            "rps_median": statistics.median(rates[name]),
            "ratio": statistics.median(
                r / p for r, p in zip(rates[name], rates["plain"], strict=True)
            ),
            "rps": rates[name],
            "cpu_us": statistics.median(cpu[name]) * 1e6,
            "cpu_ratio": statistics.median(
                c / p for c, p in zip(cpu[name], cpu["plain"], strict=True)
            ),
        }
        for name in names
    } | {"_plain_median": plain}


def shedding(seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in ["no-shedding", "shedding", "shedding, /hello exempt"]:
        proc, port = start(name)
        try:
            queue: Any = multiprocessing.Queue()
            probe_proc = multiprocessing.Process(target=probe, args=(port, seconds, queue))
            probe_proc.start()
            unloaded = queue.get(timeout=seconds + 60)
            probe_proc.join()
            time.sleep(0.5)
            loaders = [
                multiprocessing.Process(target=hammer, args=(port, "/cpu", 8, seconds + 1, queue))
                for _ in range(2)
            ]
            for p in loaders:
                p.start()
            time.sleep(1.0)  # saturated before the probe starts
            probe_proc = multiprocessing.Process(target=probe, args=(port, seconds, queue))
            probe_proc.start()
            outputs = [queue.get(timeout=seconds + 120) for _ in range(3)]
            loaded = next(o for o in outputs if isinstance(o, list))
            cpu_done = sum(o for o in outputs if isinstance(o, int))
            for p in [*loaders, probe_proc]:
                p.join()
        finally:
            proc.terminate()
            proc.wait()
        results[name] = {
            "unloaded": _latencies(unloaded),
            "loaded": _latencies(loaded),
            "cpu_rps": cpu_done / (seconds + 1),
        }
        base = results[name]["unloaded"]["p99_all"]
        results[name]["p99_ratio"] = results[name]["loaded"]["p99_all"] / base
    return results


def _latencies(samples: list[tuple[int, float]]) -> dict[str, float]:
    every = [latency for _, latency in samples]
    served = [latency for status, latency in samples if status == 200]
    return {
        "n": len(samples),
        "served": len(served) / len(samples) if samples else 0.0,
        "p50_all": percentile(every, 50),
        "p99_all": percentile(every, 99),
        "p99_served": percentile(served, 99),
    }


def in_process(rounds: int, calls: int) -> dict[str, Any]:
    """CPU per request of the ASGI path alone (no server, no sockets), interleaved."""
    sys.path[:0] = [str(REPO), str(REPO / "integrations")]  # this checkout, as the servers
    from loopguard_integrations.asgi import LoopguardMiddleware
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    import loopguard

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    def scope() -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/hello",
            "raw_path": b"/hello",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"bench")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
        }

    base = Starlette(routes=[Route("/hello", hello)])
    apps: dict[str, Any] = {
        "plain": base,
        "middleware": LoopguardMiddleware(base),
        "middleware+shed": LoopguardMiddleware(base, **VARIANTS["middleware+shed"] or {}),
    }
    cpu: dict[str, list[float]] = {name: [] for name in apps}

    async def run() -> None:
        loopguard.install(threshold=0.1, log=False, stats=True)
        for _ in range(rounds):
            order = list(apps)
            random.shuffle(order)
            for name in order:
                app = apps[name]
                started = time.process_time()
                for i in range(calls):
                    await app(scope(), receive, send)
                    if i % 50 == 0:
                        await asyncio.sleep(0)  # let the heartbeat run
                cpu[name].append((time.process_time() - started) / calls)
        loopguard.uninstall()

    asyncio.run(run())
    return {
        name: {
            "cpu_us": statistics.median(cpu[name]) * 1e6,
            "extra_us": statistics.median(
                (c - p) for c, p in zip(cpu[name], cpu["plain"], strict=True)
            )
            * 1e6,
        }
        for name in apps
    }


def report(tp: dict[str, Any], shed: dict[str, Any], inproc: dict[str, Any]) -> str:
    ms = 1000.0
    lines = []
    if tp:
        lines += [
            "| server | req/s (median) | vs plain | server CPU per request | vs plain |",
            "|---|---|---|---|---|",
        ]
    for name in ["plain", "middleware", "middleware+shed"] if tp else []:
        row = tp[name]
        lines.append(
            f"| {name} | {row['rps_median']:.0f} | {row['ratio']:.3f}x "
            f"| {row['cpu_us']:.0f} µs | {row['cpu_ratio']:.3f}x |"
        )
    if inproc:
        lines += [
            "",
            "| ASGI path in process | CPU per request | added by loopguard |",
            "|---|---|---|",
        ]
        for name, row in inproc.items():
            lines.append(f"| {name} | {row['cpu_us']:.1f} µs | {row['extra_us']:+.1f} µs |")
    lines += [
        "",
        "| server | /hello p99 unloaded | loaded: p50 | p99 (all) | p99 (200s) | served "
        "| p99 loaded/unloaded | /cpu served/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in shed.items():
        u, lo = row["unloaded"], row["loaded"]
        lines.append(
            f"| {name} | {u['p99_all'] * ms:.1f} ms | {lo['p50_all'] * ms:.1f} ms "
            f"| {lo['p99_all'] * ms:.1f} ms | {lo['p99_served'] * ms:.1f} ms "
            f"| {lo['served']:.0%} | {row['p99_ratio']:.1f}x | {row['cpu_rps']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 s (a smoke run)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--shedding-only", action="store_true", help="run only the shedding part")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), args.serve[1])
        return 0
    rounds, seconds = (2, 1.0) if args.quick else (args.rounds, args.seconds)
    tp: dict[str, Any] = {}
    inproc: dict[str, Any] = {}
    if not args.shedding_only:
        tp = throughput(rounds, seconds)
        inproc = in_process(3 if args.quick else 15, 500 if args.quick else 2000)
    shed = shedding(max(seconds, 2.0) if args.quick else seconds * 2)
    print(report(tp, shed, inproc))
    if args.out is not None:
        results = {"throughput": tp, "in_process": inproc, "shedding": shed}
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
