"""The watchdog: a heartbeat on each loop and one sampler thread per watchdog.

The heartbeat is a timer on the loop (``call_later`` re-armed each tick; a system task
on trio) that stamps ``last_tick`` and records its own lateness. The sampler thread
sleeps until ``last_tick + threshold``; if no tick came by then, the loop is held and
the sampler reads the loop thread's stack every ``interval`` until the heartbeat
resumes. The loop itself then says how long it was held (the heartbeat gap), and the
sampler emits one :class:`~loopguard.events.Stall` to the sinks.

A healthy loop therefore costs one timer callback per interval and roughly one
sampler wake per threshold; nothing runs on the loop thread per callback.

Loops are found by the hooks of :mod:`.registry`; each watched loop's state is a
:class:`~.loopwatch.LoopWatch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from .._blocking import BlockingGuard, call_during
from .._core.attribution import TRACE_PARENT, attributes_of
from .._core.frames import is_idle
from .._core.loops import loop_kind
from ..events import Event, SlowCallback, Stall
from ..metrics import (
    EVENTLOOP_SLOW_CALLBACKS,
    EVENTLOOP_STALL_CAUSE,
    EVENTLOOP_STALL_DURATION,
    EVENTLOOP_STALLS,
    trace_context,
)
from ..metrics import record as _record
from ..sinks import CallbackSink, JsonLinesSink, LoggingSink, RecordingSink, Sink, SinkSet
from . import registry
from .capture import CAPTURE, READ_LATE, Dump
from .causes import CpuClocks, CpuSnapshot, diagnose, is_import
from .config import Config
from .gcwatch import GC
from .loopmetrics import observe_stats, retire_stats
from .loopstats import LoopStatsSnapshot
from .loopwatch import LoopWatch, Ongoing, run_queue_wait, trio_beat
from .precise import TIMER
from .registry import running
from .sampling import sample_threads
from .summary import DelayHistogram, StallSummary

__all__ = ["Watchdog", "running"]

logger = logging.getLogger("loopguard")
_monotonic = time.monotonic


# How late the sampler may be before the capture helper reads the process: a few GIL
# switch intervals, so ordinary hand-offs never trigger it, short enough that the read
# happens while a stall of threshold + interval still lasts.
_MIN_CAPTURE_MARGIN = 0.03
# How long the sampler waits for a capture still being read when its stall ends.
_CAPTURE_WAIT = 1.0
# A stall is a garbage-collection pause (or a reported blocking call) when the collector
# ran (the call lasted) for this share of it.
_GC_SHARE = 0.5


class Watchdog:
    """Watches event loops and reports every stall with the line that caused it.

    Create one with :func:`loopguard.install` (process-wide) or
    :func:`loopguard.watch` (scoped). A started watchdog attaches to every loop that
    starts running afterwards, in any thread, and to the loop running in the
    thread that starts it.

    Args:
        config: Validated settings; see :class:`~loopguard.Config`.
    """

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self._recording = RecordingSink(self.config.record) if self.config.record else None
        self.summary = StallSummary()
        sinks: list[Sink] = [self.summary]
        if self._recording is not None:
            sinks.append(self._recording)
        if self.config.log:
            sinks.append(LoggingSink(full_stacks=self.config.full_stacks))
        if self.config.json is not None:
            sinks.append(JsonLinesSink(self.config.json))  # OSError here, at install
        if self.config.callback is not None:
            sinks.append(CallbackSink(self.config.callback))
        sinks.extend(self.config.sinks)
        self.sinks = SinkSet(sinks)
        self._watches: list[LoopWatch] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._finished_delay = DelayHistogram()
        self._clocks = CpuClocks()
        self._snapshot: CpuSnapshot | None = None
        self._wakes = 0
        self._passes = 0  # sampler passes ended, their stalls emitted (see flush)
        self._reporters: list[threading.Thread] = []
        self._carried: list[tuple[float, SlowCallback]] = []  # precise notes held one wake
        self._waited: list[tuple[float, SlowCallback]] = []
        self._noticed: set[str] = set()
        self.running = False

    # -- lifecycle -----------------------------------------------------------------

    #: The blocking-call guard while the watchdog runs with ``blocking`` on.
    blocking_guard: BlockingGuard | None = None

    def start(self) -> Watchdog:
        """Start watching: hook loop start-up and attach to loops already running."""
        with registry.lock:
            if self.running:
                return self
            self.running = True
            self._stop = False
            registry._running.append(self)
            if len(registry._running) == 1:
                registry.hooks_on()
            if self.config.stats:
                observe_stats(True)
            if self.config.gil_dump:
                CAPTURE.start()
            registry.all_watchdogs.add(self)
            GC.start()
        if self.config.blocking != "off" and self.blocking_guard is None:
            self.blocking_guard = BlockingGuard(
                self.config.blocking, allow=self.config.blocking_allow, sinks=[self.sinks]
            ).start()
        if self.config.precise:
            TIMER.add(self, self.config.slow_threshold, self.config.threshold)
        self._attach_running_loops()
        return self

    def stop(self) -> None:
        """Stop watching, restore every patched function and close the sinks."""
        guard, self.blocking_guard = self.blocking_guard, None
        if guard is not None:  # before the loop hooks: patches come off in reverse order
            guard.stop()
        with registry.lock:
            if not self.running:
                return
            self.running = False
            registry._running.remove(self)
            with self._lock:
                registry.hand_over(list(self._watches))
        self._stop = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None
        # A stall that ended just before stopping is still reported (and counted).
        try:
            self._pass(_monotonic(), late=0.0, final=True)
        except Exception:
            logger.exception("loopguard: final check failed")
        with registry.lock:
            if not registry._running:
                registry.hooks_off()
            TIMER.remove(self)
            if not any(wd.config.stats for wd in registry._running):
                observe_stats(False)
            if self.config.gil_dump:
                CAPTURE.stop()
            GC.stop()
        self.sinks.close()

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- results -------------------------------------------------------------------

    @property
    def events(self) -> list[Event]:
        """The most recent events (up to ``config.record``), oldest first."""
        return self._recording.events if self._recording is not None else []

    @property
    def stalls(self) -> list[Stall]:
        """The most recent stalls, oldest first."""
        return self._recording.stalls if self._recording is not None else []

    def delay(self) -> DelayHistogram:
        """Loop delay (heartbeat lateness) over every loop watched so far."""
        total = DelayHistogram()
        total.merge(self._finished_delay)
        with self._lock:
            watches = list(self._watches)
        for watch in watches:
            total.merge(watch.delay)
        return total

    def stats(self) -> list[LoopStatsSnapshot]:
        """Statistics of each watched loop since the previous call (``stats=True``).

        Returns:
            One snapshot per loop being watched; empty unless the watchdog was
            created with ``stats=True``.
        """
        with self._lock:
            watches = [w for w in self._watches if w.attached and w.stats is not None]
        return [w.stats.snapshot("api") for w in watches if w.stats is not None]

    def flush(self, timeout: float = 1.0) -> bool:
        """Wait until every stall that has happened has reached the sinks.

        The sampler thread reports a stall once the loop's heartbeat resumes, or right
        after its loop stops (the last callback of ``run_until_complete`` blocked).
        This waits for both, for a stall in progress to end, for the sinks to have
        received each one, and for blocking calls reported so far.

        Args:
            timeout: Seconds to wait at most.

        Returns:
            False if the sampler still had work after ``timeout``.
        """
        deadline = _monotonic() + timeout
        while True:
            now = _monotonic()
            with self._lock:
                # A loop that stopped, a stall the heartbeat measured but the sampler
                # has not reported, or a loop held right now: not reported yet.
                busy = [
                    w
                    for w in self._watches
                    if not w.attached
                    or w.pending
                    or w.ongoing is not None
                    or now - w.last_tick >= w.threshold
                ]
            if not self.running:
                return True
            if not busy:
                # The sampler may be between taking a stall off its loop and handing it
                # to the sinks: one whole pass after this point has emitted it.
                done = self._one_more_pass(deadline) and self._reports_done(deadline)
                guard = self.blocking_guard
                if guard is not None:  # blocking calls go to the sinks on their own thread
                    done = guard.flush(max(0.0, deadline - _monotonic())) and done
                return done
            if _monotonic() >= deadline:
                return False
            self._wake.set()
            time.sleep(0.001)

    def _one_more_pass(self, deadline: float) -> bool:
        """Wait until a sampler pass that began after this call has ended."""
        if threading.current_thread() is self._thread:
            return True  # called from a sink: this pass is the one emitting
        seen = self._passes
        while self._passes < seen + 2 and self.running:
            # seen + 2: the pass running at ``seen`` may have begun before this call.
            thread = self._thread
            if thread is None or not thread.is_alive() or _monotonic() >= deadline:
                return thread is None or not thread.is_alive()
            self._wake.set()
            time.sleep(0.001)
        return True

    def _reports_done(self, deadline: float) -> bool:
        """Wait for the short-lived threads of :meth:`report` to hand over their event."""
        with self._lock:
            reporters, self._reporters = self._reporters, []
        for thread in reporters:
            thread.join(max(0.0, deadline - _monotonic()))
        alive = [t for t in reporters if t.is_alive()]
        if alive:
            with self._lock:
                self._reporters.extend(alive)
        return not alive

    @property
    def logs(self) -> bool:
        """True when the watchdog logs what it reports (a LoggingSink is among its sinks)."""
        return any(isinstance(s, LoggingSink) for s in self.sinks.sinks)

    def report(self, event: Event) -> None:
        """Hand an event reported elsewhere (an adaptive offload switch) to the sinks.

        Sinks may write files or call user code, so they run on a short-lived thread:
        the caller, often the loop thread, never waits for them.
        """
        thread = threading.Thread(
            target=self.sinks.emit, args=(event,), name="loopguard-report", daemon=True
        )
        with self._lock:
            self._reporters = [t for t in self._reporters if t.is_alive()]
            self._reporters.append(thread)
        thread.start()

    @contextlib.contextmanager
    def watching_trio_task_run(self) -> Iterator[None]:
        """Watch the trio run of the calling trio task while the block runs.

        For trio runs the run hook does not see: anyio's pytest runner drives trio in
        guest mode between its own calls, so the run is idle, not late, while the
        runner works in between; the heartbeat ticks only inside the block. Outside a
        trio task (or while the watchdog is stopped) this does nothing.
        """
        trio = sys.modules.get("trio")
        watch = None
        try:
            if self.running and trio is not None and trio.lowlevel.in_trio_task():
                attached = self._attach_safely(trio.lowlevel.current_trio_token(), "trio")
                if attached is not None:
                    watch = attached[1]
                    trio.lowlevel.spawn_system_task(trio_beat, watch, name="loopguard-heartbeat")
        except Exception:
            logger.exception("loopguard could not watch this trio run")
            watch = None
        try:
            yield
        finally:
            if watch is not None:
                self._detach(watch)

    # -- attaching loops -------------------------------------------------------------

    def watch_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to a running loop from another thread (thread-safe)."""
        loop.call_soon_threadsafe(self._attach_safely, loop, loop_kind(loop))

    def _attach_safely(self, loop: Any, kind: str) -> tuple[Watchdog, LoopWatch] | None:
        try:
            with self._lock:
                if not self.running or any(w.loop is loop and w.attached for w in self._watches):
                    return None
                watch = LoopWatch(self, loop, kind)
                self._watches.append(watch)
                if self.config.precise and kind != "asyncio" and kind not in self._noticed:
                    self._noticed.add(kind)
                    logger.warning(
                        "precise mode times callbacks of asyncio's own loops only; "
                        "%s loops are watched by the sampling watchdog alone",
                        kind,
                    )
            if kind != "trio":
                watch.handle = loop.call_later(watch.period, watch.asyncio_tick)
            self._ensure_thread()
            return self, watch
        except Exception:
            logger.exception("loopguard could not watch %r", loop)
            return None

    def _detach(self, watch: LoopWatch) -> None:
        # The sampler drops the watch after reporting what it still holds.
        watch.detached_at = _monotonic()
        watch.attached = False
        if watch.handle is not None:
            watch.handle.cancel()
            watch.handle = None
        if watch.stats is not None:
            watch.stats.stop()
        self._wake.set()

    def _forget(self, watch: LoopWatch) -> None:
        with self._lock:
            if watch in self._watches:
                self._watches.remove(watch)
                self._finished_delay.merge(watch.delay)
        if watch.slot >= 0:
            CAPTURE.board.give_back(watch.slot)
            watch.slot = -1
        if watch.stats is not None:
            retire_stats(watch.stats)

    def _start_trio_heartbeat(self) -> None:
        import trio

        trio.lowlevel.spawn_system_task(self._trio_heartbeat, name="loopguard-heartbeat")

    async def _trio_heartbeat(self) -> None:
        import trio

        attached = self._attach_safely(trio.lowlevel.current_trio_token(), "trio")
        if attached is None:
            return
        try:
            await trio_beat(attached[1])
        finally:
            self._detach(attached[1])

    def _attach_running_loops(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self._attach_safely(loop, loop_kind(loop))
        trio = sys.modules.get("trio")
        if trio is not None:
            try:
                trio.lowlevel.current_trio_token()
            except RuntimeError:
                pass
            else:
                self._start_trio_heartbeat()
        # Loops running in other threads: found once, attached from their own thread.
        for other in _loops_in_other_threads():
            if other is not loop:
                self.watch_loop(other)

    # -- sampler thread --------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(
                target=self._sampler_main, name="loopguard-sampler", daemon=True
            )
            self._thread.start()
        else:
            self._wake.set()

    def _sampler_main(self) -> None:
        interval = self.config.period
        tolerance = max(interval, 4 * sys.getswitchinterval())
        margin = max(2 * interval, _MIN_CAPTURE_MARGIN)
        # A loop whose heartbeat is this old is in trouble: the helper reads the process
        # only then (a sampler shut out while every loop ticks needs no capture).
        stale = self.config.threshold / 2
        capture = self.config.gil_dump
        planned = _monotonic()
        while not self._stop:
            now = _monotonic()
            late = now - planned
            next_wake, watching = self._pass(now, late=late if late > tolerance else 0.0)
            if not watching:
                if capture:
                    CAPTURE.disarm()
                self._wake.wait()
                planned = _monotonic()
            else:
                planned = max(next_wake, _monotonic() + 0.001)
                # If this thread still cannot run well after it should, a thread holds
                # the GIL (or the OS keeps this one off the CPU): the helper process
                # reads every thread's stack from outside (see .capture).
                if capture:
                    CAPTURE.arm(planned + margin, stale)
                self._wake.wait(planned - _monotonic())
            self._wake.clear()

    def _pass(self, now: float, late: float, final: bool = False) -> tuple[float, bool]:
        """One look at every loop; emit what ended. Returns (next wake, any loop watched).

        ``late`` is how long after its planned wake the sampler ran (0 when on time).
        """
        threshold = self.config.threshold
        with self._lock:
            watches = list(self._watches)
        # The helper writes only after a capture, and it captures only while this thread
        # is late: read its pipe then (or while a stall lasts), not at every wake. Each
        # system call here gives up the GIL, and a loop that iterates fast takes many
        # milliseconds to give it back.
        if self.config.gil_dump and (late or final or any(w.ongoing for w in watches)):
            CAPTURE.poll()
        snapshot = self._clocks.snapshot()
        next_wake = now + threshold
        stalls: list[tuple[float, Stall]] = []
        for watch in watches:
            if final:  # the watchdog stops: whatever a loop still holds is reported now
                watch.attached = False
                watch.detached_at = watch.detached_at or now
                if watch.stats is not None:
                    watch.stats.stop()
            try:
                due = self._check(watch, now, late, snapshot, stalls)
            except Exception:
                logger.exception("loopguard sampler failed on %r", watch.loop)
                due = now + threshold
            next_wake = min(next_wake, due)
        self._snapshot = snapshot
        self._wakes += 1
        if self.config.precise:
            stalls = self._merge_precise(stalls, final)
        reports = bool(registry._running) and registry._running[0] is self
        for _, stall in stalls:
            if stall.duration < threshold:
                continue
            if reports:
                _record(EVENTLOOP_STALLS, 1, {EVENTLOOP_STALL_CAUSE: stall.cause})
                # In the blocked task's trace context: exemplars link to its request.
                trace = trace_context(stall.attributes.get(TRACE_PARENT))
                _record(EVENTLOOP_STALL_DURATION, stall.duration, None, trace)
            self.sinks.emit(stall)
        self._passes += 1
        return next_wake, bool(watches)

    def _merge_precise(
        self, stalls: list[tuple[float, Stall]], final: bool
    ) -> list[tuple[float, Stall]]:
        """Report each slow callback once: as a stall if the heartbeat saw it, else as slow.

        A timed callback that matches a stall lends it its exact duration. A long one
        with no stall yet waits one wake, since its stall may be finalised next time.
        """
        period, threshold = self.config.period, self.config.threshold
        notes, self._carried = self._carried + TIMER.drain(), []
        merged = []
        for end, stall in stalls:
            start = end - stall.duration - period
            match = next((n for n in notes if start <= n[0] <= end + period), None)
            if match is None:
                merged.append((end, stall))
                continue
            slow = match[1]
            if max(stall.duration, slow.duration) < threshold:
                continue  # the note stays: reported below as a slow callback
            notes.remove(match)
            stall = dataclasses.replace(
                stall,
                duration=max(stall.duration, slow.duration),
                culprit=stall.culprit or slow.culprit,
                task=stall.task or slow.task,
            )
            merged.append((end, stall))
        for note in notes:
            if note[1].duration >= threshold and not final and note not in self._waited:
                self._carried.append(note)
                continue
            _record(EVENTLOOP_SLOW_CALLBACKS, 1)
            self.sinks.emit(note[1])
        self._waited = list(self._carried)
        return merged

    def _check(
        self,
        watch: LoopWatch,
        now: float,
        late: float,
        snapshot: CpuSnapshot | None,
        stalls: list[tuple[float, Stall]],
    ) -> float:
        """Advance one loop's stall state; return when the sampler should look again."""
        interval, threshold = watch.period, watch.threshold
        last_tick = watch.last_tick
        attached = watch.attached
        pending = watch.take_pending()
        ongoing = watch.ongoing
        if ongoing is not None and (last_tick != ongoing.tick or not attached):
            watch.ongoing = None
            if pending:
                end, gap = pending.pop(0)
            else:  # the loop stopped before its heartbeat could run again
                end = watch.detached_at or last_tick
                gap = end - ongoing.tick
            self._stall(watch, end, gap, ongoing, snapshot, stalls)
        for end, gap in pending:  # stalls the sampler never saw (it was starved throughout)
            self._stall(watch, end, gap, None, snapshot, stalls)
        if not attached:
            self._forget(watch)
            return now + threshold
        if watch.ongoing is None:
            if now - last_tick < threshold:
                # With captures on, look once half-way as well: a sampler shut out by a
                # C call from then on arms the capture early enough to read a stall of
                # threshold + interval while it lasts (py-spy needs 20-30 ms).
                halfway = last_tick + threshold / 2
                return halfway if self.config.gil_dump and now < halfway else last_tick + threshold
            if not watch.is_running():  # a loop we joined while running has stopped
                self._detach(watch)
                return now
            watch.ongoing = Ongoing(last_tick, self._snapshot)
            task = watch.running_task()
            watch.ongoing.attributes = attributes_of(task, watch.thread_id)
            watch.ongoing.task = watch.ongoing.attributes.get("task.name")
            watch.ongoing.saw(watch.ongoing.task)
            del task
            waited = run_queue_wait(watch.native_id)
            if waited is not None:
                watch.ongoing.queued = (now, waited)
        ongoing = watch.ongoing
        # A late wake is a gap in the samples; the longest one tells a sampler shut out
        # by a GIL holder (one gap over most of the stall) from one the OS kept off a
        # CPU now and then (short gaps; the samples it took still say what ran).
        held = bool(late) and _held_through(self._snapshot, snapshot)
        if held:
            ongoing.max_gap = max(ongoing.max_gap, late)
        stack, others = sample_threads(watch.thread_id)
        if stack:
            ongoing.folder.add(stack)
            ongoing.after_gap += held
            if not is_idle(stack):
                ongoing.saw(_task_name(watch.running_task()))
        if others is not None:
            ongoing.others = others
        return now + interval

    def _stall(
        self,
        watch: LoopWatch,
        end: float,
        gap: float,
        ongoing: Ongoing | None,
        after: CpuSnapshot | None,
        stalls: list[tuple[float, Stall]],
    ) -> None:
        # The stall began somewhere in the heartbeat period before the gap: centre it.
        duration = max(gap - watch.period / 2, 0.0)
        # Below the threshold by more than the estimate's error: not a stall. Between:
        # a candidate, which precise timing may confirm; _pass drops the rest.
        if duration < watch.threshold - watch.period / 2:
            return
        captured = CAPTURE.during(end - gap, end, _CAPTURE_WAIT) if self.config.gil_dump else None
        dump = captured if isinstance(captured, Dump) else None
        before = ongoing.before if ongoing is not None else self._snapshot
        own = frozenset(
            i
            for snap in (before, after)
            if snap
            for i, n in snap.names.items()
            if n.startswith("loopguard-")
        )
        found = diagnose(
            loop_ident=watch.thread_id,
            duration=duration,
            folder=ongoing.folder if ongoing is not None else None,
            before=before,
            after=after,
            dump=dump,
            others=ongoing.others if ongoing is not None else None,
            exclude=own,
            # A stall the sampler never saw begin was a gap of the sampler's as long.
            max_gap=ongoing.max_gap if ongoing is not None else duration,
            after_gap=ongoing.after_gap if ongoing is not None else 0,
            queued=_queued_share(watch, ongoing, end),
            little_work=watch.threshold / 10,
        )
        cause, culprit = found.cause, found.culprit
        top = found.stacks[0].frames if found.stacks else ()
        if cause in ("blocked", "c-held-gil") and is_import(top):
            cause = "import"  # module-level code run inside the loop (an app imported late)
        collected = GC.within(end - gap, end)
        # The collector held the loop for most of the stall: the line that was running
        # only allocated the object that triggered it. (A GC pause cannot be sampled.)
        if collected is not None and collected.pause >= _GC_SHARE * duration:
            cause = "gc"
            if found.cause != "blocked":
                culprit = None
        tasks = tuple(ongoing.tasks) if ongoing is not None else ()
        missing = None
        if culprit is None and cause in ("c-held-gil", "gil", "unknown"):
            missing = _why_no_line(captured, self.config.gil_dump)
        stall = Stall(
            started_at=time.time() - (_monotonic() - end) - duration,
            duration=round(duration, 6),
            cause=cause,
            # Two tasks ran within the stall: neither was "the" task (see ``tasks``).
            task=tasks[0]
            if len(tasks) == 1
            else None
            if tasks
            else (ongoing.task if ongoing is not None else None),
            culprit=culprit,
            stacks=found.stacks,
            samples=ongoing.folder.total if ongoing is not None else 0,
            thread=watch.thread_name,
            loop=watch.kind,
            attributes=ongoing.attributes if ongoing is not None else {},
            hog=found.hog if cause != "gc" else None,
            loop_cpu=found.loop_cpu,
            gc=collected,
            blocking_call=call_during(watch.thread_id, end - gap, end, _GC_SHARE)
            if cause == "blocked"
            else None,
            tasks=tasks,
            capture_error=missing,
        )
        stalls.append((end, stall))

    def _after_fork_in_child(self) -> None:
        me = threading.get_ident()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        for watch in self._watches:
            if watch.thread_id != me and watch.slot >= 0:  # its loop is not in this process
                CAPTURE.board.give_back(watch.slot)  # (the board is this child's own now)
                watch.slot = -1
        self._watches = [w for w in self._watches if w.thread_id == me]
        for watch in self._watches:
            watch.ongoing = None
        if self.running and self._watches:
            self._ensure_thread()


