"""B3, every stall class with default options: how often each is named, idle and busy.

Part of B3 (``b3_detection.py --classes``, ``--busy``, ``--crash-count``). Where the
main B3 compares tools, this measures loopguard alone, with ``loopguard.install()``'s
default options (threshold 0.1 s, interval 0.02 s, captures on), on every class of
stall it tells apart:

* ``sleep``: ``time.sleep(d)`` on the loop: ``blocked``, the line.
* ``python``: a pure-Python loop on the loop: ``blocked``, the line.
* ``mixed``: a loop over ``json.loads`` (C that holds the GIL, between stretches of
  Python): ``blocked``, the function.

``python`` and ``mixed`` do a fixed amount of work (calibrated in CPU time to the
length), as a handler does: on a loaded machine they last longer.
* ``regex``: a catastrophic regex on the loop (C holding the GIL): ``c-held-gil``, the
  line that called it.
* ``hog``: the same regex in a worker thread that exits as soon as it is done, while the
  loop awaits: ``gil``, the thread's name and its line.
* ``gc``: a full collection of a large heap, run from the loop: ``gc``.

Each child runs one loop (asyncio or uvloop): a healthy period first (20 tasks of short
callbacks; every stall reported in it is a false positive), then every class at each
length, in a shuffled order, each followed by a healthy gap with task and thread
churn. ``--busy`` runs two CPU-bound processes beside each child (on a two-core machine:
no core left idle). A stall counts when its measured length is at least threshold +
interval (0.12 s); it is *named* when the report's cause and culprit are as above.

``--crash-count N`` runs N short stalls of every class per loop (0.15 to 0.25 s) with
task and thread churn between them, and counts children killed by a signal and
crash warnings in their output. It prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
LOOPS = ("asyncio", "uvloop")
CLASSES = ("sleep", "python", "mixed", "regex", "hog", "gc")
EXPECTED = {
    "sleep": "blocked",
    "python": "blocked",
    "mixed": "blocked",
    "regex": "c-held-gil",
    "hog": "gil",
    "gc": "gc",
}
LABELS = {
    "sleep": "`time.sleep` (GIL released)",
    "python": "pure Python",
    "mixed": "mixed C/Python (`json.loads` loop)",
    "regex": "C holding the GIL (regex)",
    "hog": "GIL hog thread (exits)",
    "gc": "garbage collection",
}
PATTERN = r"^(a+)+$"
MIN_COUNTED = 0.12  # threshold + interval with the default options
GAP = 0.3
PAYLOAD = json.dumps([{"tags": ["x"] * 20, "score": i / 7} for i in range(2000)])


def _line_of(marker: str) -> int:
    with open(__file__, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.rstrip().endswith(f"# {marker}"):
                return number
    raise AssertionError(marker)


# -- the injected stalls ----------------------------------------------------------------


def blocking_sleep(seconds: float) -> None:
    time.sleep(seconds)  # B3C:sleep


def python_spin(rounds: int) -> None:
    n = 0
    while n < rounds:  # B3C:python
        n += 1  # B3C:python-body


def json_scoring(rounds: int) -> float:
    total = 0.0
    for _ in range(rounds):
        for doc in json.loads(PAYLOAD)[:100]:
            total += len(doc["tags"]) * doc["score"]
    return total


def _rounds(fn: Any, cpu_seconds: float) -> int:
    """Rounds of ``fn`` that take ``cpu_seconds`` of CPU time here.

    A fixed amount of work, as a request handler has: on a loaded machine it takes
    longer in wall time, and the stall is measured in wall time.
    """
    rounds = 1
    while rounds < 1 << 30:
        started = time.thread_time()
        fn(rounds)
        used = time.thread_time() - started
        if used >= 0.02:
            return max(1, int(rounds * cpu_seconds / used))
        rounds *= 2
    return rounds


def regex_hold(subject: str) -> None:
    re.match(PATTERN, subject)  # B3C:regex


def regex_hog(subject: str, out: list[float]) -> None:
    time.sleep(0.05)
    started = time.perf_counter()
    re.match(PATTERN, subject)  # B3C:hog
    out += [started, time.perf_counter()]


class _Node:
    __slots__ = ("__weakref__", "other")

    def __init__(self, other: Any) -> None:
        self.other = other


def full_collection() -> None:
    gc.collect()  # B3C:gc


LINES = {
    "sleep": {_line_of("B3C:sleep")},
    "python": {_line_of("B3C:python"), _line_of("B3C:python-body")},
    "regex": {_line_of("B3C:regex")},
    "hog": {_line_of("B3C:hog")},
}


def _regex_n(target: float) -> int:
    """The regex ``n`` whose time is nearest ``target`` in this process (each +1 doubles)."""
    n, took = 14, 0.0
    while n < 40:
        subject = "a" * n + "!"
        started = time.perf_counter()
        re.match(PATTERN, subject)
        took = time.perf_counter() - started
        if took >= 0.02:
            break
        n += 1
    return max(1, n + round(_log2(target / took)))


def _log2(x: float) -> float:
    import math

    return math.log2(max(x, 1e-9))


def _heap_for(target: float) -> list[_Node]:
    """A heap whose full collection takes about ``target`` seconds here."""
    probe = _chain(300_000)
    started = time.perf_counter()
    gc.collect()
    per_node = (time.perf_counter() - started) / 300_000
    del probe
    return _chain(int(target / max(per_node, 1e-9)))


def _chain(n: int) -> list[_Node]:
    nodes: list[_Node] = []
    last = None
    for _ in range(n):
        last = _Node(last)
        nodes.append(last)
    return nodes


# -- the child ---------------------------------------------------------------------------


async def _churn(seconds: float) -> None:
    """A healthy loop with task and thread churn: short tasks, short-lived threads.

    The threads are started by a spawner thread: ``Thread.start()`` waits for the new
    thread to run, which on a loaded machine can itself hold the loop for 100 ms.
    """
    stop = time.perf_counter() + seconds

    async def short() -> int:
        await asyncio.sleep(0)
        return sum(range(2000))

    def spawner() -> None:
        while time.perf_counter() < stop:
            threads = [threading.Thread(target=sum, args=(range(5000),)) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(0.005)

    churner = threading.Thread(target=spawner, name="spawner", daemon=True)
    churner.start()
    while time.perf_counter() < stop:
        await asyncio.gather(*(short() for _ in range(20)))
        await asyncio.sleep(0.002)


async def _inject(kind: str, length: float, n: int, heap: list[Any]) -> tuple[float, float]:
    if kind == "hog":
        out: list[float] = []
        worker = threading.Thread(target=regex_hog, args=("a" * n + "!", out), name="hog-worker")
        worker.start()
        while worker.is_alive():
            await asyncio.sleep(0.01)
        return out[0], out[1]
    started = time.perf_counter()
    if kind == "sleep":
        blocking_sleep(length)
    elif kind == "python":
        python_spin(n)
    elif kind == "mixed":
        json_scoring(n)
    elif kind == "regex":
        regex_hold("a" * n + "!")
    else:
        full_collection()
    return started, time.perf_counter()


def _named(kind: str, stall: Any) -> bool:
    if stall is None or stall.cause != EXPECTED[kind]:
        return False
    if kind == "gc":
        return stall.gc is not None
    culprit = stall.culprit
    if culprit is None or not culprit.file.endswith(SCRIPT.name):
        return False
    if kind == "mixed":
        return bool(culprit.function == "json_scoring")
    if kind == "hog" and (stall.hog is None or stall.hog.thread != "hog-worker"):
        return False
    return culprit.line in LINES[kind]


async def _scenario(
    wd: Any, cells: list[tuple[str, float]], control: float, churn: bool, gap: float = GAP
) -> dict[str, Any]:
    await asyncio.sleep(0.3)
    wd.flush(2.0)
    before = len(wd.stalls)
    await (_churn(control) if churn else asyncio.sleep(0))
    wd.flush(2.0)
    control_stalls = [f"{s.cause} {s.culprit}" for s in wd.stalls[before:]]
    lengths = {x for _, x in cells}
    picks = {(k, x): _regex_n(x) for k in ("regex", "hog") for x in lengths}
    picks |= {("python", x): _rounds(python_spin, x) for x in lengths}
    picks |= {("mixed", x): _rounds(json_scoring, x) for x in lengths}
    rows = []
    for kind, length in cells:
        heap: list[Any] = []
        if kind == "gc":  # building the heap holds the loop too: not part of the stall
            heap = _heap_for(length)
            await asyncio.sleep(GAP)
            wd.flush(3.0)
        seen = len(wd.stalls)
        started, ended = await _inject(kind, length, picks.get((kind, length), 0), heap)
        await _churn(gap) if churn else await asyncio.sleep(gap)
        wd.flush(3.0)
        stalls = wd.stalls[seen:]
        if heap:
            del heap[:]  # freeing it holds the loop as well: let that pass first
            await asyncio.sleep(GAP)
            wd.flush(3.0)
        primary = max(stalls, key=lambda s: s.duration) if stalls else None
        rows.append(
            {
                "kind": kind,
                "measured": ended - started,
                "detected": primary is not None,
                "named": _named(kind, primary),
                "cause": primary.cause if primary else None,
                "culprit": str(primary.culprit) if primary and primary.culprit else None,
                "capture_error": primary.capture_error if primary else None,
            }
        )
    return {"control": control_stalls, "rows": rows}


def child_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="b3_classes.py --child")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--loop", choices=LOOPS, required=True)
    parser.add_argument("--lengths", required=True)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--control", type=float, default=3.0)
    parser.add_argument("--seed", default="0")
    parser.add_argument("--gap", type=float, default=GAP)
    args = parser.parse_args(argv)
    lengths = [float(x) for x in args.lengths.split(",")]
    cells = [(k, x) for k in CLASSES for x in lengths] * args.reps
    random.Random(f"{args.seed}:{args.loop}").shuffle(cells)
    import loopguard

    wd = loopguard.install(log=False, record=100_000)  # default options otherwise
    main = _scenario(wd, cells, args.control, churn=True, gap=args.gap)
    if args.loop == "uvloop":
        import uvloop

        result = uvloop.run(main)
    else:
        result = asyncio.run(main)
    loopguard.uninstall()
    print("B3C " + json.dumps(result), flush=True)
    return 0


# -- the parent ------------------------------------------------------------------------------


def _burners(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


_CRASH_WORDS = ("Segmentation fault", "SIGSEGV", "Fatal Python error", "can crash")


def run_child(
    loop: str, lengths: str, reps: int, control: float, busy: bool, gap: float = GAP
) -> dict[str, Any]:
    burners = _burners(2) if busy else []
    try:
        done = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--child",
                f"--loop={loop}",
                f"--lengths={lengths}",
                f"--reps={reps}",
                f"--control={control:g}",
                f"--gap={gap:g}",
            ],
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
    finally:
        for p in burners:
            p.kill()
            p.wait()
    line = next((x for x in done.stdout.splitlines() if x.startswith("B3C ")), None)
    out: dict[str, Any] = json.loads(line[4:]) if line else {"control": [], "rows": []}
    out["returncode"] = done.returncode
    out["crash_warnings"] = sum(done.stderr.count(w) for w in _CRASH_WORDS)
    if done.returncode != 0:
        out["stderr"] = done.stderr[-2000:]
    return out


def classes_table(results: dict[tuple[str, str], dict[str, Any]]) -> str:
    head = "| class | " + " | ".join(f"{loop}, {load}" for loop, load in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    for kind in CLASSES:
        cells = []
        for res in results.values():
            rows = [r for r in res["rows"] if r["kind"] == kind and r["measured"] >= MIN_COUNTED]
            named = sum(r["named"] for r in rows)
            pct = f" ({100 * named / len(rows):.0f} %)" if rows else ""
            cells.append(f"{named}/{len(rows)}{pct}")
        lines.append(f"| {LABELS[kind]} | " + " | ".join(cells) + " |")
    lines.append(
        "| false positives (healthy period) | "
        + " | ".join(
            str(len(r["control"]))
            + (
                f" ({', '.join(sorted({c.split()[0] for c in r['control']}))})"
                if r["control"]
                else ""
            )
            for r in results.values()
        )
        + " |"
    )
    lines.append(
        "| crashes / crash warnings | "
        + " | ".join(
            f"{int(r['returncode'] != 0)} / {r['crash_warnings']}" for r in results.values()
        )
        + " |"
    )
    return "\n".join(lines)


def _misses(results: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    out = []
    for (loop, load), res in results.items():
        for r in res["rows"]:
            if r["measured"] >= MIN_COUNTED and not r["named"]:
                out.append(
                    f"- {loop}, {load}: {r['kind']} {r['measured'] * 1e3:.0f} ms -> "
                    f"{r['cause']} {r['culprit']} {r['capture_error'] or ''}".rstrip()
                )
    return out


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="b3_classes.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one of each, 5 s healthy period")
    parser.add_argument("--busy", action="store_true", help="busy only (default: idle and busy)")
    parser.add_argument("--idle", action="store_true", help="idle only")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--control", type=float, default=60.0)
    parser.add_argument("--crash-count", type=int, default=0, metavar="N")
    parser.add_argument("--gap", type=float, default=GAP, help="healthy seconds between stalls")
    parser.add_argument("--loop", choices=LOOPS, action="append", help="only this loop")
    args = parser.parse_args(argv)
    loops = tuple(args.loop or LOOPS)
    if args.crash_count:
        return crash_main(args.crash_count, args.busy, args.gap, loops)
    loads = ["busy"] if args.busy else ["idle"] if args.idle else ["idle", "busy"]
    reps, control = (1, 5.0) if args.quick else (args.reps, args.control)
    results = {}
    for load in loads:
        for loop in loops:
            print(f"[b3 classes] {loop}, {load}...", file=sys.stderr, flush=True)
            results[(loop, load)] = run_child(loop, "0.2,0.4", reps, control, load == "busy")
    print(f"### Every class named, default options ({os.cpu_count()} cores)\n")
    print(classes_table(results))
    for (loop, load), res in results.items():
        for c in res["control"]:
            print(f"- false positive, {loop}, {load}: {c}", file=sys.stderr)
    misses = _misses(results)
    if misses:
        print("\nNot named:\n" + "\n".join(misses))
    for res in results.values():
        if "stderr" in res:
            print("\nchild failed:\n" + res["stderr"], file=sys.stderr)
    return 0


def crash_main(n: int, busy: bool, gap: float = GAP, loops: Sequence[str] = LOOPS) -> int:
    """N stalls of every class per loop, short, with churn between: count crashes."""
    reps = max(1, n // 2)  # two lengths per class
    results = {}
    for loop in loops:
        print(f"[b3 crash count] {loop}: {n} stalls of each class...", file=sys.stderr, flush=True)
        results[(loop, "busy" if busy else "idle")] = run_child(
            loop, "0.15,0.25", reps, 1.0, busy, gap
        )
    print("### Crashes over many stalls of every class (task and thread churn between)\n")
    print("| loop | stalls | crashes (killed by a signal) | crash warnings | named |")
    print("|---|---|---|---|---|")
    for (loop, _), res in results.items():
        rows = res["rows"]
        named = sum(r["named"] for r in rows if r["measured"] >= MIN_COUNTED)
        counted = sum(1 for r in rows if r["measured"] >= MIN_COUNTED)
        print(
            f"| {loop} | {len(rows)} | {int(res['returncode'] < 0)} | {res['crash_warnings']} "
            f"| {named}/{counted} |"
        )
    return 0


if __name__ == "__main__":
    if "--child" in sys.argv[1:]:
        sys.exit(child_main(sys.argv[1:]))
    sys.exit(main(sys.argv[1:]))
