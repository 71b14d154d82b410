"""Shared benchmark machinery: fresh processes, interleaved rounds, median of ratios.

Every measurement runs in a fresh interpreter (``python <script> <args>``), so no
configuration can leave patches, threads or warmed caches behind for the next one.
Configurations are interleaved: round *i* runs each of them once, in an order
shuffled per round, so slow drift of the machine (thermal state, a neighbour's
load) hits every configuration alike. Each configuration is then compared with its
baseline *from the same round*, and the reported figure is the median of those
per-round ratios, with their quartiles to show the spread.

The child side is small: a benchmark script measures what it wants and calls
:func:`emit_result` once; the parent finds that line in the child's stdout. A child
that crashes or prints no result is retried a few times and every failure is kept
(with its exit status) in the report, since a crash is a result too.

This module owns only that mechanism and the output helpers (Markdown table, JSON,
machine description); what to measure belongs to each ``bNN_*.py`` module.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RESULT_PREFIX",
    "CpuMeter",
    "Options",
    "Ratio",
    "Report",
    "Sample",
    "SpeedGate",
    "Variant",
    "emit_result",
    "interference",
    "is_quiet",
    "machine_info",
    "markdown_table",
    "median_ratios",
    "medians",
    "parse_result",
    "run_child",
    "run_rounds",
    "until_quiet",
    "samples_as_json",
    "write_json",
]

RESULT_PREFIX = "@@loopguard-bench-result "

# Variables that would change what a child measures if inherited from the caller.
_SCRUBBED_ENV = (
    "PYTHONASYNCIODEBUG",
    "PYTHONDEVMODE",
    "PYTHONTRACEMALLOC",
    "PYTHONPROFILEIMPORTTIME",
)


@dataclass(frozen=True)
class Options:
    """What the runner asks of a benchmark (see ``run.py --help``)."""

    rounds: int
    quick: bool = False
    scale: float = 1.0
    reps: int = 1  # repetitions inside each child; the child reports their median
    wait_quiet: float = 0.0  # max seconds to wait for a quiet machine before each process
    seed: int = 0
    configs: tuple[str, ...] = ()  # empty: the benchmark's default set
    out_dir: Path | None = None  # where the JSON goes; None: do not write
    verbose: bool = True


@dataclass(frozen=True)
class Variant:
    """One configuration to measure: a child command and how to compare it.

    Attributes:
        key: Unique name, e.g. ``"uvloop/loopguard"``.
        argv: Child command after the interpreter (script path first).
        group: Variants are compared with the baseline of their own group.
        env: Extra environment variables for the child.
        max_rounds: Measure only in the first ``max_rounds`` rounds (slow variants
            whose ratio is far from 1 need no precision); ``None``: every round.
        timeout: Seconds before a child is killed and counted as failed.
    """

    key: str
    argv: tuple[str, ...]
    group: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    max_rounds: int | None = None
    timeout: float = 120.0


@dataclass
class Sample:
    """One child run: its metrics if it worked, else why it did not."""

    key: str
    round: int
    ok: bool
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # one entry per failed attempt
    foreign_share: float | None = None  # other processes' CPU share while it ran
    gate: dict[str, float] | None = None  # SpeedGate: seconds waited, slowdown at start


@dataclass(frozen=True)
class Ratio:
    """Median and quartiles of per-round ratios ``variant / baseline``."""

    median: float
    q1: float
    q3: float
    n: int


@dataclass
class Report:
    """What a benchmark hands back to the runner: a table and a JSON document."""

    name: str
    markdown: str
    data: dict[str, Any]
    ok: bool = True  # False if some configuration produced no measurement at all


# -- child side --------------------------------------------------------------------


def rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``), in bytes."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def emit_result(
    metrics: Mapping[str, float],
    info: Mapping[str, Any] | None = None,
    foreign_share: float | None = None,
) -> None:
    """Print the child's single result line (call once, at the end of the child).

    Args:
        metrics: The numbers ratios are taken of.
        info: Anything else worth keeping in the JSON.
        foreign_share: Other processes' share of the CPUs during the timed part, if
            the child measured it (:class:`CpuMeter`); else the parent's measurement
            around the whole child is used.
    """
    payload: dict[str, Any] = {"metrics": dict(metrics), "info": dict(info or {})}
    if foreign_share is not None:
        payload["foreign_share"] = foreign_share
    sys.stdout.write(RESULT_PREFIX + json.dumps(payload, sort_keys=True) + "\n")
    sys.stdout.flush()


def parse_result(stdout: str) -> dict[str, Any] | None:
    """Return the payload of the last result line in ``stdout``, if any."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            payload: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return payload
    return None