# A thread running Python hands the GIL to a waiting sampler within one switch interval
# of CPU time, then waits for it; one that used more than two intervals (and a twentieth
# of the gap: a machine with six runnable threads per core gives a C call that much)
# held it in C.
_HELD_CPU_SHARE = 0.05


def _held_through(before: CpuSnapshot | None, after: CpuSnapshot | None) -> bool:
    """Whether some thread computed through the sampler's gap (so it held the GIL).

    On a busy machine the OS may take the CPU from a loop thread that runs Python while
    it holds the GIL: the sampler then waits too, but no thread's CPU clock moves.
    Without clocks, every gap counts.
    """
    if before is None or after is None:
        return True
    bar = max(2 * sys.getswitchinterval(), _HELD_CPU_SHARE * (after.at - before.at))
    return any(  # a thread started during the gap used all its CPU within it
        cpu - before.cpu.get(i, 0.0) >= bar
        for i, cpu in after.cpu.items()
        if not after.names.get(i, "").startswith("loopguard-")
    )


def _queued_share(watch: LoopWatch, ongoing: Ongoing | None, end: float) -> float | None:
    """Share of the watched part of a stall the loop thread spent waiting for a CPU."""
    if ongoing is None or ongoing.queued is None:
        return None
    since, waited = ongoing.queued
    now = run_queue_wait(watch.native_id)
    span = end - since
    if now is None or span <= 0:
        return None
    return min(1.0, (now - waited) / span)


