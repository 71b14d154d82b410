"""B6: fan-out of one message to thousands of real WebSocket connections.

A ``websockets`` server process holds N connections opened by client processes on
loopback, and publishes a numbered message every few milliseconds, four ways:

- ``sequential``: ``for ws in clients: await ws.send(m)`` (the pattern that tutorials
  show),
- ``gather``: ``await asyncio.gather(*(ws.send(m) for ws in clients))``, unbounded,
- ``websockets.broadcast``: the library's synchronous write to every connection,
- ``loopguard``: ``await broadcast.publish(channel, m)`` to a ``Broadcast("memory://")``
  group the connections are attached to.

Each message carries the server's ``time.monotonic()`` at publish; clients (separate
processes, the same clock) record when each message arrives. Reported per variant:
publish-to-last-delivery (the slowest healthy client) p50/p99 over the publishes, the
p99 of every single delivery, the longest loop stall on the server while publishing
(a 1 ms ticker's worst lateness) and the loop thread's CPU time within its worst
gap (a stall the server's own work made, as opposed to time the OS gave the clients'
processes), and the server's RSS. Then again with 1 % of the
clients that stop reading (a handshake, then nothing: a tiny receive window that fills
after a few kilobytes). A variant that cannot deliver a publish within a few seconds
is marked stalled (the rest of its run is not measured).

Server sockets' send buffers are capped at 64 KiB for every variant, so a client that
stops reading backs up after kilobytes rather than the megabytes Linux allows on
loopback; it does not slow healthy clients down at these message sizes.

A last part opens and closes 10,000 connections on a group and reports members left
and memory before and after.

Run it alone with ``python benchmarks/b6_broadcast.py [--quick]``, or through
``benchmarks/run.py --only b6``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(HERE), str(ROOT), str(ROOT / "integrations")):
    if _path not in sys.path:  # run from a checkout without installing
        sys.path.insert(0, _path)

import _harness as h  # noqa: E402

NAME = "b6"
TITLE = "B6: broadcast fan-out to real WebSocket connections"
VARIANTS = ("sequential", "gather", "websockets.broadcast", "loopguard")
SIZES = (1000, 5000)
MESSAGE_BYTES = 4096
SNDBUF = 64 * 1024
CLIENT_PROCESSES = 4
STALL_AFTER = 3.0  # a publish not done by then: the variant is stalled
PUBLISH_PHASE = 20.0  # publishing stops after this long (slow variants publish fewer)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# -- server ------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> dict[str, Any]:
    from loopguard_integrations.broadcast import Broadcast
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    variant = args.variant
    clients: set[ServerConnection] = set()
    broadcast = Broadcast("memory://")
    await broadcast.connect()
    group_cm = broadcast.group("bench", maxsize=32)
    group = await group_cm.__aenter__()

    async def handler(ws: ServerConnection) -> None:
        sock = ws.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        with contextlib.suppress(ConnectionClosed):
            if variant == "loopguard":
                async with group.attach(ws):
                    async for _ in ws:
                        pass
            else:
                clients.add(ws)
                try:
                    async for _ in ws:
                        pass
                finally:
                    clients.discard(ws)

    # How long the publish itself held the loop at a stretch (wall, and the loop
    # thread's CPU): each slice of a loopguard fan-out, each websockets.broadcast()
    # call. The sequential and gather variants have no such bound to measure.
    holds: list[tuple[float, float]] = []

    def timed(call: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return call(*a, **k)
            finally:
                holds.append((time.perf_counter() - wall, time.thread_time() - cpu))

        return run

    slice_of = type(group)._slice
    if variant == "loopguard":
        type(group)._slice = timed(slice_of)  # type: ignore[method-assign]

    async def publish(message: str) -> None:
        if variant == "sequential":
            for ws in list(clients):
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(message)
        elif variant == "gather":
            await asyncio.gather(
                *(ws.send(message) for ws in list(clients)), return_exceptions=True
            )
        elif variant == "websockets.broadcast":
            import websockets

            timed(websockets.broadcast)(list(clients), message)
        else:
            await broadcast.publish("bench", message)

    def members() -> int:
        return group.members if variant == "loopguard" else len(clients)

    worst = 0.0
    ticking = True
    late: list[float] = []
    gc_pauses: list[float] = []
    gc_started = 0.0

    def on_gc(phase: str, info: dict[str, int]) -> None:
        nonlocal gc_started
        if phase == "start":
            gc_started = time.perf_counter()
        elif ticking:
            gc_pauses.append(time.perf_counter() - gc_started)

    worst_cpu = 0.0  # the loop thread's CPU time within the worst-CPU stall

    async def ticker() -> None:
        # Lateness is wall time: it also counts time the OS gave the cores to other
        # processes (the clients, on a small machine). The loop thread's own CPU time
        # in the same gap says how much of a stall the server's work made.
        nonlocal worst, worst_cpu
        while ticking:
            before, cpu_before = time.monotonic(), time.thread_time()
            await asyncio.sleep(0.001)
            lateness = time.monotonic() - before - 0.001
            late.append(lateness)
            worst = max(worst, lateness)
            worst_cpu = max(worst_cpu, time.thread_time() - cpu_before)

    async with serve(handler, "127.0.0.1", 0, max_queue=16, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"PORT {port}", flush=True)
        deadline = time.monotonic() + 300
        while members() < args.expect and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        connected = members()
        await asyncio.sleep(0.5)
        rss_before = h.rss_bytes()
        tick = asyncio.create_task(ticker())
        gc.callbacks.append(on_gc)
        await asyncio.sleep(0.05)
        worst = worst_cpu = 0.0
        late.clear()
        holds.clear()
        padding = "x" * MESSAGE_BYTES
        published = 0
        stalled = False
        durations = []
        phase_ends = time.monotonic() + PUBLISH_PHASE
        for seq in range(args.publishes):
            if time.monotonic() > phase_ends:
                break
            started = time.monotonic()
            message = f"{seq} {started:.9f} {padding}"
            try:
                await asyncio.wait_for(publish(message), STALL_AFTER)
            except asyncio.TimeoutError:
                stalled = True
                break
            durations.append(time.monotonic() - started)
            published += 1
            await asyncio.sleep(args.interval)
        await asyncio.sleep(0.5)
        ticking = False
        await tick
        gc.callbacks.remove(on_gc)
        rss_after = h.rss_bytes()
        print("DONE", flush=True)
        # Let clients finish reading before connections close.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline), 60
            )
        result = {
            "connected": connected,
            "published": published,
            "stalled": stalled,
            "worst_stall": worst,
            "worst_cpu": worst_cpu,
            "hold_max": max((w for w, _ in holds), default=None),
            "hold_cpu_max": max((c for _, c in holds), default=None),
            "hold_p99": _pct([w for w, _ in holds], 99) if holds else None,
            "stall_p99": _pct(late, 99),
            "worst_gc": max(gc_pauses, default=0.0),
            "publish_p50": statistics.median(durations) if durations else None,
            "rss_before": rss_before,
            "rss_after": rss_after,
            "evicted": sum(group.evictions.values()),
        }
        # The result first: a teardown that hangs (a send cancelled on a stuck
        # connection) must not lose the measurement.
        h.emit_result({}, result)
        server.close(close_connections=False)
        for ws in list(clients):
            ws.transport.abort()
        await group_cm.__aexit__(None, None, None)
    return result


# -- clients -----------------------------------------------------------------------


async def _stuck(host: str, port: int) -> asyncio.StreamWriter:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    writer.transport.pause_reading()  # type: ignore[attr-defined]
    return writer


async def _clients(args: argparse.Namespace) -> dict[str, Any]:
    from websockets.asyncio.client import ClientConnection, connect

    host, port = "127.0.0.1", args.port
    latencies: list[list[float]] = [[] for _ in range(args.publishes)]
    healthy: list[ClientConnection] = []
    stuck = []
    for _ in range(args.slow):
        stuck.append(await _stuck(host, port))
    todo = args.count - args.slow
    while todo:  # a hundred handshakes at a time
        batch = min(100, todo)
        healthy.extend(
            await asyncio.gather(
                *(
                    connect(
                        f"ws://{host}:{port}", max_queue=None, compression=None, open_timeout=120
                    )
                    for _ in range(batch)
                )
            )
        )
        todo -= batch
    print("CONNECTED", flush=True)
    stop = asyncio.Event()

    async def read(ws: ClientConnection) -> None:
        with contextlib.suppress(Exception):
            while not stop.is_set():
                message = await ws.recv()
                now = time.monotonic()
                seq, sent, _ = str(message).split(" ", 2)
                latencies[int(seq)].append(now - float(sent))

    readers = [asyncio.create_task(read(ws)) for ws in healthy]
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await asyncio.sleep(0.2)
    result = {
        "healthy": len(healthy),
        "latencies": [[round(x, 6) for x in seq] for seq in latencies],
    }
    h.emit_result({}, result)  # before the teardown, as the server does
    stop.set()
    for task in readers:
        task.cancel()
    for ws in healthy:
        ws.transport.abort()
    for writer in stuck:
        writer.transport.abort()
    return result


# -- one measurement ---------------------------------------------------------------


def _spawn(role: str, *extra: str) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "integrations"), env.get("PYTHONPATH", "")]
    )
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _line(proc: subprocess.Popen[str], want: str) -> str:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child exited before {want!r}")
        if line.startswith(want):
            return line.strip()


def _result(proc: subprocess.Popen[str]) -> dict[str, Any] | None:
    """The child's result, or ``None`` if it printed none (a crash, or a hang before it).

    The result line is read as soon as it is printed; a child whose teardown then
    hangs is killed after a grace period.
    """
    stdout = proc.stdout
    assert stdout is not None
    lines: list[str] = []

    def read() -> None:
        for line in stdout:
            if line.startswith(h.RESULT_PREFIX):
                lines.append(line)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(120)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    try:
        payload = h.parse_result(lines[0]) if lines else None
    except ValueError:
        return None
    if payload is None:
        return None
    info: dict[str, Any] = payload["info"]
    return info


def measure(variant: str, n: int, slow: int, publishes: int, interval: float) -> dict[str, Any]:
    """One server and its client processes; every number of one table row."""
    server = _spawn(
        "server", "--variant", variant, "--expect", str(n),
        "--publishes", str(publishes), "--interval", str(interval),
    )  # fmt: skip
    port = int(_line(server, "PORT").split()[1])
    per = [
        n // CLIENT_PROCESSES + (1 if i < n % CLIENT_PROCESSES else 0)
        for i in range(CLIENT_PROCESSES)
    ]
    slow_per = [
        slow // CLIENT_PROCESSES + (1 if i < slow % CLIENT_PROCESSES else 0)
        for i in range(CLIENT_PROCESSES)
    ]
    clients = [
        _spawn(
            "clients",
            "--port",
            str(port),
            "--count",
            str(c),
            "--slow",
            str(s),
            "--publishes",
            str(publishes),
        )
        for c, s in zip(per, slow_per, strict=True)
    ]
    try:
        for proc in clients:
            _line(proc, "CONNECTED")
        _line(server, "DONE")
        for proc in clients:
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
        results = [_result(proc) for proc in clients]
        assert server.stdin is not None
        server.stdin.write("\n")
        server.stdin.flush()
        srv = _result(server)
    finally:
        for proc in [server, *clients]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if srv is None or any(r is None for r in results):
        failed = sum(r is None for r in [*results, srv])
        return {"variant": variant, "n": n, "slow": slow, "failed": failed}
    got = [r for r in results if r is not None]
    healthy = sum(g["healthy"] for g in got)
    last: list[float] = []
    every: list[float] = []
    complete = 0
    for seq in range(srv["published"]):
        lat = [x for g in got for x in g["latencies"][seq]]
        every.extend(lat)
        if len(lat) == healthy:
            complete += 1
            last.append(max(lat))
    return {
        "variant": variant,
        "n": n,
        "slow": slow,
        "healthy": healthy,
        "published": srv["published"],
        "complete": complete,
        "stalled": srv["stalled"] or complete < srv["published"],
        "last_p50": _pct(last, 50),
        "last_p99": _pct(last, 99),
        "every_p99": _pct(every, 99),
        "worst_stall": srv["worst_stall"],
        "worst_cpu": srv.get("worst_cpu"),
        "hold_max": srv.get("hold_max"),
        "hold_cpu_max": srv.get("hold_cpu_max"),
        "hold_p99": srv.get("hold_p99"),
        "stall_p99": srv.get("stall_p99"),
        "worst_gc": srv.get("worst_gc"),
        "rss_mb": srv["rss_after"] / 2**20,
        "rss_growth_mb": (srv["rss_after"] - srv["rss_before"]) / 2**20,
        "evicted": srv["evicted"],
    }


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


# -- connect/disconnect cycles -------------------------------------------------------


async def _cycles(total: int) -> dict[str, Any]:
    from loopguard_integrations.broadcast import Group
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    group = Group("cycles")

    async def handler(ws: ServerConnection) -> None:
        async with group.attach(ws):
            with contextlib.suppress(ConnectionClosed):
                async for _ in ws:
                    pass

    async def cycle_batch(url: str, count: int) -> None:
        async def one() -> None:
            async with connect(url) as ws:
                await ws.send("hi")

        await asyncio.gather(*(one() for _ in range(count)))

    async with serve(handler, "127.0.0.1", 0) as server:
        url = f"ws://127.0.0.1:{next(iter(server.sockets)).getsockname()[1]}"
        await cycle_batch(url, 500)  # warm-up: imports, caches, pools
        while group.members:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # closing handshakes finish
        gc.collect()
        tracemalloc.start()
        rss_before, traced_before = h.rss_bytes(), tracemalloc.get_traced_memory()[0]
        done = 0
        while done < total:
            await cycle_batch(url, 100)
            done += 100
        deadline = time.monotonic() + 10
        while group.members and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        gc.collect()
        rss_after, traced_after = h.rss_bytes(), tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    return {
        "cycles": done,
        "members_left": group.members,
        "traced_growth_kb": (traced_after - traced_before) / 1024,
        "rss_before_mb": rss_before / 2**20,
        "rss_after_mb": rss_after / 2**20,
    }


# -- the report --------------------------------------------------------------------


def _fmt_ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.1f}"


def run(options: h.Options) -> h.Report:
    """Measure every variant at each size, without and with slow clients."""
    _raise_fd_limit()
    sizes = (200,) if options.quick else SIZES
    publishes = 50 if options.quick else 100
    interval = 0.02
    rows: list[dict[str, Any]] = []
    rng = random.Random(options.seed)
    cycles = asyncio.run(_cycles(1000 if options.quick else 10_000))
    saved = HERE / "results" / f"{NAME}-rows.jsonl"
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"cycles": cycles}) + "\n")
    for n in sizes:
        for slow in (0, max(1, n // 100)):
            for _ in range(options.rounds):
                order = list(VARIANTS)
                rng.shuffle(order)
                for variant in order:
                    if options.verbose:
                        print(f"[b6] n={n} slow={slow} {variant}", file=sys.stderr)
                    rows.append(measure(variant, n, slow, publishes, interval))
                    with saved.open("a") as out:  # kept as they come: a long run may be cut
                        out.write(json.dumps(rows[-1]) + "\n")
    return _report(rows, cycles)


def report_from(path: Path) -> h.Report:
    """The report of the rows a (possibly cut) run saved."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return _report([r for r in lines if "variant" in r], lines[0]["cycles"])