# -- parent side -------------------------------------------------------------------


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["PYTHONHASHSEED"] = "0"
    env.update(extra)
    return env


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class SpeedGate:
    """Holds a run back while the machine computes slower than it can.

    On a shared or virtual machine the CPU's speed can drop for seconds at a time
    (a neighbour on the host), and nothing inside the guest shows it. The gate times
    a fixed pure-Python loop; it lets a run start once that loop is within
    ``tolerance`` of the fastest time seen so far (and other processes of this
    machine use less than ``threshold`` of the CPUs), or when the budget is spent.
    """

    def __init__(self, tolerance: float = 0.05, threshold: float = 0.1) -> None:
        self.tolerance = tolerance
        self.threshold = threshold
        self.best = float("inf")

    @staticmethod
    def probe() -> float:
        """Seconds for a fixed CPU-bound loop (best of three, about 10 ms each)."""
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            x = 0
            for i in range(200_000):
                x += i & 7
            times.append(time.perf_counter() - t0)
        return min(times)

    def wait(self, budget: float) -> tuple[float, float]:
        """Wait up to ``budget`` s for a fast, quiet machine.

        Returns:
            (seconds waited, slowdown: last probe / fastest probe).
        """
        started = time.monotonic()
        meter = CpuMeter()
        while True:
            took = self.probe()
            self.best = min(self.best, took)
            lap = meter.lap()
            quiet = lap is None or lap["foreign_share"] < self.threshold
            waited = time.monotonic() - started
            if (took <= self.best * (1 + self.tolerance) and quiet) or waited >= budget:
                return waited, took / self.best
            time.sleep(0.25)


async def until_quiet(budget: float, threshold: float = 0.1, window: float = 0.1) -> float:
    """In a running loop: wait (up to ``budget`` s) for the machine to be quiet.

    Polls in ``window``-second steps, with the loop idle, until other processes use
    less than ``threshold`` of the CPUs over one step.

    Returns:
        The seconds waited.
    """
    started = time.monotonic()
    meter = CpuMeter()
    if not meter.available or budget <= 0:
        return 0.0
    while time.monotonic() - started < budget:
        await asyncio.sleep(window)
        lap = meter.lap()
        if lap is None or lap["foreign_share"] < threshold:
            break
    return time.monotonic() - started