def _why_no_line(captured: Dump | str | None, enabled: bool) -> str:
    """Why a stall that needed a capture has no line, in words for the user."""
    if not enabled:
        return "captures are off (gil_dump=False)"
    if isinstance(captured, str):
        return captured
    if captured is not None:
        return READ_LATE
    return "the stall ended before a capture could be taken"


def _task_name(task: object) -> str | None:
    try:
        return task.get_name() if task is not None else None  # type: ignore[attr-defined]
    except Exception:
        return None


#: Functions whose frame holds a running loop: the loop's own ``run_forever`` and
#: friends (``self``), ``asyncio.Runner.run`` (``self._loop``) and 3.10's
#: ``asyncio.run`` (``loop``). uvloop's ``run_forever`` is C, but the runner above it
#: is Python.
_LOOP_FRAMES = frozenset({"run_forever", "run_until_complete", "_run_once", "run"})


def _loops_in_other_threads() -> list[asyncio.AbstractEventLoop]:
    """The asyncio (and uvloop) loops running in other threads now.

    Read from those threads' stacks: only frames of :data:`_LOOP_FRAMES` functions are
    looked into, and only for the loop they run; nothing of them is kept. (Walking the
    whole heap for loop objects took hundreds of milliseconds in a large process, on
    the loop thread when ``install()`` is called inside a running loop.)
    """
    me = threading.get_ident()
    found: list[asyncio.AbstractEventLoop] = []
    frames = sys._current_frames()
    frame: Any = None
    try:
        for ident, frame in frames.items():
            if ident == me:
                continue
            f: Any = frame
            while f is not None:
                if f.f_code.co_name in _LOOP_FRAMES:
                    try:  # any function named "run": its ``self`` may be anything
                        local = f.f_locals
                        owner = local.get("self")
                        for candidate in (owner, getattr(owner, "_loop", None), local.get("loop")):
                            if (
                                isinstance(candidate, asyncio.AbstractEventLoop)
                                and candidate.is_running()
                                and not candidate.is_closed()
                                and candidate not in found
                            ):
                                found.append(candidate)
                    except Exception:
                        pass
                    local = owner = candidate = None
                f = f.f_back
    finally:
        del frames, frame
    return found