def _report(all_rows: list[dict[str, Any]], cycles: dict[str, Any]) -> h.Report:
    rows = [r for r in all_rows if "failed" not in r]
    failed = [r for r in all_rows if "failed" in r]

    def median_of(key: str, match: dict[str, Any]) -> float | None:
        values = [
            r[key] for r in rows if all(r[k] == v for k, v in match.items()) and r[key] is not None
        ]
        return statistics.median(values) if values else None

    table = []
    for n in sorted({r["n"] for r in rows}):
        for slow in sorted({r["slow"] for r in rows if r["n"] == n}):
            base = median_of("last_p50", {"n": n, "slow": slow, "variant": "websockets.broadcast"})
            for variant in VARIANTS:
                match = {"n": n, "slow": slow, "variant": variant}
                runs = [r for r in rows if all(r[k] == v for k, v in match.items())]
                stalled = any(r["stalled"] for r in runs)
                p50 = median_of("last_p50", match)
                ratio = "—" if stalled or p50 is None or not base else f"{p50 / base:.2f}x"
                table.append(
                    [
                        str(n),
                        f"{slow}",
                        variant,
                        "stalled" if stalled else _fmt_ms(p50),
                        "stalled" if stalled else _fmt_ms(median_of("last_p99", match)),
                        _fmt_ms(median_of("every_p99", match)),
                        ratio,
                        _fmt_ms(median_of("worst_stall", match)),
                        _fmt_ms(median_of("worst_cpu", match)),
                        _fmt_ms(median_of("hold_max", match)),
                        _fmt_ms(median_of("hold_cpu_max", match)),
                        _fmt_ms(median_of("stall_p99", match)),
                        _fmt_ms(median_of("worst_gc", match)),
                        f"{median_of('rss_mb', match) or 0:.0f}",
                        f"{median_of('rss_growth_mb', match) or 0:+.1f}",
                        str(int(median_of("evicted", match) or 0)),
                    ]
                )
    header = [
        "clients", "slow", "variant", "last p50 ms", "last p99 ms", "every p99 ms",
        "p50 / broadcast()", "worst stall ms", "worst loop CPU ms",
        "publish hold max ms", "its CPU max ms", "stall p99 ms",
        "worst GC ms", "RSS MB", "RSS growth MB", "evicted",
    ]  # fmt: skip
    markdown = "\n".join(
        [
            f"## {TITLE}",
            "",
            h.markdown_table(header, table),
            "",
            f"Connect/disconnect cycles: {cycles['cycles']:,} on one group; members left "
            f"{cycles['members_left']}; Python heap growth {cycles['traced_growth_kb']:.0f} KiB "
            f"(tracemalloc); RSS {cycles['rss_before_mb']:.0f} → {cycles['rss_after_mb']:.0f} MB.",
        ]
        + [
            f"\nNot measured (a client or server process printed no result): "
            f"{r['n']} clients, {r['slow']} slow, {r['variant']}."
            for r in failed
        ]
    )
    data = {"machine": h.machine_info(), "rows": rows, "cycles": cycles}
    ok = not failed and all(r["published"] > 0 for r in rows)
    return h.Report(NAME, markdown, data, ok)


