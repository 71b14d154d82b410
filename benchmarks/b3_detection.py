"""B3: detection quality: injected stalls of known kind and length, who sees them, how well.

Each child process runs one tool on one loop (asyncio or uvloop) through the same
scenario: a healthy control period (many short callbacks, no stall: every report in
it is a false positive), then a series of injected stalls, each followed by a
healthy gap of at least 0.3 s. Four kinds of stall, each at 20 ms, 50 ms, 100 ms,
200 ms, 500 ms and 1 s:

* ``sleep``: a C call that releases the GIL, on the loop (``time.sleep(d)``).
* ``python``: a pure-Python CPU loop on the loop.
* ``regex``: a C call that holds the GIL, on the loop: the catastrophic
  ``re.match(r"^(a+)+$", "a" * n + "!")``, its ``n`` calibrated per process (each
  +1 on ``n`` doubles the time, so the nearest ``n`` lands within a factor of about
  1.4 of the target).
* ``hog``: the same regex in a worker thread, while the loop idles in
  ``await asyncio.sleep``: the loop is held only because it cannot get the GIL.

The ground truth of each stall is the injected call itself, timed with
``time.perf_counter`` around it (for ``hog``: around the regex in the worker).

Tools (``--configs``; each in a fresh interpreter per run):

Every loopguard configuration runs with its default capture (``gil_dump=True``: py-spy
from a helper process names C code holding the GIL).

``--classes`` (with ``--busy`` for a loaded machine, ``--crash-count N``) measures every
stall class loopguard tells apart with its default options instead: see
``b3_classes.py``.

* ``loopguard``: ``loopguard.install(log=False)``: threshold 0.1 s, interval 0.02 s.
* ``loopguard-fast``: ``install(threshold=0.015, interval=0.005)``.
* ``loopguard-precise``: ``install(precise=True, slow_callback=0.015)``.
* ``asyncio-debug``: ``loop.set_debug(True)``, ``slow_callback_duration = 0.015``;
  the ``Executing ... took X seconds`` warnings of the ``asyncio`` logger.
* ``aiodebug``: ``aiodebug.log_slow_callbacks.enable(0.015, on_slow_callback=...)``.
* ``pyleak``: ``async with pyleak.no_event_loop_blocking(action="log",
  threshold=0.015)`` (its default ``check_interval`` of 0.05 s); the blocks it kept.

A report is matched to an injected stall when it arrives between the stall's start
and 0.25 s after its end and the time span it describes overlaps the stall; reports
in the control period are false positives, reports elsewhere in the gaps are *stray*
(on a shared machine, often real: the whole process was kept off the CPU).

Per stall: **recall** (some report), **culprit named** (the report designates the
injected function's blocking line: loopguard's ``culprit``; for asyncio debug mode
and aiodebug the text of the warning; for pyleak any frame of the stack it reports),
**duration error** (|reported - measured| of the longest matched report) and, for
loopguard's ``Stall`` events, **cause** (``blocked``, ``blocked``, ``c-held-gil``,
``gil``).

Each stall is injected 3 times per tool and loop (0.5 s and longer: twice), in two
child processes per tool and loop, about 8 minutes in all; ``--quick`` injects each
once, 50 and 200 ms stalls only, in one child per tool and loop (about a minute).
Run through ``benchmarks/run.py`` (``--only b3``; ``--rounds`` caps the repetitions,
``--configs`` picks tools) or directly (``python benchmarks/b3_detection.py [--quick]
[--lengths 0.05,0.2] [--configs ...]``). It prints Markdown and writes
``benchmarks/results/b3.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import random
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _harness as h

NAME = "b3"
TITLE = "B3: detection quality (injected stalls of known kind and length)"
SCRIPT = Path(__file__).resolve()
LOOPS = ("asyncio", "uvloop")

KINDS = ("sleep", "python", "regex", "hog")
KIND_LABELS = {
    "sleep": "GIL-releasing C call (`time.sleep`)",
    "python": "pure-Python loop",
    "regex": "GIL-holding C call (regex)",
    "hog": "GIL hog in another thread",
}
EXPECTED_CAUSE = {"sleep": "blocked", "python": "blocked", "regex": "c-held-gil", "hog": "gil"}
LENGTHS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
QUICK_LENGTHS = (0.05, 0.2)
LONG = 0.5  # stalls this long or longer are repeated ``long_reps`` times, not ``reps``
GAP = 0.3  # healthy idle time after each injected stall
MATCH_AFTER = 0.25  # a report this long after a stall's end still belongs to it
HOG_DELAY = 0.05  # the hog thread starts its regex this long after it starts
PATTERN = r"^(a+)+$"
SLOW = 0.015  # every tool's reporting threshold except loopguard's default


@dataclass(frozen=True)
class ToolSpec:
    """How a tool is described in the tables."""

    label: str
    note: str
    threshold: float  # shortest stall it is meant to report
    uvloop: bool = True  # False: no effect on uvloop expected (verified with one run)


TOOLS: dict[str, ToolSpec] = {
    "loopguard": ToolSpec(
        "loopguard default", "`install(log=False)`: threshold 0.1 s, interval 0.02 s", 0.1
    ),
    "loopguard-fast": ToolSpec(
        "loopguard 15 ms", "`install(threshold=0.015, interval=0.005, log=False)`", SLOW
    ),
    "loopguard-precise": ToolSpec(
        "loopguard precise",
        "`install(precise=True, slow_callback=0.015, log=False)`: `Stall` from 0.1 s, "
        "`SlowCallback` from 15 ms (asyncio only)",
        SLOW,
    ),
    "asyncio-debug": ToolSpec(
        "asyncio debug", "`loop.set_debug(True)`, `slow_callback_duration = 0.015`", SLOW
    ),
    "aiodebug": ToolSpec(
        "aiodebug",
        "`log_slow_callbacks.enable(0.015)`: patches asyncio's `Handle`, unused by uvloop",
        SLOW,
        uvloop=False,
    ),
    "pyleak": ToolSpec(
        "pyleak", "`no_event_loop_blocking(threshold=0.015)`, check_interval 0.05 s", SLOW
    ),
}
LOOPGUARD_TOOLS = ("loopguard", "loopguard-fast", "loopguard-precise")


# -- the injected stalls (their blocking lines are what a tool should name) ------------


def _line_of(marker: str) -> int:
    with open(__file__, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.rstrip().endswith(f"# {marker}"):
                return number
    raise AssertionError(marker)


def blocking_sleep(seconds: float) -> None:
    """Hold the loop in a C call that releases the GIL."""
    time.sleep(seconds)  # B3:sleep


def python_spin(seconds: float) -> None:
    """Hold the loop in pure Python."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:  # B3:python
        pass  # B3:python-body


