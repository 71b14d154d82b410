"""Each stall kind is told apart and the culprit named: API and CLI, asyncio and uvloop."""

from __future__ import annotations

import asyncio
import concurrent.futures.thread
import gc
import importlib
import itertools
import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    HOG_LINE,
    REGEX_LINE,
    SLEEPY_LINE,
    SPIN_LINES,
    hog_later,
    regex_hold,
    sleepy,
    spin,
)

import loopguard
import loopguard.sinks
import loopguard.testing
from loopguard import Frame, Stall
from loopguard._watchdog.capture import Dump
from loopguard._watchdog.causes import CpuSnapshot, diagnose
from loopguard._watchdog.sampling import StackFolder

# These tests block event loops on purpose: the plugin must not fail them.
pytestmark = pytest.mark.loopguard(enabled=False)

THRESHOLD = 0.1
INTERVAL = 0.02


def run(loop_kind: str, main: Any) -> None:
    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def collect(wd: loopguard.Watchdog) -> list[Stall]:
    assert wd.flush(2.0)
    return wd.stalls


async def _in_callback(fn: Any, *args: Any) -> None:
    await asyncio.sleep(0.05)
    fn(*args)
    await asyncio.sleep(0.05)


async def _gil_hog() -> None:
    # 24 characters: about 0.8 s, well past threshold + dump margin on a busy machine.
    worker = threading.Thread(target=hog_later, args=(0.1, 24), name="hog-worker")
    worker.start()
    await asyncio.sleep(0.1)
    while worker.is_alive():
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)


KINDS = {
    "gil-releasing-c-call": (lambda: _in_callback(sleepy, 0.3), "blocked", {SLEEPY_LINE}),
    "pure-python": (lambda: _in_callback(spin, 0.3), "blocked", SPIN_LINES),
    "c-holding-gil": (lambda: _in_callback(regex_hold, 24), "c-held-gil", {REGEX_LINE}),
    "gil-hog-thread": (_gil_hog, "gil", {HOG_LINE}),
}


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_stall_kind_through_the_api(loop_kind: str, kind: str) -> None:
    main, cause, lines = KINDS[kind]
    with loopguard.watch(threshold=THRESHOLD, interval=INTERVAL) as wd:  # default options
        run(loop_kind, main)
        stalls = collect(wd)
    assert stalls, "no stall reported"
    stall = max(stalls, key=lambda s: s.duration)
    assert stall.cause == cause, stall
    assert stall.culprit is not None and stall.culprit.line in lines, stall.culprit
    assert stall.culprit.file.endswith("helpers.py")
    if cause == "gil":
        assert stall.hog is not None and stall.hog.thread == "hog-worker"
        assert stall.loop_cpu is not None and stall.loop_cpu < 0.5
    if cause == "c-held-gil":  # on CPU for much of it (a busy machine shares the cores)
        assert stall.loop_cpu is not None and stall.loop_cpu >= 0.1


def test_each_stall_kind_through_the_cli(tmp_path: Path) -> None:
    app = tmp_path / "kinds.py"
    app.write_text(
        textwrap.dedent(
            """
        import asyncio, re, sys, threading, time

        def io_call():
            time.sleep(0.3)  # MARK:io

        def python_loop():
            end = time.perf_counter() + 0.3
            while time.perf_counter() < end:  # MARK:py
                pass

        def regex():
            re.match(r"^(a+)+$", "a" * 24 + "!")  # MARK:regex

        def hog():
            time.sleep(0.1)
            re.match(r"^(a+)+$", "a" * 24 + "!")  # MARK:hog

        async def main():
            for fn in (io_call, python_loop, regex):
                await asyncio.sleep(0.1)
                fn()
            t = threading.Thread(target=hog, name="hog-worker")
            t.start()
            while t.is_alive():
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)

        if sys.argv[1] == "uvloop":
            import uvloop
            uvloop.run(main())
        else:
            asyncio.run(main())
        """
        )
    )
    text = app.read_text().splitlines()
    mark = {
        m: next(i for i, line in enumerate(text, 1) if f"MARK:{m}" in line)
        for m in ("io", "py", "regex", "hog")
    }
    for loop_kind in ("asyncio", "uvloop"):
        out = tmp_path / f"{loop_kind}.jsonl"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "loopguard",
                "run",
                "--json",
                str(out),
                "--",
                sys.executable,
                str(app),
                loop_kind,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        found = {
            (r["cause"], r["culprit"]["line"] if r["culprit"] else None)
            for r in map(json.loads, out.read_text().splitlines())
        }
        assert ("blocked", mark["io"]) in found, found
        assert ("blocked", mark["py"]) in found or ("blocked", mark["py"] + 1) in found, found
        assert ("c-held-gil", mark["regex"]) in found, found
        assert ("gil", mark["hog"]) in found, found
        assert "hog-worker" in result.stderr