def run_child(
    variant: Variant,
    round_no: int,
    *,
    retries: int = 2,
    wait_quiet: float = 0.0,
    gate: SpeedGate | None = None,
) -> Sample:
    """Run one variant in a fresh interpreter; retry a crashed child up to ``retries`` times.

    Args:
        variant: What to run.
        round_no: Recorded in the sample.
        retries: Extra attempts if the child fails.
        wait_quiet: Before each attempt, wait up to this many seconds for the machine
            to be fast and quiet (see :class:`SpeedGate`).
        gate: The gate to wait at (keeps the fastest speed seen across calls).
    """
    sample = Sample(key=variant.key, round=round_no, ok=False)
    for _attempt in range(retries + 1):
        if wait_quiet > 0:
            waited, slowdown = (gate or SpeedGate()).wait(wait_quiet)
            sample.gate = {"waited": round(waited, 3), "slowdown": round(slowdown, 4)}
        meter = CpuMeter()
        try:
            proc = subprocess.run(
                [sys.executable, *variant.argv],
                env=_child_env(variant.env),
                capture_output=True,
                text=True,
                timeout=variant.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            sample.failures.append(f"timed out after {variant.timeout:g} s")
            continue
        payload = parse_result(proc.stdout) if proc.returncode == 0 else None
        if payload is None:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no result line"]
            sample.failures.append(f"{_describe_exit(proc.returncode)}: {tail[0][:200]}")
            continue
        sample.ok = True
        sample.metrics = {k: float(v) for k, v in payload["metrics"].items()}
        sample.info = payload["info"]
        lap = meter.lap()
        if payload.get("foreign_share") is not None:
            sample.foreign_share = float(payload["foreign_share"])
        elif lap is not None:
            sample.foreign_share = lap["foreign_share"]
        break
    return sample


# CpuMeter also runs inside measured children, next to tools that patch ``os`` (a
# blockbuster raises on ``os.stat`` or ``os.read`` in a running loop): it keeps the
# functions as they were when this module was imported.
_os_open, _os_read, _os_close = os.open, os.read, os.close
_PROC_STAT = "/proc/stat"
_HAS_PROC_STAT = os.path.exists(_PROC_STAT) and hasattr(os, "sysconf")
try:
    import resource
except ImportError:  # not on Windows
    _HAS_PROC_STAT = False


class CpuMeter:
    """How much CPU *other* processes used while we measured (Linux; else unknown).

    Reads the machine's busy time from ``/proc/stat`` and subtracts what this
    process and its children used (``getrusage``). What is left is interference:
    a neighbour's load that makes the ratios noisier.
    """

    def __init__(self) -> None:
        self.available = _HAS_PROC_STAT
        self._tick = os.sysconf("SC_CLK_TCK") if self.available else 100
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, float] | None:
        if not self.available:
            return None
        fd = _os_open(_PROC_STAT, os.O_RDONLY)
        try:
            head = _os_read(fd, 4096).split(b"\n", 1)[0]
        finally:
            _os_close(fd)
        ticks = [int(x) for x in head.split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = sum(ticks[i] for i in (0, 1, 2, 5, 6) if i < len(ticks)) / self._tick
        steal = (ticks[7] if len(ticks) > 7 else 0) / self._tick
        own = sum(
            getattr(resource.getrusage(who), f)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for f in ("ru_utime", "ru_stime")
        )
        return time.monotonic(), busy, steal, own

    def lap(self) -> dict[str, float] | None:
        """Interference since the previous lap, as shares of the machine's capacity."""
        now = self._read()
        start, self._start = self._start, now
        if now is None or start is None or now[0] <= start[0]:
            return None
        capacity = (now[0] - start[0]) * (os.cpu_count() or 1)
        foreign = max(0.0, (now[1] - start[1]) - (now[3] - start[3]))
        return {
            "seconds": round(now[0] - start[0], 3),
            "foreign_share": round(foreign / capacity, 4),
            "steal_share": round((now[2] - start[2]) / capacity, 4),
        }


def run_rounds(
    variants: Sequence[Variant],
    rounds: int,
    *,
    seed: int = 0,
    retries: int = 2,
    log: Callable[[str], None] | None = None,
    load: list[dict[str, float]] | None = None,
    wait_quiet: float = 0.0,
) -> list[Sample]:
    """Run every variant once per round, in a freshly shuffled order each round.

    Args:
        variants: What to measure.
        rounds: How many rounds.
        seed: Seeds the per-round shuffles (same seed, same orders).
        retries: Extra attempts for a child that fails.
        log: Progress callback (one line per round, and per failure).
        load: If given, one :meth:`CpuMeter.lap` per round is appended to it.
        wait_quiet: Passed to :func:`run_child`.
    """
    samples: list[Sample] = []
    started = time.monotonic()
    meter = CpuMeter()
    gate = SpeedGate()
    for round_no in range(rounds):
        order = [v for v in variants if v.max_rounds is None or round_no < v.max_rounds]
        random.Random(f"{seed}:{round_no}").shuffle(order)
        for variant in order:
            sample = run_child(variant, round_no, retries=retries, wait_quiet=wait_quiet, gate=gate)
            samples.append(sample)
            if log is not None and sample.failures:
                log(f"  {variant.key}: {len(sample.failures)} failed attempt(s): {sample.failures}")
        lap = meter.lap()
        if load is not None and lap is not None:
            load.append(lap)
        if log is not None:
            elapsed = time.monotonic() - started
            busy = f", other processes {lap['foreign_share']:.0%} of the CPUs" if lap else ""
            log(f"round {round_no + 1}/{rounds} done ({elapsed:.0f} s{busy})")
    return samples


def interference(load: Sequence[Mapping[str, float]]) -> dict[str, float] | None:
    """Summarise per-round :meth:`CpuMeter.lap` records (mean and worst round)."""
    if not load:
        return None
    total = sum(x["seconds"] for x in load)
    return {
        "foreign_share_mean": round(
            sum(x["foreign_share"] * x["seconds"] for x in load) / total, 4
        ),
        "foreign_share_max": max(x["foreign_share"] for x in load),
        "steal_share_mean": round(sum(x["steal_share"] * x["seconds"] for x in load) / total, 4),
    }


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def is_quiet(sample: Sample, max_foreign: float | None) -> bool:
    """Whether other processes used at most ``max_foreign`` of the CPUs during the sample."""
    return max_foreign is None or (
        sample.foreign_share is not None and sample.foreign_share <= max_foreign
    )


def median_ratios(
    samples: Iterable[Sample],
    metric: str,
    baseline_of: Callable[[str], str | None],
    max_foreign: float | None = None,
) -> dict[str, Ratio]:
    """Median over rounds of ``metric(variant) / metric(baseline)``, same round only.

    Args:
        samples: What :func:`run_rounds` returned.
        metric: Key in each sample's ``metrics``.
        baseline_of: Maps a variant key to its baseline's key (``None``: no ratio).
        max_foreign: If set, ignore samples during which other processes used more
            than this share of the CPUs (a round counts only if both sides are kept).

    Returns:
        A :class:`Ratio` per variant that has at least one round with both measured.
    """
    by_round: dict[tuple[str, int], float] = {}
    keys: list[str] = []
    for s in samples:
        if s.ok and metric in s.metrics and is_quiet(s, max_foreign):
            by_round[(s.key, s.round)] = s.metrics[metric]
            if s.key not in keys:
                keys.append(s.key)
    out: dict[str, Ratio] = {}
    for key in keys:
        base = baseline_of(key)
        if base is None:
            continue
        ratios = [
            value / by_round[(base, rnd)]
            for (k, rnd), value in sorted(by_round.items())
            if k == key and (base, rnd) in by_round and by_round[(base, rnd)] > 0
        ]
        if ratios:
            q1, med, q3 = _quartiles(ratios)
            out[key] = Ratio(median=med, q1=q1, q3=q3, n=len(ratios))
    return out


def medians(
    samples: Iterable[Sample], metric: str, max_foreign: float | None = None
) -> dict[str, float]:
    """Median of the absolute ``metric`` per variant (``max_foreign`` as in median_ratios)."""
    values: dict[str, list[float]] = {}
    for s in samples:
        if s.ok and metric in s.metrics and is_quiet(s, max_foreign):
            values.setdefault(s.key, []).append(s.metrics[metric])
    return {k: statistics.median(v) for k, v in values.items()}


# -- output ------------------------------------------------------------------------


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None
) -> str:
    """Render a Markdown table.

    Args:
        header: Column titles.
        rows: Cells, one sequence per row.
        align: One ``l`` or ``r`` per column; default: first column left, others right.
    """
    rows = [list(r) for r in rows]
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            str(c).ljust(w) if a == "l" else str(c).rjust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        ":" + "-" * (w + 1) if a == "l" else "-" * (w + 1) + ":"
        for w, a in zip(widths, align, strict=True)
    )
    return "\n".join([line(header), rule + "|", *(line(r) for r in rows)])


def machine_info() -> dict[str, Any]:
    """Describe the machine and interpreter the numbers came from."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    return info


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON, creating the directory if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def samples_as_json(samples: Iterable[Sample]) -> list[dict[str, Any]]:
    """Raw samples for the JSON report."""
    return [asdict(s) for s in samples]
