"""pytest plugin: fail tests that stall the event loop or make blocking calls on it.

Registered through the ``pytest11`` entry point and inert until enabled with
``pytest --loopguard`` or the ini key ``loopguard = true`` (or, for one test, a
``@pytest.mark.loopguard`` marker).

How it works: one watchdog for the session (started at the first checked test) sees
every loop a test runs (pytest-asyncio and anyio runners, ``asyncio.run`` in a sync
test, ``IsolatedAsyncioTestCase``, trio); its stalls are collected into the running
test's window. One blocking-call guard for the session switches its mode per test.
At the end of each phase (setup, call, teardown) the plugin waits until the sampler
has reported loops that just stopped, then fails the phase with every stall and
blocking call seen, each with the line to blame and its stack. Tests that run no
loop see nothing and cost nothing extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import math
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace
from typing import Any, get_args

import pytest

from ._blocking import Allow, BlockingGuard, Mode, format_rules
from ._plugin_rules import Scope, asyncio_tasks, describe_tasks, trimmed
from ._watchdog import Config, Watchdog
from .events import BlockingCall, Event, Stall
from .sinks import CallbackSink
from .testing import LoopEvents, describe, settle

__all__ = ["LoopguardPlugin"]

# The guard's modes the plugin offers ("record" is what the events fixture uses).
_BLOCKING_CHOICES = tuple(m for m in get_args(Mode) if m != "record")
_GC_CHOICES = ("report", "fail")
_MARKER_OPTIONS = ("enabled", "threshold", "blocking", "pending_tasks", "allow")
_SECTION = "loopguard"
_WARN_SECTION = "loopguard warnings"  # reported, not failed: warn mode, scope, gc
_RULES_KEY = "loopguard_rules"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--loopguard*`` options and ``loopguard*`` ini keys."""
    group = parser.getgroup("loopguard", "loopguard: fail tests that block the event loop")
    group.addoption(
        "--loopguard",
        action="store_true",
        default=None,
        help="fail tests during which the event loop stalled or a blocking call was made on it",
    )
    group.addoption(
        "--loopguard-threshold",
        type=float,
        default=None,
        metavar="S",
        help="seconds the loop must be held to fail a test (default 0.1)",
    )
    group.addoption(
        "--loopguard-blocking",
        choices=_BLOCKING_CHOICES,
        default=None,
        help="blocking calls on the loop: raise BlockingCallError and fail the test (default), "
        "warn (report in the summary, do not fail) or off",
    )
    group.addoption(
        "--loopguard-pending-tasks",
        action="store_true",
        default=None,
        help="also fail async tests that leave asyncio tasks pending when they end",
    )
    group.addoption(
        "--loopguard-allow",
        action="append",
        default=[],
        metavar="RULE",
        help="allow blocking calls under MODULE[:FUNCTION][@CALL,...] (repeatable)",
    )
    group.addoption(
        "--loopguard-scope",
        action="append",
        default=[],
        metavar="MODULE",
        help="fail only for blocking calls and stalls in these packages (repeatable; '*' for "
        "all code; default: the packages found in the rootdir and rootdir/src)",
    )
    group.addoption(
        "--loopguard-gc",
        choices=_GC_CHOICES,
        default=None,
        help="garbage-collection pauses: report them in the summary (default) or fail",
    )
    parser.addini("loopguard", "enable loopguard for every test", type="bool", default=False)
    parser.addini(
        "loopguard_scope",
        "packages whose blocking calls and stalls fail tests ('*': all code)",
        type="linelist",
        default=[],
    )
    parser.addini("loopguard_gc", "garbage-collection pauses: report or fail", default="report")
    parser.addini(
        "loopguard_default_allow",
        "apply loopguard's default allow rules (imports, logging, known framework internals)",
        type="bool",
        default=True,
    )
    parser.addini("loopguard_threshold", "stall threshold in seconds", default="0.1")
    parser.addini("loopguard_blocking", "raise, warn or off", default="raise")
    parser.addini(
        "loopguard_pending_tasks", "fail tests that leave tasks pending", type="bool", default=False
    )
    parser.addini("loopguard_allow", "allow rules, one per line", type="linelist", default=[])


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker and the plugin object (inert unless enabled)."""
    config.addinivalue_line(
        "markers",
        "loopguard(enabled=True, threshold=None, blocking=None, pending_tasks=None, allow=()): "
        "loopguard settings for this test; a bare marker enables the checks for it",
    )
    config.pluginmanager.register(LoopguardPlugin(config), "loopguard-plugin")


@dataclass(frozen=True)
class _Settings:
    enabled: bool
    threshold: float
    blocking: str
    pending_tasks: bool
    allow: tuple[Allow, ...]
    gc: str = "report"
    owns_events: bool = False


def _ini_or_option(config: pytest.Config, option: str, ini: str) -> Any:
    value = config.getoption(option)
    return config.getini(ini) if value is None else value


def _threshold(value: object, where: str) -> float:
    try:
        threshold = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise pytest.UsageError(f"{where}: threshold must be a number, got {value!r}") from None
    if not threshold > 0 or math.isnan(threshold):
        raise pytest.UsageError(f"{where}: threshold must be > 0 seconds, got {value!r}")
    return threshold


# Sessions in this process, innermost last (pytester runs sessions inside a test).
_sessions: list[LoopguardPlugin] = []


class LoopguardPlugin:
    """The per-session plugin object (registered as ``"loopguard-plugin"``)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        enabled = _ini_or_option(config, "loopguard", "loopguard")
        blocking = _ini_or_option(config, "loopguard_blocking", "loopguard_blocking")
        if blocking not in _BLOCKING_CHOICES:
            raise pytest.UsageError(
                f"loopguard_blocking must be one of {', '.join(_BLOCKING_CHOICES)}, "
                f"got {blocking!r}"
            )
        try:
            allow = tuple(
                Allow.parse(rule)
                for rule in [
                    *config.getini("loopguard_allow"),
                    *config.getoption("loopguard_allow"),
                ]
            )
        except ValueError as exc:
            raise pytest.UsageError(f"loopguard allow rule: {exc}") from None
        gc = _ini_or_option(config, "loopguard_gc", "loopguard_gc")
        if gc not in _GC_CHOICES:
            raise pytest.UsageError(
                f"loopguard_gc must be one of {', '.join(_GC_CHOICES)}, got {gc!r}"
            )
        self.scope = Scope.configured(  # the command line wins over the ini key
            config.getoption("loopguard_scope") or config.getini("loopguard_scope"),
            config.rootpath,
        )
        self.defaults = _Settings(
            enabled=bool(enabled),
            threshold=_threshold(
                _ini_or_option(config, "loopguard_threshold", "loopguard_threshold"),
                "loopguard_threshold",
            ),
            blocking=str(blocking),
            pending_tasks=bool(
                _ini_or_option(config, "loopguard_pending_tasks", "loopguard_pending_tasks")
            ),
            allow=allow,
            gc=str(gc),
        )
        self.default_allow = bool(config.getini("loopguard_default_allow"))
        self.watchdog: Watchdog | None = None
        self.guard: BlockingGuard | None = None
        self.current: LoopEvents | None = None
        self.settings: _Settings | None = None
        self._min_threshold = self.defaults.threshold
        self._pending: list[str] = []  # findings of the pending-task check, this phase
        self._warned: list[tuple[str, str]] = []  # (nodeid, line): reported, not failed
        self._used = False  # some test ran with the checks on
        self._rule_hits: dict[str, int] = {str(rule): 0 for rule in allow}

    # -- settings ---------------------------------------------------------------------

    def settings_for(self, item: pytest.Item) -> _Settings:
        """Merge ini/command line with the item's ``loopguard`` markers (closest wins)."""
        settings = self.defaults
        markers = list(item.iter_markers("loopguard"))
        if markers and not self.defaults.enabled:
            settings = replace(settings, enabled=True)
        for mark in reversed(markers):
            if mark.args:
                raise pytest.UsageError(
                    f"{item.nodeid}: loopguard marker takes keyword options only "
                    f"({', '.join(_MARKER_OPTIONS)})"
                )
            unknown = sorted(set(mark.kwargs) - set(_MARKER_OPTIONS))
            if unknown:
                raise pytest.UsageError(
                    f"{item.nodeid}: unknown loopguard marker option {unknown[0]!r}; "
                    f"valid: {', '.join(_MARKER_OPTIONS)}"
                )
            kw = mark.kwargs
            if "enabled" in kw:
                settings = replace(settings, enabled=bool(kw["enabled"]))
            if kw.get("threshold") is not None:
                settings = replace(
                    settings, threshold=_threshold(kw["threshold"], f"{item.nodeid}: loopguard")
                )
            if kw.get("blocking") is not None:
                if kw["blocking"] not in _BLOCKING_CHOICES:
                    raise pytest.UsageError(
                        f"{item.nodeid}: loopguard blocking must be one of "
                        f"{', '.join(_BLOCKING_CHOICES)}, got {kw['blocking']!r}"
                    )
                settings = replace(settings, blocking=kw["blocking"])
            if kw.get("pending_tasks") is not None:
                settings = replace(settings, pending_tasks=bool(kw["pending_tasks"]))
            if kw.get("allow"):
                rules = kw["allow"]
                rules = [rules] if isinstance(rules, (str, Allow)) else list(rules)
                try:
                    parsed = tuple(Allow.parse(rule) for rule in rules)
                except ValueError as exc:
                    raise pytest.UsageError(f"{item.nodeid}: loopguard allow: {exc}") from None
                settings = replace(settings, allow=settings.allow + parsed)
        if "loopguard_events" in getattr(item, "fixturenames", ()):
            settings = replace(settings, owns_events=True, enabled=True)
        return settings

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Check every marker up front, and find the lowest threshold any test asks for."""
        for item in items:
            settings = self.settings_for(item)
            if settings.enabled:
                self._min_threshold = min(self._min_threshold, settings.threshold)

    # -- session machinery ----------------------------------------------------------------

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Suspend an enclosing session's checks while this one runs (pytester)."""
        if _sessions:
            _sessions[-1]._suspend()
        _sessions.append(self)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Stop the watchdog and guard; hand rule counts to the xdist controller."""
        self._stop_watchdog()
        self._stop_guard()
        if self in _sessions:
            _sessions.remove(self)
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput[_RULES_KEY] = dict(self._rule_hits)

    def _suspend(self) -> None:
        self._stop_guard()
        self._stop_watchdog()

    def _on_stall(self, event: Event) -> None:
        current = self.current
        if current is not None and _sessions and _sessions[-1] is self:
            current.add(event)

    def _on_blocking(self, event: BlockingCall) -> None:
        current = self.current
        if current is not None and _sessions and _sessions[-1] is self:
            current.add(event)

    def _ensure_watchdog(self) -> Watchdog:
        if self.watchdog is None:
            self.watchdog = Watchdog(
                Config(
                    threshold=self._min_threshold,
                    log=False,
                    record=0,
                    sinks=(CallbackSink(self._on_stall),),
                )
            ).start()
        return self.watchdog

    def _stop_watchdog(self) -> None:
        wd, self.watchdog = self.watchdog, None
        if wd is not None:
            settle(wd)
            wd.stop()

    def _ensure_guard(self) -> BlockingGuard:
        if self.guard is None:
            self.guard = BlockingGuard(
                "off",
                allow=self.defaults.allow,
                defaults=self.default_allow,
                listeners=[self._on_blocking],
                rate_limit=None,
                record=0,
                scope=self.scope.modules,
            ).start()
        return self.guard

    def _stop_guard(self) -> None:
        guard, self.guard = self.guard, None
        if guard is not None:
            self._count_rules(guard)
            guard.stop()

    def _count_rules(self, guard: BlockingGuard) -> None:
        for hit in guard.rules(reset=True):
            if not hit.default:
                key = str(hit.rule)
                self._rule_hits[key] = self._rule_hits.get(key, 0) + hit.hits

    # -- per test ---------------------------------------------------------------------

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, None, None]:
        """Open the test's window: start what it needs, set the guard's mode."""
        settings = self.settings_for(item)
        if not settings.enabled or (_sessions and _sessions[-1] is not self):
            if self.watchdog is not None or self.guard is not None:
                self._suspend()  # a disabled test sees no patches at all
            yield
            return
        self.settings = settings
        self._used = True
        self.current = LoopEvents()
        self._pending = []
        self._ensure_watchdog()
        if settings.blocking == "off":
            self._stop_guard()
        else:
            guard = self._ensure_guard()
            guard.mode = "record" if settings.owns_events else settings.blocking  # type: ignore[assignment]
            guard.scoped_rules = settings.allow[len(self.defaults.allow) :]
        try:
            yield
        finally:
            if self.guard is not None:
                self.guard.mode = "off"
                self._count_rules(self.guard)
                self.guard.scoped_rules = ()
            self.current = None
            self.settings = None

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        """Wrap coroutine tests: trio heartbeat, and the pending-task check."""
        settings = self.settings
        function = getattr(item, "obj", None)
        if (
            settings is None
            or not isinstance(item, pytest.Function)
            or not inspect.iscoroutinefunction(function)
            or hasattr(function, "hypothesis")
        ):
            yield
            return
        assert function is not None
        item.obj = self._wrap(function, settings)
        try:
            yield
        finally:
            item.obj = function

    def _wrap(self, function: Callable[..., Any], settings: _Settings) -> Callable[..., Any]:
        plugin = self

        @functools.wraps(function)
        async def test(*args: Any, **kwargs: Any) -> Any:
            before = asyncio_tasks()
            wd = plugin.watchdog
            with wd.watching_trio_task_run() if wd is not None else contextlib.nullcontext():
                result = await function(*args, **kwargs)
            if settings.pending_tasks and before is not None:
                await asyncio.sleep(0)  # let tasks that just finished be done
                left = [t for t in (asyncio_tasks() or set()) - before if not t.done()]
                if left:
                    plugin._pending.append(describe_tasks(left))
            return result

        return test

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, None]:
        """Fail the phase that stalled or blocked the loop, naming the culprit."""
        outcome = yield
        current, settings = self.current, self.settings
        if current is None or settings is None or self.watchdog is None:
            return
        report: pytest.TestReport = outcome.get_result()
        settle(self.watchdog)
        events = current.take()
        if settings.owns_events:
            fixture = getattr(item, "funcargs", {}).get("loopguard_events")
            if isinstance(fixture, LoopEvents):
                for event in events:
                    fixture.add(event)
            events = []
        stalls = [e for e in events if isinstance(e, Stall) and e.duration >= settings.threshold]
        calls = [e for e in events if isinstance(e, BlockingCall)]
        # One incident, one report: a stall that a warned call caused tells both facts.
        # (The watchdog matched them: the call lasted at least half of the stall.)
        caused = [(s.blocking_call, s.duration / 2) for s in stalls if s.blocking_call]
        calls = [
            c
            for c in calls
            if not (
                c.action == "warn" and any(c.function == f and c.duration >= d for f, d in caused)
            )
        ]
        failing_calls = [e for e in calls if e.action == "raise"]
        noted: list[tuple[str, Event]] = [
            ("warn" if e.action == "warn" else "outside scope", e)
            for e in calls
            if e.action != "raise"
        ]
        failing_stalls = []
        test_thread = threading.current_thread().name
        for stall in stalls:
            if stall.cause == "gc" and settings.gc != "fail":
                noted.append(("gc", stall))
            elif stall.cause == "scheduler":  # the machine, not the code: no CPU was free
                noted.append(("scheduler", stall))
            elif stall.cause == "gil" and stall.hog is not None and stall.hog.thread == test_thread:
                # A loop in another thread (a TestClient's portal) waited while the test
                # itself held the GIL: the test's own work, not the code on the loop.
                noted.append(("test thread", stall))
            elif not self.scope.holds(stall):
                noted.append(("outside scope", stall))
            else:
                failing_stalls.append(stall)
        stalls = failing_stalls
        pending, self._pending = self._pending, []
        full = self.config.get_verbosity() >= 2  # -vv: every frame of every stack
        if noted:
            text = "\n".join(
                f"[{why}] {describe(trimmed([e]), full_stacks=full)}" for why, e in noted
            )
            report.sections.append((_WARN_SECTION, text))
        problems = [*failing_calls, *stalls]
        if not problems and not pending:
            return
        where = {"setup": " in setup", "call": "", "teardown": " in teardown"}[call.when]
        head = f"loopguard: the event loop was blocked{where}"
        if stalls:
            head += f" (stall threshold {settings.threshold * 1000:.0f} ms)"
        head += ":"
        parts = [head, describe(trimmed(problems), full_stacks=full)] if problems else []
        if pending:
            parts.extend(pending)
        text = "\n".join(p for p in parts if p)
        if report.passed and not hasattr(report, "wasxfail"):
            report.outcome = "failed"
            report.longrepr = text
        else:  # failed already (BlockingCallError, most often): add why, next to it
            report.sections.append((_SECTION, text))

    # -- reporting ------------------------------------------------------------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Collect findings reported, not failed (also from xdist workers), for the summary."""
        for title, text in report.sections:
            if title == _WARN_SECTION:
                for line in text.splitlines():
                    if line.startswith("["):
                        self._warned.append((report.nodeid, line))

    @pytest.hookimpl(optionalhook=True)  # an xdist hook: without xdist it is never called
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        """Merge rule counts from an xdist worker."""
        hits = getattr(node, "workeroutput", {}).get(_RULES_KEY, {})
        for rule, count in hits.items():
            self._rule_hits[rule] = self._rule_hits.get(rule, 0) + int(count)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """Warn-mode blocking calls by test, and which allow rules fired."""
        if getattr(self.config, "workerinput", None) is not None:
            return  # an xdist worker: the controller prints the summary
        if self._warned:
            terminalreporter.section("loopguard: reported, not failed")
            for nodeid, line in self._warned:
                terminalreporter.write_line(f"{nodeid}: {line}")
        if self._used and (self._warned or self.config.getoption("verbose") > 0):
            terminalreporter.write_line(f"loopguard scope: {self.scope}")
        if self._rule_hits:
            from ._blocking import RuleHits

            rows = [
                RuleHits(Allow.parse(rule), hits, False) for rule, hits in self._rule_hits.items()
            ]
            terminalreporter.section("loopguard: allow rules")
            for line in format_rules(rows).splitlines()[1:]:
                terminalreporter.write_line(line)


