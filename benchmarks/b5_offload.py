"""B5: what ``@offload`` costs, and what it buys.

Four measurements, every variant side by side in the same process. Per-call costs
are timed in short blocks, interleaved in a shuffled order; the best block of each
variant in a round is its cost in that round (interference from the rest of the
machine only adds time), and the tables show the median over rounds:

1. **Per-call cost**: sequential awaits of a trivial function through
   ``@offload``, ``anyio.to_thread.run_sync``, ``asyncio.to_thread`` /
   ``trio.to_thread.run_sync``, on asyncio, uvloop and trio. Ratios are taken within
   each round against the call a user would write instead: ``asyncio.to_thread`` on
   asyncio and uvloop, ``anyio.to_thread.run_sync`` on trio (target: ``@offload``
   <= 1.05x on each loop).
2. **Adaptive inline path**: ``await f(x)`` of an adaptive ``@offload`` function that
   stays inline, against calling the plain function directly (target: <= 1 us more).
3. **Throughput with a limit**: many concurrent 2 ms blocking calls through
   ``@offload(limit=N)``, against the ideal ``N / 2 ms`` and against
   ``anyio.to_thread.run_sync`` with a ``CapacityLimiter(N)``.
4. **Loop delay while offloaded work runs**: the watchdog's own delay histogram
   while the loop idles, while offloaded blocking work runs, and (control) while the
   same work runs on the loop.

Run it alone with ``python benchmarks/b5_offload.py [--quick]``, or through
``benchmarks/run.py``. It prints Markdown and writes ``benchmarks/results/b5.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

import anyio  # noqa: E402
import anyio.to_process  # noqa: E402
import anyio.to_thread  # noqa: E402

import loopguard  # noqa: E402
from loopguard import metrics  # noqa: E402

NAME = "b5"
TITLE = "B5: @offload per-call cost, adaptive inline path, throughput with a limit, loop delay"

LOOPS = ("asyncio", "uvloop", "trio")
_BLOCKS = 10  # timed blocks per variant and round (the best one counts)


@dataclass
class Report:
    """What the runner expects back: a name, Markdown, a JSON document, success."""

    name: str
    markdown: str
    data: dict[str, Any]
    ok: bool = True


@dataclass
class Settings:
    rounds: int
    calls: int  # per-call cost: calls per variant per round
    inline_calls: int  # adaptive inline path: calls per variant per round
    limit_calls: int  # throughput: calls per configuration
    delay_seconds: float  # loop delay: seconds per phase
    seed: int = 0
    verbose: bool = True
    notes: list[str] = field(default_factory=list)


def _log(settings: Settings, message: str) -> None:
    if settings.verbose:
        print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


def _run_on(loop: str, main: Callable[[], Awaitable[Any]]) -> Any:
    if loop == "trio":
        return anyio.run(main, backend="trio")
    return anyio.run(main, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"})


# -- 1. per-call cost ----------------------------------------------------------------------


def _identity(x: int) -> int:
    return x


_offloaded_identity = loopguard.offload(_identity)


def _per_call_variants(loop: str) -> dict[str, Callable[[int], Awaitable[int]]]:
    variants: dict[str, Callable[[int], Awaitable[int]]] = {
        "anyio.to_thread.run_sync": lambda i: anyio.to_thread.run_sync(_identity, i),
        "@offload": _offloaded_identity,
    }
    if loop == "trio":
        import trio

        variants["trio.to_thread.run_sync"] = lambda i: trio.to_thread.run_sync(_identity, i)
    else:
        variants["asyncio.to_thread"] = lambda i: asyncio.to_thread(_identity, i)
    return variants


_WITH_SDK = "@offload, OTel SDK recording"


def _sdk_provider() -> Any:
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    except ImportError:
        return None
    return MeterProvider(metric_readers=[InMemoryMetricReader()])


def _measure_per_call(settings: Settings, loop: str, round_no: int) -> dict[str, float]:
    variants = _per_call_variants(loop)
    provider = _sdk_provider()
    if provider is not None:
        variants[_WITH_SDK] = _offloaded_identity
    order = list(variants)
    random.Random(f"{settings.seed}:{loop}:{round_no}").shuffle(order)
    out: dict[str, float] = {}

    async def timed(name: str, calls: int) -> float:
        call = variants[name]
        if name != _WITH_SDK:
            start = time.perf_counter()
            for i in range(calls):
                await call(i)
            return time.perf_counter() - start
        metrics.use_meter_provider(provider)
        try:
            start = time.perf_counter()
            for i in range(calls):
                await call(i)
            return time.perf_counter() - start
        finally:
            metrics.use_meter_provider(None)

    async def main() -> None:
        for name in order:
            await timed(name, 20)  # warm the worker pool
        # Short blocks, interleaved, best block per variant: interference from the
        # rest of the machine only ever adds time, so the best block is the cost.
        per_block = max(10, settings.calls // _BLOCKS)
        rng = random.Random(f"{settings.seed}:{loop}:{round_no}:blocks")
        for _ in range(_BLOCKS):
            rng.shuffle(order)
            for name in order:
                elapsed = await timed(name, per_block) / per_block
                out[name] = min(out.get(name, math.inf), elapsed)

    _run_on(loop, main)
    return out


# -- 2. adaptive inline path -----------------------------------------------------------------


_adaptive_identity = loopguard.offload(adaptive=1.0)(_identity)


async def _plain_async(x: int) -> int:
    return x


def _measure_inline(settings: Settings, round_no: int) -> dict[str, float]:
    n = max(1000, settings.inline_calls // _BLOCKS)
    out: dict[str, float] = {}

    async def direct() -> float:
        f = _identity
        start = time.perf_counter()
        for i in range(n):
            f(i)
        return time.perf_counter() - start

    async def awaited(call: Callable[[int], Awaitable[int]]) -> float:
        start = time.perf_counter()
        for i in range(n):
            await call(i)
        return time.perf_counter() - start

    cases: dict[str, Callable[[], Awaitable[float]]] = {
        "direct call f(x)": direct,
        "await async def (reference)": lambda: awaited(_plain_async),
        "await adaptive @offload (inline)": lambda: awaited(_adaptive_identity),
    }
    order = list(cases)
    random.Random(f"{settings.seed}:inline:{round_no}").shuffle(order)

    async def main() -> None:
        for name in order:
            await cases[name]()  # warm-up
        rng = random.Random(f"{settings.seed}:inline:{round_no}:blocks")
        for _ in range(_BLOCKS):
            rng.shuffle(order)
            for name in order:
                out[name] = min(out.get(name, math.inf), await cases[name]() / n)

    asyncio.run(main())
    return out


# -- 3. throughput with a limit --------------------------------------------------------------

_BLOCK = 0.002


def _blocking(_: int) -> None:
    time.sleep(_BLOCK)


def _measure_throughput(settings: Settings, round_no: int) -> dict[str, float]:
    out: dict[str, float] = {}
    configs: dict[str, Callable[[], Callable[[int], Awaitable[None]]]] = {}
    for limit in (1, 4, 16):
        configs[f"@offload(limit={limit})"] = lambda limit=limit: loopguard.offload(limit=limit)(
            _blocking
        )

        def with_anyio(limit: int = limit) -> Callable[[int], Awaitable[None]]:
            limiter = anyio.CapacityLimiter(limit)
            return lambda i: anyio.to_thread.run_sync(_blocking, i, limiter=limiter)

        configs[f"anyio.to_thread + CapacityLimiter({limit})"] = with_anyio
    order = list(configs)
    random.Random(f"{settings.seed}:limit:{round_no}").shuffle(order)

    async def main() -> None:
        for name in order:
            call = configs[name]()
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(settings.limit_calls):
                    tg.start_soon(call, i)
            out[name] = settings.limit_calls / (time.perf_counter() - start)

    asyncio.run(main())
    return out


# -- 4. loop delay while offloaded work runs ----------------------------------------------------


def _spin(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


_spin_in_process = loopguard.offload(process=True)(_spin)


def _measure_delay(settings: Settings) -> dict[str, dict[str, float]]:
    seconds = settings.delay_seconds
    chunk = 0.02
    sleep_off = loopguard.offload(time.sleep)
    spin_off = loopguard.offload(_spin)
    out: dict[str, dict[str, float]] = {}

    async def keep_busy(call: Callable[[float], Awaitable[None]], workers: int) -> None:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await call(chunk)

        async with anyio.create_task_group() as tg:
            for _ in range(workers):
                tg.start_soon(worker)

    async def on_loop() -> None:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            time.sleep(chunk)
            await anyio.sleep(0)

    phases: dict[str, Callable[[], Awaitable[None]]] = {
        "idle loop": lambda: anyio.sleep(seconds),
        "@offload time.sleep(20 ms), 8 at once": lambda: keep_busy(sleep_off, 8),
        "reference: anyio.to_thread time.sleep(20 ms), 8 at once": lambda: keep_busy(
            lambda seconds: anyio.to_thread.run_sync(time.sleep, seconds), 8
        ),
        "@offload CPU-bound 20 ms chunks (threads), 2 at once": lambda: keep_busy(spin_off, 2),
        "@offload(process=True) CPU-bound 20 ms chunks, 2 at once": lambda: keep_busy(
            _spin_in_process, 2
        ),
        "control: time.sleep(20 ms) on the loop": on_loop,
    }

    async def main() -> None:
        # Start worker threads and processes outside the measurement.
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(sleep_off, 0.001)
        await _spin_in_process(0.0)
        await anyio.to_process.run_sync(_spin, 0.0)
        for name, phase in phases.items():
            with loopguard.watch(threshold=0.1, interval=0.005) as wd:
                await phase()
            hist = wd.delay()
            out[name] = {
                "p50_ms": hist.percentile(50) * 1000,
                "p99_ms": hist.percentile(99) * 1000,
                "max_ms": hist.max * 1000,
                "ticks": float(hist.count),
                "stalls": float(len(wd.stalls)),
            }

    asyncio.run(main())
    return out


# -- the run ---------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q1, _q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def measure(settings: Settings) -> dict[str, Any]:
    """Run every measurement and return the raw numbers (seconds, calls/s)."""
    per_call: dict[str, dict[str, list[float]]] = {loop: {} for loop in LOOPS}
    inline: dict[str, list[float]] = {}
    throughput: dict[str, list[float]] = {}
    for round_no in range(settings.rounds):
        for loop in LOOPS:
            for name, value in _measure_per_call(settings, loop, round_no).items():
                per_call[loop].setdefault(name, []).append(value)
        for name, value in _measure_inline(settings, round_no).items():
            inline.setdefault(name, []).append(value)
        for name, value in _measure_throughput(settings, round_no).items():
            throughput.setdefault(name, []).append(value)
        _log(settings, f"round {round_no + 1}/{settings.rounds} done")
    delay = _measure_delay(settings)
    return {"per_call": per_call, "inline": inline, "throughput": throughput, "delay": delay}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


_ROW_ORDER = (
    "anyio.to_thread.run_sync",
    "@offload",
    _WITH_SDK,
    "asyncio.to_thread",
    "trio.to_thread.run_sync",
    "direct call f(x)",
    "await async def (reference)",
    "await adaptive @offload (inline)",
)


_REFERENCE = {
    "asyncio": "asyncio.to_thread",
    "uvloop": "asyncio.to_thread",
    "trio": "anyio.to_thread.run_sync",
}
"""What ``@offload`` is compared with on each loop: the call a user would write instead."""

_PER_CALL_TARGET = 1.05


def _row_rank(name: str) -> int:
    return _ROW_ORDER.index(name) if name in _ROW_ORDER else len(_ROW_ORDER)


def summarize(raw: dict[str, Any], settings: Settings) -> tuple[str, dict[str, Any]]:
    """Turn raw numbers into the Markdown tables and the JSON summary."""
    summary: dict[str, Any] = {"per_call": {}, "inline": {}, "throughput": {}, "delay": {}}
    sections = [f"### {TITLE}"]

    rows = []
    targets = []
    for loop in LOOPS:
        timings = raw["per_call"][loop]
        reference = _REFERENCE[loop]
        base = timings[reference]
        for name, values in sorted(timings.items(), key=lambda item: _row_rank(item[0])):
            ratios = [v / b for v, b in zip(values, base, strict=True)]
            q1, q3 = _quartiles(ratios)
            summary["per_call"].setdefault(loop, {})[name] = {
                "us_per_call": _median(values) * 1e6,
                "reference": reference,
                "ratio_to_reference": _median(ratios),
                "ratio_q1": q1,
                "ratio_q3": q3,
            }
            rows.append(
                [
                    loop,
                    name,
                    f"{_median(values) * 1e6:.1f}",
                    f"{_median(ratios):.3f} ({q1:.3f}-{q3:.3f})",
                ]
            )
        ratio = summary["per_call"][loop]["@offload"]["ratio_to_reference"]
        verdict = "met" if ratio <= _PER_CALL_TARGET else "NOT met"
        targets.append(
            f"- {loop}: `@offload` / `{reference}` = **{ratio:.3f}** "
            f"(target <= {_PER_CALL_TARGET}: {verdict})"
        )
    sections.append(
        "**Per-call cost** (sequential awaits of a trivial function; best of "
        f"{_BLOCKS} interleaved blocks per round; ratio: median over rounds of the "
        "same-round ratio to the loop's reference — `asyncio.to_thread` on asyncio and "
        "uvloop, `anyio.to_thread.run_sync` on trio — quartiles in brackets)\n\n"
        + _table(["loop", "variant", "µs/call", "ratio to the reference"], rows)
        + "\n\n"
        + "\n".join(targets)
    )

    direct = raw["inline"]["direct call f(x)"]
    rows = []
    for name, values in sorted(raw["inline"].items(), key=lambda item: _row_rank(item[0])):
        extra = [v - d for v, d in zip(values, direct, strict=True)]
        summary["inline"][name] = {
            "ns_per_call": _median(values) * 1e9,
            "ns_over_direct": _median(extra) * 1e9,
        }
        rows.append([name, f"{_median(values) * 1e9:.0f}", f"{_median(extra) * 1e9:+.0f}"])
    sections.append(
        f"**Adaptive inline path** (asyncio; a call that stays under its budget; best of "
        f"{_BLOCKS} interleaved blocks per round, median over rounds)\n\n"
        + _table(["call", "ns/call", "ns over a direct call"], rows)
    )

    rows = []
    for name, values in raw["throughput"].items():
        limit = int(name.split("(")[-1].rstrip(")").split("=")[-1])
        ideal = limit / _BLOCK
        summary["throughput"][name] = {
            "calls_per_s": _median(values),
            "ideal_calls_per_s": ideal,
            "efficiency": _median(values) / ideal,
        }
    for limit in (1, 4, 16):
        ours = summary["throughput"][f"@offload(limit={limit})"]
        theirs = summary["throughput"][f"anyio.to_thread + CapacityLimiter({limit})"]
        rows.append(
            [
                str(limit),
                f"{ours['calls_per_s']:.0f}",
                f"{theirs['calls_per_s']:.0f}",
                f"{ours['ideal_calls_per_s']:.0f}",
                f"{ours['efficiency']:.0%}",
            ]
        )
    sections.append(
        f"**Throughput with a limit** (asyncio; {settings.limit_calls} concurrent calls "
        f"blocking {_BLOCK * 1000:.0f} ms each)\n\n"
        + _table(
            [
                "limit",
                "@offload calls/s",
                "anyio + CapacityLimiter calls/s",
                "ideal calls/s",
                "@offload / ideal",
            ],
            rows,
        )
    )

    rows = []
    for name, stats in raw["delay"].items():
        summary["delay"][name] = stats
        rows.append(
            [name, f"{stats['p50_ms']:.2f}", f"{stats['p99_ms']:.2f}", f"{stats['max_ms']:.1f}"]
        )
    sections.append(
        f"**Loop delay while offloaded work runs** (asyncio; watchdog delay histogram, "
        f"5 ms heartbeat, {settings.delay_seconds:g} s per phase)\n\n"
        + _table(["phase", "p50 ms", "p99 ms", "max ms"], rows)
    )
    return "\n\n".join(sections) + "\n", summary


def _machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loopguard": loopguard.__version__,
        "anyio": _version("anyio"),
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _settings(rounds: int | None, quick: bool, scale: float, seed: int, verbose: bool) -> Settings:
    return Settings(
        rounds=rounds if rounds is not None else (3 if quick else 9),
        calls=max(50, int(2000 * scale)),
        inline_calls=max(2000, int(200_000 * scale)),
        limit_calls=max(40, int(400 * scale)),
        delay_seconds=0.3 if quick else 1.0,
        seed=seed,
        verbose=verbose,
    )


def run(options: Any) -> Report:
    """Entry point for ``benchmarks/run.py`` (reads rounds, quick, scale, seed, verbose)."""
    settings = _settings(
        getattr(options, "rounds", None),
        bool(getattr(options, "quick", False)),
        float(getattr(options, "scale", 1.0)),
        int(getattr(options, "seed", 0)),
        bool(getattr(options, "verbose", True)),
    )
    raw = measure(settings)
    markdown, summary = summarize(raw, settings)
    data = {
        "name": NAME,
        "title": TITLE,
        "machine": _machine(),
        "settings": {
            "rounds": settings.rounds,
            "calls": settings.calls,
            "inline_calls": settings.inline_calls,
            "limit_calls": settings.limit_calls,
            "delay_seconds": settings.delay_seconds,
        },
        "summary": summary,
        "raw": raw,
    }
    return Report(name=NAME, markdown=markdown, data=data)


def main(argv: Sequence[str] | None = None) -> int:
    """Run B5 alone: print the tables, write ``benchmarks/results/b5.json``."""
    parser = argparse.ArgumentParser(prog="benchmarks/b5_offload.py", description=TITLE)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller workload")
    parser.add_argument("--rounds", type=int, help="rounds (default 9, or 3 with --quick)")
    parser.add_argument("--scale", type=float, help="workload factor (default 1, 0.2 quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results", help="JSON directory")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    scale = args.scale if args.scale is not None else (0.2 if args.quick else 1.0)
    options = argparse.Namespace(
        rounds=args.rounds, quick=args.quick, scale=scale, seed=args.seed, verbose=not args.quiet
    )
    report = run(options)
    print(report.markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{NAME}.json"
    path.write_text(json.dumps(report.data, indent=2) + "\n")
    if not args.quiet:
        print(f"[{NAME}] wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