def regex_hold(subject: str) -> None:
    """Hold the loop (and the GIL) in C: a catastrophic regex."""
    re.match(PATTERN, subject)  # B3:regex


def regex_hog(subject: str, out: list[float]) -> None:
    """Worker thread body: wait a little, then hold the GIL in C."""
    time.sleep(HOG_DELAY)
    started = time.perf_counter()
    re.match(PATTERN, subject)  # B3:hog
    out += [started, time.perf_counter()]


EXPECTED_LINES: dict[str, frozenset[int]] = {
    "sleep": frozenset({_line_of("B3:sleep")}),
    "python": frozenset({_line_of("B3:python"), _line_of("B3:python-body")}),
    "regex": frozenset({_line_of("B3:regex")}),
    "hog": frozenset({_line_of("B3:hog")}),
}


def _regex_seconds(n: int) -> float:
    subject = "a" * n + "!"
    started = time.perf_counter()
    re.match(PATTERN, subject)
    return time.perf_counter() - started


def calibrate(targets: Iterable[float]) -> tuple[dict[float, int], dict[int, float]]:
    """Pick the regex ``n`` closest to each target length (in ratio), for this process.

    Times ``n`` upwards (best of three, so a neighbour's load does not inflate it)
    until a match takes 20 ms, then extrapolates with the growth per step fitted over
    the last measured steps (about 2x). The injected calls are timed anyway, and that
    measurement is the ground truth.

    Returns:
        ``n`` per target and the measured or extrapolated seconds per ``n``.
    """
    re.match(PATTERN, "a!")  # compile and cache the pattern first
    times: dict[int, float] = {}
    n = 12
    while True:
        times[n] = min(_regex_seconds(n) for _ in range(3))
        if times[n] >= 0.02 or n >= 40:
            break
        n += 1
    top = max(times)
    points = [(k, math.log(times[k])) for k in range(top - 3, top + 1)]
    mean_k = statistics.fmean(k for k, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    slope = sum((k - mean_k) * (y - mean_y) for k, y in points) / sum(
        (k - mean_k) ** 2 for k, _ in points
    )
    estimates = dict(times)
    for k in range(top + 1, top + 12):
        estimates[k] = math.exp(mean_y + slope * (k - mean_k))
    picks = {
        target: min(estimates, key=lambda k: abs(math.log(estimates[k] / target)))
        for target in targets
    }
    return picks, {k: round(v, 6) for k, v in estimates.items()}


# -- the tools, as each child sets them up and collects their reports -----------------


class Tool:
    """A tool's set-up in the child and the reports it made (base: no tool)."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def before_loop(self) -> None:
        """Process-wide set-up, before the loop exists."""

    def on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Set-up on the new loop, before it runs."""

    async def enter(self, stack: contextlib.AsyncExitStack) -> None:
        """Set-up inside the running loop."""

    def finish(self) -> None:
        """Collect what the tool kept (after the loop's work is done)."""

    def add(self, report: dict[str, Any]) -> None:
        """Note one report (any thread)."""
        with self.lock:
            self.reports.append(report)


def _frame(frame: Any) -> dict[str, Any] | None:
    if frame is None:
        return None
    return {"file": frame.file, "line": frame.line, "function": frame.function}


class Loopguard(Tool):
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = options

    def before_loop(self) -> None:
        import loopguard

        loopguard.install(log=False, callback=self.on_event, **self.options)

    def on_event(self, event: Any) -> None:
        now = time.perf_counter()
        if event.kind == "stall":
            began = event.started_at - (time.time() - now)  # on the perf_counter clock
            self.add(
                {
                    "t": now,
                    "span": [began, began + event.duration],
                    "type": "stall",
                    "duration": event.duration,
                    "cause": event.cause,
                    "culprit": _frame(event.culprit),
                    "hog": event.hog.thread if event.hog is not None else None,
                    "samples": event.samples,
                    "loop_cpu": event.loop_cpu,
                }
            )
        elif event.kind == "slow_callback":
            self.add(
                {
                    "t": now,
                    # Drained by the sampler at its next wake: up to a threshold later.
                    "span": [now - event.duration - 0.15, now],
                    "type": "slow_callback",
                    "duration": event.duration,
                    "cause": None,
                    "culprit": _frame(event.culprit),
                    "callback": event.callback,
                }
            )

    def finish(self) -> None:
        import loopguard

        loopguard.uninstall()


_TOOK = re.compile(r"took ([0-9.]+) seconds")


class _SlowLog(logging.Handler):
    """Captures asyncio's ``Executing ... took X seconds`` warnings."""

    def __init__(self, tool: Tool) -> None:
        super().__init__(logging.WARNING)
        self.tool = tool

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        found = _TOOK.search(text)
        if found:
            now = time.perf_counter()
            took = float(found.group(1))
            self.tool.add(
                {
                    "t": now,
                    "span": [now - took, now],
                    "type": "log",
                    "duration": took,
                    "text": text[:2000],
                }
            )


class AsyncioDebug(Tool):
    def before_loop(self) -> None:
        log = logging.getLogger("asyncio")
        log.addHandler(_SlowLog(self))
        log.propagate = False

    def on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.set_debug(True)
        loop.slow_callback_duration = SLOW


class Aiodebug(Tool):
    def before_loop(self) -> None:
        from aiodebug import log_slow_callbacks

        def on_slow(name: str, duration: float) -> None:
            now = time.perf_counter()
            self.add(
                {
                    "t": now,
                    "span": [now - duration, now],
                    "type": "callback",
                    "duration": duration,
                    "text": str(name)[:2000],
                }
            )

        log_slow_callbacks.enable(SLOW, on_slow_callback=on_slow)


class _BlockLog(logging.Handler):
    """Notes when pyleak reports a new block (its immediate log line)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.created: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Event loop blocked for"):
            self.created.append(time.perf_counter())


class Pyleak(Tool):
    def __init__(self) -> None:
        super().__init__()
        self.cm: Any = None
        self.handler = _BlockLog()
        self.logger = logging.getLogger("b3.pyleak")
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.WARNING)
        self.logger.propagate = False

    async def enter(self, stack: contextlib.AsyncExitStack) -> None:
        from pyleak import no_event_loop_blocking
        from pyleak.base import LeakAction

        self.cm = no_event_loop_blocking(action=LeakAction.LOG, logger=self.logger, threshold=SLOW)
        await self.cm.__aenter__()
        stack.push_async_exit(self.cm.__aexit__)

    def finish(self) -> None:
        # Each block is created with one log line; its duration grows while the same
        # stack is seen again. Report every block at its creation, with its final size.
        blocks = list(self.cm.detector.detected_blocks) if self.cm is not None else []
        created = self.handler.created
        for i, block in enumerate(blocks):
            stack = block.blocking_stack or []
            t = created[i] if i < len(created) else float("nan")
            self.add(
                {
                    "t": t,
                    # Created after its first wait timed out; grown by later waits.
                    "span": [t - block.duration - 0.02, t + block.duration],
                    "type": "block",
                    "duration": block.duration,
                    "frames": [
                        {"file": f.filename, "line": f.lineno, "function": f.name} for f in stack
                    ],
                }
            )


TOOL_FACTORIES: dict[str, Callable[[], Tool]] = {
    "loopguard": Loopguard,
    "loopguard-fast": lambda: Loopguard(threshold=SLOW, interval=0.005),
    "loopguard-precise": lambda: Loopguard(precise=True, slow_callback=SLOW),
    "asyncio-debug": AsyncioDebug,
    "aiodebug": Aiodebug,
    "pyleak": Pyleak,
}


# -- the scenario (child) --------------------------------------------------------------


def _healthy_step() -> int:
    return sum(range(3000))  # a few tens of microseconds


async def _healthy_worker(stop_at: float, pause: float) -> None:
    while time.perf_counter() < stop_at:
        _healthy_step()
        await asyncio.sleep(pause)


async def healthy_period(seconds: float) -> None:
    """A busy but healthy loop: many short callbacks, no stall."""
    stop_at = time.perf_counter() + seconds
    workers = [_healthy_worker(stop_at, 0.0 if i % 2 else 0.002) for i in range(20)]
    await asyncio.gather(*workers)


async def inject(kind: str, length: float, n: int) -> tuple[float, float]:
    """Inject one stall; return its start and end (``perf_counter``)."""
    if kind == "hog":
        out: list[float] = []
        worker = threading.Thread(
            target=regex_hog, args=("a" * n + "!", out), name="hog-worker", daemon=True
        )
        worker.start()
        while worker.is_alive():
            await asyncio.sleep(0.01)
        worker.join()
        return out[0], out[1]
    if kind == "regex":
        subject = "a" * n + "!"
        started = time.perf_counter()
        regex_hold(subject)
        return started, time.perf_counter()
    fn = blocking_sleep if kind == "sleep" else python_spin
    started = time.perf_counter()
    fn(length)
    return started, time.perf_counter()


def order_cells(cells: Sequence[tuple[str, float]], seed: str) -> list[tuple[str, float]]:
    """Shuffle the stalls so that two of the same kind never follow each other."""
    rng = random.Random(seed)
    per_kind = {k: [c for c in cells if c[0] == k] for k in KINDS}
    for group in per_kind.values():
        rng.shuffle(group)
    out: list[tuple[str, float]] = []
    while any(per_kind.values()):
        kinds = [k for k, v in per_kind.items() if v and (not out or out[-1][0] != k)]
        if not kinds:  # only the previous kind is left: accept a repeat
            kinds = [k for k, v in per_kind.items() if v]
        # Prefer the kind with the most left, so the tail does not pile up one kind.
        most = max(len(per_kind[k]) for k in kinds)
        pick = rng.choice([k for k in kinds if len(per_kind[k]) == most])
        out.append(per_kind[pick].pop())
    return out


async def scenario(
    tool: Tool, cells: Sequence[tuple[str, float]], picks: dict[float, int], control: float
) -> dict[str, Any]:
    """The child's whole run on the loop: control period, then the injected stalls."""
    injections: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        await tool.enter(stack)
        await asyncio.sleep(0.2)  # settle
        c0 = time.perf_counter()
        await healthy_period(control)
        c1 = time.perf_counter()
        await asyncio.sleep(GAP)
        for kind, length in cells:
            n = picks[length] if kind in ("regex", "hog") else None
            started, ended = await inject(kind, length, n or 0)
            injections.append(
                {
                    "kind": kind,
                    "target": length,
                    "n": n,
                    "start": started,
                    "end": ended,
                    "measured": ended - started,
                }
            )
            await asyncio.sleep(GAP)
        await asyncio.sleep(0.1)  # late reports (the last gap came before)
    return {"control": [c0, c1], "injections": injections}


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def child_main(argv: Sequence[str]) -> int:
    """Run one tool on one loop through the scenario; print the result line."""
    parser = argparse.ArgumentParser(prog="b3_detection.py --child")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--loop", choices=LOOPS, required=True)
    parser.add_argument("--tool", choices=sorted(TOOL_FACTORIES), required=True)
    parser.add_argument("--cells", required=True, help="kind:length,...")
    parser.add_argument("--control", type=float, default=3.0)
    parser.add_argument("--seed", default="0")
    args = parser.parse_args(argv)
    cells = [(c.split(":")[0], float(c.split(":")[1])) for c in args.cells.split(",") if c]
    lengths = sorted({length for kind, length in cells if kind in ("regex", "hog")})
    picks, estimates = calibrate(lengths)
    cells = order_cells(cells, f"{args.seed}:{args.loop}:{args.tool}")
    if args.loop == "uvloop":  # imported before any tool, as an application would
        import uvloop  # noqa: F401
    tool = TOOL_FACTORIES[args.tool]()
    tool.before_loop()
    loop = _new_loop(args.loop)
    asyncio.set_event_loop(loop)
    tool.on_loop(loop)
    try:
        result = loop.run_until_complete(scenario(tool, cells, picks, args.control))
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    time.sleep(0.05)
    tool.finish()
    with tool.lock:
        reports = list(tool.reports)
    info = {
        **result,
        "reports": reports,
        "calibration": {"picks": {str(k): v for k, v in picks.items()}, "seconds": estimates},
        "loop_type": type(loop).__module__,
        "file": str(SCRIPT),
    }
    h.emit_result({"reports": float(len(reports))}, info)
    return 0


# -- matching and scoring (parent) ------------------------------------------------------


def _names_line(report: dict[str, Any], kind: str) -> bool:
    lines = EXPECTED_LINES[kind]
    frames: list[dict[str, Any]] = []
    if report.get("culprit"):
        frames = [report["culprit"]]
    elif report.get("frames"):
        frames = report["frames"]
    for f in frames:
        if f["file"].endswith(SCRIPT.name) and f["line"] in lines:
            return True
    text = report.get("text") or ""
    return any(f"{SCRIPT.name}:{line}" in text for line in lines)


@dataclass
class Outcome:
    """What one tool made of one injected stall."""

    kind: str
    target: float
    measured: float
    detected: bool
    named: bool
    error: float | None  # |reported - measured| of the longest matched report
    reported: float | None
    cause: str | None  # loopguard Stall events only
    reports: int


def score_sample(info: dict[str, Any]) -> tuple[list[Outcome], int, int]:
    """Match one child's reports to its stalls.

    A report belongs to a stall if it arrived between the stall's start and
    ``MATCH_AFTER`` after its end, and the time it says it covers overlaps the stall.

    Returns:
        One outcome per injected stall, the reports in the control period (false
        positives) and the stray reports (in gaps, matching no stall).
    """
    injections = info["injections"]
    matched: list[list[dict[str, Any]]] = [[] for _ in injections]
    c0, c1 = info["control"]
    false_pos = stray = 0
    for report in info["reports"]:
        t = report["t"]
        a, b = report["span"]
        hit = next(
            (
                i
                for i, inj in enumerate(injections)
                if inj["start"] - 0.01 <= t <= inj["end"] + MATCH_AFTER
                and a <= inj["end"] + 0.02
                and b >= inj["start"] - 0.02
            ),
            None,
        )
        if hit is not None:
            matched[hit].append(report)
        elif (c0 <= t <= c1 + 0.1) or (a <= c1 and b >= c0):
            false_pos += 1
        else:
            stray += 1
    outcomes = []
    for inj, reports in zip(injections, matched, strict=True):
        primary = max(reports, key=lambda r: r["duration"]) if reports else None
        outcomes.append(
            Outcome(
                kind=inj["kind"],
                target=inj["target"],
                measured=inj["measured"],
                detected=primary is not None,
                named=primary is not None and _names_line(primary, inj["kind"]),
                error=abs(primary["duration"] - inj["measured"]) if primary else None,
                reported=primary["duration"] if primary else None,
                cause=primary.get("cause") if primary and primary["type"] == "stall" else None,
                reports=len(reports),
            )
        )
    return outcomes, false_pos, stray


# -- parent: running and reporting ------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What the parent runs."""

    tools: tuple[str, ...]
    lengths: tuple[float, ...]
    reps: int
    long_reps: int
    control: float
    seed: int
    verbose: bool


def _cells(lengths: Iterable[float], long: bool) -> list[tuple[str, float]]:
    return [(k, x) for k in KINDS for x in lengths if long or x < LONG]


def _variant(loop: str, tool: str, cells: list[tuple[str, float]], plan: Plan, rnd: int) -> Any:
    spec = ",".join(f"{k}:{x:g}" for k, x in cells)
    return h.Variant(
        key=f"{loop}/{tool}",
        argv=(
            str(SCRIPT),
            "--child",
            f"--loop={loop}",
            f"--tool={tool}",
            f"--cells={spec}",
            f"--control={plan.control:g}",
            f"--seed={plan.seed}:{rnd}",
        ),
        group=loop,
        timeout=120.0,
    )


def children(plan: Plan) -> list[list[tuple[int, h.Variant]]]:
    """The child runs, grouped in rounds: ``(round, variant)``.

    Each tool and loop gets ``long_reps`` children with every stall once; the last
    one also repeats the stalls shorter than ``LONG`` until they reach ``reps``
    (fewer processes, same repetitions). A tool not expected to work on uvloop gets
    one child there, with the short stalls only, to verify that it reports nothing.
    """
    rounds: list[list[tuple[int, h.Variant]]] = []
    for rnd in range(plan.long_reps):
        todo = []
        for loop in LOOPS:
            for tool in plan.tools:
                if loop == "uvloop" and not TOOLS[tool].uvloop:
                    if rnd == 0:
                        cells = _cells(plan.lengths, long=False) or _cells(plan.lengths, True)
                        todo.append((rnd, _variant(loop, tool, cells, plan, rnd)))
                    continue
                cells = _cells(plan.lengths, long=True)
                if rnd == plan.long_reps - 1:
                    cells += _cells(plan.lengths, long=False) * (plan.reps - plan.long_reps)
                todo.append((rnd, _variant(loop, tool, cells, plan, rnd)))
        random.Random(f"{plan.seed}:{rnd}").shuffle(todo)
        rounds.append(todo)
    return rounds


def run_plan(plan: Plan) -> tuple[list[h.Sample], list[dict[str, float]]]:
    """Run every child, round by round, in a shuffled order per round."""
    samples: list[h.Sample] = []
    load: list[dict[str, float]] = []
    meter = h.CpuMeter()
    started = time.monotonic()
    rounds = children(plan)
    for number, todo in enumerate(rounds, 1):
        for rnd, variant in todo:
            sample = h.run_child(variant, rnd, retries=1)
            samples.append(sample)
            if plan.verbose and sample.failures:
                print(f"[b3] {variant.key}: failed: {sample.failures}", file=sys.stderr)
        lap = meter.lap()
        if lap is not None:
            load.append(lap)
        if plan.verbose:
            print(
                f"[b3] round {number}/{len(rounds)} done ({time.monotonic() - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return samples, load


@dataclass
class Cell:
    """Every outcome of one tool, loop, kind and target length."""

    outcomes: list[Outcome]

    @property
    def n(self) -> int:
        return len(self.outcomes)

    @property
    def detected(self) -> int:
        return sum(o.detected for o in self.outcomes)

    @property
    def named(self) -> int:
        return sum(o.named for o in self.outcomes)

    def errors(self) -> list[float]:
        return [o.error for o in self.outcomes if o.error is not None]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f}" if seconds >= 0.0095 else f"{seconds * 1e3:.1f}"


def _fmt_target(x: float) -> str:
    return f"{x:g} s" if x >= 1 else f"{x * 1e3:g} ms"


def _no_effect(loop: str, tool: str, runs: list[h.Sample]) -> bool:
    """True if a tool not expected to work on this loop indeed reported nothing."""
    if loop != "uvloop" or TOOLS[tool].uvloop:
        return False
    return bool(runs) and all(not s.info.get("reports") for s in runs if s.ok)


def analyse(samples: list[h.Sample], plan: Plan) -> dict[str, Any]:
    """Aggregate the samples into cells and per-tool summaries."""
    cells: dict[tuple[str, str, str, float], Cell] = {}
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for s in samples:
        loop, tool = s.key.split("/", 1)
        tot = totals.setdefault(
            (loop, tool), {"runs": 0, "control_s": 0.0, "false_pos": 0, "stray": 0, "failed": 0}
        )
        tot["failed"] += len(s.failures)
        if not s.ok:
            continue
        outcomes, fp, stray = score_sample(s.info)
        tot["runs"] += 1
        c0, c1 = s.info["control"]
        tot["control_s"] += c1 - c0
        tot["false_pos"] += fp
        tot["stray"] += stray
        for o in outcomes:
            cells.setdefault((loop, tool, o.kind, o.target), Cell([])).outcomes.append(o)
    return {"cells": cells, "totals": totals}


def _cell_text(cell: Cell | None, na: bool) -> str:
    if na:
        return "n/a"
    if cell is None or cell.n == 0:
        return "?"
    errs = cell.errors()
    err = _ms(statistics.median(errs)) if errs else "-"
    return f"{cell.detected}/{cell.n} · {cell.named}/{cell.n} · {err}"


def _summary_row(outs: list[Outcome], threshold: float) -> dict[str, Any]:
    in_scope = [o for o in outs if o.measured >= threshold]
    det = [o for o in outs if o.detected]
    errs = [o.error for o in det if o.error is not None]
    stalls = [o for o in det if o.cause is not None]
    return {
        "stalls": len(outs),
        "recall": sum(o.detected for o in outs) / len(outs) if outs else None,
        "in_scope": len(in_scope),
        "recall_in_scope": (
            sum(o.detected for o in in_scope) / len(in_scope) if in_scope else None
        ),
        "named_of_detected": sum(o.named for o in det) / len(det) if det else None,
        "named_of_injected": sum(o.named for o in outs) / len(outs) if outs else None,
        "error_median": statistics.median(errs) if errs else None,
        "error_max": max(errs) if errs else None,
        "cause_ok": (
            sum(o.cause == EXPECTED_CAUSE[o.kind] for o in stalls) / len(stalls) if stalls else None
        ),
        "cause_n": len(stalls),
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def render(samples: list[h.Sample], plan: Plan, load: list[dict[str, float]]) -> h.Report:
    """Build the Markdown tables and the JSON document."""
    found = analyse(samples, plan)
    cells: dict[tuple[str, str, str, float], Cell] = found["cells"]
    totals = found["totals"]
    by_key: dict[str, list[h.Sample]] = {}
    for s in samples:
        by_key.setdefault(s.key, []).append(s)
    na = {
        (loop, tool): _no_effect(loop, tool, by_key.get(f"{loop}/{tool}", []))
        for loop in LOOPS
        for tool in plan.tools
    }
    lines = [f"## {TITLE}", ""]
    lines += [
        "Cells: stalls reported / stalls whose blocking line the report names / median",
        "|reported - measured| duration in ms, over the runs of that cell. *measured*: median",
        "length of the injected call (regex lengths come in steps of about 2x).",
        "",
    ]
    for loop in LOOPS:
        header = ["Stall kind", "target", "measured"] + [TOOLS[t].label for t in plan.tools]
        rows = []
        for kind in KINDS:
            for x in plan.lengths:
                any_cell = [cells[k] for t in plan.tools if (k := (loop, t, kind, x)) in cells]
                measured = [o.measured for c in any_cell for o in c.outcomes]
                row = [
                    KIND_LABELS[kind],
                    _fmt_target(x),
                    f"{_ms(statistics.median(measured))} ms" if measured else "?",
                ]
                for t in plan.tools:
                    text = _cell_text(cells.get((loop, t, kind, x)), na[(loop, t)])
                    if not na[(loop, t)] and x < TOOLS[t].threshold:
                        text += " (below threshold)"
                    row.append(text)
                rows.append(row)
        lines += [
            f"### {loop}",
            "",
            h.markdown_table(header, rows, align="lrr" + "c" * len(plan.tools)),
        ]
        nas = [TOOLS[t].label for t in plan.tools if na[(loop, t)]]
        if nas:
            lines += ["", f"n/a: {', '.join(nas)}: no effect on {loop} (one run, no report)."]
        lines.append("")

    lg = [t for t in plan.tools if t in LOOPGUARD_TOOLS]
    if lg:
        header = ["Stall kind", "target", "expected"] + [
            f"{TOOLS[t].label} ({loop})" for loop in LOOPS for t in lg
        ]
        rows = []
        for kind in KINDS:
            for x in plan.lengths:
                row = [KIND_LABELS[kind], _fmt_target(x), f"`{EXPECTED_CAUSE[kind]}`"]
                for loop in LOOPS:
                    for t in lg:
                        cell = cells.get((loop, t, kind, x))
                        causes = [o.cause for o in cell.outcomes if o.cause] if cell else []
                        if not causes:
                            row.append("-")
                            continue
                        ok = sum(c == EXPECTED_CAUSE[kind] for c in causes)
                        wrong = sorted({c for c in causes if c != EXPECTED_CAUSE[kind]})
                        extra = f" ({', '.join(wrong)})" if wrong else ""
                        row.append(f"{ok}/{len(causes)}{extra}")
                rows.append(row)
        lines += [
            "### loopguard: cause of each reported `Stall`",
            "",
            "Cells: `Stall` events with the expected cause / `Stall` events matched to",
            "the injected stalls (wrong causes in parentheses; `SlowCallback` events carry",
            "no cause and are left out).",
            "",
            h.markdown_table(header, rows, align="lll" + "c" * (len(header) - 3)),
            "",
        ]

    header = [
        "Tool",
        "loop",
        "recall (all)",
        "recall (>= threshold)",
        "line named (of reported)",
        "dur. error median / max (ms)",
        "cause ok",
        "false pos. (control)",
        "stray",
    ]
    rows = []
    summary: dict[str, Any] = {}
    for t in plan.tools:
        for loop in LOOPS:
            key = f"{loop}/{t}"
            tot = totals.get((loop, t), {})
            if na[(loop, t)]:
                rows.append([TOOLS[t].label, loop, "n/a (no effect on uvloop)", *[""] * 6])
                summary[key] = {"na": True, **tot}
                continue
            outs = [
                o
                for (lp, tl, _, _), c in cells.items()
                if (lp, tl) == (loop, t)
                for o in c.outcomes
            ]
            stats = _summary_row(outs, TOOLS[t].threshold)
            summary[key] = {**stats, **tot}
            err = (
                f"{_ms(stats['error_median'])} / {_ms(stats['error_max'])}"
                if stats["error_median"] is not None
                else "-"
            )
            rows.append(
                [
                    TOOLS[t].label,
                    loop,
                    _pct(stats["recall"]),
                    _pct(stats["recall_in_scope"]),
                    _pct(stats["named_of_detected"]),
                    err,
                    _pct(stats["cause_ok"]) if t in LOOPGUARD_TOOLS else "",
                    f"{tot.get('false_pos', 0)} in {tot.get('control_s', 0.0):.0f} s",
                    str(tot.get("stray", 0)),
                ]
            )
    lines += [
        "### Summary",
        "",
        h.markdown_table(header, rows, align="ll" + "r" * (len(header) - 2)),
        "",
        "Tools: " + "; ".join(f"**{TOOLS[t].label}**: {TOOLS[t].note}" for t in plan.tools) + ".",
    ]
    busy = h.interference(load)
    machine = h.machine_info()
    runs = sum(1 for s in samples if s.ok)
    foot = (
        f"{runs} child processes; each stall {plan.reps}x per tool and loop (stalls of"
        f" {_fmt_target(LONG)} and longer {plan.long_reps}x); control period {plan.control:g} s"
        " per process."
        f" Python {machine['python']}, {machine['cpus']} CPUs."
    )
    if busy is not None:
        foot += f" Other processes used {busy['foreign_share_mean']:.0%} of the CPUs."
    lines += ["", foot]
    failed = [s for s in samples if not s.ok]
    if failed:
        lines += [
            "",
            f"**{len(failed)} run(s) failed**: "
            + "; ".join(f"{s.key}: {s.failures[-1]}" for s in failed[:5]),
        ]

    data = {
        "benchmark": NAME,
        "title": TITLE,
        "machine": machine,
        "interference": busy,
        "settings": {
            "tools": list(plan.tools),
            "lengths": list(plan.lengths),
            "reps": plan.reps,
            "long_reps": plan.long_reps,
            "control_s": plan.control,
            "gap_s": GAP,
            "match_after_s": MATCH_AFTER,
            "seed": plan.seed,
        },
        "tools": {t: TOOLS[t].__dict__ for t in plan.tools},
        "expected_lines": {k: sorted(v) for k, v in EXPECTED_LINES.items()},
        "summary": summary,
        "cells": [
            {
                "loop": loop,
                "tool": tool,
                "kind": kind,
                "target": x,
                "na": na.get((loop, tool), False),
                "n": c.n,
                "detected": c.detected,
                "named": c.named,
                "measured": [round(o.measured, 6) for o in c.outcomes],
                "reported": [o.reported for o in c.outcomes],
                "error_median": statistics.median(c.errors()) if c.errors() else None,
                "error_max": max(c.errors()) if c.errors() else None,
                "causes": [o.cause for o in c.outcomes],
                "reports_per_stall": [o.reports for o in c.outcomes],
            }
            for (loop, tool, kind, x), c in sorted(cells.items())
        ],
        "samples": h.samples_as_json(samples),
    }
    ok = all(any(s.ok for s in v) for v in by_key.values())
    return h.Report(name=NAME, markdown="\n".join(lines), data=data, ok=ok)


def plan_from(opts: h.Options, lengths: Sequence[float] | None = None) -> Plan:
    """Translate the runner's options: ``--rounds`` caps the repetitions (3 full, 1 quick)."""
    tools = opts.configs or tuple(TOOLS)
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise SystemExit(f"b3: unknown configuration(s) {unknown}; known: {sorted(TOOLS)}")
    reps = max(1, min(opts.rounds, 1 if opts.quick else 3))
    return Plan(
        tools=tuple(tools),
        lengths=tuple(lengths or (QUICK_LENGTHS if opts.quick else LENGTHS)),
        reps=reps,
        long_reps=min(reps, 2),
        control=1.0 if opts.quick else 2.0,
        seed=opts.seed,
        verbose=opts.verbose,
    )


def run(opts: h.Options, lengths: Sequence[float] | None = None) -> h.Report:
    """Run B3 with the runner's options; return the tables and the JSON document."""
    plan = plan_from(opts, lengths)
    samples, load = run_plan(plan)
    return render(samples, plan, load)


def main(argv: Sequence[str]) -> int:
    """Stand-alone entry point (``python benchmarks/b3_detection.py``)."""
    parser = argparse.ArgumentParser(prog="benchmarks/b3_detection.py", description=TITLE)
    parser.add_argument("--quick", action="store_true", help="1 run, 50 and 200 ms stalls")
    parser.add_argument("--rounds", type=int, default=3, help="runs per tool and loop (max 3)")
    parser.add_argument("--lengths", default="", help="comma-separated stall lengths in s")
    parser.add_argument("--configs", default="", help=f"tools (default: {','.join(TOOLS)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=SCRIPT.parent / "results")
    parser.add_argument("--no-json", action="store_true")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    opts = h.Options(
        rounds=args.rounds,
        quick=args.quick,
        seed=args.seed,
        configs=tuple(c.strip() for c in args.configs.split(",") if c.strip()),
        out_dir=None if args.no_json else args.out,
        verbose=not args.quiet,
    )
    lengths = [float(x) for x in args.lengths.split(",") if x.strip()] or None
    report = run(opts, lengths)
    print(report.markdown)
    if opts.out_dir is not None:
        h.write_json(opts.out_dir / f"{NAME}.json", report.data)
    return 0 if report.ok else 1


if __name__ == "__main__":
    if "--child" in sys.argv[1:]:
        sys.exit(child_main(sys.argv[1:]))
    if {"--classes", "--busy", "--crash-count"} & {a.split("=")[0] for a in sys.argv[1:]}:
        import b3_classes

        sys.exit(b3_classes.main([a for a in sys.argv[1:] if a != "--classes"]))
    sys.exit(main(sys.argv[1:]))
