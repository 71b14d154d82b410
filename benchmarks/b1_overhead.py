"""B1: what watching a callback-heavy event loop costs, next to the usual alternatives.

The workload is a loop that does nothing but schedule: thousands of tasks that each
``await asyncio.sleep(0)`` many times, while one ``loop.call_soon`` chain hops
hundreds of thousands of times. There is no I/O and no callback is slow, so every
cost a tool adds per callback or per loop iteration shows up undiluted. The wall
time and the process CPU time (``time.process_time``: every thread, so loopguard's
sampler thread is included) of the workload alone are measured, after a short
warm-up, in a fresh interpreter per run.

Configurations (each on asyncio and on uvloop):

* ``vanilla``: nothing watches the loop (the baseline).
* ``loopguard``: ``loopguard.install(log=False)`` with its defaults.
* ``asyncio-debug``: ``loop.set_debug(True)`` (what ``PYTHONASYNCIODEBUG=1`` does).
* ``aiodebug``: ``aiodebug.log_slow_callbacks.enable(0.05)``.
* ``pyleak``: ``async with pyleak.no_event_loop_blocking(threshold=0.1)``.
* ``blockbuster``: ``blockbuster.BlockBuster().activate()``.
* ``idle-thread`` and ``idle-thread+timer``: references, no tool at all. One live
  idle thread, and that thread plus a 20 ms timer re-armed on the loop: the bare
  mechanism of any heartbeat-and-watcher-thread detector.

loopguard's modes, also in the default set: ``loopguard-precise`` (``precise=True``:
every callback timed), ``loopguard-stats`` (``stats=True``: loop statistics),
``loopguard-otel`` and ``loopguard-otel-stats`` (the same with an OpenTelemetry SDK
``MeterProvider`` configured first, so the metrics are really aggregated), and
``loopguard-nocapture`` (``gil_dump=False``: no capture helper, to compare with the
default, which has one). More configurations (``--configs``): ``loopguard-i50`` (interval 0.05 s),
``loopguard-t1`` (threshold 1 s, so the sampler wakes about once a second),
``timer`` (the 20 ms timer without a thread). Every configuration also
exists as ``app+<name>``: the same, in a process that already has what a typical
server has, an idle worker thread of the default executor and a pending far-off
timer (a keep-alive, say); those are compared with ``app+vanilla``.

After the timed part each child blocks its loop for 250 ms with ``time.sleep`` and
records whether the tool saw it, so a configuration that silently does nothing
(aiodebug on uvloop, for one) is visible in the table rather than assumed.

Run through ``benchmarks/run.py`` (``--only b1``); ``--child`` is the per-process
entry point the harness uses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import _harness as h

NAME = "b1"
TITLE = "B1: callback-heavy loop overhead"
SCRIPT = Path(__file__).resolve()
LOOPS = ("asyncio", "uvloop")

# Full-size workload; ``--scale`` multiplies the steps per task and the chain length.
TASKS = 2_000
STEPS = 50
HOPS = 200_000
PROBE_SECONDS = 0.2
QUIET = 0.10  # a run is quiet if other processes used at most this share of the CPUs
MIN_QUIET_ROUNDS = 3


@dataclass(frozen=True)
class ConfigSpec:
    """How a configuration is described in the table."""

    label: str
    note: str
    slow: bool = False  # far from 1x: one run per process, in a few rounds only


CONFIGS: dict[str, ConfigSpec] = {
    "vanilla": ConfigSpec("vanilla", "baseline: median absolute time of the workload"),
    "vanilla-again": ConfigSpec(
        "vanilla again (A/A)", "vanilla measured twice: the resolution of this run"
    ),
    "loopguard": ConfigSpec(
        "loopguard (default)", "`install(log=False)`: threshold 0.1 s, interval 0.02 s"
    ),
    "loopguard-precise": ConfigSpec(
        "loopguard precise",
        "`install(log=False, precise=True)`: every callback timed (asyncio); "
        "uvloop falls back to the watchdog",
    ),
    "loopguard-stats": ConfigSpec(
        "loopguard stats", "`install(log=False, stats=True)`: loop statistics on"
    ),
    "loopguard-otel": ConfigSpec(
        "loopguard + OTel SDK",
        "default install, with an SDK `MeterProvider` (in-memory reader) set first",
    ),
    "loopguard-otel-stats": ConfigSpec(
        "loopguard stats + OTel SDK", "`stats=True`, with an SDK `MeterProvider` set first"
    ),
    "loopguard-instrumentor": ConfigSpec(
        "loopguard via the OTel instrumentor",
        "`LoopguardInstrumentor().instrument()` with SDK meter and logger providers and the "
        "Prometheus exporter (served on a loopback port), as `opentelemetry-instrument` does",
    ),
    "loopguard-nocapture": ConfigSpec(
        "loopguard gil_dump=False",
        "`install(log=False, gil_dump=False)`: no capture helper (the default has one)",
    ),
    "asyncio-debug": ConfigSpec(
        "asyncio debug mode", "`loop.set_debug(True)`, slow_callback_duration 0.1 s", slow=True
    ),
    "aiodebug": ConfigSpec(
        "aiodebug",
        "`log_slow_callbacks.enable(0.05)`; patches asyncio's `Handle`, "
        "which uvloop does not use: no effect on uvloop",
    ),
    "pyleak": ConfigSpec(
        "pyleak", "`no_event_loop_blocking(threshold=0.1)`, default check_interval 0.05 s"
    ),
    "blockbuster": ConfigSpec(
        "blockbuster",
        "`BlockBuster().activate()`; raises on blocking calls, does not time the loop",
    ),
    "idle-thread": ConfigSpec("ref: one idle thread", "no tool; a second thread that never wakes"),
    "idle-thread+timer": ConfigSpec(
        "ref: idle thread + 20 ms timer", "no tool; the bare heartbeat-and-thread mechanism"
    ),
    "loopguard-i50": ConfigSpec("loopguard interval=0.05", "`install(log=False, interval=0.05)`"),
    "loopguard-t1": ConfigSpec(
        "loopguard threshold=1", "`install(log=False, threshold=1.0)`: sampler wakes ~1/s"
    ),
    "timer": ConfigSpec("ref: 20 ms timer", "no tool; the heartbeat timer without a thread"),
}
DEFAULT_CONFIGS = (
    "vanilla",
    "vanilla-again",
    "loopguard",
    "loopguard-precise",
    "loopguard-stats",
    "loopguard-otel",
    "loopguard-otel-stats",
    "loopguard-instrumentor",
    "loopguard-nocapture",
    "asyncio-debug",
    "aiodebug",
    "pyleak",
    "blockbuster",
    "idle-thread",
)


# -- the workload ------------------------------------------------------------------


async def _worker(steps: int) -> None:
    for _ in range(steps):
        await asyncio.sleep(0)


def _call_soon_chain(loop: asyncio.AbstractEventLoop, hops: int) -> asyncio.Future[None]:
    done: asyncio.Future[None] = loop.create_future()

    def hop(left: int) -> None:
        if left:
            loop.call_soon(hop, left - 1)
        else:
            done.set_result(None)

    loop.call_soon(hop, hops)
    return done


async def workload(tasks: int, steps: int, hops: int) -> None:
    """Run ``tasks`` tasks of ``steps`` yields each beside a ``hops``-long call_soon chain."""
    chain = _call_soon_chain(asyncio.get_running_loop(), hops)
    await asyncio.gather(*(_worker(steps) for _ in range(tasks)))
    await chain


# -- the tools, as each child sets them up -------------------------------------------


class Tool:
    """A configuration's set-up in the child; the base class is ``vanilla``."""

    def before_loop(self) -> None:
        """Process-wide set-up, before the loop exists."""

    def on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Set-up on the new loop, before it runs."""

    async def enter(self, stack: contextlib.AsyncExitStack) -> None:
        """Set-up inside the running loop (async context managers go on ``stack``)."""

    def detections(self) -> int:
        """How many slow callbacks or stalls the tool has reported so far."""
        return 0

    def info(self) -> dict[str, Any]:
        """Facts for the JSON report."""
        return {}


class Loopguard(Tool):
    def __init__(self, otel: bool = False, **options: Any) -> None:
        self.options = options  # passed to install() as they are
        self.otel = otel
        self.reader: Any = None
        self.wd: Any = None

    def before_loop(self) -> None:
        import loopguard

        if self.otel:
            # A real SDK pipeline, as an application configures it before loopguard
            # records anything: its instruments then record into SDK aggregations.
            from opentelemetry import metrics
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader

            self.reader = InMemoryMetricReader()
            metrics.set_meter_provider(MeterProvider(metric_readers=[self.reader]))
        self.wd = loopguard.install(log=False, **self.options)

    def detections(self) -> int:
        return len(self.wd.stalls)

    def info(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "heartbeats": self.wd.delay().count,
            "interval": self.wd.config.interval,
            "options": self.options,
        }
        # Diagnostic only (private, may vanish): captures the helper process took.
        capture = getattr(sys.modules.get("loopguard._watchdog.capture"), "CAPTURE", None)
        if capture is not None:
            facts["captures"] = len(getattr(capture, "_dumps", ()))
        if self.reader is not None:  # proof the SDK pipeline really received data
            data = self.reader.get_metrics_data()
            facts["otel_metrics"] = sorted(
                m.name
                for rm in (data.resource_metrics if data else ())
                for sm in rm.scope_metrics
                for m in sm.metrics
            )
        return facts


class Instrumented(Loopguard):
    """loopguard turned on by its OpenTelemetry instrumentor, over a full SDK set-up."""

    def before_loop(self) -> None:
        import os

        from opentelemetry import _logs, metrics
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, ConsoleLogRecordExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from prometheus_client import start_http_server

        import loopguard
        from loopguard.otel import LoopguardInstrumentor

        start_http_server(0, addr="127.0.0.1")
        metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
        logs = LoggerProvider()
        logs.add_log_record_processor(BatchLogRecordProcessor(ConsoleLogRecordExporter()))
        _logs.set_logger_provider(logs)
        os.environ["OTEL_PYTHON_LOOPGUARD_LOG"] = "0"
        LoopguardInstrumentor().instrument()
        self.wd = loopguard.current()

    def info(self) -> dict[str, Any]:
        from prometheus_client import REGISTRY, generate_latest

        scrape = generate_latest(REGISTRY).decode()  # what Prometheus would get
        series = {line.split("{")[0] for line in scrape.splitlines() if line.startswith("asyncio")}
        return {**super().info(), "prometheus_series": sorted(series)}


class _SlowLogCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "took" in str(record.msg):
            self.count += 1


class AsyncioDebug(Tool):
    def __init__(self) -> None:
        self.counter = _SlowLogCounter()

    def before_loop(self) -> None:
        logging.getLogger("asyncio").addHandler(self.counter)

    def on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.set_debug(True)

    def detections(self) -> int:
        return self.counter.count


class Aiodebug(Tool):
    def __init__(self) -> None:
        self.count = 0

    def before_loop(self) -> None:
        from aiodebug import log_slow_callbacks

        def on_slow(name: str, duration: float) -> None:
            self.count += 1

        log_slow_callbacks.enable(0.05, on_slow_callback=on_slow)

    def detections(self) -> int:
        return self.count


class Pyleak(Tool):
    def __init__(self) -> None:
        self.cm: Any = None

    async def enter(self, stack: contextlib.AsyncExitStack) -> None:
        from pyleak import no_event_loop_blocking
        from pyleak.base import LeakAction

        self.cm = no_event_loop_blocking(action=LeakAction.LOG, threshold=0.1)
        await stack.enter_async_context(self.cm)

    def detections(self) -> int:
        return int(self.cm.detector.block_count)


class Blockbuster(Tool):
    def before_loop(self) -> None:
        from blockbuster import BlockBuster

        BlockBuster().activate()  # detection shows as the probe's BlockingError


class IdleThread(Tool):
    def __init__(self, thread: bool = True, timer: bool = False) -> None:
        self.thread = thread
        self.timer = timer
        self._never = threading.Event()

    def before_loop(self) -> None:
        if self.thread:
            threading.Thread(target=self._never.wait, name="idle", daemon=True).start()

    async def enter(self, stack: contextlib.AsyncExitStack) -> None:
        if not self.timer:
            return
        loop = asyncio.get_running_loop()

        def tick() -> None:
            loop.call_later(0.02, tick)

        loop.call_later(0.02, tick)


TOOLS: dict[str, Callable[[], Tool]] = {
    "vanilla": Tool,
    "vanilla-again": Tool,
    "loopguard": Loopguard,
    "asyncio-debug": AsyncioDebug,
    "aiodebug": Aiodebug,
    "pyleak": Pyleak,
    "blockbuster": Blockbuster,
    "idle-thread": IdleThread,
    "idle-thread+timer": lambda: IdleThread(timer=True),
    "loopguard-precise": lambda: Loopguard(precise=True),
    "loopguard-stats": lambda: Loopguard(stats=True),
    "loopguard-otel": lambda: Loopguard(otel=True),
    "loopguard-otel-stats": lambda: Loopguard(otel=True, stats=True),
    "loopguard-instrumentor": Instrumented,
    "loopguard-nocapture": lambda: Loopguard(gil_dump=False),
    "loopguard-i50": lambda: Loopguard(interval=0.05),
    "loopguard-t1": lambda: Loopguard(threshold=1.0),
    "timer": lambda: IdleThread(thread=False, timer=True),
}


class AppLike(Tool):
    """Wraps a tool: the process also has an idle executor thread and a pending timer."""

    def __init__(self, inner: Tool) -> None:
        self.inner = inner

    def before_loop(self) -> None:
        self.inner.before_loop()

    def on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self.inner.on_loop(loop)

    async def enter(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, int)  # its worker thread stays, idle
        stack.callback(loop.call_later(3600, int).cancel)
        await self.inner.enter(stack)

    def detections(self) -> int:
        return self.inner.detections()

    def info(self) -> dict[str, Any]:
        return self.inner.info()


def _app_like(make: Callable[[], Tool]) -> Callable[[], Tool]:
    return lambda: AppLike(make())


APP = "app+"
for _name, _spec in list(CONFIGS.items()):
    CONFIGS[APP + _name] = ConfigSpec(f"app-like: {_spec.label}", _spec.note, _spec.slow)
    TOOLS[APP + _name] = _app_like(TOOLS[_name])


# -- child -----------------------------------------------------------------------------


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _block_loop(seconds: float) -> str | None:
    """Hold the loop the way a careless handler does; return what was raised, if anything."""
    try:
        time.sleep(seconds)
    except Exception as exc:  # blockbuster's BlockingError
        return type(exc).__name__
    return None


async def _measure(tool: Tool, scale: float, reps: int, wait_quiet: float) -> dict[str, Any]:
    steps = max(1, round(STEPS * scale))
    hops = max(1, round(HOPS * scale))
    runs: list[tuple[float, float, float, float | None]] = []
    deadline = time.monotonic() + wait_quiet
    async with contextlib.AsyncExitStack() as stack:
        await tool.enter(stack)
        await workload(TASKS // 10, max(1, steps // 5), max(1, hops // 20))  # warm-up
        before = tool.detections()
        for _ in range(reps):
            await h.until_quiet(deadline - time.monotonic(), QUIET)
            gc.collect()
            meter = h.CpuMeter()
            wall0, cpu0, own0 = time.perf_counter(), time.process_time(), time.thread_time()
            await workload(TASKS, steps, hops)
            wall1, cpu1, own1 = time.perf_counter(), time.process_time(), time.thread_time()
            lap = meter.lap()
            foreign = lap["foreign_share"] if lap is not None else None
            runs.append((wall1 - wall0, cpu1 - cpu0, own1 - own0, foreign))
        during = tool.detections() - before
        threads = threading.active_count()
        raised = _block_loop(PROBE_SECONDS)
        await asyncio.sleep(0.1)  # let threaded detectors report the probe
        seen = tool.detections() - before - during
    # Keep the runs during which other processes left the CPUs alone, if any were.
    quiet = [r for r in runs if r[3] is not None and r[3] <= QUIET]
    kept = quiet or runs
    shares = [r[3] for r in kept if r[3] is not None]
    return {
        "metrics": {
            "wall": statistics.median(r[0] for r in kept),
            "cpu": statistics.median(r[1] for r in kept),
            "loop_thread_cpu": statistics.median(r[2] for r in kept),
            "wall_min": min(r[0] for r in kept),
            "cpu_min": min(r[1] for r in kept),
        },
        "foreign_share": max(shares) if shares else None,
        "info": {
            "workload": {"tasks": TASKS, "steps": steps, "hops": hops},
            "reps": [list(r) for r in runs],
            "quiet_reps": len(quiet),
            "detections_during_workload": during,
            "probe_seen": seen > 0 or raised is not None,
            "probe_raised": raised,
            "threads": threads,
            **tool.info(),
        },
    }


def child_main(argv: Sequence[str]) -> int:
    """Measure one configuration on one loop and print the result line."""
    parser = argparse.ArgumentParser(prog="b1_overhead.py --child")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--loop", choices=LOOPS, required=True)
    parser.add_argument("--config", choices=sorted(TOOLS), required=True)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--wait-quiet", type=float, default=0.0)
    args = parser.parse_args(argv)
    tool = TOOLS[args.config]()
    if args.loop == "uvloop":
        import uvloop  # noqa: F401 - imported before any tool, as an application would
    tool.before_loop()
    loop = _new_loop(args.loop)
    asyncio.set_event_loop(loop)
    tool.on_loop(loop)
    try:
        result = loop.run_until_complete(_measure(tool, args.scale, args.reps, args.wait_quiet))
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    h.emit_result(
        result["metrics"],
        {"loop_type": type(loop).__module__, **result["info"]},
        foreign_share=result["foreign_share"],
    )
    return 0


# -- parent ----------------------------------------------------------------------------


def variants(opts: h.Options) -> list[h.Variant]:
    """One variant per (loop, configuration); slow ones in a few rounds only."""
    configs = opts.configs or DEFAULT_CONFIGS
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"b1: unknown configuration(s) {unknown}; known: {sorted(CONFIGS)}")
    for prefix in ("", APP):
        wanted = any(c.startswith(APP) == bool(prefix) for c in configs)
        if wanted and prefix + "vanilla" not in configs:
            configs = (prefix + "vanilla", *configs)
    slow_rounds = max(1, min(3, opts.rounds // 5))
    return [
        h.Variant(
            key=f"{loop}/{config}",
            argv=(
                str(SCRIPT),
                "--child",
                f"--loop={loop}",
                f"--config={config}",
                f"--scale={opts.scale:g}",
                f"--reps={1 if CONFIGS[config].slow else opts.reps}",
                f"--wait-quiet={0 if CONFIGS[config].slow else opts.wait_quiet:g}",
            ),
            group=loop,
            max_rounds=slow_rounds if CONFIGS[config].slow else None,
        )
        for config in configs
        for loop in LOOPS
    ]


def _baseline(key: str) -> str:
    loop, config = key.split("/", 1)
    return f"{loop}/{APP if config.startswith(APP) else ''}vanilla"


def _ratio_cell(ratio: h.Ratio | None) -> str:
    if ratio is None:
        return "n/a"
    if ratio.n == 1:
        return f"{ratio.median:.3f}x"
    return f"{ratio.median:.3f}x ({ratio.q1:.3f}-{ratio.q3:.3f})"


def _summaries(
    samples: list[h.Sample], keys: Sequence[str], metric: str
) -> dict[str, tuple[h.Ratio | None, bool]]:
    """Per variant: the ratio from quiet rounds if there are enough, else from all."""
    quiet = h.median_ratios(samples, metric, _baseline, QUIET)
    every = h.median_ratios(samples, metric, _baseline)
    out: dict[str, tuple[h.Ratio | None, bool]] = {}
    for key in keys:
        measured = sum(1 for s in samples if s.key == key and s.ok)
        q = quiet.get(key)
        if q is not None and q.n >= min(MIN_QUIET_ROUNDS, measured):
            out[key] = (q, True)
        else:
            out[key] = (every.get(key), False)
    return out


def _versus(samples: list[h.Sample], configs: Sequence[str], one: str, other: str) -> list[str]:
    """Lines giving ``one`` against ``other`` directly, per loop (same rounds only)."""
    if one not in configs or other not in configs:
        return []

    def baseline(key: str) -> str | None:
        loop, config = key.split("/", 1)
        return f"{loop}/{other}" if config == one else None

    lines = [f"{CONFIGS[one].label} against {CONFIGS[other].label} (not vanilla):", ""]
    for loop in LOOPS:
        cells = []
        for metric in ("wall", "cpu"):
            ratio = h.median_ratios(samples, metric, baseline).get(f"{loop}/{one}")
            cells.append(f"{metric} {_ratio_cell(ratio)}")
        lines.append(f"- {loop}: {', '.join(cells)}")
    return [*lines, ""]


def _as_dict(ratio: h.Ratio | None) -> dict[str, Any] | None:
    return asdict(ratio) if ratio is not None else None


def run(opts: h.Options) -> h.Report:
    """Measure every configuration, print progress, return the table and JSON."""
    todo = variants(opts)
    keys = [v.key for v in todo]
    configs = list(dict.fromkeys(k.split("/", 1)[1] for k in keys))
    log = (lambda msg: print(f"[b1] {msg}", file=sys.stderr, flush=True)) if opts.verbose else None
    load: list[dict[str, float]] = []
    samples = h.run_rounds(
        todo, opts.rounds, seed=opts.seed, log=log, load=load, wait_quiet=opts.wait_quiet
    )
    busy = h.interference(load)

    wall = _summaries(samples, keys, "wall")
    cpu = _summaries(samples, keys, "cpu")
    quiet_abs = {m: h.medians(samples, m, QUIET) for m in ("wall", "cpu", "loop_thread_cpu")}
    every_abs = {m: h.medians(samples, m) for m in ("wall", "cpu", "loop_thread_cpu")}

    def absolute(metric: str, key: str) -> float | None:
        quiet_n = sum(1 for s in samples if s.key == key and s.ok and h.is_quiet(s, QUIET))
        source = quiet_abs if quiet_n >= MIN_QUIET_ROUNDS else every_abs
        return source[metric].get(key)

    def seen(key: str) -> str:
        ok = [s for s in samples if s.key == key and s.ok]
        if not ok:
            return "?"
        hits = sum(1 for s in ok if s.info.get("probe_seen"))
        return "yes" if hits == len(ok) else "no" if hits == 0 else f"{hits}/{len(ok)}"

    def cell(found: tuple[h.Ratio | None, bool]) -> str:
        ratio, from_quiet = found
        mark = "" if from_quiet or ratio is None or busy is None else "*"
        return _ratio_cell(ratio) + mark

    header = ["Configuration"]
    for loop in LOOPS:
        header += [f"{loop} wall", f"{loop} CPU"]
    header += ["sees 200 ms block (asyncio / uvloop)", "rounds used", "notes"]
    rows: list[list[str]] = []
    all_measured = True
    any_starred = False
    per_variant: dict[str, Any] = {}
    for config in configs:
        spec = CONFIGS[config]
        row = [spec.label]
        notes = [spec.note]
        used: list[str] = []
        for loop in LOOPS:
            key = f"{loop}/{config}"
            runs = [s for s in samples if s.key == key]
            measured = sum(1 for s in runs if s.ok)
            all_measured = all_measured and measured > 0
            wall_s, cpu_s, own_s = (absolute(m, key) for m in ("wall", "cpu", "loop_thread_cpu"))
            if config in ("vanilla", APP + "vanilla"):
                row += [f"{x * 1e3:.0f} ms" if x is not None else "n/a" for x in (wall_s, cpu_s)]
                quiet_n = sum(1 for s in runs if s.ok and h.is_quiet(s, QUIET))
                used.append(str(quiet_n if quiet_n >= MIN_QUIET_ROUNDS else measured))
            else:
                row += [cell(wall[key]), cell(cpu[key])]
                ratio = wall[key][0]
                used.append(str(ratio.n if ratio is not None else 0))
                any_starred = any_starred or cell(wall[key]).endswith("*")
            errors = [f for s in runs for f in s.failures]
            attempts = len(errors) + measured
            if errors:
                kinds = sorted({e.split(":", 1)[0] for e in errors})
                notes.append(
                    f"{loop}: {len(errors)} of {attempts} runs failed ({', '.join(kinds)})"
                )
            per_variant[key] = {
                "loop": loop,
                "config": config,
                "label": spec.label,
                "wall_ratio": _as_dict(wall[key][0]),
                "cpu_ratio": _as_dict(cpu[key][0]),
                "ratios_from_quiet_rounds_only": wall[key][1],
                "wall_s": wall_s,
                "cpu_s": cpu_s,
                "loop_thread_cpu_s": own_s,
                "other_threads_cpu_s": cpu_s - own_s if cpu_s is not None and own_s else None,
                "rounds_measured": measured,
                "failed_attempts": len(errors),
                "attempts": attempts,
                "errors": errors,
                "probe_seen": seen(key),
            }
        row.append(" / ".join(seen(f"{loop}/{config}") for loop in LOOPS))
        row.append(" / ".join(used))
        row.append("; ".join(notes))
        rows.append(row)

    table = h.markdown_table(header, rows, align="l" + "r" * (len(header) - 2) + "l")
    versus = _versus(samples, configs, "loopguard-instrumentor", "loopguard")
    steps = max(1, round(STEPS * opts.scale))
    hops = max(1, round(HOPS * opts.scale))
    machine = h.machine_info()
    lines = [
        f"## {TITLE}",
        "",
        f"Workload: {TASKS} tasks x {steps} `sleep(0)` + {hops}-hop `call_soon` chain;",
        f"{opts.rounds} rounds, median of {opts.reps} run(s) per process. Cells: median of",
        "per-round ratios to vanilla on the same loop (interquartile range in parentheses);",
        "vanilla row: median absolute time. CPU = process CPU time, every thread included.",
        "",
        table,
        "",
        *versus,
        f"Python {machine['python']}, {machine['cpus']} CPUs.",
    ]
    if busy is not None:
        lines[-1] += (
            f" Other processes used {busy['foreign_share_mean']:.0%} of the CPUs during the"
            f" run (worst round {busy['foreign_share_max']:.0%}). Rounds used: those in which"
            f" they used at most {QUIET:.0%} during both runs compared"
            + (
                f"; * fewer than {MIN_QUIET_ROUNDS} such rounds, all rounds used."
                if any_starred
                else "."
            )
        )
        if busy["foreign_share_mean"] > 0.05 and any_starred:
            lines += ["", "**The machine was busy: the starred ratios are not reliable.**"]
    data = {
        "benchmark": NAME,
        "title": TITLE,
        "machine": machine,
        "interference": busy,
        "interference_per_round": load,
        "quiet_threshold": QUIET,
        "settings": {
            "rounds": opts.rounds,
            "quick": opts.quick,
            "scale": opts.scale,
            "reps": opts.reps,
            "seed": opts.seed,
            "wait_quiet": opts.wait_quiet,
            "workload": {"tasks": TASKS, "steps": steps, "hops": hops},
            "probe_seconds": PROBE_SECONDS,
        },
        "variants": per_variant,
        "samples": h.samples_as_json(samples),
    }
    return h.Report(name=NAME, markdown="\n".join(lines), data=data, ok=all_measured)


if __name__ == "__main__":
    if "--child" in sys.argv[1:]:
        sys.exit(child_main(sys.argv[1:]))
    import run as runner

    sys.exit(runner.main(["--only", NAME, *sys.argv[1:]]))