def test_pytest_faulthandler_timeout_still_fires(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import asyncio, time, loopguard

        def test_slow():
            with loopguard.watch(threshold=0.1):
                asyncio.run(asyncio.sleep(0.1))
                time.sleep(2.5)
        """
    )
    result = pytester.runpytest_subprocess("-o", "faulthandler_timeout=1", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "Timeout" in result.stderr.str()  # pytest's own dump still happened


def test_diagnose_without_evidence_is_unknown() -> None:
    found = diagnose(
        loop_ident=1,
        duration=0.5,
        folder=StackFolder(),
        before=None,
        after=None,
        dump=None,
        others=None,
    )
    assert (found.cause, found.culprit, found.hog) == ("unknown", None, None)


def test_diagnose_prefers_the_thread_that_burned_the_cpu() -> None:
    loop_stack = (Frame(sys.modules["selectors"].__file__ or "", 1, "EpollSelector.select"),)
    busy = (Frame("/app/worker.py", 9, "crunch"),)
    idle = (Frame(threading.__file__, 300, "Condition.wait"),)
    before = CpuSnapshot(0.0, {1: 0.0, 2: 0.0, 3: 0.0}, {1: "Main", 2: "w1", 3: "w2"})
    after = CpuSnapshot(1.0, {1: 0.01, 2: 0.0, 3: 0.9}, {1: "Main", 2: "w1", 3: "w2"})
    found = diagnose(
        loop_ident=1,
        duration=0.9,
        folder=None,
        before=before,
        after=after,
        dump=Dump(0.1, 0.2, {1: loop_stack, 2: idle, 3: busy}, {1: "Main", 2: "w1", 3: "w2"}, 3),
        others=None,
    )
    assert found.cause == "gil"
    assert found.hog is not None and found.hog.thread == "w2" and found.hog.cpu == 0.9
    assert found.culprit == busy[0]


def test_diagnose_never_blames_an_idle_thread_for_a_hog_that_exited() -> None:
    """A pool worker waiting for work used no CPU: the hog is the thread that exited."""
    loop_stack = (Frame(sys.modules["selectors"].__file__ or "", 1, "EpollSelector.select"),)
    waiting = (Frame(concurrent.futures.thread.__file__, 81, "_worker"),)
    hog = (Frame("/app/jobs.py", 50, "hog"),)
    before = CpuSnapshot(0.0, {1: 0.0, 2: 0.0, 3: 0.0}, {1: "Main", 2: "pool_0", 3: "hog"})
    after = CpuSnapshot(1.3, {1: 0.004, 2: 0.0}, {1: "Main", 2: "pool_0"})  # 3 has exited
    idle_loop = StackFolder()
    idle_loop.add(loop_stack)  # sampled back in select(): the loop waited
    found = diagnose(
        loop_ident=1,
        duration=1.25,
        folder=idle_loop,
        before=before,
        after=after,
        dump=None,
        others={2: waiting, 3: hog},  # the last sample still saw it, on its way out
    )
    assert found.cause == "gil"
    assert found.hog is not None and found.hog.thread == "hog"
    assert found.culprit == hog[0]
    gone = diagnose(
        loop_ident=1,
        duration=1.25,
        folder=idle_loop,
        before=before,
        after=after,
        dump=None,
        others={2: waiting},  # never sampled: still named from the earlier reading
    )
    assert gone.hog is not None and gone.hog.thread == "hog"


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_without_captures_cpu_clocks_still_tell_the_gil_causes_apart(loop_kind: str) -> None:
    with loopguard.watch(threshold=THRESHOLD, gil_dump=False) as wd:
        run(loop_kind, lambda: _in_callback(regex_hold, 24))
        run(loop_kind, _gil_hog)
        stalls = collect(wd)
    assert [s.cause for s in stalls] == ["c-held-gil", "gil"]
    assert stalls[0].culprit is None and stalls[0].loop_cpu is not None
    assert stalls[0].capture_error is not None and "off" in stalls[0].capture_error
    assert stalls[1].hog is not None and stalls[1].hog.thread == "hog-worker"


class _Node:
    __slots__ = ("__weakref__", "other")

    def __init__(self) -> None:
        self.other: Any = None


def _garbage_heap(n: int) -> list[_Node]:
    """``n`` live container objects: a full collection has to walk all of them."""
    nodes = [_Node() for _ in range(n)]
    for a, b in itertools.pairwise(nodes):
        a.other = b
    return nodes


def _cycles(n: int) -> None:
    """Leave ``n`` unreachable two-object cycles for the collector."""
    for _ in range(n):
        a, b = _Node(), _Node()
        a.other, b.other = b, a


def test_gc_pause_is_its_own_cause() -> None:
    """A full collection holding the loop is a ``gc`` stall, not C code on an innocent line."""
    import gc

    heap = _garbage_heap(2_000_000)

    async def main() -> None:
        await asyncio.sleep(0.05)
        gc.disable()  # the cycles must wait for the full collection below
        try:
            _cycles(50_000)
        finally:
            gc.enable()
        gc.collect()  # a full collection over a heap of two million objects
        await asyncio.sleep(0.05)

    with loopguard.watch(threshold=THRESHOLD, interval=INTERVAL) as wd:
        asyncio.run(main())
        loopguard.testing.settle(wd)
        stalls = list(wd.stalls)
    del heap
    assert stalls, "the collection did not stall the loop for the threshold"
    stall = max(stalls, key=lambda s: s.duration)
    assert stall.cause == "gc", stall
    assert stall.gc is not None
    assert stall.gc.generation == 2
    assert stall.gc.collected >= 100_000
    assert stall.gc.pause >= 0.5 * stall.duration
    assert stall.culprit is None
    assert "by garbage collection (generation 2" in loopguard.sinks.format_stall(stall)
    assert stall.to_dict()["gc"]["generation"] == 2


def test_stall_with_a_short_collection_keeps_its_cause() -> None:
    """A Python stall during which a young collection ran stays ``blocked`` at its line."""
    import gc

    async def main() -> None:
        await asyncio.sleep(0.05)
        spin(0.3)
        await asyncio.sleep(0.05)

    with loopguard.watch(threshold=THRESHOLD, interval=INTERVAL) as wd:
        gc.collect(0)
        asyncio.run(main())
        loopguard.testing.settle(wd)
        stalls = list(wd.stalls)
    assert [s.cause for s in stalls] == ["blocked"]
    assert stalls[0].culprit is not None and stalls[0].culprit.line in SPIN_LINES


_SELECT = (Frame(sys.modules["selectors"].__file__ or "", 1, "EpollSelector.select"),)
_RUN = Frame(asyncio.events.__file__, 80, "Handle._run")


def test_busy_machine_late_sampler_wakes_keep_the_samples() -> None:
    """The OS kept the sampler off the CPU now and then: what it sampled still counts."""
    folder = StackFolder()
    for _ in range(3):  # three samples in a json.loads loop, between short late wakes
        folder.add((_RUN, Frame("/app/score.py", 12, "score_documents")))
    found = diagnose(
        loop_ident=1,
        duration=0.3,
        folder=folder,
        before=CpuSnapshot(0.0, {1: 0.0}, {1: "Main"}),
        after=CpuSnapshot(0.3, {1: 0.2}, {1: "Main"}),
        dump=None,
        others=None,
        max_gap=0.08,  # several wakes late by up to 80 ms, none over half the stall
    )
    assert (found.cause, found.culprit) == (
        "blocked",
        Frame("/app/score.py", 12, "score_documents"),
    )


def test_sampler_shut_out_by_the_loop_trusts_the_capture_over_a_later_sample() -> None:
    later = StackFolder()
    later.add((_RUN, Frame("/app/h.py", 9, "handler")))  # where the loop went next
    held = (_RUN, Frame("/app/h.py", 8, "handler"))
    dump = Dump(0.1, 0.12, {1: held, 2: ()}, {1: "Main", 2: "loopguard-sampler"}, 1)
    found = diagnose(
        loop_ident=1,
        duration=0.8,
        folder=later,
        before=None,
        after=None,
        dump=dump,
        others=None,
        max_gap=0.75,
    )
    assert (found.cause, found.culprit) == ("c-held-gil", Frame("/app/h.py", 8, "handler"))


def test_mixed_c_and_python_work_is_blocked_even_if_a_capture_saw_it_in_c() -> None:
    folder = StackFolder()
    for _ in range(5):
        folder.add((_RUN, Frame("/app/score.py", 12, "score_documents")))
    held = (_RUN, Frame("/app/score.py", 11, "score_documents"))  # inside json.loads
    found = diagnose(
        loop_ident=1,
        duration=0.5,
        folder=folder,
        before=None,
        after=None,
        dump=Dump(0.1, 0.12, {1: held}, {1: "Main"}, 1),
        others=None,
        max_gap=0.06,
    )
    assert found.cause == "blocked"
    assert found.culprit is not None and found.culprit.function == "score_documents"


def test_idle_loop_with_no_thread_on_the_cpu_is_the_scheduler_not_a_gil_hog() -> None:
    idle = StackFolder()
    idle.add(_SELECT)
    found = diagnose(
        loop_ident=1,
        duration=0.1,
        folder=idle,
        before=CpuSnapshot(0.0, {1: 0.0, 2: 0.0}, {1: "Main", 2: "pool_0"}),
        after=CpuSnapshot(0.1, {1: 0.001, 2: 0.0}, {1: "Main", 2: "pool_0"}),
        dump=None,
        others={2: (Frame(concurrent.futures.thread.__file__, 81, "_worker"),)},
    )
    assert (found.cause, found.hog) == ("scheduler", None)


def test_capture_names_a_hog_that_exited_before_the_stall_ended() -> None:
    idle = StackFolder()
    idle.add(_SELECT)
    hog = (Frame("/app/jobs.py", 50, "crunch"),)
    found = diagnose(
        loop_ident=1,
        duration=0.6,
        folder=idle,
        before=CpuSnapshot(0.0, {1: 0.0, 3: 0.0}, {1: "Main", 3: "cruncher"}),
        after=CpuSnapshot(0.6, {1: 0.0}, {1: "Main"}),  # it has exited
        dump=Dump(0.2, 0.25, {1: _SELECT, 3: hog}, {1: "Main", 3: "cruncher"}, 3),
        others=None,
        max_gap=0.55,
    )
    assert found.cause == "gil"
    assert found.hog is not None and found.hog.thread == "cruncher"
    assert found.culprit == hog[0]


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _score(payload: str, rounds: int) -> float:
    total = 0.0
    for _ in range(rounds):  # a fixed amount of work, as a request handler has
        for doc in json.loads(payload)[:200]:  # MARK:json
            total += len(doc["tags"]) * doc["score"]
    return total


def _rounds_for(payload: str, cpu_seconds: float) -> int:
    """Rounds of ``_score`` that take ``cpu_seconds`` of CPU (not wall) time here."""
    rounds = 1
    while rounds < 1 << 16:
        started = time.thread_time()
        _score(payload, rounds)
        if time.thread_time() - started >= cpu_seconds / 4:
            return rounds * 4
        rounds *= 2
    return rounds


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_mixed_json_work_is_named_on_a_busy_machine(loop_kind: str) -> None:
    payload = json.dumps([{"tags": ["x"] * 20, "score": i / 7} for i in range(4000)])
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    hogs = [ctx.Process(target=_busy, args=(30.0,), daemon=True) for _ in range(2)]
    for p in hogs:
        p.start()
    # The objects earlier tests left behind are set aside from collection: with them,
    # full collections of a long test run's heap take most of the stall, and the stall
    # is rightly "gc" (the gc tests cover that); this test is about
    # the JSON work itself.
    gc.collect()
    gc.freeze()
    try:
        rounds = _rounds_for(payload, 0.3)
        with loopguard.watch(threshold=THRESHOLD, log=False) as wd:
            for _ in range(3):
                run(loop_kind, lambda: _in_callback(_score, payload, rounds))
            stalls = collect(wd)
    finally:
        gc.unfreeze()
        for p in hogs:
            p.kill()
            p.join()
    named = [s for s in stalls if s.duration >= 0.3]
    assert named, stalls
    for stall in named:
        assert stall.cause == "blocked", stall
        assert stall.culprit is not None and stall.culprit.function == "_score", stall.culprit


def test_module_code_run_inside_the_loop_is_an_import_stall(tmp_path: Path) -> None:
    (tmp_path / "slow_app.py").write_text("import time\ntime.sleep(0.3)\nAPP = 1\n")
    sys.path.insert(0, str(tmp_path))

    async def serve() -> None:  # as uvicorn does: the app is imported by the running loop
        await asyncio.sleep(0.05)
        importlib.import_module("slow_app")
        await asyncio.sleep(0.05)

    try:
        with loopguard.watch(threshold=THRESHOLD, log=False) as wd:
            asyncio.run(serve())
            stalls = collect(wd)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("slow_app", None)
    stall = max(stalls, key=lambda s: s.duration)
    assert stall.cause == "import"
    assert stall.culprit == Frame(str(tmp_path / "slow_app.py"), 2, "<module>")
    # Kept apart from user stalls (a loaded machine may add stalls of its own there).
    assert stall.culprit not in [r.culprit for r in wd.summary.rows()]
    assert [r.culprit for r in wd.summary.startup_rows()] == [stall.culprit]


def test_a_lone_sample_after_a_short_c_stall_is_not_taken_for_python_work() -> None:
    """A 150 ms regex: the sampler slept 100 ms of it, was shut out, sampled once at the end."""
    once = StackFolder()
    once.add((_RUN, Frame("/app/v.py", 4, "validate")))
    held = (_RUN, Frame("/app/v.py", 4, "validate"))
    found = diagnose(
        loop_ident=1,
        duration=0.15,
        folder=once,
        before=None,
        after=None,
        dump=Dump(0.1, 0.12, {1: held}, {1: "Main"}, 1),
        others=None,
        max_gap=0.05,  # a third of the stall
        after_gap=1,
    )
    assert (found.cause, found.culprit) == ("c-held-gil", Frame("/app/v.py", 4, "validate"))


def test_little_work_held_by_the_run_queue_is_the_scheduler() -> None:
    """A callback preempted by the OS: 5 ms of work, most of the stall waiting for a CPU."""
    folder = StackFolder()
    for _ in range(4):
        folder.add((_RUN, Frame("/app/t.py", 19, "test_fine")))

    def case(cpu: float, queued: float) -> Any:
        return diagnose(
            loop_ident=1,
            duration=0.185,
            folder=folder,
            before=CpuSnapshot(0.0, {1: 0.0}, {1: "Main"}),
            after=CpuSnapshot(0.2, {1: cpu}, {1: "Main"}),
            dump=None,
            others=None,
            queued=queued,
            little_work=0.01,
        )

    preempted = case(0.005, 0.8)
    assert (preempted.cause, preempted.culprit) == (
        "scheduler",
        Frame("/app/t.py", 19, "test_fine"),
    )
    assert case(0.005, 0.02).cause == "blocked"  # time.sleep: not runnable, so not queued
    assert case(0.03, 0.9).cause == "blocked"  # real work, slowed by a busy machine