@pytest.fixture
def loopguard_events(request: pytest.FixtureRequest) -> Iterator[LoopEvents]:
    """The stalls and blocking calls of this test, for the test to assert on.

    Requesting it makes the events the test's own: the plugin records blocking calls
    instead of refusing them and does not fail the test for what it hands over.
    Works with the plugin off as well (the fixture then watches this test alone).
    Events of a phase arrive when it ends: read them in the test after the code under
    test has run and its loop has stopped.
    """
    plugin = request.config.pluginmanager.get_plugin("loopguard-plugin")
    if isinstance(plugin, LoopguardPlugin) and plugin.current is not None:
        # The plugin hands this test's events over; they are moved in on each read.
        yield _Live(plugin)
        return
    from .testing import capture

    settings = plugin.settings_for(request.node) if isinstance(plugin, LoopguardPlugin) else None
    threshold = settings.threshold if settings else 0.1
    with capture(threshold=threshold) as seen:
        yield seen


class _Live(LoopEvents):
    """A test's own events while the plugin runs: reading settles the watchdog first."""

    def __init__(self, plugin: LoopguardPlugin) -> None:
        super().__init__()
        self._plugin = plugin

    @property
    def events(self) -> list[Event]:
        plugin = self._plugin
        if plugin.watchdog is not None:
            settle(plugin.watchdog)
        current = plugin.current
        if current is not None:
            for event in current.take():
                self.add(event)
        return super().events