def main(argv: Sequence[str] | None = None) -> int:
    global SIZES, VARIANTS
    parser = argparse.ArgumentParser(description=TITLE)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--role", choices=("server", "clients"), default=None)
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument("--publishes", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--port", type=int)
    parser.add_argument("--count", type=int)
    parser.add_argument("--slow", type=int, default=0)
    parser.add_argument("--sizes", help="comma-separated client counts (default 1000,5000)")
    parser.add_argument("--variants", help="comma-separated variants to run (default: all)")
    parser.add_argument("--report-from", type=Path, help="print the report of saved rows")
    args = parser.parse_args(argv)
    _raise_fd_limit()
    if args.role == "server":
        asyncio.run(_serve(args))  # prints its result before tearing down
        return 0
    if args.role == "clients":
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(_clients(args))  # likewise
        return 0
    if args.sizes:
        SIZES = tuple(int(x) for x in args.sizes.split(","))
    if args.variants:
        VARIANTS = tuple(v for v in VARIANTS if v in args.variants.split(","))
    if args.report_from:
        print(report_from(args.report_from).markdown)
        return 0
    report = run(h.Options(rounds=args.rounds, quick=args.quick))
    print(report.markdown)
    out = HERE / "results" / f"{NAME}.json"
    h.write_json(out, report.data)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
